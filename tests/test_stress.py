"""The stress scripts, run small: the same checks as `make stress`, in CI's time budget."""

from __future__ import annotations

from tests.crashkit import WINDOWS
from tests.stress import chaos, random_kills


def test_chaos_run_has_no_duplicates_and_loses_nothing() -> None:
    figures = chaos.run(operations=200, workers=4, probability=0.4, seed=7)
    assert figures.errors == []
    assert figures.duplicates == 0
    assert figures.lost == 0
    assert figures.completed == 200
    assert figures.retries > 0
    assert len(figures.faults) >= 5  # most kinds of fault were met
    assert "duplicates (server acted twice)" in figures.table()


def test_random_kills() -> None:
    tally = random_kills.run(repetitions=1, seed=3)
    assert sum(tally.values()) == len(WINDOWS) + 1

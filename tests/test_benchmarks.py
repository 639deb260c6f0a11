"""The benchmark runs (tiny), so it does not rot. Speed is never asserted here."""

from __future__ import annotations

import pytest

from benchmarks import bench


def test_quick_benchmark_prints_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "scenario" in out
    assert "idemclient full" in out
    assert "fsyncs per operation" in out
    assert "pending()" in out
    assert "resident memory" in out

"""Every example runs against the local server, so none of them rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quickstart.py", "server effects: 1"),
        ("wrap_client.py", "server effects: 1"),
        ("async_orders.py", "server effects: 10"),
    ],
)
def test_example_runs(name: str, expected: str) -> None:
    assert expected in run(name)


def test_demo_charges_every_invoice_once() -> None:
    out = run("crash_and_resume.py")
    assert "every invoice charged exactly once" in out
    assert "duplicate charges                       0" in out
    assert "resent, replayed by server" in out


def test_batch_is_rerunnable(server_url_and_journal: tuple[str, Path]) -> None:
    url, journal = server_url_and_journal
    first = run("charge_batch.py", url, str(journal), "3")
    assert first.splitlines()[-1] == '{"from_journal": 0, "replayed_by_server": 0, "sent": 3}'
    second = run("charge_batch.py", url, str(journal), "3")
    assert second.splitlines()[-1] == '{"from_journal": 3, "replayed_by_server": 0, "sent": 0}'

"""Shared by the crash tests and the random-kill stress script: run the crash child, check."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import idemclient
from idemclient.testing import IdempotentServer

CHILD = Path(__file__).with_name("crash_child.py")

#: window -> the killed operation's possible states in the journal just after the crash
WINDOWS = {
    "registered": {"pending"},  # journaled and claimed, nothing sent
    "sending": {"pending"},  # claimed, about to send
    "answered": {"pending"},  # the server acted and answered; nothing recorded
    "retrying": {"pending"},  # sleeping between attempts
    "recording": {"pending"},  # about to record the completion
    # Recorded, but completion writes are batched (within the journal's flush_delay): the
    # crash may beat it (then a rerun resends and the server replays). Once written, a rerun
    # sends nothing for it.
    "completed": {"pending", "completed"},
}


def child_command(
    server: IdempotentServer, journal: Path | str, count: int, kill: str, victim: int, mode: str
) -> list[str]:
    return [sys.executable, str(CHILD), server.url, str(journal), str(count), kill, str(victim),
            mode]  # fmt: skip


def run_child(
    server: IdempotentServer, journal: Path | str, count: int, kill: str, victim: int, mode: str
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        child_command(server, journal, count, kill, victim, mode),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if kill == "none":
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "done"
    return result


def check_exactly_once(server: IdempotentServer, journal_path: Path | str, count: int) -> None:
    """Each operation acted on once by the server, completed in the journal, same key. The
    journal is a path (SQLite) or a URL (PostgreSQL)."""
    per_path = Counter(e.path for e in server.effects)
    assert per_path == Counter({f"/ops/{i}": 1 for i in range(count)}), per_path
    with idemclient.open_journal(journal_path) as journal:
        ops = {op.name or op.key: op for op in journal.operations()}
    assert sorted(ops) == sorted(f"op-{i}" for i in range(count))
    assert {op.state for op in ops.values()} == {"completed"}
    key_of_path = {e.path: e.key for e in server.effects}
    for i in range(count):
        assert ops[f"op-{i}"].key == key_of_path[f"/ops/{i}"]

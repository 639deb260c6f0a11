"""The crash matrix: SIGKILL at every window of an operation's life, then rerun or resume.

A child process runs a batch of named operations against the real loopback server and kills
itself (SIGKILL, from an event hook) at one exact window of one operation. Then the batch is
finished, by a rerun of the same script or by `resume_pending` and a rerun. Every time: the
server acted exactly once per operation, no operation is lost, and the journal agrees with the
server about every key.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import idemclient
from idemclient.testing import IdempotentServer

CHILD = Path(__file__).with_name("crash_child.py")
COUNT = 4
VICTIM = 2
# window -> what the killed operation looks like in the journal just after the crash
WINDOWS = {
    "registered": "pending",  # journaled and claimed, nothing sent
    "sending": "pending",  # claimed, about to send
    "answered": "pending",  # the server acted and answered; nothing recorded
    "retrying": "pending",  # sleeping between attempts
    "recording": "pending",  # about to write the completion
    "completed": "completed",  # recorded: a rerun must not send at all
}


def run_child(server: IdempotentServer, journal: Path, kill: str, mode: str) -> int:
    result = subprocess.run(
        [sys.executable, str(CHILD), server.url, str(journal), str(COUNT), kill, str(VICTIM),
         mode],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if kill == "none":
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "done"
    return result.returncode


def check_exactly_once(server: IdempotentServer, journal_path: Path) -> None:
    per_path = Counter(e.path for e in server.effects)
    assert per_path == Counter({f"/ops/{i}": 1 for i in range(COUNT)}), per_path
    with idemclient.Journal(journal_path) as journal:
        ops = {op.name or op.key: op for op in journal.operations()}
    assert sorted(ops) == [f"op-{i}" for i in range(COUNT)]
    assert {op.state for op in ops.values()} == {"completed"}
    # the journal and the server agree on the key that performed each operation
    key_of_path = {e.path: e.key for e in server.effects}
    for i in range(COUNT):
        assert ops[f"op-{i}"].key == key_of_path[f"/ops/{i}"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("finish", ["rerun", "resume"])
def test_kill_at_window(
    server: IdempotentServer, journal_path: Path, window: str, mode: str, finish: str
) -> None:
    if window == "retrying":
        server.inject("status", status=503, path=f"/ops/{VICTIM}")
    code = run_child(server, journal_path, window, mode)
    assert code == -signal.SIGKILL
    with idemclient.Journal(journal_path) as journal:
        victim = journal.get(f"op-{VICTIM}")
        assert victim is not None
        assert victim.state == WINDOWS[window]
        assert journal.get(f"op-{VICTIM + 1}") is None  # the batch stopped there
    acted = server.effect_count
    if finish == "resume":
        with idemclient.Client(base_url=server.url, journal=journal_path, timeout=10.0) as client:
            results = client.resume_pending()
        expected = [] if WINDOWS[window] == "completed" else ["completed"]
        assert [r.outcome for r in results] == expected
        if window in ("answered", "recording"):
            assert results[0].response is not None
            assert results[0].response.extensions["idempotency"]["replayed"] is True
            assert server.effect_count == acted  # replayed, not performed again
    run_child(server, journal_path, "none", mode)
    check_exactly_once(server, journal_path)


def test_an_operation_that_keeps_killing_the_process_is_parked(
    server: IdempotentServer, journal_path: Path
) -> None:
    # The send of op-2 kills the process every time (here: a hook; in life: say, a body
    # that exhausts memory). Reruns must not crash forever.
    for _ in range(4):  # the first crash, then max_recoveries (3) recoveries that crash again
        assert run_child(server, journal_path, "sending", "sync") == -signal.SIGKILL
    result = subprocess.run(
        [sys.executable, str(CHILD), server.url, str(journal_path), str(COUNT), "sending",
         str(VICTIM), "sync"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "OperationParkedError" in result.stderr
    with idemclient.Journal(journal_path) as journal:
        op = journal.get(f"op-{VICTIM}")
        assert op is not None
        assert (op.state, op.recoveries) == ("parked", 4)
        assert op.last_error is not None
        assert "parked after 4 recoveries" in op.last_error
    with idemclient.Client(base_url=server.url, journal=journal_path) as client:
        assert client.resume_pending() == []  # parked operations are not resumed
    assert server.effect_count == VICTIM  # op-0 and op-1 only
    # a person looks, fixes the cause, and unparks it: the same key goes out
    with idemclient.Journal(journal_path) as journal:
        journal.unpark(f"op-{VICTIM}")
    run_child(server, journal_path, "none", "sync")
    check_exactly_once(server, journal_path)

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
from pathlib import Path

import pytest

import idemclient
from idemclient.testing import IdempotentServer
from tests.crashkit import WINDOWS, child_command, run_child
from tests.crashkit import check_exactly_once as _check

COUNT = 4
VICTIM = 2


def check_exactly_once(server: IdempotentServer, journal_path: Path | str) -> None:
    _check(server, journal_path, COUNT)


# Every window on both backends, in both shells: the async shell on PostgreSQL writes through
# psycopg's async connections on the event loop, a path of its own.
CASES = [
    pytest.param(backend, mode, id=f"{backend}-{mode}")
    for backend in ("sqlite", "postgres")
    for mode in ("sync", "async")
]


def journal_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    if backend == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        return dsn
    return tmp_path / "journal.sqlite3"


@pytest.mark.parametrize(("backend", "mode"), CASES)
@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("finish", ["rerun", "resume"])
def test_kill_at_window(
    server: IdempotentServer,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
    window: str,
    mode: str,
    finish: str,
) -> None:
    journal_path = journal_for(backend, request, tmp_path)
    if window == "retrying":
        server.inject("status", status=503, path=f"/ops/{VICTIM}")
    code = run_child(server, journal_path, COUNT, window, VICTIM, mode).returncode
    assert code == -signal.SIGKILL
    with idemclient.open_journal(journal_path) as journal:
        victim = journal.get(f"op-{VICTIM}")
        assert victim is not None
        assert victim.state in WINDOWS[window]
        # Earlier operations were answered; their completions are written in batches, so the
        # last few may not be in the journal yet (a resume gets the server's replay).
        earlier = [journal.get(f"op-{i}") for i in range(VICTIM)]
        assert all(op is not None and op.state in WINDOWS["completed"] for op in earlier)
        assert journal.get(f"op-{VICTIM + 1}") is None  # the batch stopped there
        unfinished = {op.name for op in journal.pending()}
    acted = server.effect_count
    if finish == "resume":
        with idemclient.Client(base_url=server.url, journal=journal_path, timeout=10.0) as client:
            results = client.resume_pending()
        assert {r.operation.name: r.outcome for r in results} == dict.fromkeys(
            unfinished, "completed"
        )
        for result in results:
            if result.operation.name != f"op-{VICTIM}" or window in ("answered", "recording"):
                # the server had acted: it replays
                assert result.response is not None
                assert result.response.extensions["idempotency"]["replayed"] is True
        if window not in ("registered", "sending", "retrying"):
            assert server.effect_count == acted  # replayed, not performed again
    run_child(server, journal_path, COUNT, "none", VICTIM, mode)
    check_exactly_once(server, journal_path)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_an_operation_that_keeps_killing_the_process_is_parked(
    server: IdempotentServer, request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    journal_path = journal_for(backend, request, tmp_path)
    # The send of op-2 kills the process every time (here: a hook; in life: say, a body
    # that exhausts memory). Reruns must not crash forever.
    for _ in range(4):  # the first crash, then max_recoveries (3) recoveries that crash again
        result = run_child(server, journal_path, COUNT, "sending", VICTIM, "sync")
        assert result.returncode == -signal.SIGKILL
    result = subprocess.run(
        child_command(server, journal_path, COUNT, "sending", VICTIM, "sync"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "OperationParkedError" in result.stderr
    with idemclient.open_journal(journal_path) as journal:
        op = journal.get(f"op-{VICTIM}")
        assert op is not None
        assert (op.state, op.recoveries) == ("parked", 4)
        assert op.last_error is not None
        assert "parked after 4 recoveries" in op.last_error
    with idemclient.Client(base_url=server.url, journal=journal_path) as client:
        assert client.resume_pending() == []  # parked operations are not resumed
    assert server.effect_count == VICTIM  # op-0 and op-1 only
    # a person looks, fixes the cause, and unparks it: the same key goes out
    with idemclient.open_journal(journal_path) as journal:
        journal.unpark(f"op-{VICTIM}")
    run_child(server, journal_path, COUNT, "none", VICTIM, "sync")
    check_exactly_once(server, journal_path)

"""Several processes and threads on one journal; a paused holder taken over. On PostgreSQL
each process plays a host of its own (`IDEMCLIENT_HOST`): a holder on another host cannot be
checked for liveness, only waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import idemclient
from idemclient.testing import IdempotentServer

HERE = Path(__file__).parent
BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgres"])


def journal_for(backend: str, request: pytest.FixtureRequest, journal_path: Path) -> str:
    if backend == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        return dsn
    return str(journal_path)


def as_host(number: int) -> dict[str, str]:
    """The environment of a child process playing host number `number`."""
    return {**os.environ, "IDEMCLIENT_HOST": f"host-{number}"}


@BACKENDS
def test_processes_and_threads_share_one_journal(
    server: IdempotentServer, request: pytest.FixtureRequest, journal_path: Path, backend: str
) -> None:
    """The same named batch started on four processes (four hosts on PostgreSQL) at once."""
    journal = journal_for(backend, request, journal_path)
    count, processes = 30, 4
    idemclient.open_journal(journal).close()  # created once, then shared
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "contention_child.py"),
                server.url,
                journal,
                str(count),
                str(seed),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=as_host(seed),
        )
        for seed in range(processes)
    ]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        outputs.append(out.split())
    # every operation performed exactly once by the server, whoever sent it
    assert Counter(e.path for e in server.effects) == Counter(
        {f"/ops/{i}": 1 for i in range(count)}
    )
    assert server.duplicates() == 0
    # each of the 8 workers finished every operation: sent once, otherwise replayed
    sent = sum(int(o[1]) for o in outputs)
    replayed = sum(int(o[2]) for o in outputs)
    assert sent + replayed == count * processes * 2
    with idemclient.open_journal(journal) as opened:
        ops = opened.operations()
    assert len(ops) == count
    assert {op.state for op in ops} == {"completed"}
    keys = {e.path: e.key for e in server.effects}
    assert all(keys[f"/ops/{op.name.removeprefix('op-')}"] == op.key for op in ops if op.name)


PAUSED_CHILD = """
import sys
import idemclient

url, journal = sys.argv[1:3]
with idemclient.Client(base_url=url, journal=journal, timeout=30.0) as client:
    with idemclient.operation("paused-op"):
        response = client.post("/ops/paused", json={"op": "paused"})
print(response.status_code, flush=True)
"""


@BACKENDS
def test_a_paused_holder_taken_over_cannot_overwrite(
    server: IdempotentServer,
    request: pytest.FixtureRequest,
    journal_path: Path,
    tmp_path: Path,
    backend: str,
) -> None:
    """SIGSTOP the holder mid-request; once its lease has expired another process (on
    PostgreSQL, on another host) takes the operation over; when the first wakes up, its late
    write is fenced out."""
    journal = journal_for(backend, request, journal_path)
    script = tmp_path / "paused.py"
    script.write_text(PAUSED_CHILD)
    server.inject("slow_after_acting", seconds=0.5)
    child = subprocess.Popen(
        [sys.executable, str(script), server.url, journal],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=as_host(0),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while server.effect_count == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGSTOP)
        # A second process whose clock says the holder's lease ran out long ago.
        later = idemclient.open_journal(journal, clock=lambda: time.time() + 3600)
        with (
            idemclient.Client(base_url=server.url, journal=later, timeout=10.0) as client,
            idemclient.operation("paused-op"),
        ):
            taken = client.post("/ops/paused", json={"op": "paused"})
        assert taken.extensions["idempotency"]["replayed"] is True
        assert taken.extensions["idempotency"]["attempts"] == 2
        later.close()
    finally:
        os.kill(child.pid, signal.SIGCONT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == "201"  # the woken holder still hands its caller the answer
    assert server.effect_count == 1
    with idemclient.open_journal(journal) as opened:
        op = opened.get("paused-op")
        stored = opened.stored_response("paused-op")
    assert op is not None
    assert stored is not None
    assert (op.state, op.attempts) == ("completed", 2)
    # the recorded answer is the taker's (a replay), not the paused holder's late one
    assert {k.lower(): v for k, v in stored.headers}["idempotent-replayed"] == "true"


@BACKENDS
def test_several_resumes_at_once_perform_each_operation_once(
    server: IdempotentServer, request: pytest.FixtureRequest, journal_path: Path, backend: str
) -> None:
    """Operators (or cron) run `idemclient resume` three times at once on one journal (on
    PostgreSQL from three hosts)."""
    journal = journal_for(backend, request, journal_path)
    down = IdempotentServer()
    down_url = down.url
    down.stop()
    count = 12
    with idemclient.Client(
        base_url=down_url, journal=journal, retry=idemclient.RetryPolicy(max_attempts=1)
    ) as client:
        for i in range(count):
            try:
                with idemclient.operation(f"op-{i}"):
                    client.post(f"/ops/{i}", json={"op": i})
            except idemclient.RetriesExhaustedError:
                pass
    server.inject("slow_after_acting", seconds=0.05, times=count)  # resumes overlap
    resumes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "idemclient",
                "--journal",
                journal,
                "resume",
                "--rebase",
                f"{down_url}={server.url}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=as_host(number),
        )
        for number in range(3)
    ]
    for process in resumes:
        _, err = process.communicate(timeout=120)
        assert "database is locked" not in err
        assert process.returncode in (0, 1), err  # 1: some were held by another resume
    assert Counter(e.path for e in server.effects) == Counter(
        {f"/ops/{i}": 1 for i in range(count)}
    )
    with idemclient.open_journal(journal) as opened:
        assert {op.state for op in opened.operations()} == {"completed"}

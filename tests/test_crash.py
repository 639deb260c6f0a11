"""Real crashes: a child process is killed with SIGKILL mid-request, then resumed or rerun.

The server acts on the request and holds its answer back, the test kills the client while it
waits, and a resume (or a rerun of the same script) must finish the operation with the same
key, so that the server acts exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import idemclient
from idemclient.testing import IdempotentServer

CHILD = """
import sys
import idemclient

url, journal, name = sys.argv[1:4]
with idemclient.Client(base_url=url, journal=journal, timeout=30.0) as client:
    with idemclient.operation(name):
        response = client.post("/charges", json={"invoice": name, "amount": 500})
print(response.status_code, response.extensions["idempotency"]["replayed"], flush=True)
"""


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "charge.py"
    path.write_text(CHILD)
    return path


def wait_until(condition: object, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def killed_mid_request(server: IdempotentServer, journal_path: Path, child_script: Path) -> str:
    """Run the child until the server has acted, then SIGKILL it while it awaits the answer."""
    server.inject("slow_after_acting", seconds=2.0)
    child = subprocess.Popen(
        [sys.executable, str(child_script), server.url, str(journal_path), "invoice-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: server.effect_count == 1)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        assert child.stdout is not None
        assert child.stderr is not None
        child.stdout.close()
        child.stderr.close()
    return "invoice-1"


def test_killed_mid_request_then_resumed(
    server: IdempotentServer, journal_path: Path, killed_mid_request: str
) -> None:
    with idemclient.Journal(journal_path) as journal:
        op = journal.get(killed_mid_request)
        assert op is not None
        assert (op.state, op.attempts) == ("pending", 1)
    # the dead child's lease is free at once: no waiting for it to expire
    with idemclient.Client(base_url=server.url, journal=journal_path, timeout=10.0) as client:
        results = client.resume_pending()
    assert [r.outcome for r in results] == ["completed"]
    response = results[0].response
    assert response is not None
    assert response.status_code == 201
    assert response.extensions["idempotency"]["replayed"] is True
    assert response.extensions["idempotency"]["key"] == op.key
    assert server.effect_count == 1
    assert server.requests_for(op.key) == 2


def test_killed_mid_request_then_rerun(
    server: IdempotentServer,
    journal_path: Path,
    child_script: Path,
    killed_mid_request: str,
) -> None:
    rerun = subprocess.run(
        [sys.executable, str(child_script), server.url, str(journal_path), killed_mid_request],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.split() == ["201", "True"]
    # and a third run is answered from the journal without sending at all
    third = subprocess.run(
        [sys.executable, str(child_script), server.url, str(journal_path), killed_mid_request],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert third.stdout.split() == ["201", "True"]
    assert server.effect_count == 1
    with idemclient.Journal(journal_path) as journal:
        op = journal.get(killed_mid_request)
        assert op is not None
        assert op.state == "completed"
        assert server.requests_for(op.key) == 2

"""A fleet on one PostgreSQL journal: workers on four hosts (`IDEMCLIENT_HOST`) run one
batch at once, two are killed with SIGKILL mid-batch, a resumer on a fifth host finishes
(taking over the killed hosts' operations once their leases end): every order performed
once, none lost. The same run is `make fleet-demo`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import idemclient
from idemclient import PostgresJournal
from idemclient.testing import Effect, IdempotentServer, Reply

DEMO = Path(__file__).parent.parent / "examples" / "fleet_demo.py"


def test_four_hosts_two_killed_a_fifth_resumes_every_order_once(pg_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO), "--dsn", pg_dsn], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SIGKILL to host-1 and host-2" in out
    assert "orders in the journal: 40, all completed" in out
    assert "orders the server performed: 40" in out
    assert out.rstrip().endswith("duplicates 0")


class Trickling(IdempotentServer):
    """Answers with 16 chunks 0.4 s apart: about 6 s in all, each read well inside a 1 s
    read timeout (an answer that trickles in, or a long stream)."""

    def respond(self, effect: Effect, number: int) -> Reply:
        return Reply(200, tuple(b'{"part": %d}\n' % i for i in range(16)))

    def pace(self, effect: Effect, index: int) -> None:
        time.sleep(0.4)


def test_a_resumer_on_another_host_leaves_an_answer_that_outlasts_its_lease(
    pg_dsn: str,
) -> None:
    """The holder's lease is its timeouts (4 x 1 s, no margin); its answer takes 6 s. A
    resume on another host runs after the first lease has ended, while the answer is still
    coming in: the holder's journal has renewed the lease, so the resume leaves the operation
    to it (in progress) instead of sending it again under the same key."""
    with Trickling() as server, PostgresJournal(pg_dsn, lease_margin=0.0) as journal:
        client = idemclient.Client(base_url=server.url, journal=journal, timeout=1.0)
        answers: list[httpx.Response] = []

        def hold() -> None:
            with idemclient.operation("long-answer"):
                answers.append(client.post("/reports", json={"month": 11}))

        holder = threading.Thread(target=hold)
        started = time.monotonic()
        holder.start()
        while server.effect_count == 0:
            assert time.monotonic() - started < 10, "the server never acted"
            time.sleep(0.01)
        time.sleep(max(0.0, started + 4.5 - time.monotonic()))  # past the first lease
        resume = subprocess.run(
            [sys.executable, "-m", "idemclient", "--journal", pg_dsn, "resume"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "IDEMCLIENT_HOST": "another-host"},
        )  # fmt: skip
        assert time.monotonic() - started < 6.0, "the answer ended before the resume ran"
        holder.join(30)
        client.close()
        assert "in_progress" in resume.stdout + resume.stderr, resume
        assert [a.status_code for a in answers] == [200]
        key = answers[0].extensions["idempotency"]["key"]
        assert server.requests_for(key) == 1  # never sent again
        op = journal.get("long-answer")
        assert op is not None
        assert op.state == "completed"

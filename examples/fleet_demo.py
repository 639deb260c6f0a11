"""The fleet demo (`make fleet-demo`): one PostgreSQL journal shared by workers on many hosts.

1. Starts a throwaway PostgreSQL server (initdb in a temporary directory, 127.0.0.1 only) and
   a local idempotent HTTP server.
2. Four workers "on four hosts" (`IDEMCLIENT_HOST=host-1` ... `host-4`) run the same named
   batch of orders at once; two of them are killed with SIGKILL in the middle.
3. A resumer on a fifth host finishes what they left: an operation a killed worker held is
   taken over once its lease ends (a host cannot see whether a process on another host
   still runs), and sent again under its key, so the server replays instead of acting twice.
4. Prints what happened, ending with the number of duplicate orders: 0.

Run: .venv/bin/python examples/fleet_demo.py [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import idemclient
from idemclient.testing import IdempotentServer

COUNT = 40
HOSTS = 4
LEASE_MARGIN = 1.0  # seconds a lease outlasts its request's timeouts (30 by default)
TIMEOUT = 1.0  # seconds per request phase: a lease is 4 x this + the margin
ROOT = Path(__file__).resolve().parent.parent


def worker(url: str, dsn: str, count: int) -> int:
    """The batch, as each host runs it: orders already done are answered from the journal,
    one another live host holds is left to it (a resume finishes it if that host dies)."""
    done = held = 0
    journal = idemclient.PostgresJournal(dsn, lease_margin=LEASE_MARGIN)
    with idemclient.Client(base_url=url, journal=journal, timeout=TIMEOUT) as client:
        for i in range(count):
            try:
                with idemclient.operation(f"order-{i:03d}"):
                    client.post(f"/orders/{i}", json={"order": i, "amount": 500})
                done += 1
            except idemclient.OperationInProgressError:
                held += 1
    journal.close()
    print(f"{os.environ.get('IDEMCLIENT_HOST')}: {done} done, {held} held by other hosts")
    return 0


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn is not None:
        yield dsn
        return
    sys.path.insert(0, str(ROOT))
    from tests import pgserver  # the throwaway server the test suite uses

    reason = pgserver.unavailable()
    if reason is not None:
        raise SystemExit(f"fleet demo: {reason}")
    with pgserver.postgres_server() as server:
        yield server.create_database()


def start_worker(host: str, url: str, dsn: str) -> subprocess.Popen[str]:
    env = {**os.environ, "IDEMCLIENT_HOST": host}
    return subprocess.Popen(
        [sys.executable, __file__, "worker", url, dsn, str(COUNT)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker(argv[1], argv[2], int(argv[3]))
    parser = argparse.ArgumentParser(description="idemclient fleet demo")
    parser.add_argument("--dsn", help="a PostgreSQL database to use (default: a throwaway one)")
    args = parser.parse_args(argv)
    with database(args.dsn) as dsn, IdempotentServer(act_seconds=0.05) as server:
        with idemclient.PostgresJournal(dsn) as journal:  # creates its schema
            print(f"PostgreSQL journal {journal.path}, API on {server.url}")
        print(f"{HOSTS} workers on {HOSTS} hosts run the same batch of {COUNT} orders")
        workers = [start_worker(f"host-{n}", server.url, dsn) for n in range(1, HOSTS + 1)]
        deadline = time.monotonic() + 60
        while server.effect_count < COUNT // 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        for victim in workers[:2]:
            os.kill(victim.pid, signal.SIGKILL)
        print(f"SIGKILL to host-1 and host-2 after {server.effect_count} orders")
        for process in workers:
            out, err = process.communicate(timeout=120)
            if process.returncode == 0:
                print("  " + out.strip())
            elif process.returncode != -signal.SIGKILL:
                print(err, file=sys.stderr)
                return 1
        os.environ["IDEMCLIENT_HOST"] = "host-5"  # the resumer: another host
        rounds = 0
        journal = idemclient.PostgresJournal(dsn, lease_margin=LEASE_MARGIN)
        with journal, idemclient.Client(base_url=server.url, journal=journal,
                                        timeout=TIMEOUT) as client:  # fmt: skip
            while client.journal.pending() and time.monotonic() < deadline + 60:
                rounds += 1
                report = client.resume_pending(concurrency=4)
                if any(r.outcome == "in_progress" for r in report):
                    time.sleep(0.5)  # held by a killed host until its lease ends
            ops = client.journal.operations()
        states = {op.state for op in ops}
        print(f"host-5 resumed the rest in {rounds} rounds (waiting out the killed hosts' leases)")
        print(f"orders in the journal: {len(ops)}, all {'/'.join(sorted(states))}")
        print(f"orders the server performed: {server.effect_count}")
        print(f"requests the server saw: {server.request_count}")
        print(f"duplicates {server.duplicates()}")
        ok = server.duplicates() == 0 and len(ops) == COUNT and states == {"completed"}
        ok = ok and server.effect_count == COUNT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

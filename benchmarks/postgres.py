"""The PostgreSQL journal, side by side with bare httpx (part of `make bench`).

    python -m benchmarks.postgres [--quick] [--dsn postgresql://...]

Without `--dsn` it starts a throwaway PostgreSQL server (`tests/pgserver.py`: initdb in a
temporary directory, 127.0.0.1 only) and stops it at the end. It prints:

* sequential POSTs, 32 threads and 32 tasks: bare httpx against idemclient on PostgreSQL
  (variants alternating, medians of several repetitions, the ratio to httpx);
* WAL flushes per operation on the server (`pg_stat_wal.wal_sync`): a registration is one
  synchronous commit, completions are batched;
* a backlog of pending operations resumed against a server answering in 20 ms, at a given
  concurrency, against the ideal (operations x latency / concurrency).

Speed is never asserted by the test suite; this only prints.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

import idemclient
from idemclient import PostgresJournal

from .bench import (
    BODY,
    Sample,
    Variant,
    _limits,
    local_server,
    run_sequential,
    run_tasks,
    run_threads,
    side_by_side,
    table,
)


@contextlib.contextmanager
def a_database(dsn: str | None) -> Iterator[Callable[[], str]]:
    """A maker of fresh databases: on the server at `dsn`, or on a throwaway one."""
    if dsn is not None:
        yield lambda: dsn
        return
    from tests import pgserver

    reason = pgserver.unavailable()
    if reason is not None:
        raise SystemExit(f"benchmarks.postgres: {reason}")
    with pgserver.postgres_server() as server:
        yield server.create_database


def pg_variant(make_database: Callable[[], str], opened: list[PostgresJournal]) -> Variant:
    def journal() -> PostgresJournal:
        opened.append(PostgresJournal(make_database(), pool_size=64))
        return opened[-1]

    return Variant(
        "idemclient postgres",
        lambda url, _: idemclient.wrap(
            httpx.Client(base_url=url, limits=_limits()), journal=journal()
        ),
        lambda url, _: idemclient.wrap(
            httpx.AsyncClient(base_url=url, limits=_limits()), journal=journal()
        ),
    )


def bare() -> Variant:
    return Variant(
        "httpx",
        lambda url, _: httpx.Client(base_url=url, limits=_limits()),
        lambda url, _: httpx.AsyncClient(base_url=url, limits=_limits()),
    )


def measure(variant: Variant, scenario: str, url: str, ops: int, workers: int) -> Sample:
    here = Path(".")
    if scenario == "tasks":
        return run_tasks(lambda: variant.async_(url, here), ops, workers)
    with variant.sync(url, here) as client:
        for _ in range(20):  # warm the connections, the pool, the journal
            client.post("/charges", json=BODY)
        if scenario == "sequential":
            return run_sequential(client, ops)
        return run_threads(client, ops, workers)


def wal_syncs(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
    return int(row[0]) if row else 0


def wal_per_operation(url: str, dsn: str, ops: int, workers: int) -> float:
    """WAL flushes on the server per journaled operation. A backend reports its counts when
    it ends (or now and then): the journal's connections are closed before reading."""
    before = wal_syncs(dsn)
    with PostgresJournal(dsn, pool_size=64) as journal:
        client = idemclient.wrap(httpx.Client(base_url=url, limits=_limits()), journal=journal)
        with client:
            if workers == 1:
                run_sequential(client, ops)
            else:
                run_threads(client, ops, workers)
    time.sleep(1.5)  # the ended backends' counts reach pg_stat_wal
    return (wal_syncs(dsn) - before) / ops


def backlog(url: str, dsn: str, operations: int) -> None:
    """`operations` pending operations, registered and never sent, in one statement."""
    import psycopg

    with PostgresJournal(dsn):
        pass  # the schema
    now = time.time()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO idemclient.operations (name, key, state, method, url, headers, body, "
            "fingerprint, attempts, created_at, updated_at, lease_version, key_header, "
            "key_style) SELECT 'op-' || i, %s || i, 'pending', 'POST', %s, "
            "'[[\"content-type\", \"application/json\"]]', %s, 'fp-' || i, 0, %s + i * 1e-6, "
            "%s, 0, 'Idempotency-Key', 'bare' FROM generate_series(1, %s) AS i",
            (f"{uuid.uuid4()}-", f"{url}/charges", b'{"amount": 500}', now, now, operations),
        )


def resume_backlog(url: str, dsn: str, operations: int, concurrency: int) -> float:
    backlog(url, dsn, operations)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    with PostgresJournal(dsn, pool_size=concurrency + 4) as journal, idemclient.Client(
        base_url=url, journal=journal, limits=limits
    ) as client:  # fmt: skip
        started = time.perf_counter()
        report = client.resume_pending(concurrency=concurrency)
        seconds = time.perf_counter() - started
    assert all(r.outcome == "completed" for r in report), "the backlog did not finish"
    assert len(report) == operations
    return seconds


def bare_backlog(url: str, operations: int, concurrency: int) -> float:
    """The same POSTs sent by bare httpx from `concurrency` threads: what this machine's
    HTTP stack can do at all, the ceiling a resume is measured against beside the ideal."""
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=url, limits=limits) as client:

        def one(i: int) -> None:
            key = {"Idempotency-Key": f"bare-{i}"}
            client.post("/charges", content=b'{"amount": 500}', headers=key).raise_for_status()

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(concurrency)))  # warm the connections
            started = time.perf_counter()
            list(pool.map(one, range(concurrency, concurrency + operations)))
            return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="idemclient on PostgreSQL, side by side")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and fast")
    parser.add_argument("--dsn", help="a PostgreSQL server to use (default: a throwaway one)")
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=20.0, metavar="MS")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if args.quick:
        args.ops, args.repetitions, args.workers, args.backlog = 64, 1, 4, 64
    opened: list[PostgresJournal] = []
    with a_database(args.dsn) as make_database:
        dsn = make_database()
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"PostgreSQL {version[0] if version else '?'} on 127.0.0.1, "
              "synchronous_commit on for registrations")  # fmt: skip
        found = [bare(), pg_variant(make_database, opened)]
        kinds = {"sequential": "sequential", f"{args.workers} threads": "threads",
                 f"{args.workers} tasks": "tasks"}  # fmt: skip
        results: dict[tuple[str, str], list[Sample]] = {}
        with local_server() as url:
            for rep in range(args.repetitions):
                for scenario, kind in kinds.items():
                    for variant in found if rep % 2 == 0 else list(reversed(found)):
                        try:
                            sample = measure(variant, kind, url, args.ops, args.workers)
                        finally:
                            while opened:
                                opened.pop().close()
                        results.setdefault((scenario, variant.name), []).append(sample)
            rows = side_by_side(results, list(kinds), [v.name for v in found])
            print(f"\n{args.ops} POSTs per measurement, medians of {args.repetitions} repetitions")
            print(table(rows))
            wal: list[list[str]] = [["threads", "WAL flushes per operation"]]
            for workers in (1, args.workers):
                ops = max(workers, (50 if args.quick else 500) // workers * workers)
                per_op = wal_per_operation(url, make_database(), ops, workers)
                wal.append([str(workers), f"{per_op:.2f}"])
            print()
            print(table(wal))
        with local_server(args.latency) as slow:
            seconds = resume_backlog(slow, make_database(), args.backlog, args.concurrency)
            bare_seconds = bare_backlog(slow, args.backlog, args.concurrency)
        ideal = args.backlog * args.latency / 1000 / args.concurrency
        print(
            f"\nbacklog: {args.backlog:,} pending operations resumed at concurrency "
            f"{args.concurrency} against a server answering in {args.latency:g} ms "
            f"(ideal: operations x latency / concurrency = {ideal:.2f} s)"
        )
        print(
            table([
                ["sender", "seconds", "x of the ideal", "x of bare httpx"],
                ["bare httpx, same POSTs", f"{bare_seconds:.2f}", f"{ideal / bare_seconds:.2f}",
                 "1.00"],
                ["idemclient resume", f"{seconds:.2f}", f"{ideal / seconds:.2f}",
                 f"{bare_seconds / seconds:.2f}"],
            ])
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The PostgreSQL journal, side by side with bare httpx (part of `make bench`).

    python -m benchmarks.postgres [--quick] [--dsn postgresql://...]

Without `--dsn` it starts a throwaway PostgreSQL server (`tests/pgserver.py`: initdb in a
temporary directory, 127.0.0.1 only) and stops it at the end. It prints:

* sequential POSTs, 32 threads and 32 tasks: bare httpx, the floor (bare httpx plus one
  INSERT committed synchronously through a psycopg pool before each send) and idemclient on
  PostgreSQL (variants alternating, medians of several repetitions), with the ratios of
  idemclient to the floor and to httpx;
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
import json
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


_FLOOR_TABLE = (
    "CREATE TABLE IF NOT EXISTS floor (key text PRIMARY KEY, name text UNIQUE, state text, "
    "method text, url text, headers text, body bytea, fingerprint text, attempts int, "
    "created_at float8, updated_at float8, lease_owner text, lease_expires float8)"
)
_FLOOR_INSERT = (
    "INSERT INTO floor VALUES (%s, NULL, 'pending', %s, %s, %s, %s, %s, 1, %s, %s, %s, %s) "
    "ON CONFLICT DO NOTHING RETURNING key"
)


def _floor_row(request: httpx.Request) -> tuple[object, ...]:
    now = time.time()
    headers = json.dumps([[k, v] for k, v in request.headers.items()])
    return (str(uuid.uuid4()), request.method, str(request.url), headers, request.content,
            "fp", now, now, "host:1:2", now + 60)  # fmt: skip


class PostgresFloor(httpx.BaseTransport):
    """The floor of a journaled POST on PostgreSQL: one INSERT of a journal-sized row,
    committed synchronously (autocommit, `synchronous_commit=on`) on a connection of a
    psycopg pool, before the send; nothing else, not even the completion's write. What the
    design requires of a journal on PostgreSQL, and what idemclient there is measured
    against, beside bare httpx."""

    def __init__(self, dsn: str) -> None:
        import psycopg_pool

        self.inner = httpx.HTTPTransport(limits=_limits())
        self.pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=64, open=True,
                                                kwargs=_FLOOR_CONNECTION)  # fmt: skip
        with self.pool.connection() as conn:
            conn.execute(_FLOOR_TABLE)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.pool.connection() as conn:
            conn.execute(_FLOOR_INSERT, _floor_row(request)).fetchall()
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
        self.pool.close()


class AsyncPostgresFloor(httpx.AsyncBaseTransport):
    """The async floor: the same INSERT on psycopg's async connections, on the event loop."""

    def __init__(self, dsn: str) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=_limits())
        self.dsn = dsn
        self.pool: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.pool is None:
            import psycopg_pool

            self.pool = psycopg_pool.AsyncConnectionPool(
                self.dsn, min_size=1, max_size=64, open=False, kwargs=_FLOOR_CONNECTION
            )
            await self.pool.open()
            async with self.pool.connection() as conn:
                await conn.execute(_FLOOR_TABLE)
        async with self.pool.connection() as conn:
            await (await conn.execute(_FLOOR_INSERT, _floor_row(request))).fetchall()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self.pool is not None:
            await self.pool.close()


_FLOOR_CONNECTION = {"autocommit": True, "options": "-c synchronous_commit=on"}


def floor_variant(make_database: Callable[[], str]) -> Variant:
    return Variant(
        "floor postgres",
        lambda url, _: httpx.Client(base_url=url, transport=PostgresFloor(make_database())),
        lambda url, _: httpx.AsyncClient(
            base_url=url, transport=AsyncPostgresFloor(make_database())
        ),
    )


def against_the_floor(
    results: dict[tuple[str, str], list[Sample]], scenarios: list[str], idem: str
) -> list[list[str]]:
    """idemclient against the floor and against bare httpx: each ratio taken within one
    repetition (the variants alternate), then the median."""
    rows = [["scenario", "floor vs httpx", "idemclient vs floor", "idemclient vs httpx"]]

    def ratio(scenario: str, top: str, bottom: str) -> float:
        pairs = zip(results[(scenario, top)], results[(scenario, bottom)], strict=True)
        return statistics.median(a.ops_per_second / b.ops_per_second for a, b in pairs)

    for scenario in scenarios:
        rows.append([scenario, f"{ratio(scenario, 'floor postgres', 'httpx'):.2f}x",
                     f"{ratio(scenario, idem, 'floor postgres'):.2f}x",
                     f"{ratio(scenario, idem, 'httpx'):.2f}x"])  # fmt: skip
    return rows


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
        found = [bare(), floor_variant(make_database), pg_variant(make_database, opened)]
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
            print("\nagainst the floor (bare httpx + one INSERT committed synchronously through "
                  "a psycopg pool, before the send; nothing else)")  # fmt: skip
            print(table(against_the_floor(results, list(kinds), found[-1].name)))
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

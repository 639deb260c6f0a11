"""Side-by-side benchmark: bare httpx, httpx-retries and idemclient, in one run.

Every variant sends the same POSTs to the same local server (`benchmarks/server.py`, its own
process on 127.0.0.1). Variants alternate within each repetition, so that a slow moment of
the machine hits all of them; the table shows medians over the repetitions.

    .venv/bin/python -m benchmarks.bench            # what `make bench` runs
    .venv/bin/python -m benchmarks.bench --quick    # a smoke run (the test suite runs it)

Sections: throughput and latency (sequential, 32 threads, 32 asyncio tasks), fsyncs per
operation (counted with strace where it is installed), and with --scale the cost per
operation at 1,000,000 journal rows, `pending()` and `purge()` at that size, and resident
memory across 100,000 operations.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import json
import os
import platform
import pstats
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

import idemclient

HERE = Path(__file__).parent
BODY = {"amount": 500, "currency": "eur", "customer": "cus_123"}


def _optional(module: str) -> Any:
    """A module installed only for benchmarks (`make bench`), or `None`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


httpx_retries = _optional("httpx_retries")


# -- the server -------------------------------------------------------------------------


@contextmanager
def local_server(delay_ms: float = 0.0) -> Iterator[str]:
    """The fast server in its own process, answering after `delay_ms`; stopped by its PID."""
    process = subprocess.Popen(
        [sys.executable, str(HERE / "server.py"), "0", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


# -- variants ---------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    sync: Callable[[str, Path], httpx.Client]
    async_: Callable[[str, Path], httpx.AsyncClient]


def _limits() -> httpx.Limits:
    return httpx.Limits(max_connections=64, max_keepalive_connections=64)


_opened: list[idemclient.Journal] = []


def _journal(path: Path, durability: str) -> idemclient.Journal:
    journal = idemclient.Journal(path / "journal.sqlite3", durability=durability)  # type: ignore[arg-type]
    _opened.append(journal)  # closed by `measure` once the run is over
    return journal


class FloorWrite:
    """The floor of a journaled POST: one autocommit INSERT of a journal-sized row (key,
    request, headers as JSON, timestamps; a unique key) into a WAL SQLite file with raw
    sqlite3, before the send; nothing else. What the design requires, and what idemclient
    is measured against (issue: what it adds beyond its one durable write)."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path, self.synchronous = path, synchronous.upper()
        self.local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA busy_timeout=10000")
            db.execute(
                "CREATE TABLE IF NOT EXISTS floor (id INTEGER PRIMARY KEY, key TEXT NOT NULL "
                "UNIQUE, state TEXT, method TEXT, url TEXT, headers TEXT, body BLOB, "
                "attempts INTEGER, created_at REAL, updated_at REAL, lease_owner TEXT, "
                "lease_expires REAL)"
            )
            self.local.db = db
        return db

    def write(self, request: httpx.Request) -> None:
        now = time.time()
        headers = json.dumps([[k, v] for k, v in request.headers.items()])
        self._db().execute(
            "INSERT INTO floor (key, state, method, url, headers, body, attempts, created_at, "
            "updated_at, lease_owner, lease_expires) VALUES (?, 'pending', ?, ?, ?, ?, 1, ?, ?, "
            "?, ?)",
            (str(uuid.uuid4()), request.method, str(request.url), headers, request.content,
             now, now, "host:1:2", now + 60),
        )  # fmt: skip


class FloorTransport(httpx.BaseTransport):
    def __init__(self, floor: FloorWrite) -> None:
        self.floor, self.inner = floor, httpx.HTTPTransport(limits=_limits())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.floor.write(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class AsyncFloorTransport(httpx.AsyncBaseTransport):
    """The async floor: the same INSERT, made on the event loop (the least it can cost)."""

    def __init__(self, floor: FloorWrite) -> None:
        self.floor, self.inner = floor, httpx.AsyncHTTPTransport(limits=_limits())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.floor.write(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def floors() -> list[Variant]:
    found = []
    for durability in ("normal", "full"):

        def sync(url: str, path: Path, durability: str = durability) -> httpx.Client:
            floor = FloorWrite(path / f"floor-{durability}.sqlite3", durability)
            return httpx.Client(base_url=url, transport=FloorTransport(floor))

        def async_(url: str, path: Path, durability: str = durability) -> httpx.AsyncClient:
            floor = FloorWrite(path / f"floor-{durability}.sqlite3", durability)
            return httpx.AsyncClient(base_url=url, transport=AsyncFloorTransport(floor))

        found.append(Variant(f"floor {durability}", sync, async_))
    return found


def variants() -> list[Variant]:
    found = [
        Variant(
            "httpx",
            lambda url, _: httpx.Client(base_url=url, limits=_limits()),
            lambda url, _: httpx.AsyncClient(base_url=url, limits=_limits()),
        )
    ]
    if httpx_retries is not None:
        retries = httpx_retries

        def retry() -> Any:
            return retries.Retry(
                total=4, backoff_factor=0.5, allowed_methods=["POST", "PATCH", "GET"]
            )

        found.append(
            Variant(
                "httpx-retries",
                lambda url, _: httpx.Client(
                    base_url=url,
                    transport=retries.RetryTransport(
                        httpx.HTTPTransport(limits=_limits()), retry=retry()
                    ),
                ),
                lambda url, _: httpx.AsyncClient(
                    base_url=url,
                    transport=retries.RetryTransport(
                        httpx.AsyncHTTPTransport(limits=_limits()), retry=retry()
                    ),
                ),
            )
        )
    for durability in ("normal", "full"):

        def sync(url: str, path: Path, durability: str = durability) -> httpx.Client:
            client = httpx.Client(base_url=url, limits=_limits())
            return idemclient.wrap(client, journal=_journal(path, durability))

        def async_(url: str, path: Path, durability: str = durability) -> httpx.AsyncClient:
            client = httpx.AsyncClient(base_url=url, limits=_limits())
            return idemclient.wrap(client, journal=_journal(path, durability))

        found.append(Variant(f"idemclient {durability}", sync, async_))
    return found + floors()


# -- one measurement --------------------------------------------------------------------


@dataclass
class Sample:
    ops_per_second: float
    latencies: list[float] = field(repr=False)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_sequential(client: httpx.Client, ops: int) -> Sample:
    latencies = []
    started = time.perf_counter()
    for _ in range(ops):
        t = time.perf_counter()
        client.post("/charges", json=BODY).raise_for_status()
        latencies.append(time.perf_counter() - t)
    return Sample(ops / (time.perf_counter() - started), latencies)


def run_threads(client: httpx.Client, ops: int, workers: int) -> Sample:
    latencies: list[float] = []
    lock = threading.Lock()
    share = max(1, ops // workers)

    def work() -> None:
        mine = []
        for _ in range(share):
            t = time.perf_counter()
            client.post("/charges", json=BODY).raise_for_status()
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Sample(len(latencies) / (time.perf_counter() - started), latencies)


def run_tasks(make: Callable[[], httpx.AsyncClient], ops: int, workers: int) -> Sample:
    async def main() -> Sample:
        latencies: list[float] = []
        share = max(1, ops // workers)
        async with make() as client:
            for _ in range(20):  # warm the pool
                await client.post("/charges", json=BODY)

            async def work() -> None:
                for _ in range(share):
                    t = time.perf_counter()
                    (await client.post("/charges", json=BODY)).raise_for_status()
                    latencies.append(time.perf_counter() - t)

            started = time.perf_counter()
            await asyncio.gather(*(work() for _ in range(workers)))
            return Sample(len(latencies) / (time.perf_counter() - started), latencies)

    return asyncio.run(main())


def measure(variant: Variant, scenario: str, url: str, ops: int, workers: int) -> Sample:
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        path = Path(tmp)
        try:
            if scenario in ("tasks", "async"):
                count = workers if scenario == "tasks" else 1
                return run_tasks(lambda: variant.async_(url, path), ops, count)
            with variant.sync(url, path) as client:
                for _ in range(20):  # warm the connection(s) and the journal
                    client.post("/charges", json=BODY)
                if scenario == "sequential":
                    return run_sequential(client, ops)
                return run_threads(client, ops, workers)
        finally:
            while _opened:
                _opened.pop().close()


# -- the disk ---------------------------------------------------------------------------


def fsync_seconds(directory: Path, rounds: int = 200) -> float:
    """Median time of one 4 KiB write + fdatasync in `directory` (the journal's disk)."""
    fd, name = tempfile.mkstemp(dir=directory)
    times = []
    try:
        for i in range(rounds):
            t = time.perf_counter()
            os.pwrite(fd, b"x" * 4096, (i % 16) * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(name)
    return statistics.median(times)


FSYNC_CHILD = """
import sys, threading, httpx, idemclient
url, path, durability = sys.argv[1], sys.argv[2], sys.argv[3]
ops, workers = int(sys.argv[4]), int(sys.argv[5])
journal = idemclient.Journal(path, durability=durability)
limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
with idemclient.Client(base_url=url, journal=journal, limits=limits) as c:
    def work():
        for _ in range(ops // workers):
            c.post("/charges", json={"amount": 500})
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
"""


def fsyncs_per_operation(url: str, durability: str, ops: int, workers: int = 1) -> float | None:
    """Count fsync/fdatasync calls of `ops` operations sent by `workers` threads, with
    strace; `None` without strace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    counts = []
    for n in (0, ops):  # subtract the cost of starting up and opening the journal
        with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
            result = subprocess.run(
                [strace, "-f", "-c", "-e", "trace=fsync,fdatasync", sys.executable, "-c",
                 FSYNC_CHILD, url, str(Path(tmp) / "j.sqlite3"), durability, str(n),
                 str(workers)],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        total = 0
        for line in result.stderr.splitlines():
            match = re.match(
                r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)$", line
            )
            if match:
                total += int(match.group(1))
        counts.append(total)
    return (counts[1] - counts[0]) / ops if ops else None


# -- where the time goes ------------------------------------------------------------------


class _TimedJournal(idemclient.Journal):
    """A journal that keeps how long each registration (the durable write) took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_seconds: list[float] = []
        self.marks: list[tuple[str, float]] | None = None  # `stages` notes when it begins

    def register(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        if self.marks is not None:
            self.marks.append(("register", started))
        try:
            return super().register(*args, **kwargs)
        finally:
            self.register_seconds.append(time.perf_counter() - started)


def breakdown(url: str, ops: int, repetitions: int = 3) -> list[list[str]]:
    """Sequential: the time idemclient adds per operation, and the durable write's share of it
    (the registration, timed where it runs)."""
    per_op: dict[str, list[float]] = {"httpx": [], "normal": [], "full": []}
    register: dict[str, list[float]] = {"normal": [], "full": []}
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        for rep in range(repetitions):
            for kind in per_op:
                client = httpx.Client(base_url=url)
                journal = None
                if kind != "httpx":
                    path = Path(tmp) / f"{kind}-{rep}.sqlite3"
                    journal = _TimedJournal(path, durability=kind)
                    client = idemclient.wrap(client, journal=journal)
                with client:
                    for _ in range(20):
                        client.post("/charges", json=BODY)
                    if journal is not None:
                        journal.register_seconds.clear()
                    per_op[kind].append(1 / run_sequential(client, ops).ops_per_second)
                if journal is not None:
                    register[kind].append(statistics.median(journal.register_seconds))
                    journal.close()
    bare = statistics.median(per_op["httpx"])
    rows = [["durability", "ms per op", "added", "durable write", "the rest"]]
    for kind in ("normal", "full"):
        total = statistics.median(per_op[kind])
        write = statistics.median(register[kind])
        rows.append([kind, f"{total * 1000:.3f}", f"{(total - bare) * 1000:.3f}",
                     f"{write * 1000:.3f}", f"{(total - bare - write) * 1000:.3f}"])  # fmt: skip
    return rows


class _Entry(httpx.BaseTransport):
    """Notes when a request enters idemclient's transport and when its response leaves."""

    def __init__(self, inner: httpx.BaseTransport, marks: list[tuple[str, float]]) -> None:
        self.inner, self.marks = inner, marks

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.marks.append(("enter", time.perf_counter()))
        try:
            return self.inner.handle_request(request)
        finally:
            self.marks.append(("leave", time.perf_counter()))

    def close(self) -> None:
        self.inner.close()


#: a stage: from one mark to the next, named for what happens between them
STAGES = [
    ("plan (key, headers, policy, journal record)", "enter", "register"),
    ("register (the durable write)", "register", "registered"),
    ("until the send", "registered", "sending"),
    ("send and read (the wire, httpx)", "sending", "answered"),
    ("classify and record (in memory)", "answered", "completed"),
    ("return to the caller", "completed", "leave"),
]


def stages(url: str, ops: int, durability: str) -> list[list[str]]:
    """Sequential: microseconds per operation in each stage of a journaled POST, from the
    transport's events and the journal's registration, medians over the operations."""
    marks: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        journal = _TimedJournal(Path(tmp) / "journal.sqlite3", durability=durability)
        journal.marks = marks
        transport = idemclient.IdempotentTransport(
            journal=journal, hooks=[lambda e: marks.append((e.kind, time.perf_counter()))]
        )
        with httpx.Client(base_url=url, transport=_Entry(transport, marks)) as client:
            for _ in range(20):
                client.post("/charges", json=BODY)
            per_stage: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
            for _ in range(ops):
                marks.clear()
                client.post("/charges", json=BODY).raise_for_status()
                at = dict(marks)
                for name, start, end in STAGES:
                    if start in at and end in at:
                        per_stage[name].append(at[end] - at[start])
        journal.close()
    return [[name, f"{statistics.median(v) * 1e6:.0f}" if v else "n/a"]
            for name, v in per_stage.items()]  # fmt: skip


def _profiled(client: httpx.Client, ops: int) -> dict[tuple[str, int, str], tuple[int, float]]:
    """Each function's calls and own CPU seconds (this thread's), over `ops` sequential POSTs."""
    for _ in range(20):
        client.post("/charges", json=BODY)
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    for _ in range(ops):
        client.post("/charges", json=BODY).raise_for_status()
    profile.disable()
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return {where: (calls, own) for where, (_, calls, own, _, _) in stats.items()}


def _where(where: tuple[str, int, str]) -> str:
    path, line, name = where
    if path == "~":
        return name  # a builtin
    for root, keep in (("site-packages/", ""), ("idemclient/", "idemclient/"), ("lib/python", "")):
        if root in path:
            path = keep + path.split(root, 1)[1]
            break
    return f"{path}:{line} {name}"


def profile(url: str, ops: int, durability: str = "normal", top: int = 20) -> list[list[str]]:
    """Sequential, under cProfile: the functions where idemclient's CPU goes, as own CPU
    microseconds per operation beyond what bare httpx spends in them (profiled runs are
    slower than real ones: compare the rows with each other, not with the tables above)."""
    with httpx.Client(base_url=url, limits=_limits()) as client:
        bare = _profiled(client, ops)
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        journal = idemclient.Journal(Path(tmp) / "journal.sqlite3", durability=durability)  # type: ignore[arg-type]
        client = idemclient.wrap(httpx.Client(base_url=url, limits=_limits()), journal=journal)
        with client:
            mine = _profiled(client, ops)
        journal.close()
    extra: list[tuple[float, float, tuple[str, int, str]]] = []
    for where, (calls, own) in mine.items():
        base_calls, base_own = bare.get(where, (0, 0.0))
        extra.append((own - base_own, (calls - base_calls) / ops, where))
    extra.sort(reverse=True)
    total = sum(own for own, _, _ in extra)
    rows = [["function", "us per op", "calls per op"]]
    rows.append(["(all, beyond bare httpx)", f"{total / ops * 1e6:.1f}", ""])
    for seconds, per_op, where in extra[:top]:
        rows.append([_where(where), f"{seconds / ops * 1e6:.1f}", f"{per_op:+.1f}"])
    return rows


# -- scale ------------------------------------------------------------------------------


def prefill(path: Path, rows: int, pending: int) -> None:
    """A journal with `rows` finished operations and `pending` pending ones, written fast."""
    idemclient.Journal(path, auto_purge=None).close()
    now = time.time() - 3600
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO operations (name, key, state, method, url, headers, body, fingerprint, "
        "attempts, created_at, updated_at, first_sent_at, lease_version, response_status, "
        "response_headers, response_body, response_body_kept) "
        "VALUES (?, ?, ?, 'POST', 'http://x/charges', '[]', ?, 'fp', 1, ?, ?, ?, 1, 201, '[]', "
        "?, 1)",
        (
            (f"op-{i}", f"key-{i}", "pending" if i < pending else "completed",
             b'{"amount":500}', now - (rows - i) * 5, now - (rows - i) * 5, now, b'{"id":1}')
            for i in range(rows)
        ),
    )  # fmt: skip
    db.execute("COMMIT")
    db.close()


def scale(url: str, rows: int, ops: int) -> list[tuple[str, str]]:
    out = []
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        empty, full = Path(tmp) / "empty.sqlite3", Path(tmp) / "big.sqlite3"
        started = time.perf_counter()
        prefill(full, rows, pending=1000)
        out.append((f"prefill {rows:,} rows", f"{time.perf_counter() - started:.1f} s"))
        labels = {"empty": empty, f"{rows:,} rows": full}
        samples: dict[str, list[Sample]] = {label: [] for label in labels}
        for rep in range(5):  # alternating, so that a slow moment hits both
            for label in labels if rep % 2 == 0 else reversed(list(labels)):
                journal = idemclient.Journal(labels[label], durability="normal", auto_purge=None)
                with idemclient.Client(base_url=url, journal=journal) as client:
                    samples[label].append(run_sequential(client, ops))
                journal.close()
        per_op = {
            label: 1000 / statistics.median(s.ops_per_second for s in runs)
            for label, runs in samples.items()
        }
        for label, ms in per_op.items():
            out.append((f"ms per operation (normal), journal {label}", f"{ms:.3f}"))
        first, second = per_op.values()
        out.append(("cost at size / cost empty", f"{second / first:.2f}x"))
        with idemclient.Journal(full, auto_purge=None) as journal:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                found = journal.pending()
                times.append(time.perf_counter() - t)
            out.append((f"pending() ({len(found)} of {rows:,})",
                        f"{statistics.median(times) * 1000:.1f} ms"))  # fmt: skip
            t = time.perf_counter()
            purged = journal.purge(older_than=timedelta(days=30))
            out.append((f"purge() (older than 30 d: {purged})",
                        f"{(time.perf_counter() - t) * 1000:.1f} ms"))  # fmt: skip
    return out


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(url: str, ops: int) -> list[tuple[str, str]]:
    out = []
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp, idemclient.Client(
        base_url=url, journal=Path(tmp) / "mem.sqlite3"
    ) as client:  # fmt: skip
        marks = sorted({ops // 10, ops // 2, ops})
        done = 0
        for mark in marks:
            while done < mark:
                client.post("/charges", json=BODY)
                done += 1
            out.append((f"resident memory after {mark:,} operations", f"{rss_mib():.1f} MiB"))
    return out


# -- the report -------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def side_by_side(
    results: dict[tuple[str, str], list[Sample]], scenarios: list[str], names: list[str]
) -> list[list[str]]:
    """The table of medians, each variant against bare httpx in the same scenario."""
    rows = [["scenario", "variant", "ops/s", "p50 ms", "p99 ms", "vs httpx"]]
    for scenario in scenarios:
        base = statistics.median(s.ops_per_second for s in results[(scenario, "httpx")])
        for name in names:
            samples = results[(scenario, name)]
            ops = statistics.median(s.ops_per_second for s in samples)
            p50 = statistics.median(s.percentile(0.50) for s in samples) * 1000
            p99 = statistics.median(s.percentile(0.99) for s in samples) * 1000
            rows.append([scenario, name, f"{ops:,.0f}", f"{p50:.3f}", f"{p99:.3f}",
                         f"{ops / base:.2f}x"])  # fmt: skip
    return rows


def against_floors(
    results: dict[tuple[str, str], list[Sample]], scenarios: list[str]
) -> list[list[str]]:
    """idemclient against the floor of the same durability, and against bare httpx: each
    ratio taken within one repetition (the variants alternate), then the median."""
    rows = [["scenario", "durability", "floor vs httpx", "idemclient vs floor",
             "idemclient vs httpx"]]  # fmt: skip

    def ratio(scenario: str, top: str, bottom: str) -> float:
        pairs = zip(results[(scenario, top)], results[(scenario, bottom)], strict=True)
        return statistics.median(a.ops_per_second / b.ops_per_second for a, b in pairs)

    for scenario in scenarios:
        for durability in ("normal", "full"):
            idem, floor = f"idemclient {durability}", f"floor {durability}"
            rows.append([scenario, durability, f"{ratio(scenario, floor, 'httpx'):.2f}x",
                         f"{ratio(scenario, idem, floor):.2f}x",
                         f"{ratio(scenario, idem, 'httpx'):.2f}x"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="idemclient side-by-side benchmark")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and fast")
    parser.add_argument("--ops", type=int, default=2000, help="operations per measurement")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--scale", action="store_true", help="also the 1M-row and memory runs")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--memory-ops", type=int, default=100_000)
    parser.add_argument(
        "--server-delay", type=float, default=0.0, metavar="MS",
        help="the server answers MS milliseconds late, as a remote API would (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="also where idemclient's CPU goes, by function (cProfile, sequential)",
    )  # fmt: skip
    parser.add_argument(
        "--scenarios", default="sequential,async,threads,tasks",
        help="comma-separated: sequential, async (one task), threads, tasks (default: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not chosen or set(chosen) - {"sequential", "async", "threads", "tasks"}:
        parser.error("--scenarios takes sequential, async, threads and tasks")
    if args.quick:
        args.ops, args.repetitions, args.workers = 64, 1, 4
        args.rows, args.memory_ops = 2000, 200
    fsync = fsync_seconds(HERE.parent)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, httpx {httpx.__version__}, idemclient "
          f"{idemclient.__version__}")  # fmt: skip
    print(f"disk: one 4 KiB write + fdatasync takes {fsync * 1000:.3f} ms")
    if args.server_delay:
        print(f"server: answers {args.server_delay:g} ms after each request")
    kinds = {"sequential": "sequential", "async sequential": "async",
             f"{args.workers} threads": "threads", f"{args.workers} tasks": "tasks"}  # fmt: skip
    scenarios = [label for label, kind in kinds.items() if kind in chosen]
    found = variants()
    results: dict[tuple[str, str], list[Sample]] = {}
    with local_server(args.server_delay) as url:
        for rep in range(args.repetitions):
            for scenario in scenarios:
                order = found if rep % 2 == 0 else list(reversed(found))
                for variant in order:
                    sample = measure(variant, kinds[scenario], url, args.ops, args.workers)
                    results.setdefault((scenario, variant.name), []).append(sample)
        rows = side_by_side(results, scenarios, [v.name for v in found])
        print()
        print(f"{args.ops} POSTs per measurement, medians of {args.repetitions} repetitions")
        print(table(rows))
        print("\nagainst the floors (bare httpx + one INSERT into a WAL SQLite file, raw "
              "sqlite3), medians of the per-repetition ratios:")  # fmt: skip
        print(table(against_floors(results, scenarios)))
        if "sequential" in chosen:
            rtt = statistics.median(s.percentile(0.5) for s in results[("sequential", "httpx")])
            ideal = 1 / (rtt + fsync)
            full = statistics.median(
                s.ops_per_second for s in results[("sequential", "idemclient full")]
            )
            print(f"\nsequential 'full' against 1 / (round trip + one fsync) = "
                  f"{ideal:,.0f} ops/s: {full / ideal:.2f}x")  # fmt: skip
        print()
        fsync_rows = [["durability", "threads", "fsyncs per operation"]]
        for durability in ("normal", "full"):
            for workers in (1, args.workers):
                ops = (50 if args.quick else 500) // workers * workers
                count = fsyncs_per_operation(url, durability, ops, workers)
                shown = "n/a (no strace)" if count is None else f"{count:.2f}"
                fsync_rows.append([durability, str(workers), shown])
        print(table(fsync_rows))
        if "sequential" in chosen:
            print("\nwhere the time goes, sequential (bare httpx: the round trip), medians:")
            print(table(breakdown(url, args.ops, 1 if args.quick else 3)))
            print("\nstages of a journaled POST, sequential, microseconds per operation "
                  "(medians):")  # fmt: skip
            by = {d: stages(url, args.ops, d) for d in ("normal", "full")}
            print(table([["stage", "normal", "full"]] + [
                [name, a, b] for (name, a), (_, b) in zip(by["normal"], by["full"], strict=True)
            ]))  # fmt: skip
        if args.profile:
            print("\nwhere idemclient's CPU goes, sequential 'normal', under cProfile: own CPU "
                  "per operation beyond bare httpx's in the same function (top 20):")  # fmt: skip
            print(table(profile(url, args.ops)))
        if args.scale or args.quick:
            print()
            extra = scale(url, args.rows, args.ops) + memory(url, args.memory_ops)
            print(table([["at scale", "value"], *[[a, b] for a, b in extra]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

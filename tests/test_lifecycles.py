"""Exactly once across the lifecycles users put the client through: long suspends, a person
deciding during a backoff, clients closed before their journal, forks, asyncio timeouts."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import idemclient
from idemclient import (
    Journal,
    OperationAbandonedError,
    OperationExpiredError,
    PostgresJournal,
    open_journal,
)
from idemclient.journal._owner import current_owner
from idemclient.testing import IdempotentServer

from .test_journal import LEASE, record


def test_a_retry_after_a_long_suspend_is_not_sent_past_the_retention(journal_path: Path) -> None:
    """The machine slept 25 h during a backoff sleep: the server may have forgotten the key,
    so the retry must not go out."""
    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=24))
    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(503)

    def suspend(seconds: float) -> None:
        now[0] += 25 * 3600

    with (
        idemclient.Client(
            journal=journal, transport=httpx.MockTransport(server), sleep=suspend,
            base_url="https://api.example",
        ) as client,
        idemclient.operation("charge-1"),
        pytest.raises(OperationExpiredError, match="while it waited to retry"),
    ):  # fmt: skip
        client.post("/charges", json={"amount": 5})
    assert len(sent) == 1
    op = journal.get("charge-1")
    assert op is not None
    assert (op.state, op.attempts) == ("expired", 1)
    journal.close()


def test_an_operation_abandoned_during_a_backoff_sleep_says_so(journal_path: Path) -> None:
    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(503)

    def operator_abandons(seconds: float) -> None:
        with Journal(journal_path) as theirs:  # another process, in effect
            theirs.abandon("charge-1")

    with (
        idemclient.Client(
            journal=journal_path, transport=httpx.MockTransport(server), sleep=operator_abandons,
            base_url="https://api.example",
        ) as client,
        idemclient.operation("charge-1"),
        pytest.raises(OperationAbandonedError, match="abandoned by a person"),
    ):  # fmt: skip
        client.post("/charges", json={"amount": 5})
    assert len(sent) == 1


def test_closing_a_client_writes_its_answers_into_the_callers_journal(journal_path: Path) -> None:
    journal = Journal(journal_path, flush_delay=60)  # the caller's: the client does not own it
    with idemclient.Client(
        journal=journal, transport=httpx.MockTransport(lambda r: httpx.Response(201)),
        base_url="https://api.example",
    ) as client:  # fmt: skip
        client.post("/charges", json={"amount": 5})
    with sqlite3.connect(journal_path) as db:  # what another process would see now
        assert db.execute("SELECT state FROM operations").fetchall() == [("completed",)]
    journal.close()


def _failing_at_close(journal_path: Path, monkeypatch: pytest.MonkeyPatch) -> Journal:
    """The caller's journal, whose write of the held answers fails when the client closes
    (a full disk, a journal that went away)."""
    journal = Journal(journal_path, flush_delay=60)

    def flush() -> None:
        raise idemclient.JournalError(f"journal {journal_path}: could not record responses")

    monkeypatch.setattr(journal, "flush", flush)
    return journal


def _created(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201)


@pytest.mark.parametrize("raised", [True, False])
def test_a_journal_error_at_exit_does_not_hide_the_blocks_own_exception(
    journal_path: Path, raised: bool, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The block raised: its exception comes out, and the journal's error is logged. It did
    not: the journal's error is raised, as `close()` raises it."""
    journal = _failing_at_close(journal_path, monkeypatch)
    client = idemclient.Client(
        journal=journal, base_url="https://api.example", transport=httpx.MockTransport(_created)
    )

    def use() -> None:
        with client:
            client.post("/charges", json={"amount": 5})
            if raised:
                raise ValueError("the caller's own error")

    with pytest.raises(ValueError if raised else idemclient.JournalError):
        use()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert bool(logged) is raised
    if raised:
        assert "could not record responses" in logged[0]
        assert "while the client closed on ValueError" in logged[0]
    monkeypatch.undo()
    journal.close()


def test_close_in_a_finally_does_not_hide_the_exception_on_its_way_out(
    journal_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SDK closes its client with `close()` (in its own `__exit__`, or a `finally`): the
    exception on its way out is still the one raised."""
    journal = _failing_at_close(journal_path, monkeypatch)
    client = idemclient.Client(
        journal=journal, base_url="https://api.example", transport=httpx.MockTransport(_created)
    )

    def use() -> None:
        try:
            client.post("/charges", json={"amount": 5})
            raise ValueError("the caller's own error")
        finally:
            client.close()

    with pytest.raises(ValueError, match="the caller's own error"):
        use()
    assert any("while the client closed on ValueError" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    journal.close()


@pytest.mark.anyio
@pytest.mark.parametrize("raised", [True, False])
async def test_a_journal_error_at_async_exit_does_not_hide_the_blocks_own_exception(
    journal_path: Path, raised: bool, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    journal = _failing_at_close(journal_path, monkeypatch)
    client = idemclient.AsyncClient(
        journal=journal, base_url="https://api.example", transport=httpx.MockTransport(_created)
    )

    async def use() -> None:
        async with client:
            await client.post("/charges", json={"amount": 5})
            if raised:
                raise ValueError("the caller's own error")

    with pytest.raises(ValueError if raised else idemclient.JournalError):
        await use()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert bool(logged) is raised
    if raised:
        assert "while the client closed on ValueError" in logged[0]
    monkeypatch.undo()
    journal.close()


def test_a_client_per_job_sees_the_last_jobs_answer(journal_path: Path) -> None:
    """A worker that makes a client per job, reruns included: the answer the last client
    recorded a moment ago is found, not reported "in progress by another process"."""
    calls: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(201, json={"n": len(calls)})

    first = idemclient.Client(journal=Journal(journal_path, flush_delay=60),
                              transport=httpx.MockTransport(server))  # fmt: skip
    second = idemclient.Client(journal=Journal(journal_path, flush_delay=60),
                               transport=httpx.MockTransport(server))  # fmt: skip
    for client in (first, second):
        with idemclient.operation("job-1"):
            response = client.post("https://api.example/jobs", json={"job": 1})
        assert response.json() == {"n": 1}
    assert len(calls) == 1
    for client in (first, second):
        client.journal.close()
        client.close()


FORK_CHILD = """
import os, signal, sys, threading, time
import anyio
import httpx
import idemclient

journal_path = sys.argv[1]
signal.alarm(20)  # a hang fails the test instead of stalling it
transport = httpx.MockTransport(lambda request: httpx.Response(201))
client = idemclient.Client(journal=journal_path, transport=transport, base_url="https://x")
client.post("/warm-up", json={})  # the flusher thread now runs
journal = client.journal
# When the fork is asked for, a thread of the parent is inside a journal transaction (the
# fork waits for it to end), a registration of the parent's is queued, and an answer of the
# parent's is held in memory.
held = threading.Event()

def holder():
    with journal._write("hold"):
        held.set()
        time.sleep(0.3)

threading.Thread(target=holder, daemon=True).start()
held.wait()
with idemclient.operation("parent-answer"):
    pass
journal._queue.append(object())
journal._shared.deferred.append(("completed", 0.0, 201, "[]", b"", 1, "parent-key", 1))
pid = os.fork()
if pid == 0:
    try:
        with idemclient.operation("child-op"):
            response = client.post("/child", json={"child": True})
        client.journal.flush()
        print("child", response.status_code, flush=True)
        os._exit(0)
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
journal._queue.clear()
journal._shared.deferred.clear()
print("parent", os.waitstatus_to_exitcode(status), flush=True)
op = journal.get("child-op")
print("child-op", op.state if op else None, flush=True)
"""


def test_a_forked_child_starts_with_clean_locks_and_queues(tmp_path: Path) -> None:
    """gunicorn --preload and multiprocessing's fork start method fork a process whose
    threads use the client: the child must not hang on a lock held at the fork, nor
    commit the parent's queued registrations."""
    lines = _run_with_a_journal(FORK_CHILD, tmp_path)
    assert lines[:3] == ["child 201", "parent 0", "child-op completed"]


def _run_with_a_journal(script: str, tmp_path: Path) -> list[str]:
    """Run `script` in a process of its own, given a journal path: the lines it printed."""
    path = tmp_path / "child.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path), str(tmp_path / "journal.sqlite3")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\n")


FORK_ASYNC_CHILD = """
import asyncio, os, signal, sys, threading, time
import httpx
import idemclient
from idemclient import _transport

signal.alarm(20)  # a hang fails the test instead of stalling it
_transport._JournalThread.IDLE_SECONDS = 0.2
transport = idemclient.AsyncIdempotentTransport(
    httpx.MockTransport(lambda request: httpx.Response(201)), journal=sys.argv[1]
)
client = httpx.AsyncClient(transport=transport, base_url="https://x")

def threads():
    return [t.name for t in threading.enumerate()].count("idemclient-journal-async")

async def post(name):
    with idemclient.operation(name):
        return (await client.post("/" + name, json={})).status_code

print("before", asyncio.run(post("before")), threads(), flush=True)
pid = os.fork()
if pid == 0:
    try:
        print("child", asyncio.run(post("child")), threads(), flush=True)
        transport.journal.flush()  # (os._exit: no flush at exit)
        os._exit(0)
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
time.sleep(0.6)  # the journal thread, idle, ends
print("idle", threads(), flush=True)
print("after", asyncio.run(post("after")), threads(), flush=True)
transport.journal.flush()
print(sorted((op.name, op.state) for op in transport.journal.operations()), flush=True)
"""


def test_the_async_journal_thread_across_a_fork_and_idle_time(tmp_path: Path) -> None:
    """The async transport makes an SQLite journal's calls on one thread of that journal: a
    forked child starts its own (the parent's, and what it had queued, stay the parent's),
    and the thread ends when idle, the next call starting another."""
    assert _run_with_a_journal(FORK_ASYNC_CHILD, tmp_path)[:5] == [
        "before 201 1",
        "child 201 1",
        "idle 0",
        "after 201 1",
        "[('after', 'completed'), ('before', 'completed'), ('child', 'completed')]",
    ]


class _Wrapped:
    """A caller's own backend: delegates to a journal, and can be neither hashed nor weakly
    referenced (the `JournalBackend` protocol asks neither)."""

    __slots__ = ("inner",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, inner: Journal) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.anyio
async def test_the_async_transport_takes_a_journal_that_cannot_be_hashed(
    journal_path: Path,
) -> None:
    with Journal(journal_path) as journal:
        transport = idemclient.AsyncIdempotentTransport(
            httpx.MockTransport(lambda request: httpx.Response(201)),
            journal=_Wrapped(journal),
        )
        async with httpx.AsyncClient(transport=transport, base_url="https://x") as client:
            assert (await client.post("/a", json={})).status_code == 201


@pytest.mark.anyio
async def test_a_journal_thread_that_could_not_start_is_started_by_the_next_call(
    journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread could be started for the first journal call (the process at its limit):
    that request fails, nothing is sent, and the next one goes through instead of waiting
    forever for a thread that never ran."""
    import threading

    from idemclient import _transport

    sent: list[str] = []
    start = threading.Thread.start
    refused: list[str] = []

    def start_once(thread: threading.Thread) -> None:
        if thread.name == "idemclient-journal-async" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(201)

    monkeypatch.setattr(threading.Thread, "start", start_once)
    monkeypatch.setattr(_transport, "_journal_threads", __import__("weakref").WeakKeyDictionary())
    with Journal(journal_path) as journal:
        transport = idemclient.AsyncIdempotentTransport(
            httpx.MockTransport(handler), journal=journal
        )
        async with httpx.AsyncClient(transport=transport, base_url="https://x") as client:
            with pytest.raises(RuntimeError, match="can't start new thread"):
                await client.post("/first", json={})
            # (else the next call would wait forever, shielded, for a thread that never ran)
            assert transport._registrar.thread._running is False
            with anyio.fail_after(20):  # (a hang fails the test instead of stalling it)
                assert (await client.post("/second", json={})).status_code == 201
        assert sent == ["/second"]
        assert [op.url.rsplit("/", 1)[1] for op in journal.operations()] == ["second"]


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, journal_path: Path) -> str:
    """A journal of either backend (PostgreSQL: the async transport uses its native async
    connections, no worker thread)."""
    if request.param == "sqlite":
        return str(journal_path)
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.mark.anyio
async def test_a_timeout_cancels_only_its_own_task(location: str) -> None:
    """400 concurrent named POSTs, every tenth under a 1 ms `asyncio.wait_for`: the others
    all succeed (none fails with CancelledError because a leader of its batch was cancelled),
    and each timed-out operation can be sent again at once by this same process."""
    acted: dict[str, int] = {}

    async def server(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(random.uniform(0, 0.002))
        key = request.headers["Idempotency-Key"]
        acted[key] = acted.get(key, 0) + 1
        return httpx.Response(201, json={"path": request.url.path})

    async with idemclient.AsyncClient(
        journal=location, transport=httpx.MockTransport(server), base_url="https://x",
    ) as client:  # fmt: skip

        async def post(i: int) -> httpx.Response:
            return await client.post(f"/ops/{i}", json={"i": i},
                                     extensions={"idempotency_operation": f"op-{i}"})  # fmt: skip

        async def one(i: int) -> str:
            if i % 10 == 0:
                try:
                    await asyncio.wait_for(post(i), timeout=0.001)
                except asyncio.TimeoutError:
                    return "timed out"
                return "done"
            response = await post(i)
            assert response.status_code == 201
            return "done"

        outcomes = await asyncio.gather(*(one(i) for i in range(400)), return_exceptions=True)
        failed = [(i, o) for i, o in enumerate(outcomes) if o not in ("done", "timed out")]
        assert failed == []
        timed_out = [i for i, o in enumerate(outcomes) if o == "timed out"]
        # Sent again at once, in this process: never "in progress by another process".
        for i in timed_out:
            response = await post(i)
            assert response.status_code == 201
    assert all(count == 1 for count in acted.values())  # one effect per key
    with open_journal(location) as journal:
        states = {op.name: op.state for op in journal.operations()}
    assert len(states) == 400
    assert set(states.values()) == {"completed"}


@pytest.mark.anyio
async def test_a_task_cancelled_during_its_postgres_registration_leaves_no_trace(
    pg_dsn: str,
) -> None:
    """The same on PostgreSQL, whose registration runs on the event loop (a task of its
    own): cancelled while it commits, the task waits for the commit, gives the operation
    back and raises; nothing was sent."""
    sent: list[httpx.Request] = []

    async def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201)

    journal = PostgresJournal(pg_dsn)
    entered, release = asyncio.Event(), asyncio.Event()
    original = journal.aregister_many

    async def slow_aregister_many(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await original(*args, **kwargs)

    journal.aregister_many = slow_aregister_many  # type: ignore[method-assign]
    async with idemclient.AsyncClient(
        journal=journal, transport=httpx.MockTransport(server), base_url="https://x"
    ) as client:
        for extensions in ({}, {"idempotency_operation": "n-1"}):
            entered.clear()
            release.clear()
            task = asyncio.ensure_future(client.post("/p", json={}, extensions=extensions))
            await asyncio.wait_for(entered.wait(), timeout=10)
            task.cancel()
            await asyncio.sleep(0.01)
            assert not task.done()  # seen through: waiting for the registration
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert sent == []
        assert await anyio.to_thread.run_sync(journal.operations) == []  # given back
        journal.aregister_many = original  # type: ignore[method-assign]
        again = await client.post("/p", json={}, extensions={"idempotency_operation": "n-1"})
        assert again.status_code == 201
    await anyio.to_thread.run_sync(journal.close)


@pytest.mark.anyio
async def test_a_task_cancelled_before_its_send_leaves_no_trace(journal_path: Path) -> None:
    """Cancelled while its registration was being committed: the operation is given back
    (nothing was sent), so it is neither left for a resume to send behind the caller's back
    nor held by this live process."""
    sent: list[httpx.Request] = []

    async def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201)

    journal = Journal(journal_path)
    entered, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    original = journal.register_many

    def slow_register_many(*args: object, **kwargs: object) -> object:
        loop.call_soon_threadsafe(entered.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    journal.register_many = slow_register_many  # type: ignore[method-assign,assignment]
    async with idemclient.AsyncClient(
        journal=journal, transport=httpx.MockTransport(server), base_url="https://x"
    ) as client:
        task = asyncio.ensure_future(client.post("/unnamed", json={}))
        await entered.wait()
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sent == []
        assert journal.operations() == []  # given back: nothing for a resume to send
        named = asyncio.ensure_future(
            client.post("/named", json={}, extensions={"idempotency_operation": "n-1"})
        )
        release.clear()
        entered.clear()
        await entered.wait()
        named.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await named
        journal.register_many = original  # type: ignore[method-assign]
        response = await client.post("/named", json={}, extensions={"idempotency_operation": "n-1"})
        assert response.status_code == 201
    assert len(sent) == 1
    journal.close()


def test_fork_leaves_the_parents_connections_alone(tmp_path: Path) -> None:
    """A child that opens its own journal and exits does not disturb the parent's."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.operations()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child = Journal(path)
            child.operations()
            child.close()
            journal.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert journal.operations() == []
    journal.close()


@pytest.mark.anyio
async def test_an_anyio_timeout_before_the_send_leaves_no_trace(journal_path: Path) -> None:
    """anyio's (and trio's) cancel scopes are shielded off while the registration is
    committed, then delivered before the first byte, not inside the send: the operation is
    given back, so that a resume at the next start-up cannot send it a second time behind
    the caller's retry."""
    sent: list[httpx.Request] = []

    async def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201)

    journal = Journal(journal_path)
    original = journal.register_many

    def slow_register_many(*args: object, **kwargs: object) -> object:
        time.sleep(0.05)  # the scope's deadline passes while the journal commits
        return original(*args, **kwargs)  # type: ignore[arg-type]

    journal.register_many = slow_register_many  # type: ignore[method-assign,assignment]
    async with idemclient.AsyncClient(
        journal=journal, transport=httpx.MockTransport(server), base_url="https://x"
    ) as client:
        with anyio.move_on_after(0.01) as scope:
            await client.post("/charges", json={"amount": 5})
        assert scope.cancelled_caught
        assert sent == []
        assert journal.operations() == []
        journal.register_many = original  # type: ignore[method-assign]
        await client.post("/charges", json={"amount": 5})  # the caller's retry
        assert list(await client.aresume_pending()) == []  # the next start-up
    assert len(sent) == 1
    journal.close()


DROPPED_CLIENT = """
import gc, sys
import anyio
import httpx
import idemclient

client = idemclient.Client(journal=sys.argv[1], base_url="https://x",
                           transport=httpx.MockTransport(lambda r: httpx.Response(201)))
with idemclient.operation("job-1"):
    client.post("/jobs", json={})
del client  # a client per job, dropped without close()
gc.collect()
import time
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("linger", [0.0, 0.5])
def test_a_client_dropped_without_close_keeps_its_answer(tmp_path: Path, linger: float) -> None:
    """Held answers keep their journal alive until written, by the flusher thread or at exit:
    an operation completed by a client nobody closed must not be left looking pending."""
    path = tmp_path / "journal.sqlite3"
    subprocess.run(
        [sys.executable, "-c", DROPPED_CLIENT, str(path), str(linger)], check=True, timeout=60
    )
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name, state FROM operations").fetchall() == [
            ("job-1", "completed")
        ]


def test_a_retry_of_a_call_wait_for_cancelled_continues_the_operation(journal_path: Path) -> None:
    """`asyncio.wait_for` sends in a task of its own (before Python 3.12): the call it
    cancelled after the server acted, retried in the same `operation()` block, is that
    operation again (same name and key: the server replays), not `name#2` acting twice."""
    from idemclient.testing import IdempotentServer

    async def main(server: IdempotentServer) -> list[tuple[str | None, str]]:
        async with idemclient.AsyncClient(base_url=server.url, journal=journal_path) as client:
            async with idemclient.operation("charge-9"):
                for _ in range(5):  # bounded
                    try:
                        await asyncio.wait_for(client.post("/charges", json={"n": 9}), 0.3)
                        break
                    except asyncio.TimeoutError:
                        continue
            return [(op.name, op.state) for op in client.journal.operations()]

    with IdempotentServer() as server:
        server.inject("slow_after_acting", seconds=1.0, times=1)
        assert asyncio.run(main(server)) == [("charge-9", "completed")]
        assert server.effect_count == 1


def test_a_child_keeps_what_it_writes_when_the_parent_closes_first(tmp_path: Path) -> None:
    """The parent has the journal open when it forks; the child opens its own on the same
    file and registers operations while the parent closes its journal. SQLite state the
    child inherited with an open connection would let the parent's last close checkpoint
    and delete the WAL under the child's writes: every registration of the child must stay
    (else a rerun sends them again). The parent's journal works on after the fork."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.register(record("parent-0", "kp-0"), current_owner(), LEASE)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            child = Journal(path)
            for i in range(30):
                child.register(record(f"child-{i}", f"kc-{i}"), current_owner(), LEASE)
                time.sleep(0.01)
            child.close()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    journal.register(record("parent-1", "kp-1"), current_owner(), LEASE)
    time.sleep(0.1)  # the child is writing
    journal.close()  # the parent's last connection
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    with Journal(path) as after:
        names = {op.name for op in after.operations()}
    assert names == {"parent-0", "parent-1"} | {f"child-{i}" for i in range(30)}


def test_a_forked_child_does_not_share_the_parents_http_connections(
    server: IdempotentServer, journal_path: Path
) -> None:
    """The client made a request before the fork: its pooled connection is a socket the
    child inherits. Used by both, their requests would interleave on it and one would read
    (and journal, for good) the other's answer. The child drops the parent's connections and
    opens its own: each side gets, and journals, its own answers."""
    client = idemclient.Client(base_url=server.url, journal=journal_path)
    client.post("/charges", json={"warm": True})

    def charges(who: str) -> list[tuple[str, Any]]:
        wrong = []
        for i in range(20):
            with idemclient.operation(f"{who}-{i}"):
                answer = client.post("/charges", json={"who": who, "i": i})
            if answer.json()["request"] != {"who": who, "i": i}:
                wrong.append((f"{who}-{i}", answer.json()["request"]))
        return wrong

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            code = 3 if charges("child") else 0
            client.close()
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    wrong = charges("parent")
    _, status = os.waitpid(pid, 0)
    client.close()
    assert wrong == []
    assert os.WEXITSTATUS(status) == 0
    with Journal(journal_path) as journal:
        for who in ("parent", "child"):
            for i in range(20):
                stored = journal.stored_response(f"{who}-{i}")
                assert stored is not None
                assert json.loads(stored.body)["request"] == {"who": who, "i": i}


STARVED = """
import os, sys, threading
from idemclient import Journal
path = sys.argv[1]
reading, journal = Journal(path), Journal(path)
for _ in range(200):  # reads that take a little while
    reading.operations()
stop, started = threading.Event(), threading.Barrier(3)
def read():
    started.wait()
    while not stop.is_set():
        reading.operations()
readers = [threading.Thread(target=read) for _ in range(2)]
for reader in readers:
    reader.start()
started.wait()
pid = os.fork()  # waits for the reads under way; none may start meanwhile
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
journal.close()  # the same, for another journal's reads on the file
stop.set()
for reader in readers:
    reader.join()
reading.close()
print("done")
"""


def test_a_fork_and_a_close_are_not_held_off_by_reads_that_keep_coming(tmp_path: Path) -> None:
    """Threads that read the journal in a loop: a fork, then a close, wait for the reads
    under way, and no new read starts meanwhile (else a read that keeps coming would hold
    them, and every send of the process behind them, for good)."""
    assert _run_with_a_journal(STARVED, tmp_path)[0] == "done"

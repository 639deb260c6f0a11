"""The renewal of held leases (`journal/_leases.py`), on its own: what is renewed, when, and
when it stops. The journals' renewals are in the contract suite, and a long answer across
hosts in `test_fleet.py`."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import idemclient
from idemclient.journal import _leases
from idemclient.journal._leases import Holds, Lease

from .test_together import until


class Renewals:
    """A journal's renewal: records each call; renews every lease but those in `gone`
    (rows finished or taken over meanwhile), or raises while `failures` last."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tuple[float, list[Lease]]] = []
        self.lock = threading.Lock()
        self.gone: set[str] = set()
        self.failures = failures

    def __call__(self, leases: Sequence[Lease], now: float) -> set[str]:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise OSError("the journal is unreachable a while")
            self.calls.append((time.monotonic(), list(leases)))
            return {lease[0] for lease in leases} - self.gone

    def renewed(self) -> list[str]:
        with self.lock:
            return [lease[0] for _, call in self.calls for lease in call]

    def first(self, key: str) -> float:
        with self.lock:
            return next(at for at, call in self.calls if any(x[0] == key for x in call))


def test_a_hold_is_renewed_each_half_lease_until_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_leases, "_IDLE", 0.2)
    renewals = Renewals()
    holds = Holds(renewals, time.time)
    holds.hold("k", 3, "host:1:2", 0.2)
    until(lambda: renewals.renewed().count("k") >= 3)
    assert renewals.calls[0][1] == [("k", 3, "host:1:2", 0.2)]
    assert holds.held()["k"][0] == 3
    holds.drop("k", 2)  # an older claim's end: the newer hold stays
    assert "k" in holds.held()
    holds.drop("k", 3)
    count = len(renewals.renewed())
    time.sleep(0.4)
    assert len(renewals.renewed()) == count
    until(lambda: holds._thread is None)  # nothing held a while: the thread ended
    holds.close()


def test_a_short_lease_held_while_a_long_one_waits_is_renewed_in_time() -> None:
    """The thread sleeps until the soonest renewal, and a new hold wakes it."""
    renewals = Renewals()
    holds = Holds(renewals, time.time)
    holds.hold("long", 1, "host:1:2", 300.0)
    time.sleep(0.1)  # the thread is asleep, until the long lease's half (150 s)
    held_at = time.monotonic()
    holds.hold("short", 1, "host:1:2", 2.0)
    until(lambda: "short" in renewals.renewed(), seconds=5)
    assert renewals.first("short") - held_at < 2.0  # before its lease ended (not at 150 s)
    holds.close()


def test_a_lease_the_journal_no_longer_matches_is_not_renewed_again() -> None:
    renewals = Renewals()
    renewals.gone.add("k")  # finished elsewhere, abandoned, or taken over
    holds = Holds(renewals, time.time)
    holds.hold("k", 1, "host:1:2", 0.2)
    until(lambda: "k" not in holds.held())
    assert renewals.renewed() == ["k"]
    holds.close()


def test_renewal_goes_on_after_a_failing_write_and_stops_after_renew_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_leases, "RENEW_FOR", 0.6)
    monkeypatch.setattr(_leases, "_IDLE", 0.2)
    renewals = Renewals(failures=2)
    holds = Holds(renewals, time.time)
    holds.hold("k", 1, "host:1:2", 0.1)
    until(lambda: len(renewals.renewed()) >= 1)  # after two failures, renewed all the same
    until(lambda: "k" not in holds.held())  # held too long: dropped
    until(lambda: holds._thread is None)  # and the thread ended with it
    holds.close()


def test_a_thread_that_could_not_start_is_started_by_the_next_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renewals = Renewals()
    holds = Holds(renewals, time.time)
    real = threading.Thread.start
    failed: list[bool] = []

    def start_once_failing(thread: threading.Thread) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("can't start new thread")
        real(thread)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    holds.hold("a", 1, "host:1:2", 0.2)  # no thread: not renewed for now, no error
    holds.hold("b", 1, "host:1:2", 0.2)
    until(lambda: {"a", "b"} <= set(renewals.renewed()))
    holds.close()


def test_a_clock_that_jumps_starts_no_renewal() -> None:
    """When to renew is reckoned on the monotonic clock, not the journal's."""
    renewals = Renewals()
    jumped = [time.time()]
    holds = Holds(renewals, lambda: jumped[0])
    holds.hold("k", 1, "host:1:2", 60.0)
    jumped[0] += 3600
    time.sleep(0.3)
    assert renewals.renewed() == []
    holds.close()


def test_holds_one_after_another_neither_wake_nor_restart_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests one after another each hold and drop a lease: the renewing thread keeps
    sleeping until the soonest renewal, so no request wakes it or starts another one."""
    started: list[str] = []
    real = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread.name)
        real(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    holds = Holds(Renewals(), time.time)
    for i in range(300):
        holds.hold(f"k{i}", 1, "host:1:2", 60.0)
        holds.drop(f"k{i}", 1)
        time.sleep(0.0005)  # the thread would run between requests if woken
    assert started.count("idemclient-leases") == 1
    holds.close()


@pytest.mark.parametrize("how", ["loop closed", "task collected"])
def test_a_task_gone_mid_request_stops_renewing_its_lease(tmp_path: Path, how: str) -> None:
    """An async task gone while its request is under way, without being cancelled: its loop
    closed under it while it waits inside an anyio cancel scope, as httpcore's reads do (the
    task never runs again, nor ends, nor is collected: anyio keeps it), or the task
    collected while its loop runs (its flow closed, no journal step possible). Its lease is
    no longer renewed, so that it ends on its own and a resume may take the operation over
    (else it stayed held for `RENEW_FOR`, an hour)."""
    journal = idemclient.Journal(tmp_path / "j.sqlite3")
    arrived = threading.Event()

    async def never(request: httpx.Request) -> httpx.Response:
        arrived.set()
        if how == "loop closed":
            with anyio.fail_after(60):
                await asyncio.Event().wait()
        else:  # a future only this task knows of: the task can be collected
            await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    loop = asyncio.new_event_loop()
    client = idemclient.AsyncClient(journal=journal, transport=httpx.MockTransport(never))
    task = loop.create_task(client.post("https://api.example/charges", json={"amount": 5}))
    deadline = time.monotonic() + 10
    while not arrived.is_set():
        assert time.monotonic() < deadline
        loop.run_until_complete(asyncio.sleep(0.01))
    assert len(journal._holds.held()) == 1
    if how == "loop closed":
        loop.close()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Task was destroyed but it is pending!"
            del task
            gc.collect()
    assert journal._holds.held() == {}
    (op,) = journal.operations()
    assert op.state == "pending"  # its lease ends on its own; a resume then finishes it
    if not loop.is_closed():
        loop.close()
    journal.close()


def test_forget_drops_the_version_it_names_at_the_next_look() -> None:
    """`forget` (from a flow the garbage collector closes: no lock taken) drops the hold of
    that version only, before the next renewal; a newer hold of the key stays."""
    holds = Holds(Renewals(), time.time)
    holds.hold("a", 1, "me", 60.0)
    holds.forget("a", 1)
    holds.hold("a", 2, "me", 60.0)  # taken again since: kept
    holds.forget("a", 1)
    assert {key: version for key, (version, _) in holds.held().items()} == {"a": 2}
    holds.forget("a", 2)
    assert holds.held() == {}
    holds.close()


@pytest.mark.parametrize("when", ["closed meanwhile", "stopped, then closed"])
@pytest.mark.parametrize("at", ["register", "claim"])
def test_a_loop_closed_while_a_lease_is_being_taken_lets_go_of_it(
    tmp_path: Path, at: str, when: str
) -> None:
    """The loop of an async task is closed under it (no cancellation) while its
    registration, or its retry's claim, is being committed in the journal's thread (another
    process holds the write lock a moment), or stopped while it is, and closed after the
    result came: the task never takes the result, and the lease that commit took is not
    renewed for nobody; it ends on its own. The same client then works in a new loop (the
    batch the closed loop's task led is not waited for)."""
    path = tmp_path / "j.sqlite3"
    journal = idemclient.Journal(path)
    journal.operations()  # the file and its schema exist
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    answered: list[int] = []

    def busy_a_moment() -> None:  # another process writes for half a second
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, lambda: other.execute("COMMIT")).start()

    async def handler(request: httpx.Request) -> httpx.Response:
        answered.append(1)
        if request.url.path == "/later":
            return httpx.Response(201)
        if at == "claim" and len(answered) == 1:
            busy_a_moment()
            return httpx.Response(503)  # retried: its claim waits for the write lock
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    if at == "register":
        busy_a_moment()
    loop = asyncio.new_event_loop()
    client = idemclient.AsyncClient(
        journal=journal, transport=httpx.MockTransport(handler),
        retry=idemclient.RetryPolicy(base_delay=0.01, jitter=False),
    )  # fmt: skip
    task = loop.create_task(client.post("https://api.example/charges", json={"amount": 5}))
    loop.run_until_complete(asyncio.sleep(0.2))  # the commit waits in the journal's thread
    assert len(answered) == (1 if at == "claim" else 0)
    if when == "closed meanwhile":
        loop.close()
    until(lambda: [op.attempts for op in journal.operations()] == [2 if at == "claim" else 1])
    if when == "stopped, then closed":
        time.sleep(0.2)  # the result was handed to the stopped loop
        assert len(journal._holds.held()) == 1
        loop.close()
    until(lambda: journal._holds.held() == {})
    assert not task.done()  # it never ran again: it was not cancelled, nor did it end
    assert len(answered) == (1 if at == "claim" else 0)  # nothing more was sent

    async def later() -> int:
        response = await asyncio.wait_for(client.post("https://api.example/later", json={}), 10)
        return response.status_code

    assert asyncio.run(later()) == 201
    other.close()
    journal.close()


def test_a_loop_dropped_unclosed_takes_its_tasks_leases_with_it(tmp_path: Path) -> None:
    """A loop left unclosed by a thread that ended, with a task mid-request: the leases
    that task holds do not keep the loop (and its tasks) alive, and end with it."""
    journal = idemclient.Journal(tmp_path / "j.sqlite3")
    arrived = threading.Event()

    async def never(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await asyncio.sleep(1000)
        raise AssertionError("unreachable")

    client = idemclient.AsyncClient(journal=journal, transport=httpx.MockTransport(never))

    def in_a_thread() -> None:
        loop = asyncio.new_event_loop()
        loop.create_task(client.post("https://api.example/charges", json={}))  # noqa: RUF006
        deadline = time.monotonic() + 10
        while not arrived.is_set():
            assert time.monotonic() < deadline
            loop.run_until_complete(asyncio.sleep(0.01))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join(30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Task was destroyed but it is pending!"
        gc.collect()
    assert journal._holds.held() == {}
    journal.close()


def test_a_hold_for_a_task_ends_with_its_loop() -> None:
    """A hold made for a task of a loop is tied to it from the start: the loop closed under
    its tasks takes its holds with it, even one whose result never reached its task. One
    made without a loop (a sync client's, even on a loop's thread) stays."""
    holds = Holds(Renewals(), time.time)
    loop = asyncio.new_event_loop()
    holds.hold("for-a-task", 1, "me", 60.0, loop)
    holds.hold("sync", 1, "me", 60.0)
    assert sorted(holds.held()) == ["for-a-task", "sync"]
    loop.close()
    assert sorted(holds.held()) == ["sync"]
    holds.close()


def test_tasks_of_two_loops_register_in_lines_of_their_own(tmp_path: Path) -> None:
    """One client used by tasks of two loops in turn (stopped and run again, as one thread
    may): each loop's registrations are batched on their own, so a task's lease is tied to
    its own loop. Closing the other loop, even in the middle of its batch, neither drops
    the lease of this loop's task while it sends, nor leaves that task unanswered."""
    journal = idemclient.Journal(tmp_path / "j.sqlite3")
    journal.operations()
    real = journal.register_many

    def slow(*args: Any, **kwargs: Any) -> Any:  # a registration takes a moment
        time.sleep(0.3)
        return real(*args, **kwargs)

    journal.register_many = slow  # type: ignore[method-assign]
    sending = threading.Event()
    held_while_sending: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a":
            sending.set()
            await asyncio.sleep(0.3)
            held_while_sending.append(journal._holds.held())
        return httpx.Response(201)

    client = idemclient.AsyncClient(journal=journal, transport=httpx.MockTransport(handler))
    b, a = asyncio.new_event_loop(), asyncio.new_event_loop()
    task_b = b.create_task(client.post("https://x.example/b", json={}))
    b.run_until_complete(asyncio.sleep(0.05))  # B's task leads a batch; B stops
    task_a = a.create_task(client.post("https://x.example/a", json={}))
    a.run_until_complete(asyncio.sleep(0.05))  # A's task registers in A's own line; A stops
    b.close()  # in the middle of B's batch

    async def finish_a() -> int:
        return (await asyncio.wait_for(task_a, 10)).status_code

    assert a.run_until_complete(finish_a()) == 201
    a.close()
    assert sending.is_set()
    (held,) = held_while_sending
    assert len(held) == 1  # A's own lease, renewed while it sends
    assert not task_b.done()
    journal.close()

"""Registrations of concurrent threads committed together (`journal/_together.py`), and on a
real PostgreSQL server: fewer commits than registrations, each thread its own answer."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from idemclient import JournalError, PostgresJournal
from idemclient._records import Decision, RequestRecord, StoredResponse
from idemclient.journal._together import Together


def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


class Held:
    """A `carry_out` whose first call waits until released: the threads that arrive
    meanwhile line up for the next batch. It records every batch."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_on == len(self.batches):
            raise RuntimeError("the server went away")
        return [f"done {item}" for item in items]


def stand_in(exc: BaseException, items: Sequence[str]) -> BaseException:
    return JournalError(f"the batch failed for {', '.join(items)}: {exc!r}")


def in_threads(together: Together[str, str], names: list[str]) -> tuple[
    list[threading.Thread], dict[str, Any]
]:  # fmt: skip
    got: dict[str, Any] = {}

    def one(name: str) -> None:
        try:
            got[name] = together.run([f"{name}.1", f"{name}.2"])
        except BaseException as exc:
            got[name] = exc

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    return threads, got


def test_alone_a_thread_carries_out_its_own_items_at_once() -> None:
    held = Held()
    held.release.set()
    together: Together[str, str] = Together(held, stand_in)
    assert together.run(["a", "b"]) == ["done a", "done b"]
    assert together.run(["c"]) == ["done c"]
    assert held.batches == [["a", "b"], ["c"]]


def test_threads_that_arrive_during_a_batch_go_together_in_the_next() -> None:
    held = Held()
    together: Together[str, str] = Together(held, stand_in)
    first, got_first = in_threads(together, ["first"])
    assert held.entered.wait(10)
    threads, got = in_threads(together, [f"t{i}" for i in range(6)])
    until(lambda: len(together._waiting) == 6)
    held.release.set()
    for thread in [*first, *threads]:
        thread.join(10)
    assert len(held.batches) == 2  # six threads, one call
    assert sorted(held.batches[1]) == sorted(f"t{i}.{n}" for i in range(6) for n in (1, 2))
    assert got_first == {"first": ["done first.1", "done first.2"]}
    assert got == {f"t{i}": [f"done t{i}.1", f"done t{i}.2"] for i in range(6)}
    assert together.run(["after"]) == ["done after"]  # the line is free again


def test_a_failed_batch_fails_every_thread_of_it_and_no_other() -> None:
    held = Held(fail_on=2)
    together: Together[str, str] = Together(held, stand_in)
    first, got_first = in_threads(together, ["first"])
    assert held.entered.wait(10)
    threads, got = in_threads(together, ["a", "b", "c"])
    until(lambda: len(together._waiting) == 3)
    held.release.set()
    for thread in [*first, *threads]:
        thread.join(10)
    assert got_first == {"first": ["done first.1", "done first.2"]}
    errors = list(got.values())
    # the thread that carried the batch out gets the error itself, the others a stand-in
    assert sum(isinstance(e, RuntimeError) for e in errors) == 1
    assert sum(isinstance(e, JournalError) and "the batch failed" in str(e) for e in errors) == 2
    assert together.run(["after"]) == ["done after"]


def test_the_main_thread_goes_alone_so_that_its_interrupt_fails_no_one_else() -> None:
    """Ctrl-C lands in the main thread: it never waits in line nor carries out others'
    items, so an interrupt of its call (here, raised in its own carry-out) leaves the
    batch under way and the threads waiting for the next one alone."""
    held = Held()
    carry_out = held.__call__

    def interrupted_for_mine(items: list[str]) -> list[str]:
        if items == ["mine"]:
            raise KeyboardInterrupt
        return carry_out(items)

    together: Together[str, str] = Together(interrupted_for_mine, stand_in)
    first, got_first = in_threads(together, ["first"])
    assert held.entered.wait(10)
    others, got = in_threads(together, ["a", "b"])
    until(lambda: len(together._waiting) == 2)
    with pytest.raises(KeyboardInterrupt):
        together.run(["mine"])  # at once, though a batch is under way
    assert len(together._waiting) == 2
    held.release.set()
    for thread in [*first, *others]:
        thread.join(10)
    assert got_first == {"first": ["done first.1", "done first.2"]}
    assert got == {"a": ["done a.1", "done a.2"], "b": ["done b.1", "done b.2"]}
    assert all("mine" not in batch for batch in held.batches)
    assert together.run(["after"]) == ["done after"]


def record(name: str) -> RequestRecord:
    return RequestRecord(
        name=name,
        key=f"key-{name}",
        key_given=False,
        method="POST",
        url="http://127.0.0.1:9/orders",
        headers=[("content-type", "application/json")],
        body=b'{"n": 1}',
        fingerprint=f"fp-{name}",
    )


def in_two_batches(
    journal: PostgresJournal, records: list[RequestRecord], owner: str
) -> tuple[list[int], dict[str, Any]]:
    """Each record registered by a thread of its own: the first alone, the others while
    its batch is held open, so that they line up for the next. The sizes of the batches
    carried out, and each record's registration by name."""
    real = journal._register_now
    calls: list[int] = []
    gate = threading.Event()

    def held_first(items: Any) -> Any:
        calls.append(len(items))
        if len(calls) == 1:
            assert gate.wait(10)
        return real(items)

    journal._together._carry_out = held_first
    results: dict[str, Any] = {}

    def one(record: RequestRecord) -> None:
        results[str(record.name)] = journal.register(record, owner, 60.0)

    threads = [threading.Thread(target=one, args=(record,)) for record in records]
    threads[0].start()
    until(lambda: len(calls) == 1)
    for thread in threads[1:]:
        thread.start()
    until(lambda: len(journal._together._waiting) == len(records) - 1)
    gate.set()
    for thread in threads:
        thread.join(30)
    return calls, results


def test_postgres_threads_registering_at_once_share_commits(pg_dsn: str) -> None:
    """Sixteen threads register while one registration is being committed: they go in one
    statement, each is inserted once and gets its own registration."""
    names = [f"op-{i}" for i in range(17)]
    with PostgresJournal(pg_dsn, auto_purge=None) as journal:
        owner = f"this-host:{os.getpid()}:1"
        inserted: list[int] = []  # by each INSERT statement
        real_insert = journal._insert

        def counted(items: Any, now: float) -> Any:
            keys = yield from real_insert(items, now)
            inserted.append(len(keys))
            return keys

        journal._insert = counted  # type: ignore[method-assign]
        calls, results = in_two_batches(journal, [record(name) for name in names], owner)
        assert calls == [1, 16]
        assert inserted == [1, 16]
        assert {name: r.decision for name, r in results.items()} == {
            name: Decision.SEND for name in names
        }
        assert {name: r.operation.key for name, r in results.items()} == {
            name: f"key-{name}" for name in names
        }
        rows = {op.name: op.state for op in journal.operations()}
        assert rows == dict.fromkeys(names, "pending")


@pytest.mark.parametrize("whole_seconds", [False, True])
def test_postgres_resumed_operations_claimed_together_in_one_statement(
    pg_dsn: str, whole_seconds: bool
) -> None:
    """Sixteen resumer threads claim backlog rows at once: the rows as `pending_requests`
    read them are claimed in one statement, each fenced by its row version; a row written
    since it was read is left out of it and decided again on the row read locked. Also with
    a clock that gives whole seconds (ints), beside times read back as floats."""
    owner = f"this-host:{os.getpid()}:1"
    names = [f"op-{i}" for i in range(17)]
    clock = (lambda: int(time.time())) if whole_seconds else None
    with PostgresJournal(pg_dsn, auto_purge=None, clock=clock) as journal:
        for i, name in enumerate(names):  # a backlog: pending, no holder; half never sent
            reg = journal.register(record(name), owner, 60.0)
            journal.release(f"key-{name}", reg.lease_version, "down", never_sent=i % 2 == 0)
        journal.pending_requests()  # what a resume reads first
        # one row changes after it was read (another resumer claimed and released it)
        reg = journal.register(resumed("op-16"), "other-host:1:1", 60.0)
        journal.release("key-op-16", reg.lease_version, "gave up")
        statements: list[int] = []
        claimed: list[int] = []  # by the statement itself, not left to the one-by-one path
        real_many = journal._claim_seen_many

        def counted(claims: Any, results: Any) -> Any:
            statements.append(len(claims))
            yield from real_many(claims, results)
            claimed.append(sum(results[i] is not None for i, _, _ in claims.values()))

        journal._claim_seen_many = counted  # type: ignore[method-assign]
        calls, results = in_two_batches(journal, [resumed(name) for name in names], owner)
        assert calls == [1, 16]
        assert statements == [15]  # op-16's row changed since it was read: not in it
        assert claimed == [15]
        assert {n: r.decision for n, r in results.items()} == dict.fromkeys(names, Decision.SEND)
        assert {n: r.operation.attempts for n, r in results.items()} == {
            **dict.fromkeys(names[:16], 2),
            "op-16": 3,
        }
        assert {op.name: op.state for op in journal.operations()} == dict.fromkeys(names, "pending")


def resumed(name: str) -> RequestRecord:
    """The record a resume sends for the operation `name`."""
    return dataclasses.replace(record(name), resume=True)


def test_postgres_one_registration_refused_leaves_the_others_of_its_batch(pg_dsn: str) -> None:
    """A registration the journal itself refuses (its own error, not the server out of
    reach) fails alone: the others of its batch are registered, and no later one is failed
    for having waited for it."""
    owner = f"this-host:{os.getpid()}:1"
    names = ["op-0", "op-1", "op-2"]
    with PostgresJournal(pg_dsn, auto_purge=None) as journal:
        for name in names:  # pending, never sent, no holder: each resumed one by one
            reg = journal.register(record(name), owner, 60.0)
            journal.release(f"key-{name}", reg.lease_version, "down", never_sent=True)
        real = journal._register

        def refusing(record: RequestRecord, owner: str, lease_seconds: float) -> Any:
            if record.name == "op-0":
                raise JournalError("operation key 'key-op-0' collides with another")
            return (yield from real(record, owner, lease_seconds))

        journal._register = refusing  # type: ignore[method-assign]
        results = journal.register_many([(resumed(name), owner, 60.0) for name in names])
        assert isinstance(results[0], JournalError)
        assert [getattr(r, "decision", None) for r in results[1:]] == [Decision.SEND] * 2
        journal._register = real  # type: ignore[method-assign]
        later = journal.register(record("op-3"), owner, 60.0)
        assert later.decision is Decision.SEND


def test_postgres_a_rerun_of_finished_operations_is_decided_in_one_read(pg_dsn: str) -> None:
    """A rerun of a batch that completed (and a few that are new, pending, or abandoned):
    the finished ones are decided together on their rows read in one statement, each
    replayed (or refused) as one by one; the new and the pending are left to the locked
    path, which inserts or claims them."""
    owner = f"this-host:{os.getpid()}:1"
    names = [f"op-{i}" for i in range(17)]
    done = {f"op-{i}" for i in range(1, 13)}
    answer = StoredResponse(201, [("content-type", "application/json")], b'{"id": 1}')
    with PostgresJournal(pg_dsn, auto_purge=None) as journal:
        for name in [*sorted(done), "op-13", "op-14"]:
            reg = journal.register(record(name), owner, 60.0)
            if name in done:
                journal.finish(f"key-{name}", reg.lease_version, "completed", answer)
            else:
                journal.release(f"key-{name}", reg.lease_version, "down")
        journal.abandon("op-14")
        journal.flush()
        looked: list[int] = []
        decided: list[int] = []  # by the one read, not left to the one-by-one path
        real = journal._settled_many

        def counted(requests: Any, results: Any) -> Any:
            looked.append(len(requests))
            before = sum(r is not None for r in results)
            yield from real(requests, results)
            decided.append(sum(r is not None for r in results) - before)

        journal._settled_many = counted  # type: ignore[method-assign]
        calls, results = in_two_batches(journal, [record(name) for name in names], owner)
        assert calls == [1, 16]
        assert looked == [16]
        assert decided == [13]  # op-1..12 replayed, op-14 refused: abandoned
        assert {n: r.decision for n, r in results.items()} == {
            **{n: Decision.COMPLETED for n in done},
            "op-0": Decision.SEND,  # new: inserted
            "op-13": Decision.SEND,  # pending, its holder gone: claimed, locked
            "op-14": Decision.ABANDONED,
            "op-15": Decision.SEND,
            "op-16": Decision.SEND,
        }
        assert all(results[n].response == answer for n in done)

"""Calls of concurrent threads carried out together: a group commit for registrations.

Thirty-two threads that each register an operation on PostgreSQL would each make a round trip
and a synchronous commit (one WAL flush each: the server's own group commit does not join them
at `commit_delay = 0`). Gathered, they make a few: while one batch is being committed, the
registrations that arrive wait, and the first of them commits all of them next, in one
statement. A thread alone pays one uncontended lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result

__all__ = ["Together"]


class _Ticket(Generic[I, R]):
    """A thread's items, waiting for a batch: then their results (or the batch's error), or
    the word that this thread commits the next batch (`lead`)."""

    __slots__ = ("error", "items", "lead", "results", "wake")

    def __init__(self, items: Sequence[I]) -> None:
        self.items = items
        self.results: list[R] | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.wake = threading.Event()


class Together(Generic[I, R]):
    """Carries out the items of concurrent threads in batches, one batch at a time.

    `carry_out(items)` returns one result per item, in order. A thread that arrives while no
    batch is under way carries out its own items at once. One that arrives during a batch
    waits; when that batch ends, the first waiting thread carries out everything gathered
    meanwhile, in one call, and each thread gets its own results.

    If `carry_out` raises, the thread that called it gets the exception and every other
    thread of the batch gets `stand_in(exception, its items)` (their items may or may not
    have been carried out: a caller must treat that as it treats a failed call of its own).

    The main thread carries out its own items alone, at once, and never waits in line nor
    carries out other threads' items: Ctrl-C (and a SIGTERM handler's `SystemExit`) lands
    there, and an interrupt of one thread must fail nobody else's call nor leave anyone
    waiting.
    """

    def __init__(
        self,
        carry_out: Callable[[list[I]], list[R]],
        stand_in: Callable[[BaseException, Sequence[I]], BaseException],
    ) -> None:
        self._carry_out = carry_out
        self._stand_in = stand_in
        self._lock = threading.Lock()
        self._waiting: list[_Ticket[I, R]] = []
        self._busy = False  # a batch is under way (or its leader is about to take it)

    def run(self, items: Sequence[I]) -> list[R]:
        """The results of `items`, carried out alone or in a batch with other threads'."""
        if threading.current_thread() is threading.main_thread():
            return self._carry_out(list(items))
        ticket: _Ticket[I, R] = _Ticket(items)
        with self._lock:
            self._waiting.append(ticket)
            lead = not self._busy
            self._busy = True
        if not lead:
            try:
                ticket.wake.wait()
            except BaseException:
                with self._lock:
                    if ticket in self._waiting:  # not taken: nothing was done for it
                        self._waiting.remove(ticket)
                        if ticket.lead:
                            self._hand_over()
                raise
            if not ticket.lead:
                if ticket.error is not None:
                    raise ticket.error
                assert ticket.results is not None
                return ticket.results
        return self._lead(ticket)

    def _lead(self, ticket: _Ticket[I, R]) -> list[R]:
        """Carry out every waiting thread's items (this thread's among them) in one call."""
        try:
            with self._lock:
                batch, self._waiting = self._waiting, []
            if len(batch) == 1:
                return self._carry_out(list(ticket.items))
            items = [item for waiting in batch for item in waiting.items]
            try:
                results = self._carry_out(items)
            except BaseException as exc:
                for waiting in batch:
                    if waiting is not ticket:
                        waiting.error = self._stand_in(exc, waiting.items)
                        waiting.wake.set()
                raise
            start = 0
            for waiting in batch:
                end = start + len(waiting.items)
                waiting.results = results[start:end]
                start = end
                if waiting is not ticket:
                    waiting.wake.set()
            assert ticket.results is not None
            return ticket.results
        finally:
            with self._lock:
                self._hand_over()

    def _hand_over(self) -> None:
        """(Under the lock, the batch ended.) The first waiting thread commits the next."""
        if self._waiting:
            first = self._waiting[0]
            first.lead = True
            first.wake.set()
        else:
            self._busy = False

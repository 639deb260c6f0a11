"""Leases kept alive while this process holds them.

A lease is made of the request's timeouts (plus a margin), and httpx's read timeout bounds
each read, not the whole answer: a long stream, or an answer that trickles in, can outlast
it. A resumer elsewhere (another process, another host) would then take the operation over
while its holder is still reading the answer, and send it again under the same key. So while
this process holds an operation (from the claim that sends it to the write that records or
releases it), a thread of the journal extends its lease each time half of it has passed: one
UPDATE, fenced by the holder and the lease version, that changes nothing once the operation
is finished, released or taken over.

A holder that dies stops renewing: its lease ends at most one lease length later, as before.
A hold is renewed for at most `RENEW_FOR` seconds, so that an answer that is never read to
its end nor closed cannot keep its operation from a resume for longer.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

__all__ = ["RENEW_FOR", "Holds"]

logger = logging.getLogger("idemclient")

#: how long one hold is renewed at most, in seconds
RENEW_FOR = 3600.0
#: the renewing thread looks at least this often, in seconds (and retries a failed renewal
#: after a tenth of its lease, at most this long)
_MOST_EVERY = 10.0

#: an idle renewing thread ends after this many seconds with nothing held
_IDLE = 10.0

#: what renewal writes: (key, lease version, owner, lease seconds)
Lease = tuple[str, int, str, float]

_all: weakref.WeakSet[Holds] = weakref.WeakSet()


class _Hold:
    """One held operation. When to renew is reckoned on the monotonic clock (a wall clock
    that jumps, or a test's clock, starts no renewals); what is written is the journal's."""

    __slots__ = ("expires", "lease", "loop", "owner", "renew_at", "since", "version")

    def __init__(self, version: int, owner: str, lease: float, now: float) -> None:
        self.version, self.owner, self.lease = version, owner, lease
        #: the event loop of the async task that holds it (`Holds.tie`), if one does: weakly
        #: (a loop dropped unclosed, with its tasks, must not be kept alive by its leases)
        self.loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self.since = time.monotonic()
        self.renew_at = self.since + lease / 2
        self.expires = now + lease

    def orphaned(self) -> bool:
        """Whether the loop of the task that holds it is closed or gone: that task never
        runs again, to record the answer or give the lease back."""
        if self.loop is None:
            return False
        loop = self.loop()
        return loop is None or loop.is_closed()


class Holds:
    """The operations this process holds in one journal, and the thread that renews their
    leases. `renew(leases, now)` writes `lease_expires = now + lease` for each (fenced by its
    owner and version) and returns the keys it changed: a hold whose row no longer matches
    (finished, released, abandoned, taken over) is no longer renewed. `clock` is the
    journal's wall clock (the one its leases are written in)."""

    def __init__(
        self, renew: Callable[[Sequence[Lease], float], set[str]], clock: Callable[[], float]
    ) -> None:
        self._renew = renew
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a hold came, or it is closing
        self._held: dict[str, _Hold] = {}
        self._forgotten: collections.deque[tuple[str, int]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wakes_at = float("inf")  # when the thread's current wait ends (monotonic)
        _all.add(self)

    def hold(
        self,
        key: str,
        version: int,
        owner: str,
        lease: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """This process now holds `key` at `version`, for `lease` seconds from now; for a
        task of `loop`, if given (`tie`)."""
        entry = _Hold(version, owner, lease, self._clock())
        entry.loop = _weakly(loop)
        with self._lock:
            if self._closed:
                return
            self._forget_now(orphans=False)  # (the renewing thread looks for those)
            self._held[key] = entry
            if entry.renew_at < self._wakes_at:  # due before the thread would look: wake it
                self._changed.notify()
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="idemclient-leases", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread now (a limit, the interpreter ending)
                    logger.warning("leases of this process are not renewed for now: %s", exc)
                else:
                    self._thread = thread

    def forget(self, key: str, version: int) -> None:
        """`drop`, without taking the lock: for a flow closed by the garbage collector, which
        may run in a thread that holds it. Done at the next look at the holds, before any
        renewal."""
        self._forgotten.append((key, version))

    def tie(self, key: str, version: int, loop: asyncio.AbstractEventLoop) -> None:
        """`key`, held at `version`, is held by a task of `loop`: if that loop is closed
        under it (its pending tasks never run again, nor end), the hold is dropped."""
        with self._lock:
            entry = self._held.get(key)
            if entry is not None and entry.version == version:
                entry.loop = _weakly(loop)

    def _forget_now(self, *, orphans: bool = True) -> None:
        """Drop what `forget` was told, and (with `orphans`: a look at every hold) the holds
        of tasks whose loop is closed or gone (the lock held)."""
        while self._forgotten:
            key, version = self._forgotten.popleft()
            entry = self._held.get(key)
            if entry is not None and entry.version == version:
                del self._held[key]
        if orphans:
            for key in [k for k, h in self._held.items() if h.orphaned()]:
                del self._held[key]

    def drop(self, key: str, version: int) -> None:
        """`key`, held at `version`, is recorded, released or given back: its lease is no
        longer renewed (a newer hold of the same key is kept)."""
        with self._lock:
            entry = self._held.get(key)
            if entry is not None and entry.version == version:
                del self._held[key]

    def held(self) -> dict[str, tuple[int, float]]:
        """Key -> (version, when its lease ends, as last written): for tests and inspection."""
        with self._lock:
            self._forget_now()
            return {key: (h.version, h.expires) for key, h in self._held.items()}

    def close(self) -> None:
        """The journal is closed: nothing more is renewed."""
        with self._lock:
            self._closed = True
            self._held.clear()
            self._changed.notify()

    def _reset(self) -> None:
        """In a forked child: the parent's holds are the parent's, and so is its thread."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._held = {}
        self._forgotten = collections.deque()
        self._thread = None
        self._wakes_at = float("inf")

    def _run(self) -> None:
        """Renew each lease when half of it has passed; end after `_IDLE` seconds with
        nothing held (the next hold starts another thread), so that a journal dropped
        unclosed is not kept alive."""
        idle_since: float | None = None
        while True:
            with self._lock:
                self._forget_now()
                moment = time.monotonic()
                for key in [k for k, h in self._held.items() if moment - h.since >= RENEW_FOR]:
                    del self._held[key]  # held too long: never read to its end, nor closed
                if self._closed or (not self._held and idle_since is not None
                                    and moment - idle_since >= _IDLE):  # fmt: skip
                    self._thread = None
                    return
                if not self._held:
                    idle_since = moment if idle_since is None else idle_since
                    self._wakes_at = moment + _IDLE
                    self._changed.wait(_IDLE)
                    self._wakes_at = float("inf")
                    continue
                idle_since = None
                soonest = min(h.renew_at for h in self._held.values())
                if soonest > moment:
                    timeout = min(soonest - moment, _MOST_EVERY)
                    self._wakes_at = moment + timeout
                    self._changed.wait(timeout)
                    self._wakes_at = float("inf")
                    continue
            self._renew_due()

    def _renew_due(self) -> None:
        moment = time.monotonic()
        with self._lock:
            self._forget_now()
            due = [
                (key, h.version, h.owner, h.lease)
                for key, h in self._held.items()
                if h.renew_at <= moment
            ]
        if not due:
            return
        now = self._clock()
        try:
            renewed = self._renew(due, now)
        except Exception as exc:  # unreachable a while: tried again a little later
            logger.debug("could not renew %d lease(s): %s", len(due), exc)
            with self._lock:
                for key, version, _, _ in due:
                    entry = self._held.get(key)
                    if entry is not None and entry.version == version:
                        entry.renew_at = moment + min(entry.lease / 10, _MOST_EVERY)
            return
        with self._lock:
            for key, version, _, lease in due:
                entry = self._held.get(key)
                if entry is None or entry.version != version:
                    continue
                if key in renewed:
                    entry.expires = now + lease
                    entry.renew_at = moment + lease / 2
                else:  # finished, released or taken over meanwhile: not ours to renew
                    del self._held[key]


def _weakly(
    loop: asyncio.AbstractEventLoop | None,
) -> weakref.ref[asyncio.AbstractEventLoop] | None:
    """A weak reference to `loop`; `None` for a loop that takes none (then its holds are
    not tied to it)."""
    if loop is None:
        return None
    try:
        return weakref.ref(loop)
    except TypeError:
        return None


def _after_fork_in_child() -> None:
    for holds in list(_all):
        holds._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)

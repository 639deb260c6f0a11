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

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

__all__ = ["RENEW_FOR", "Holds"]

logger = logging.getLogger("idemclient")

#: how long one hold is renewed at most, in seconds
RENEW_FOR = 3600.0
#: the renewing thread looks this often at most (and at least every tenth of a lease)
_MOST_EVERY = 10.0
_LEAST_EVERY = 0.05

#: what renewal writes: (key, lease version, owner, lease seconds)
Lease = tuple[str, int, str, float]

_all: weakref.WeakSet[Holds] = weakref.WeakSet()


class _Hold:
    """One held operation. When to renew is reckoned on the monotonic clock (a wall clock
    that jumps, or a test's clock, starts no renewals); what is written is the journal's."""

    __slots__ = ("expires", "lease", "owner", "renew_at", "since", "version")

    def __init__(self, version: int, owner: str, lease: float, now: float) -> None:
        self.version, self.owner, self.lease = version, owner, lease
        self.since = time.monotonic()
        self.renew_at = self.since + lease / 2
        self.expires = now + lease


class Holds:
    """The operations this process holds in one journal, and the thread that renews their
    leases. `renew(leases, now)` writes `lease_expires = now + lease` for each (fenced by its
    owner and version; a row that no longer matches is left alone); `clock` is the journal's
    wall clock (the one its leases are written in)."""

    def __init__(
        self, renew: Callable[[Sequence[Lease], float], None], clock: Callable[[], float]
    ) -> None:
        self._renew = renew
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, _Hold] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        _all.add(self)

    def hold(self, key: str, version: int, owner: str, lease: float) -> None:
        """This process now holds `key` at `version`, for `lease` seconds from now."""
        entry = _Hold(version, owner, lease, self._clock())
        with self._lock:
            self._held[key] = entry
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="idemclient-leases", daemon=True
                )
                self._thread.start()

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
            return {key: (h.version, h.expires) for key, h in self._held.items()}

    def close(self) -> None:
        """The journal is closed: nothing more is renewed."""
        self._stop.set()
        with self._lock:
            self._held.clear()

    def _reset(self) -> None:
        """In a forked child: the parent's holds are the parent's, and so is its thread."""
        self._lock = threading.Lock()
        self._held = {}
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._held:
                    self._thread = None  # the next hold starts another
                    return
                every = min(h.lease for h in self._held.values()) / 10
            if self._stop.wait(min(max(every, _LEAST_EVERY), _MOST_EVERY)):
                return
            self._renew_due()

    def _renew_due(self) -> None:
        moment = time.monotonic()
        with self._lock:
            due = [
                (key, h.version, h.owner, h.lease)
                for key, h in self._held.items()
                if h.renew_at <= moment and moment - h.since < RENEW_FOR
            ]
        if not due:
            return
        now = self._clock()
        try:
            self._renew(due, now)
        except Exception as exc:  # unreachable a while: tried again at the next look
            logger.debug("could not renew %d lease(s): %s", len(due), exc)
            return
        with self._lock:
            for key, version, _, lease in due:
                entry = self._held.get(key)
                if entry is not None and entry.version == version:
                    entry.expires = now + lease
                    entry.renew_at = moment + lease / 2


def _after_fork_in_child() -> None:
    for holds in list(_all):
        holds._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)

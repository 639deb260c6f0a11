"""The journal: the contract every backend keeps, and the way to open one.

`JournalBackend` is what the core, the transports, `resume_pending` and the command line
use; each method's docstring states what a backend guarantees (the model is hishel's storage
base class). The rules of a registration live in one pure function (`_decide`) that every
backend calls: a backend only stores.

Backends:

* `Journal` (`_sqlite.py`): one SQLite file, the embedded default.
* `PostgresJournal` (`_postgres.py`): PostgreSQL, for fleets (extra `idemclient[postgres]`).

`open_journal` turns a location into one: a path, a `postgresql://` URL, or `None` for
`$IDEMCLIENT_JOURNAL` (either kind), else the default SQLite file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from typing_extensions import Self  # Python 3.10 has no typing.Self

from idemclient._errors import JournalError
from idemclient._records import (
    FINISHED,
    JournalStats,
    Operation,
    Registration,
    RequestRecord,
    State,
    StoredResponse,
    Verdict,
    VerdictKind,
)

from ._decide import DEFAULT_PURGE_HORIZON
from ._postgres import PostgresJournal, is_postgres_location, is_postgres_url
from ._sqlite import Journal, default_journal_path

__all__ = [
    "AsyncJournalSteps",
    "Journal",
    "JournalBackend",
    "PostgresJournal",
    "default_journal_path",
    "is_postgres_url",
    "open_journal",
]


class JournalBackend(Protocol):
    """The durable record of operations, as the core and its users need it.

    Every method that reads or writes raises `JournalError` (naming where the journal is)
    when the store cannot be reached, read or written; nothing else of the backend's driver
    escapes. Writes before a send (`register`, `register_many`, `claim`) are durable when
    they return; the others need not be (if one is lost, a resume resends the same key and
    the server replays its answer). A write by a holder whose lease was taken over (its
    `version` is no longer the operation's) changes nothing.

    Example:
        >>> def report(journal: JournalBackend) -> None:
        ...     for op in journal.pending():
        ...         print(op.name or op.key, op.attempts, op.last_error)
    """

    #: how long the server keeps a key: a pending operation sent at least once and older
    #: than this is `expired`, never resent automatically (a property of the journal, shared
    #: by every client of it)
    retention: timedelta
    #: bytes of a final response body kept for replays
    max_response_body: int
    #: the same for an answer the caller streamed (`finish(..., streamed=True)`)
    max_stream_body: int
    #: finished operations older than this (never less than the retention) are purged
    #: automatically, once a day per journal, off the callers' paths; `None`: never
    auto_purge: timedelta | None

    @property
    def closed(self) -> bool:
        """Whether `close()` has begun: nothing more may be written through this journal."""
        ...

    # -- one operation's life: what the core's steps carry out --------------------------

    def register(self, record: RequestRecord, owner: str, lease_seconds: float) -> Registration:
        """Look the operation up and, if it is to be sent, claim it: one durable commit.

        The decision is `_decide.register`'s: unknown, it is inserted and claimed for `owner`
        (`SEND`, first attempt, `fresh`); known, a different request is `MISMATCH`, a finished
        one is answered (`COMPLETED` with its `response`, `CONFLICT`, `ABANDONED`), one past
        the retention becomes `EXPIRED`, one whose live holder's lease has not ended is
        `IN_PROGRESS`, one taken over too often is `PARKED`, and a pending one with a free
        lease is claimed (`SEND`, one more attempt, a new `lease_version`). Nothing is sent
        by the caller unless the commit is durable.
        """
        ...

    def register_many(
        self, requests: Sequence[tuple[RequestRecord, str, float]]
    ) -> list[Registration | JournalError]:
        """`register` for several operations (record, owner, lease seconds), in order: each
        result is the `Registration`, or the `JournalError` that stopped that one."""
        ...

    def claim(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> Registration:
        """Claim one more attempt for the holder at `version`: one durable commit.

        `SEND` with the new `lease_version` (its `operation.attempts` counts this attempt),
        or why the attempt must not be sent: `EXPIRED`, `ABANDONED`, `COMPLETED` or `CONFLICT`
        (finished by another holder: its answer in `response`), `PARKED`, or `IN_PROGRESS`
        (another holder took it over). Raises `JournalError` if the key is no longer known.
        """
        ...

    def unclaim(self, key: str, version: int, *, fresh: bool, never_sent: bool = False) -> None:
        """Undo a claim whose request was provably never sent (cancelled before the send).

        A `fresh` operation (inserted by that very registration) is removed, as if never
        registered; a known one gets its attempt back and its lease freed (and counts as never
        sent again if that was its first attempt, or if `never_sent`: no attempt before this
        one reached the server either). Fenced by `version`.
        """
        ...

    def finish(
        self,
        key: str,
        version: int,
        state: Literal["completed", "conflict"],
        response: StoredResponse,
        *,
        streamed: bool = False,
    ) -> None:
        """Record the final response, fenced by `version`; it may be written later (batched).

        Its body is kept up to `max_response_body` bytes (`max_stream_body` if `streamed`);
        a larger one is recorded with its status and headers only (`body_kept=False`). No
        disk or network I/O on the caller's path is required: the async transport calls it on
        the event loop. Until written, the operation merely looks pending; every read through
        any journal of this process sees it written (`flush` first).

        Raises:
            JournalError: this journal is closed and nothing else can write the answer (the
                operation stays pending).
        """
        ...

    def release(
        self,
        key: str,
        version: int,
        last_error: str | None,
        *,
        moved_fingerprint: str | None = None,
        never_sent: bool = False,
    ) -> bool:
        """Give the lease back, leaving the operation pending with its last error; whether it
        was still this holder's (`version`).

        `moved_fingerprint`: a 307/308 sent the request on; a request with this fingerprint is
        then accepted as this operation's next attempt. `never_sent`: no attempt ever reached
        the server, so it stays provably never sent and no retention expires it.
        """
        ...

    def flush(self) -> None:
        """Write every completion held in memory (see `finish`) now."""
        ...

    def close(self) -> None:
        """Write held completions and let go of every resource; later use raises
        `JournalError`. Closing twice is harmless."""
        ...

    def __enter__(self) -> Self:
        """The journal itself, closed when the block ends."""
        ...

    def __exit__(self, *exc_info: object) -> None: ...

    # -- reading back ---------------------------------------------------------------------

    def stored_request(self, key: str) -> tuple[str, str, list[tuple[str, str]], bytes, str]:
        """The journaled request: method, URL, headers (no secrets), the exact body bytes,
        and the encoding that turns the headers back into their bytes. `KeyError` if unknown."""
        ...

    def stored_response(self, name_or_key: str) -> StoredResponse | None:
        """The journaled final response of an operation (by name, else key), if it has one."""
        ...

    def pending_requests(
        self,
    ) -> list[tuple[Operation, tuple[str, str, list[tuple[str, str]], bytes, str]]]:
        """Every pending operation (those past the retention included) with its stored
        request (as `stored_request` gives it), oldest first, in one read: what a resume
        sends."""
        ...

    def operations(self, state: State | None = None) -> list[Operation]:
        """Every operation, oldest first; only those in `state` if given (`ValueError` for a
        state that does not exist)."""
        ...

    def get(self, name_or_key: str) -> Operation | None:
        """The operation with this name, else with this key (a name wins); `None` if neither
        is known."""
        ...

    def by_keys(self, keys: Iterable[str]) -> dict[str, Operation]:
        """The operations with these keys, as this process sees them (its held completions
        included), by key; a key not known is left out. One read for many keys: what a
        resume reads its sends back with."""
        ...

    def refresh_retention(self) -> timedelta:
        """The retention as the store keeps it now, read again and kept as `retention`
        (another process may have changed it). `expire_stale` and `pending` do this first."""
        ...

    def stats(self) -> JournalStats:
        """Operations by state and the oldest pending one, from one aggregate read (cheap
        however large the journal: for monitoring)."""
        ...

    def pending(self) -> list[Operation]:
        """Operations a resume would send: pending and not past the retention, oldest first."""
        ...

    # -- upkeep ---------------------------------------------------------------------------

    def expire_stale(self, select: Callable[[Operation], bool] | None = None) -> list[Operation]:
        """Mark pending operations sent once and older than the retention `expired` (only
        those `select` accepts, if given), in one transaction; the expired operations."""
        ...

    def abandon(self, name_or_key: str) -> Operation:
        """Mark a pending, expired or parked operation `abandoned`: never sent again.
        `KeyError` if unknown, `ValueError` if it is finished already."""
        ...

    def unpark(self, name_or_key: str) -> Operation:
        """Make a parked operation pending again, with its key and its recoveries reset.
        `KeyError` if unknown, `ValueError` if it is not parked."""
        ...

    def reissue(self, name_or_key: str) -> Operation:
        """Give an expired operation a new key (the old one kept as `previous_key`), pending
        and never sent. For a person who checked the server did not act. `KeyError` if
        unknown, `ValueError` if it is not expired."""
        ...

    def purge(
        self, older_than: timedelta = DEFAULT_PURGE_HORIZON, *, states: tuple[State, ...] = FINISHED
    ) -> int:
        """Delete finished operations (only `completed`, `conflict`, `abandoned`) last updated
        more than `older_than` ago; the count. `ValueError` for a horizon shorter than the
        retention or a state that is not finished. Pending and expired ones are never purged."""
        ...

    def reconcile(
        self,
        name_or_key: str,
        verdict: VerdictKind,
        decided_by: str,
        *,
        response: StoredResponse | None = None,
        detail: str | None = None,
    ) -> Operation:
        """Decide on an `expired` operation, and journal who decided what and when, in one
        durable transaction: `happened` makes it `completed` (with `response` as its answer,
        else none kept), `not_happened` reissues it (a new key, pending, never sent),
        `unknown` and `error` leave it expired. `KeyError` if unknown, `ValueError` if it is
        not expired or the verdict is not one of `VERDICTS`."""
        ...

    def decisions(self, name_or_key: str) -> list[Verdict]:
        """The decisions journaled on an operation, under any key it had, oldest first
        (`KeyError` if unknown)."""
        ...

    def purge_if_due(self) -> int | None:
        """The automatic purge, if no journal on this store did it in the last day: `purge`
        with `auto_purge` as the horizon (never less than the retention); the count, or
        `None` when not due or off. One conditional write decides who does it, so many
        processes sharing a journal purge once a day between them. Called by the journal's
        own upkeep thread (at open, then hourly); pending, expired and parked operations
        are never purged."""
        ...

    def set_retention(self, retention: timedelta) -> None:
        """Change the journal's retention for every client that opens it from now on
        (`ValueError` unless positive)."""
        ...


@runtime_checkable
class AsyncJournalSteps(Protocol):
    """What a backend with native async I/O adds: the writes of one operation's life as
    coroutines of the running asyncio loop, so that the async transport makes them without a
    worker thread (`PostgresJournal`, on psycopg's async connections). Each keeps the
    guarantees of its sync twin in `JournalBackend` exactly; the transport runs each in a task
    of its own and sees it through, whatever cancels the caller meanwhile. A backend without
    them (SQLite) is called in a worker thread."""

    async def aregister_many(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        *,
        arrived: Sequence[float] | None = None,
    ) -> list[Registration | JournalError]:
        """`JournalBackend.register_many`: what the async transport commits for the
        registrations of its tasks that wait together. `arrived` is when each was asked for
        (`time.monotonic()`): one that waited for a batch that found the backend out of
        reach may fail with that batch's error without being tried (its caller has waited
        for the backend once already)."""
        ...

    def register_many(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        *,
        arrived: Sequence[float] | None = None,
    ) -> list[Registration | JournalError]:
        """`JournalBackend.register_many`, with `arrived` as `aregister_many` takes it: what
        the async transport calls from a worker thread when its loop is not asyncio's."""
        ...

    async def aclaim(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> Registration:
        """`JournalBackend.claim`."""
        ...

    async def arelease(
        self,
        key: str,
        version: int,
        last_error: str | None,
        *,
        moved_fingerprint: str | None = None,
        never_sent: bool = False,
    ) -> bool:
        """`JournalBackend.release`."""
        ...

    async def aunclaim(
        self, key: str, version: int, *, fresh: bool, never_sent: bool = False
    ) -> None:
        """`JournalBackend.unclaim`."""
        ...


def open_journal(location: str | os.PathLike[str] | None = None, **options: Any) -> JournalBackend:
    """The journal at `location`: a `postgresql://` (or `postgres://`) URL opens a
    `PostgresJournal`, anything else an SQLite `Journal` file (created if need be); `None`
    means `$IDEMCLIENT_JOURNAL` (a path or a URL), else the default SQLite journal in the
    user state directory. `options` go to the backend's constructor.

    The one place where what the transports, clients and the command line were given
    becomes a journal.

    Raises:
        JournalError: it cannot be opened (for PostgreSQL without the driver installed, the
            error names the extra to install).
    """
    if location is None:
        location = os.environ.get("IDEMCLIENT_JOURNAL") or None
    if is_postgres_location(location):
        return PostgresJournal(str(location), **options)
    return Journal(location, **options)

"""The rules of a registration and a claim: pure functions that every backend calls.

No SQL and no I/O here. A backend looks the stored rows up (`lookups` says which), hands them
over as `StoredRow`s, and stores what the rules decided (`Decided.write`: `Insert`,
`ClaimUpdate`, `Expire`, `Park`, or nothing). So SQLite and PostgreSQL journals decide alike.

The rules (DESIGN.md §2, §3): an unknown operation is inserted and claimed; a known name or key
with another request is a mismatch (unless a 307/308 sent the request on to where it now
is); a finished one is answered from the journal; one sent before and older than the retention
expires (never resent automatically); one whose live holder's lease has not ended is in
progress; one whose holders kept vanishing mid-operation is parked for a person; any other is
claimed for one more attempt under a new lease version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from idemclient._records import (
    Decision,
    Operation,
    Registration,
    RequestRecord,
    StoredResponse,
    utc,
)

__all__ = [
    "DEFAULT_PURGE_HORIZON",
    "DEFAULT_RETENTION",
    "ClaimUpdate",
    "Decided",
    "Expire",
    "Insert",
    "Limits",
    "Park",
    "StoredRow",
    "Write",
    "claim",
    "lookups",
    "new_registration",
    "register",
    "with_stored_body",
]

#: how long a server keeps a key, unless the journal says otherwise (its own retention)
DEFAULT_RETENTION = timedelta(hours=24)
#: finished operations are kept this long by default before `purge` may delete them
DEFAULT_PURGE_HORIZON = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class StoredRow:
    """An operation as a backend holds it: what the user sees, and the journal's bookkeeping.

    Times are seconds since the epoch, as stored. `response` is the journaled answer of a
    finished operation (`None` while pending).
    """

    operation: Operation
    fingerprint: str  # of the request it was registered (or rebased, or moved) with
    first_sent_at: float | None  # None until the first claim: provably never sent
    lease_owner: str | None
    lease_expires: float | None
    lease_version: int
    moved_fingerprint: str | None = None  # the request a 307/308 sent it on as
    response: StoredResponse | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What the rules need to know of the journal and the world beside the rows."""

    retention: timedelta
    max_recoveries: int
    #: whether a lease owner still runs (`_owner.owner_alive`; another host: assumed alive)
    alive: Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Insert:
    """Insert the record as a new operation, claimed by the registering owner: first attempt,
    lease version 1, created, updated and first sent now. A backend whose insert finds the
    name or key taken raises `JournalError` (a collision: the lookup found neither)."""


@dataclass(frozen=True, slots=True)
class ClaimUpdate:
    """Claim one more attempt: store these values on the operation with this key."""

    key: str
    lease_version: int
    lease_owner: str
    lease_expires: float
    attempts: int
    first_sent_at: float
    recoveries: int
    url: str
    fingerprint: str
    last_error: str | None
    updated_at: float
    #: the request may be a multipart rerun: read the stored body and headers, and let
    #: `with_stored_body` decide which bytes to send
    compare_body: bool = False


@dataclass(frozen=True, slots=True)
class Expire:
    """Mark the operation `expired` and free its lease."""

    key: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class Park:
    """Mark the operation `parked` for a person, with its recoveries and why; free its lease."""

    key: str
    recoveries: int
    reason: str
    updated_at: float


Write = Insert | ClaimUpdate | Expire | Park


@dataclass(frozen=True, slots=True)
class Decided:
    """The rules' answer: the registration to return, and the write to make first (if any)."""

    registration: Registration
    write: Write | None = None


def lookups(record: RequestRecord) -> tuple[bool, bool]:
    """Which stored rows `register` reads for `record`: (by name, by key). A backend may skip
    a lookup it is told it need not make."""
    if record.name is not None:
        return True, record.key_given
    return False, record.key_given or record.resume


def new_registration(record: RequestRecord, now: float) -> Registration:
    """What registering a new operation decided: send it, first attempt, first lease."""
    when = utc(now)
    op = Operation(
        record.name, record.key, "pending", record.method, record.url, 1, when, when, None, None,
        key_header=record.key_header, key_style=record.key_style,
    )  # fmt: skip
    return Registration(Decision.SEND, op, lease_version=1, fresh=True)


def register(
    record: RequestRecord,
    by_name: StoredRow | None,
    by_key: StoredRow | None,
    *,
    owner: str,
    lease_seconds: float,
    now: float,
    limits: Limits,
) -> Decided:
    """`register`'s decision for `record`, given the stored row with its name and the one with
    its key (each `None` if unknown, or if `lookups` said it need not be read). The row with
    its key is the operation that gave the key up for a new one, when one did (`reissue`)."""
    row = None
    if record.name is not None:
        row = by_name
        # the caller's key is another operation's
        if (
            record.key_given
            and by_key is not None
            and (row is None or by_key.operation.key != row.operation.key)
        ):
            detail = f"key {record.key!r} already belongs to another operation"
            return Decided(Registration(Decision.MISMATCH, by_key.operation, detail=detail))
    elif record.key_given or record.resume:
        row = by_key
    if row is None:
        return Decided(new_registration(record, now), Insert())
    op = row.operation
    # Inside a named operation the journal's key is the key: one a caller (an SDK that
    # draws a key per call) put in the header is replaced by it (`request_with_key`).
    # An unnamed operation found by a key it gave up (reissued by a person: the server may
    # have forgotten the old key): never sent under that key again, nor as a new operation
    # (the operation would be performed twice, once under each key). A resume sends it.
    if record.key_given and op.key != record.key and record.name is None:
        detail = f"its key {record.key!r} was given up for {op.key!r} (reissued); a resume sends it"
        return Decided(Registration(Decision.MISMATCH, op, detail=detail))
    # A request a 307/308 sent on (httpx follows it with the same key) is the same
    # operation at its new URL.
    moved = (
        op.state == "pending"
        and row.moved_fingerprint is not None
        and row.moved_fingerprint == record.fingerprint
    )
    if not record.resume and row.fingerprint != record.fingerprint and not moved:
        detail = f"it was registered with another request ({op.method} {op.url})"
        return Decided(Registration(Decision.MISMATCH, op, detail=detail))
    if op.state != "pending":
        return _finished(row)
    if (expired := _expire(row, now, limits)) is not None:
        return expired
    if not _lease_free(row, now, limits):
        until = utc(row.lease_expires) if row.lease_expires is not None else "it ends"
        detail = f"held by {row.lease_owner} until {until}"
        return Decided(Registration(Decision.IN_PROGRESS, op, detail=detail))
    # A lease that was never given back: its holder died (or stalled) mid-operation.
    recoveries = op.recoveries + (1 if row.lease_owner is not None else 0)
    if recoveries > limits.max_recoveries:
        reason = (
            f"parked after {recoveries} recoveries: each time, the process sending it "
            f"was gone before it finished (last holder {row.lease_owner}); unpark or abandon it"
        )
        parked = dataclasses.replace(
            op, state="parked", recoveries=recoveries, updated_at=utc(now), last_error=reason
        )
        return Decided(
            Registration(Decision.PARKED, parked, detail=reason),
            Park(op.key, recoveries, reason, now),
        )
    # A resume sends to the URL in its record (the stored one, or where `rebase` moved it), a
    # redirected request to where it was sent on: that is where the operation now lives, for
    # every later resume too.
    url = record.url if record.resume or moved else op.url
    # Moved to another host (`rebase`): it is now this request at the new host, so that a
    # rerun there is recognised, and one still at the old host is refused, not sent where
    # the operation no longer lives.
    fingerprint = row.fingerprint
    if record.resume and _origin(record.url) != _origin(op.url):
        fingerprint = record.fingerprint
    return _claimed(
        row, owner=owner, lease_seconds=lease_seconds, now=now, recoveries=recoveries, url=url,
        fingerprint=fingerprint, last_error=op.last_error,
        compare_body=record.body[:2] == b"--" and not record.resume,  # perhaps multipart
    )  # fmt: skip


def claim(
    row: StoredRow,
    version: int,
    *,
    owner: str,
    lease_seconds: float,
    last_error: str | None,
    now: float,
    limits: Limits,
) -> Decided:
    """`claim`'s decision: one more attempt for the holder at `version`, or why not (finished
    meanwhile, taken over by another holder, or past the retention after a long sleep)."""
    op = row.operation
    if op.state != "pending":
        return _finished(row)
    if row.lease_version != version:
        detail = f"taken over by {row.lease_owner or 'another holder'}"
        return Decided(Registration(Decision.IN_PROGRESS, op, detail=detail))
    if (expired := _expire(row, now, limits)) is not None:
        return expired
    return _claimed(
        row, owner=owner, lease_seconds=lease_seconds, now=now, recoveries=op.recoveries,
        url=op.url, fingerprint=row.fingerprint, last_error=last_error,
    )  # fmt: skip


def with_stored_body(
    registration: Registration,
    body: bytes,
    stored_body: bytes,
    stored_headers: list[tuple[str, str]],
) -> Registration:
    """A rerun of a multipart upload sends the bytes of its first attempt (a server compares a
    retried key's body byte for byte, and each call draws a new boundary): the stored body
    and its content type, when they differ from this call's `body`."""
    if stored_body == body:
        return registration
    content_type = dict(stored_headers).get("content-type")
    return dataclasses.replace(registration, body=stored_body, content_type=content_type)


def _finished(row: StoredRow) -> Decided:
    """A finished (or expired, parked) operation: said as it is, with its answer."""
    op = row.operation
    return Decided(Registration(Decision(op.state), op, response=row.response))


def _expire(row: StoredRow, now: float, limits: Limits) -> Decided | None:
    """Sent before and now older than the retention: the server may have forgotten the key,
    so it is never resent automatically. `None` if it is not (a never-sent one never is)."""
    first_sent = row.first_sent_at
    if first_sent is None or first_sent >= now - limits.retention.total_seconds():
        return None
    expired = dataclasses.replace(row.operation, state="expired", updated_at=utc(now))
    return Decided(Registration(Decision.EXPIRED, expired), Expire(expired.key, now))


def _lease_free(row: StoredRow, now: float, limits: Limits) -> bool:
    """Nobody holds it, its lease has ended, or its holder is gone."""
    owner, expires = row.lease_owner, row.lease_expires
    if owner is None or (expires is not None and expires <= now):
        return True
    return not limits.alive(owner)


def _claimed(
    row: StoredRow,
    *,
    owner: str,
    lease_seconds: float,
    now: float,
    recoveries: int,
    url: str,
    fingerprint: str,
    last_error: str | None,
    compare_body: bool = False,
) -> Decided:
    """Claimed for one more attempt under the next lease version."""
    op = row.operation
    version = row.lease_version + 1
    write = ClaimUpdate(
        key=op.key,
        lease_version=version,
        lease_owner=owner,
        lease_expires=now + lease_seconds,
        attempts=op.attempts + 1,
        first_sent_at=row.first_sent_at if row.first_sent_at is not None else now,
        recoveries=recoveries,
        url=url,
        fingerprint=fingerprint,
        last_error=last_error,
        updated_at=now,
        compare_body=compare_body,
    )
    claimed = dataclasses.replace(
        op, attempts=write.attempts, updated_at=utc(now), recoveries=recoveries, url=url,
        last_error=last_error,
    )  # fmt: skip
    sent_before = row.first_sent_at is not None
    return Decided(
        Registration(Decision.SEND, claimed, lease_version=version, sent_before=sent_before),
        write,
    )


def _origin(url: str) -> str:
    """scheme://host[:port] of a stored URL, as written (for telling a host move apart)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0].split('?', 1)[0].lower()}"

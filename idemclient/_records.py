"""The journal's records: plain data that the core, the backends and the user share.

Standard library only: the core reads them, every journal backend (`idemclient.journal`)
writes and returns them, and `Operation` is public (`idemclient.Operation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Literal

__all__ = [
    "FINISHED",
    "STATES",
    "VERDICTS",
    "Decision",
    "Operation",
    "Registration",
    "RequestRecord",
    "State",
    "StoredResponse",
    "Verdict",
    "VerdictKind",
    "utc",
]

State = Literal["pending", "completed", "conflict", "expired", "parked", "abandoned"]
STATES: tuple[State, ...] = ("pending", "completed", "conflict", "expired", "parked", "abandoned")
#: finished for good: answered from the journal, never sent again (and purgeable)
FINISHED: tuple[State, ...] = ("completed", "conflict", "abandoned")


def utc(ts: float) -> datetime:
    """A stored timestamp (seconds since the epoch) as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True, slots=True)
class Operation:
    """One journaled operation, as the journal holds it now.

    `name` is `None` for an unnamed operation. `state` is one of `pending` (resumable),
    `completed`, `conflict` (422), `expired` (sent once and older than the retention: never
    resent automatically), `parked` (its sends kept ending with the process gone: a person
    decides) and `abandoned`. `attempts` counts the sends claimed so far; `recoveries` the
    times a holder vanished mid-operation; `previous_key` the key a `reissue` replaced.

    Example:
        >>> op = journal.get("charge-42")
        >>> op.state, op.attempts, op.response_status
        ('completed', 2, 201)
    """

    name: str | None
    key: str
    state: State
    method: str
    url: str
    attempts: int
    created_at: datetime
    updated_at: datetime
    response_status: int | None
    last_error: str | None
    recoveries: int = 0
    previous_key: str | None = None
    key_header: str | None = None
    key_style: str | None = None


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A final response as journaled: status, headers (no Set-Cookie) and the raw body.

    `body_kept` is `False` when the body was larger than the journal's `max_response_body`;
    a replay then returns the status and headers with an empty body.

    `headers` are text, decoded with `encoding` (httpx's `Headers.encoding` of the response:
    ascii, utf-8 or iso-8859-1, one for all of them). That decoding loses nothing, so encoding
    the text with it again gives back the exact bytes the server sent.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    body_kept: bool = True
    encoding: str = "utf-8"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What `register` needs to know about a request (secrets already removed)."""

    name: str | None
    key: str
    key_given: bool  # the caller chose the key (an Idempotency-Key header)
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    fingerprint: str
    resume: bool = False  # sent by resume: the stored request, found by key
    key_header: str = "Idempotency-Key"  # how the key goes out, stored with the operation
    key_style: str = "bare"
    headers_encoding: str = "utf-8"  # what `headers` were decoded with (httpx's choice)


class Decision(Enum):
    """What `register` decided; the core turns it into a send, a replay or an error."""

    SEND = "send"
    COMPLETED = "completed"
    CONFLICT = "conflict"
    MISMATCH = "mismatch"
    IN_PROGRESS = "in_progress"
    EXPIRED = "expired"
    PARKED = "parked"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class Registration:
    """What `register` or `claim` decided, with the operation as it stands after it.

    `lease_version` fences the claim (`SEND` only); `response` is a finished operation's
    journaled answer; `detail` says why nothing may be sent (a mismatch, a holder, parking).
    """

    decision: Decision
    operation: Operation
    lease_version: int = 0
    response: StoredResponse | None = None
    detail: str = ""
    fresh: bool = False  # a new operation inserted by this registration (nothing sent before)
    #: an earlier attempt may have reached the server (`SEND` only): `False` while every
    #: attempt before this claim provably never left (each connection refused)
    sent_before: bool = False
    # the journaled body to send instead of this request's (a multipart rerun: the first
    # attempt's boundary), and its content type
    body: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class JournalStats:
    """What a journal's `stats()` counts: every state (zeros included) and the oldest pending
    operation (`None`s if nothing is pending; its name is `None` if it is unnamed). A pending
    operation past the retention counts as pending until a resume expires it."""

    states: dict[str, int]
    oldest_pending_name: str | None = None
    oldest_pending_key: str | None = None
    oldest_pending_created_at: datetime | None = None


#: what a reconciliation found about an expired operation (`JournalBackend.reconcile`)
VERDICTS = ("happened", "not_happened", "unknown", "error")
VerdictKind = Literal["happened", "not_happened", "unknown", "error"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision on an expired operation, as the journal keeps it: what was found
    (`happened`, `not_happened`, `unknown`, or `error`: the check itself failed), who or what
    decided (a reconcile function's qualified name, "a person"), when, and any detail. `key`
    is the operation's key at that moment (a reissue gives it a new one)."""

    key: str
    name: str | None
    verdict: VerdictKind
    decided_by: str
    decided_at: datetime
    detail: str | None = None

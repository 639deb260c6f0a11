"""The exceptions idemclient raises.

Every one of them is raised *instead of* an httpx result, and each says whether the server may
have acted. The tree::

    IdempotencyError                 catch-all for idemclient's own decisions
    ├── ConflictError                the server refused the key (422): never retried
    │   └── OperationMismatchError   a known name or key with another request: nothing sent
    ├── OperationInProgressError     another live process holds the operation: nothing sent
    ├── OperationExpiredError        sent once, older than the retention: nothing sent
    ├── OperationParkedError         its sends kept killing the process: nothing sent
    ├── OperationAbandonedError      a person abandoned it: nothing sent
    ├── ResponseNotKeptError         completed before, its answer too large to keep: nothing sent
    ├── InvalidOperationError        bad name, key or body (also a ValueError): nothing sent
    ├── JournalError                 the journal could not be read or written: nothing sent
    └── RetriesExhaustedError        attempts or deadline used up: still pending, resumable

Transport errors that are not worth retrying (an unsupported protocol, a proxy error) are
raised as the original `httpx` exception, as plain httpx would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

    from ._records import Operation

__all__ = [
    "ConflictError",
    "IdempotencyError",
    "InvalidOperationError",
    "JournalError",
    "OperationAbandonedError",
    "OperationExpiredError",
    "OperationInProgressError",
    "OperationMismatchError",
    "OperationParkedError",
    "ResponseNotKeptError",
    "RetriesExhaustedError",
]


class IdempotencyError(Exception):
    """Base class of every idemclient error.

    `operation` is the journaled operation the error is about, when there is one.
    """

    def __init__(self, message: str, *, operation: Operation | None = None) -> None:
        super().__init__(message)
        self.operation = operation


class _AnsweredError(IdempotencyError):
    """An error that carries the server's answer (`response`), when there is one."""

    def __init__(
        self,
        message: str,
        *,
        operation: Operation | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message, operation=operation)
        self.response = response


class ConflictError(_AnsweredError):
    """The server answered 422 (or a 400 naming an `idempotency_error`) for this key.

    The key was already used with another payload, or the server cannot process it. Retrying
    with the same key can never succeed, and retrying with a new key could perform the
    operation twice, so idemclient stops: the operation is recorded as `conflict` and a later
    call with the same name raises this again without sending. `response` is the server's
    answer (from the journal on a rerun).

    Catch it to show the server's reason to a person.
    """


class OperationMismatchError(ConflictError):
    """A known operation name or key was used with a different request.

    Caught by the journal before anything is sent: the client-side twin of the server's 422.
    Usually a bug (two different requests under one name) or a script that changed between a
    crash and its rerun. `response` is `None`.
    """


class OperationInProgressError(IdempotencyError):
    """Another live process (or thread) holds the lease on this operation.

    Nothing was sent. Try again after the holder finishes, or once its lease expires.
    """


class OperationExpiredError(IdempotencyError):
    """The operation was sent at least once and is older than the journal's retention.

    The server may have forgotten the key, so a resend could perform it twice. Nothing was
    sent: a person decides (`Journal.abandon`, or a new operation under a new name).
    """


class OperationParkedError(IdempotencyError):
    """The operation was parked: every recent attempt ended with its process gone.

    An operation whose send keeps crashing the process (a body that makes the client run out
    of memory, a hook that kills it) would otherwise crash every rerun. After the journal's
    `max_recoveries` it is parked and nothing is sent; a person decides
    (`Journal.unpark` to try again with the same key, or `Journal.abandon`).
    """


class OperationAbandonedError(IdempotencyError):
    """The operation was abandoned by a person (`Journal.abandon`); it is never sent again."""


class ResponseNotKeptError(_AnsweredError):
    """The operation completed before, but its answer's body was larger than the journal
    keeps (`Journal(max_response_body=...)`), so it cannot be replayed. Nothing was sent.

    A replay with an empty body would look like a success that says nothing: this is raised
    instead, unless the transport was given `empty_replays=True`. `response` is the stored
    status and headers, with an empty body.
    """


class InvalidOperationError(IdempotencyError, ValueError):
    """The request cannot be made idempotent as given; nothing was sent.

    Raised for an invalid operation name, an `Idempotency-Key` value the IETF draft forbids, or
    a body that cannot be replayed byte for byte (already consumed, or over `max_body_size`).
    """


class JournalError(IdempotencyError):
    """The journal could not be opened, read or written; `path` names the file.

    Raised before a send means nothing was sent (idemclient fails closed). Raised after a
    response arrived (the completion write failed) means the operation stays pending: a resume
    sends the same key again and the server replays its answer.
    """

    def __init__(
        self, message: str, *, path: str | None = None, operation: Operation | None = None
    ) -> None:
        super().__init__(message, operation=operation)
        self.path = path


class RetriesExhaustedError(_AnsweredError):
    """Every attempt allowed by the `RetryPolicy` failed, or its deadline passed.

    The server may or may not have acted (a read timeout can hide a success). The operation
    stays `pending` in the journal with its key, so `resume_pending()` or a rerun finishes it
    without a duplicate. `response` is the last retryable response (already closed), if the
    last attempt got one; the last transport error is chained as `__cause__`.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: Operation | None = None,
        response: httpx.Response | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message, operation=operation, response=response)
        self.attempts = attempts

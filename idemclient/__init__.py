"""idemclient: make unsafe HTTP calls (POST, PATCH) safe to retry, across crashes.

Every operation gets one Idempotency-Key, written with the exact request to a local SQLite
journal before it is sent; retries and resumes after a crash reuse that key, so the server
performs the operation once. See the README for the guarantees and the limits.
"""

from __future__ import annotations

from ._budget import RetryBudget
from ._client import (
    AsyncClient,
    Client,
    ResumeReport,
    ResumeResult,
    aresume_pending,
    resume_pending,
    wrap,
)
from ._core import Event, operation, unjournaled
from ._errors import (
    ConflictError,
    IdempotencyError,
    InvalidOperationError,
    JournalError,
    OperationAbandonedError,
    OperationExpiredError,
    OperationInProgressError,
    OperationMismatchError,
    OperationParkedError,
    ResponseNotKeptError,
    RetriesExhaustedError,
)
from ._policy import RetryPolicy
from ._records import Operation
from ._transport import AsyncIdempotentTransport, IdempotentTransport
from .journal import Journal, PostgresJournal, open_journal

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncClient",
    "AsyncIdempotentTransport",
    "Client",
    "ConflictError",
    "Event",
    "IdempotencyError",
    "IdempotentTransport",
    "InvalidOperationError",
    "Journal",
    "JournalError",
    "Operation",
    "OperationAbandonedError",
    "OperationExpiredError",
    "OperationInProgressError",
    "OperationMismatchError",
    "OperationParkedError",
    "PostgresJournal",
    "ResponseNotKeptError",
    "ResumeReport",
    "ResumeResult",
    "RetriesExhaustedError",
    "RetryBudget",
    "RetryPolicy",
    "__version__",
    "aresume_pending",
    "open_journal",
    "operation",
    "resume_pending",
    "unjournaled",
    "wrap",
]

from __future__ import annotations

import idemclient


def test_all_is_exactly_the_public_surface() -> None:
    assert sorted(idemclient.__all__) == sorted(
        [
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
            "PostgresJournal",
            "open_journal",
            "Operation",
            "OperationAbandonedError",
            "OperationExpiredError",
            "OperationInProgressError",
            "OperationMismatchError",
            "OperationParkedError",
            "ResponseNotKeptError",
            "ResumeReport",
            "ResumeResult",
            "RetriesExhaustedError",
            "RetryBudget",
            "RetryPolicy",
            "__version__",
            "aresume_pending",
            "operation",
            "resume_pending",
            "unjournaled",
            "wrap",
        ]
    )


def test_every_exported_name_exists_and_public_names_are_exported() -> None:
    for name in idemclient.__all__:
        assert hasattr(idemclient, name), name
    public = {n for n in vars(idemclient) if not n.startswith("_")}
    submodules = {"annotations", "testing", "httpx2", "journal", "otel"}
    assert public <= set(idemclient.__all__) | submodules


def test_error_tree() -> None:
    e = idemclient
    assert issubclass(e.ConflictError, e.IdempotencyError)
    assert issubclass(e.OperationMismatchError, e.ConflictError)
    for cls in (
        e.OperationInProgressError,
        e.OperationExpiredError,
        e.OperationAbandonedError,
        e.OperationParkedError,
        e.ResponseNotKeptError,
        e.InvalidOperationError,
        e.JournalError,
        e.RetriesExhaustedError,
    ):
        assert issubclass(cls, e.IdempotencyError)
        assert not issubclass(cls, e.ConflictError)
    assert issubclass(e.InvalidOperationError, ValueError)

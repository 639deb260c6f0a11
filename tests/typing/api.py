"""Checked by mypy (`make test`), never run: the public API's types, as a user sees them."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
from typing_extensions import assert_type

import idemclient
from idemclient.journal import JournalBackend, open_journal
from idemclient.testing import IdempotentApp, IdempotentServer, set_testing


def sync_api() -> None:
    journal = idemclient.Journal("j.sqlite3", retention=timedelta(hours=1), durability="normal")
    transport = idemclient.IdempotentTransport(
        httpx.HTTPTransport(), journal=journal, retry=idemclient.RetryPolicy(max_attempts=3)
    )
    client = httpx.Client(transport=transport)
    assert_type(idemclient.wrap(httpx.Client()), httpx.Client)
    assert_type(idemclient.wrap(httpx.AsyncClient()), httpx.AsyncClient)
    assert_type(
        idemclient.wrap(httpx.Client(), secret_headers=["X-Internal"], keep_headers=["X-Sid"]),
        httpx.Client,
    )
    idemclient.IdempotentTransport(secret_headers=("X-Internal",), keep_headers=("X-Sid",))

    ready = idemclient.Client(
        base_url="https://x", journal="j.sqlite3", hooks=[print], keep_headers=["X-Session-Locale"]
    )
    assert_type(ready.journal, JournalBackend)
    with idemclient.operation("charge-1"):
        response = ready.post("/charges", json={"amount": 5})
    assert_type(response, httpx.Response)

    results = idemclient.resume_pending(client)
    assert_type(results, idemclient.ResumeReport)
    assert_type(results.skipped, tuple[idemclient.Operation, ...])
    idemclient.resume_pending(client, rebase={"https://old.example": "https://new.example"})
    first = results[0]
    assert_type(first.operation, idemclient.Operation)
    assert_type(first.response, httpx.Response | None)

    op = journal.get("charge-1")
    assert_type(op, idemclient.Operation | None)
    if op is not None:
        assert_type(op.created_at, datetime)
        assert_type(op.attempts, int)
        assert_type(op.name, str | None)
    assert_type(journal.pending(), list[idemclient.Operation])
    assert_type(journal.purge(older_than=timedelta(days=30)), int)
    assert_type(journal.abandon("charge-1"), idemclient.Operation)

    policy = idemclient.RetryPolicy().replace(deadline=10.0)
    assert_type(policy, idemclient.RetryPolicy)

    budget = idemclient.RetryBudget(0.1, min_per_second=5.0, window=30.0, clock=lambda: 0.0)
    idemclient.Client(retry_budget=budget)
    idemclient.Client(retry_budget=None)
    idemclient.IdempotentTransport(retry_budget=budget)
    idemclient.wrap(httpx.Client(), retry_budget=budget)
    assert_type(budget.balance, int)
    assert_type(budget.denied, int)
    assert_type(budget.try_withdraw(), bool)

    once = idemclient.RetryPolicy(max_attempts=1)
    ready.post("/refunds", json={}, extensions=once.extensions())
    ready.post("/events", json={}, extensions=idemclient.unjournaled())
    with idemclient.operation("refund-1", retry=once):
        ready.post("/refunds", json={})

    try:
        ready.post("/charges", json={})
    except idemclient.ConflictError as exc:
        assert_type(exc.response, httpx.Response | None)
    except idemclient.RetriesExhaustedError as exc:
        assert_type(exc.attempts, int)
    except idemclient.JournalError as exc:
        assert_type(exc.path, str | None)

    def hook(event: idemclient.Event) -> None:
        assert_type(event.status, int | None)

    idemclient.Client(hooks=[hook])

    app = IdempotentApp()
    app.inject("status", times=2, status=503, retry_after="1")
    httpx.Client(transport=httpx.MockTransport(app.handler))
    with IdempotentServer() as server, set_testing(True):
        assert_type(server.url, str)
        assert_type(server.effect_count, int)


async def async_api() -> None:
    async with idemclient.AsyncClient(base_url="https://x") as client:
        async with idemclient.operation("order-1"):
            response = await client.post("/orders", json={})
        assert_type(response, httpx.Response)
        assert_type(await client.aresume_pending(), idemclient.ResumeReport)
        assert_type(await idemclient.aresume_pending(client), idemclient.ResumeReport)
    transport = idemclient.AsyncIdempotentTransport(
        httpx.AsyncHTTPTransport(), keep_headers=("X-Session-Locale",)
    )
    idemclient.AsyncClient(secret_headers=["X-Internal"], keep_headers=["X-Session-Locale"])
    httpx.AsyncClient(transport=transport)


def journal_contract() -> None:
    # The SQLite journal keeps the journal contract that every backend keeps.
    backend: JournalBackend = idemclient.Journal("j.sqlite3")
    assert_type(open_journal("j.sqlite3"), JournalBackend)
    assert_type(backend.pending(), list[idemclient.Operation])
    assert_type(backend.closed, bool)

"""A retry policy per request (an httpx request extension) and per `operation()` block, and
requests sent unjournaled on purpose (`idemclient.unjournaled()`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

import idemclient
from idemclient import InvalidOperationError, RetriesExhaustedError, RetryPolicy
from idemclient.testing import IdempotentApp, set_testing

from .fakes import FakeAPI

ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(autouse=True)
def _no_sleeps() -> Iterator[None]:
    with set_testing(True):
        yield


def client_on(
    handler: Callable[[httpx.Request], httpx.Response], journal: Path, **options: Any
) -> idemclient.Client:
    return idemclient.Client(
        journal=journal,
        base_url="https://api.example",
        transport=httpx.MockTransport(handler),
        **options,
    )


class Recorder:
    """A server answering `statuses` in turn (then 200), recording what it got."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            status = self.statuses.pop(0) if self.statuses else 200
        return httpx.Response(status, json={"n": len(self.requests)})


# -- per request ---------------------------------------------------------------------------


def test_a_request_extension_gives_one_request_its_policy(journal_path: Path) -> None:
    app = IdempotentApp()
    app.inject("status", status=503, times=3)
    with client_on(app.handler, journal_path, retry=ONCE) as client:
        r = client.post("/charges", json={}, extensions=RetryPolicy(max_attempts=4).extensions())
        assert r.status_code == 201
        assert r.extensions["idempotency"]["attempts"] == 4
        app.inject("status", status=503, times=1)
        with pytest.raises(RetriesExhaustedError):  # the next request: the client's policy
            client.post("/charges", json={"n": 2})


def test_the_extension_is_the_policy_itself_spelled_by_hand(journal_path: Path) -> None:
    assert RetryPolicy(max_attempts=2).extensions() == {
        "idempotency_retry": RetryPolicy(max_attempts=2)
    }
    server = Recorder(503, 503)
    with client_on(server, journal_path) as client:
        response = client.get("/status", extensions={"idempotency_retry": ONCE})
    assert response.status_code == 503
    assert len(server.requests) == 1


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("wrong", [3, {"max_attempts": 3}, "RetryPolicy(max_attempts=3)"])
def test_a_wrong_type_in_the_extension_is_a_type_error_before_sending(
    journal_path: Path, method: str, wrong: object
) -> None:
    server = Recorder()
    with client_on(server, journal_path) as client:
        with pytest.raises(TypeError, match=r"takes an idemclient\.RetryPolicy"):
            client.request(method, "/charges", json={}, extensions={"idempotency_retry": wrong})
        assert client.journal.operations() == []
    assert server.requests == []


def test_operation_retry_must_be_a_policy() -> None:
    with pytest.raises(TypeError, match=r"operation\(retry=...\)"):
        idemclient.operation("x", retry=3)  # type: ignore[arg-type]


# -- per operation() block --------------------------------------------------------------------


def test_a_block_policy_applies_to_its_requests_and_a_requests_own_wins(
    journal_path: Path,
) -> None:
    app = IdempotentApp()
    with client_on(app.handler, journal_path, retry=ONCE) as client:
        with idemclient.operation("batch-1", retry=RetryPolicy(max_attempts=3)):
            app.inject("status", status=503, times=2)
            first = client.post("/charges", json={"n": 1})
            app.inject("status", status=503, times=1)
            with pytest.raises(RetriesExhaustedError):
                client.post("/charges", json={"n": 2}, extensions=ONCE.extensions())
            with idemclient.operation("inner"):  # a block without a policy keeps the outer's
                app.inject("status", status=503, times=2)
                inner = client.post("/charges", json={"n": 3})
        app.inject("status", status=503, times=1)
        with pytest.raises(RetriesExhaustedError):  # after the block: the client's policy
            client.post("/charges", json={"n": 4})
    assert first.extensions["idempotency"]["attempts"] == 3
    assert inner.extensions["idempotency"]["attempts"] == 3


def test_a_block_policy_applies_to_plain_requests_too(journal_path: Path) -> None:
    server = Recorder(503, 503, 503, 503)
    with client_on(server, journal_path) as client:
        with idemclient.operation("lookup", retry=RetryPolicy(max_attempts=2)):
            assert client.get("/status").status_code == 503
        assert len(server.requests) == 2
        assert client.get("/status").status_code == 200  # the client's five attempts
    assert len(server.requests) == 5


@pytest.mark.anyio
async def test_async_requests_take_the_block_and_request_policies(journal_path: Path) -> None:
    app = IdempotentApp()
    async with idemclient.AsyncClient(
        journal=journal_path,
        base_url="https://api.example",
        transport=httpx.MockTransport(app.handler),
        retry=ONCE,
    ) as client:
        async with idemclient.operation("order-1", retry=RetryPolicy(max_attempts=3)):
            app.inject("status", status=503, times=2)
            r = await client.post("/orders", json={})
        assert r.extensions["idempotency"]["attempts"] == 3
        app.inject("status", status=503, times=1)
        r = await client.post("/orders", json={"n": 2}, extensions=RetryPolicy().extensions())
        assert r.extensions["idempotency"]["attempts"] == 2


# -- unjournaled, on purpose ----------------------------------------------------------------


def test_an_unjournaled_post_has_no_key_no_row_and_one_attempt(journal_path: Path) -> None:
    server = Recorder(503)
    with client_on(server, journal_path) as client, idemclient.operation("block"):
        response = client.post("/events", json={}, extensions=idemclient.unjournaled())
        assert response.status_code == 503  # never retried, whatever the answer
        assert "idempotency" not in response.extensions
        assert client.journal.operations() == []
        named = client.post("/charges", json={})  # the block's first name is still free
        assert named.extensions["idempotency"]["operation"] == "block"
    (unjournaled, keyed) = server.requests
    assert "idempotency-key" not in unjournaled.headers
    assert "idempotency-key" in keyed.headers


def test_an_unjournaled_request_is_not_retried_after_a_transport_error(
    journal_path: Path,
) -> None:
    sent: list[httpx.Request] = []

    def lost(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.ConnectError("refused", request=request)

    with client_on(lost, journal_path) as client:
        with pytest.raises(httpx.ConnectError):
            client.post("/events", json={}, extensions={"idempotency_unjournaled": True})
        with pytest.raises(httpx.ConnectError):  # not the idempotent methods' rules either
            client.get("/events", extensions=idemclient.unjournaled())
    assert len(sent) == 2


@pytest.mark.parametrize(
    ("extensions", "error", "match"),
    [
        ({"idempotency_unjournaled": "yes"}, TypeError, "takes True"),
        ({"idempotency_unjournaled": 1}, TypeError, "takes True"),
        (
            {**idemclient.unjournaled(), "idempotency_operation": "x"},
            InvalidOperationError,
            "cannot also have 'idempotency_operation'",
        ),
        (
            {**idemclient.unjournaled(), **ONCE.extensions()},
            InvalidOperationError,
            "cannot also have 'idempotency_retry'",
        ),
    ],
)
def test_a_wrong_unjournaled_mark_is_refused_before_sending(
    journal_path: Path, extensions: dict[str, Any], error: type[Exception], match: str
) -> None:
    server = Recorder()
    with client_on(server, journal_path) as client, pytest.raises(error, match=match):
        client.post("/events", json={}, extensions=extensions)
    assert server.requests == []


# -- under an SDK: the block is how its calls get a policy ---------------------------------


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    with FakeAPI() as fake:
        yield fake


def test_an_sdk_call_takes_its_operation_blocks_policy(api: FakeAPI, journal_path: Path) -> None:
    """anthropic passes no extensions per call: `operation(..., retry=...)` gives one call
    more attempts than the wrapped client's policy (one), under one key."""
    http = idemclient.wrap(anthropic.DefaultHttpxClient(), journal=journal_path, retry=ONCE)
    client = anthropic.Anthropic(
        api_key="sk-test", base_url=api.url, http_client=http, max_retries=0
    )
    api.inject("status", status=503, times=2)
    with idemclient.operation("reply-1", retry=RetryPolicy(max_attempts=3)):
        message = client.messages.create(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert message.id
    api.inject("status", status=503, times=1)
    with pytest.raises(anthropic.InternalServerError):  # outside: one attempt, then the SDK's
        client.messages.create(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "bye"}]
        )
    with idemclient.Journal(journal_path) as journal:
        op = journal.get("reply-1")
        assert op is not None
        assert (op.state, op.attempts) == ("completed", 3)
    assert api.effect_count == 1
    client.close()

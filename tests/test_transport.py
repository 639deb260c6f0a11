"""The transports against scripted servers (`httpx.MockTransport`): keys, retries, stops."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import random
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

import idemclient
from idemclient import (
    AsyncIdempotentTransport,
    ConflictError,
    IdempotentTransport,
    InvalidOperationError,
    Journal,
    JournalError,
    OperationInProgressError,
    OperationMismatchError,
    RetriesExhaustedError,
    RetryPolicy,
)

from .fakes import AnswerLostOnce, SeeOther

Handler = Callable[[httpx.Request], httpx.Response]


class Script:
    """A scripted server: answers from a list, records every request it received."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]

    @property
    def bodies(self) -> list[bytes]:
        return [r.content for r in self.requests]


def ok(status: int = 201, **kwargs: object) -> httpx.Response:
    return httpx.Response(status, json={"id": "ch_1"}, **kwargs)  # type: ignore[arg-type]


def client_for(
    handler: Handler, journal: Path | Journal, sleeps: list[float], **options: object
) -> httpx.Client:
    transport = IdempotentTransport(
        httpx.MockTransport(handler),
        journal=journal,
        sleep=sleeps.append,
        rng=random.Random(0),
        **options,  # type: ignore[arg-type]
    )
    return httpx.Client(transport=transport, base_url="https://api.example")


def journal_of(client: httpx.Client) -> Journal:
    transport = client._transport
    assert isinstance(transport, IdempotentTransport)
    assert isinstance(transport.journal, Journal)
    return transport.journal


@pytest.fixture
def client_factory(
    journal_path: Path, sleeps: list[float]
) -> Iterator[Callable[..., httpx.Client]]:
    made: list[httpx.Client] = []

    def make(handler: Handler, **options: object) -> httpx.Client:
        client = client_for(handler, journal_path, sleeps, **options)
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


def test_retries_reuse_one_key_and_the_same_body_bytes(
    client_factory: Callable[..., httpx.Client], sleeps: list[float]
) -> None:
    script = Script(httpx.Response(503), httpx.ReadTimeout("lost"), ok())
    client = client_factory(script)
    response = client.post("/charges", json={"amount": 500})
    assert response.status_code == 201
    assert response.json() == {"id": "ch_1"}
    key = script.keys[0]
    assert key is not None
    assert uuid.UUID(key).version == 4
    assert script.keys == [key, key, key]
    assert script.bodies == [b'{"amount":500}'] * 3
    assert len(sleeps) == 2
    assert response.extensions["idempotency"] == {
        "key": key,
        "operation": None,
        "attempts": 3,
        "replayed": False,
    }
    assert response.request.headers["Idempotency-Key"] == key  # the request as sent
    op = journal_of(client).get(key)
    assert op is not None
    assert (op.state, op.attempts, op.response_status) == ("completed", 3, 201)


def test_messages_name_an_operation_by_its_name_and_key_or_by_its_key_alone(
    client_factory: Callable[..., httpx.Client], caplog: pytest.LogCaptureFixture
) -> None:
    """Named: `operation 'charge-7' (key K)`; unnamed: `operation with key K`, never the key
    twice."""
    client = client_factory(Script(httpx.Response(503)), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(RetriesExhaustedError) as unnamed:
        client.post("/charges", json={"n": 1})
    assert unnamed.value.operation is not None
    key = unnamed.value.operation.key
    assert str(unnamed.value).startswith(f"operation with key {key} gave up: ")
    with idemclient.operation("charge-7"), pytest.raises(RetriesExhaustedError) as named:
        client.post("/charges", json={"n": 2})
    assert named.value.operation is not None
    named_key = named.value.operation.key
    assert str(named.value).startswith(f"operation 'charge-7' (key {named_key}) gave up: ")
    logged = [r.getMessage() for r in caplog.records]
    assert f"operation with key {key}: HTTP 503; gave up" in logged[0]
    assert f"operation 'charge-7' (key {named_key}): HTTP 503; gave up" in logged[1]
    assert not any(f"{key} (key {key})" in line for line in logged)


def test_server_replay_marker_is_surfaced(client_factory: Callable[..., httpx.Client]) -> None:
    client = client_factory(Script(ok(headers={"Idempotent-Replayed": "true"})))
    assert client.post("/charges", json={}).extensions["idempotency"]["replayed"] is True


def test_422_is_a_hard_stop_remembered_by_name(
    client_factory: Callable[..., httpx.Client], sleeps: list[float]
) -> None:
    script = Script(httpx.Response(422, json={"error": "key reused"}))
    client = client_factory(script)
    with pytest.raises(ConflictError) as info, idemclient.operation("charge-7"):
        client.post("/charges", json={"amount": 5})
    assert len(script.requests) == 1
    assert sleeps == []
    assert info.value.response is not None
    assert info.value.response.status_code == 422
    assert info.value.response.json() == {"error": "key reused"}
    assert info.value.operation is not None
    assert info.value.operation.name == "charge-7"
    op = journal_of(client).get("charge-7")
    assert op is not None
    assert op.state == "conflict"
    # a rerun raises again without sending
    with pytest.raises(ConflictError) as again, idemclient.operation("charge-7"):
        client.post("/charges", json={"amount": 5})
    assert len(script.requests) == 1
    assert again.value.response is not None
    assert again.value.response.status_code == 422


def test_stripe_style_idempotency_error_is_a_conflict(
    client_factory: Callable[..., httpx.Client],
) -> None:
    body = {"error": {"type": "idempotency_error", "message": "Keys for idempotent requests"}}
    script = Script(httpx.Response(400, json=body))
    with pytest.raises(ConflictError):
        client_factory(script).post("/charges", json={})
    assert len(script.requests) == 1


def test_gzip_encoded_idempotency_error_is_a_conflict(
    client_factory: Callable[..., httpx.Client],
) -> None:
    raw = gzip.compress(b'{"error": {"type": "idempotency_error"}}')
    script = Script(httpx.Response(400, content=raw, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(ConflictError):
        client_factory(script).post("/charges", json={})


def test_plain_400_is_an_answer(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(httpx.Response(400, json={"error": "amount must be positive"}))
    assert client_factory(script).post("/charges", json={}).status_code == 400


def test_completed_named_operation_replays_without_sending(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(ok(headers={"X-Request-Id": "r1"}))
    client = client_factory(script)
    with idemclient.operation("charge-1"):
        first = client.post("/charges", json={"amount": 5})
    second = client.post(
        "/charges", json={"amount": 5}, extensions={"idempotency_operation": "charge-1"}
    )
    assert len(script.requests) == 1
    assert second.status_code == first.status_code
    assert second.content == first.content
    assert second.headers["X-Request-Id"] == "r1"
    assert second.extensions["idempotency"]["replayed"] is True
    assert second.extensions["idempotency"]["key"] == first.extensions["idempotency"]["key"]


def test_gzip_response_replays_decoded(client_factory: Callable[..., httpx.Client]) -> None:
    raw = gzip.compress(b'{"id": "ch_9"}')
    client = client_factory(
        Script(httpx.Response(201, content=raw, headers={"Content-Encoding": "gzip"}))
    )
    with idemclient.operation("gz"):
        assert client.post("/c", json={}).json() == {"id": "ch_9"}
    with idemclient.operation("gz"):
        assert client.post("/c", json={}).json() == {"id": "ch_9"}


def test_same_name_with_another_request_is_refused_before_sending(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(ok())
    client = client_factory(script)
    with idemclient.operation("charge-1"):
        client.post("/charges", json={"amount": 5})
    with (
        pytest.raises(OperationMismatchError, match="nothing was sent"),
        idemclient.operation("charge-1"),
    ):
        client.post("/charges", json={"amount": 6})
    assert len(script.requests) == 1


def test_operation_block_names_each_request_in_order(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(ok())
    client = client_factory(script)
    for _ in range(2):
        with idemclient.operation("order-1"):
            client.post("/orders", json={"cart": 1})
            client.post("/emails", json={"to": "a@example"})
    assert len(script.requests) == 2
    names = [op.name for op in journal_of(client).operations()]
    assert names == ["order-1", "order-1#2"]


def test_exhausted_retries_leave_the_operation_pending(
    client_factory: Callable[..., httpx.Client], sleeps: list[float]
) -> None:
    script = Script(httpx.Response(503))
    client = client_factory(script, retry=RetryPolicy(max_attempts=4))
    with pytest.raises(RetriesExhaustedError, match="stays pending") as info:
        client.post("/charges", json={"amount": 5})
    assert len(script.requests) == 4
    assert len(sleeps) == 3
    assert info.value.attempts == 4
    assert info.value.response is not None
    assert info.value.response.status_code == 503
    op = journal_of(client).operations()[0]
    assert (op.state, op.attempts) == ("pending", 4)
    assert op.last_error is not None
    assert "HTTP 503" in op.last_error
    assert [p.key for p in journal_of(client).pending()] == [op.key]


def test_exhausted_connect_errors_chain_the_cause(
    client_factory: Callable[..., httpx.Client],
) -> None:
    client = client_factory(
        Script(httpx.ConnectError("refused")), retry=RetryPolicy(max_attempts=2)
    )
    with pytest.raises(RetriesExhaustedError) as info:
        client.post("/charges", json={})
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert info.value.response is None


def test_unretryable_transport_error_is_raised_and_the_lease_released(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(httpx.UnsupportedProtocol("nope"), ok())
    client = client_factory(script)
    with pytest.raises(httpx.UnsupportedProtocol), idemclient.operation("op"):
        client.post("/charges", json={})
    assert len(script.requests) == 1
    # not stuck "in progress" for this process: the same name goes on with the same key
    with idemclient.operation("op"):
        response = client.post("/charges", json={})
    assert response.status_code == 201
    assert script.keys[0] == script.keys[1]


def test_retry_after_is_honoured_and_capped(
    client_factory: Callable[..., httpx.Client], sleeps: list[float]
) -> None:
    script = Script(httpx.Response(429, headers={"Retry-After": "3"}), ok())
    client_factory(script).post("/charges", json={})
    assert sleeps == [3.0]
    sleeps.clear()
    script = Script(httpx.Response(503, headers={"Retry-After": "3600"}), ok())
    with pytest.raises(RetriesExhaustedError, match="max_retry_after"):
        client_factory(script).post("/charges", json={})
    assert len(script.requests) == 1
    assert sleeps == []


def test_deadline_bounds_the_whole_operation(journal_path: Path, sleeps: list[float]) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    transport = IdempotentTransport(
        httpx.MockTransport(Script(httpx.Response(503))),
        journal=journal_path,
        retry=RetryPolicy(max_attempts=50, base_delay=1, max_delay=1, jitter=False, deadline=2.5),
        sleep=sleep,
        clock=lambda: now[0],
    )
    with (
        httpx.Client(transport=transport) as client,
        pytest.raises(RetriesExhaustedError, match="deadline"),
    ):
        client.post("https://api.example/x", json={})
    assert sleeps == [1.0, 1.0]


def test_hint_header_stops_a_retry(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(httpx.Response(503, headers={"x-should-retry": "false"}))
    assert client_factory(script).post("/charges", json={}).status_code == 503
    assert len(script.requests) == 1


def test_idempotent_methods_are_retried_without_key_or_journal(
    client_factory: Callable[..., httpx.Client], sleeps: list[float]
) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(503), httpx.Response(200))
    client = client_factory(script)
    assert client.get("/charges/1").status_code == 200
    assert script.keys == [None, None, None]
    assert len(sleeps) == 2
    assert journal_of(client).operations() == []


def test_idempotent_method_returns_the_last_response_when_retries_run_out(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(httpx.Response(503))
    client = client_factory(script, retry=RetryPolicy(max_attempts=2))
    assert client.get("/x").status_code == 503
    assert len(script.requests) == 2


def test_unkeyed_409_is_an_answer(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(httpx.Response(409))
    assert client_factory(script).put("/x", json={}).status_code == 409
    assert len(script.requests) == 1


def test_methods_are_configurable(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(ok())
    client = client_factory(script, methods=("POST", "PUT"))
    client.put("/x", json={})
    client.patch("/x", json={})
    assert script.keys[0] is not None
    assert script.keys[1] is None


def test_generator_body_is_read_once_and_resent_byte_for_byte(
    client_factory: Callable[..., httpx.Client],
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"hello "
        yield b"world"

    script = Script(httpx.Response(502), ok())
    client = client_factory(script)
    client.post("/upload", content=chunks())
    assert script.bodies == [b"hello world", b"hello world"]
    for request in script.requests:
        assert request.headers["content-length"] == "11"
        assert "transfer-encoding" not in request.headers


def test_too_large_body_is_refused_before_sending(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(ok())
    client = client_factory(script, max_body_size=10)

    def chunks() -> Iterator[bytes]:
        yield b"x" * 8
        yield b"x" * 8

    with pytest.raises(InvalidOperationError, match="max_body_size"):
        client.post("/upload", content=chunks())
    with pytest.raises(InvalidOperationError, match="max_body_size"):
        client.post("/upload", content=b"y" * 11)
    assert script.requests == []
    assert journal_of(client).operations() == []


def test_callers_key_is_used_and_validated(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(ok())
    client = client_factory(script)
    client.post("/x", json={}, headers={"Idempotency-Key": "order-123-attempt"})
    assert script.keys == ["order-123-attempt"]
    assert journal_of(client).get("order-123-attempt") is not None
    # quoted (Structured Field) form is understood
    client.post("/x", json={}, headers={"Idempotency-Key": '"order-123-attempt"'})
    assert len(script.requests) == 1  # completed: replayed from the journal
    for bad in ["", "a" * 256, "tab\there", 'a"b', "back\\slash"]:
        with pytest.raises(InvalidOperationError):
            client.post("/x", json={}, headers={"Idempotency-Key": bad})
    assert len(script.requests) == 1


def test_structured_key_style_quotes_the_key(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(ok())
    client_factory(script, key_style="structured").post("/x", json={})
    key = script.keys[0]
    assert key is not None
    assert key.startswith('"')
    assert key.endswith('"')
    uuid.UUID(key.strip('"'))


def test_custom_key_header(client_factory: Callable[..., httpx.Client]) -> None:
    script = Script(ok())
    client_factory(script, key_header="X-Idempotency-Key").post("/x", json={})
    assert script.requests[0].headers.get("X-Idempotency-Key") is not None
    assert script.keys == [None]


def test_invalid_operation_names(client_factory: Callable[..., httpx.Client]) -> None:
    client = client_factory(Script(ok()))
    for bad in ["", "x" * 201, "line\nbreak"]:
        with pytest.raises(InvalidOperationError):
            idemclient.operation(bad)
        with pytest.raises(InvalidOperationError):
            client.post("/x", json={}, extensions={"idempotency_operation": bad})


def test_locked_journal_fails_closed(journal_path: Path, sleeps: list[float]) -> None:
    script = Script(ok())
    client = client_for(script, Journal(journal_path, busy_timeout=0.05), sleeps)
    holder = sqlite3.connect(journal_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(JournalError) as info:
            client.post("/charges", json={"amount": 5})
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert script.requests == []
    assert info.value.path == str(journal_path)


def test_secrets_never_reach_the_journal(journal_path: Path, sleeps: list[float]) -> None:
    secrets = [
        "Bearer sk_live_AUTHORIZATION",
        "Basic PROXY_SECRET",
        "session=COOKIE_SECRET",
        "XAPIKEY_SECRET",
        "CUSTOM_SECRET",
        "URL_PASSWORD",
        "SET_COOKIE_SECRET",
        "dXNlcjpVUkxfUEFTU1dPUkQ=",  # base64 of user:URL_PASSWORD, as httpx sends it
    ]
    script = Script(httpx.Response(503), ok(headers={"Set-Cookie": "sid=SET_COOKIE_SECRET"}))
    client = client_for(script, journal_path, sleeps, secret_headers=("X-Custom-Token",))
    client.post(
        "https://user:URL_PASSWORD@api.example/charges",
        json={"amount": 5},
        headers={
            "Authorization": secrets[0],
            "Proxy-Authorization": secrets[1],
            "Cookie": secrets[2],
            "X-Api-Key": secrets[3],
            "X-Custom-Token": secrets[4],
            "X-Trace": "kept",
        },
    )
    # the server did get the credentials (httpx turns URL user info into Basic auth)
    sent = script.requests[-1].headers
    assert sent["Authorization"] == "Basic dXNlcjpVUkxfUEFTU1dPUkQ="
    assert sent["X-Api-Key"] == secrets[3]
    stored = b"".join(
        p.read_bytes() for p in journal_path.parent.iterdir() if p.name.startswith("journal")
    )
    assert b"kept" in stored
    for secret in secrets:
        assert secret.encode() not in stored, secret
    op = journal_of(client).operations()[0]
    assert op.url == "https://api.example/charges"


#: Credentials a request carries in headers, by name; every value unique, to grep for.
HEADER_SECRETS = {
    "Authorization": "Bearer sk-AUTHZ-0001",
    "Proxy-Authorization": "Basic PROXYAUTH-0002",
    "Cookie": "sid=COOKIE-0003",
    "X-Api-Key": "XAPIKEY-0004",
    "PRIVATE-TOKEN": "glpat-PRIVTOKEN-0005",
    "X-Auth-Token": "XAUTHTOKEN-0006",
    "X-Shopify-Access-Token": "shpat-SHOPIFY-0007",
    "api-key": "AZUREKEY-0008",
    "X-Goog-Api-Key": "AIza-GOOGKEY-0009",
    "X-Amz-Security-Token": "AMZTOKEN-0010",
    "X-CSRF-Token": "CSRF-0011",
    "Ocp-Apim-Subscription-Key": "APIM-0012",
    "X-Client-Secret": "CLIENTSECRET-0013",
    "X-Hub-Signature-256": "sha256=HUBSIG-0014",
    "X-Session-Id": "SESSIONID-0015",
    "X-Internal": "INTERNAL-0016",  # named in secret_headers=
}
#: Credentials in the query string, by parameter name.
QUERY_SECRETS = {
    "api_key": "QAPIKEY-0101",
    "apikey": "QAPIKEY2-0102",
    "access_token": "QACCESS-0103",
    "token": "QTOKEN-0104",
    "sig": "QSIG-0105",
    "signature": "QSIGNATURE-0106",
    "key": "QKEY-0107",
    "secret": "QSECRET-0108",
    "password": "QPASSWORD-0109",
    "X-Amz-Signature": "QAMZSIG-0110",
    "X-Amz-Credential": "AKIAQCRED-0111",
    "X-Amz-Security-Token": "QAMZTOKEN-0112",
}
#: What a server echoes back in the response headers.
RESPONSE_SECRETS = {
    "Set-Cookie": "sid=RESPCOOKIE-0201; HttpOnly",
    "X-Amz-Security-Token": "RESPAMZ-0202",
    "X-Auth-Token": "RESPECHO-0203",
}


def test_no_credential_reaches_the_journal_files_the_logs_the_events_or_an_error(
    journal_path: Path, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="idemclient")
    rotated = {"Authorization": "Bearer sk-ROTATED-0301", "api_key": "QROTATED-0302"}
    url_password = "URLPASS-0303"
    secrets = [
        *HEADER_SECRETS.values(), *QUERY_SECRETS.values(), *RESPONSE_SECRETS.values(),
        *rotated.values(), url_password,
        base64.b64encode(f"user:{url_password}".encode()).decode(),  # httpx's Basic auth
    ]  # fmt: skip
    answer = ok(headers={**RESPONSE_SECRETS, "X-Request-Id": "resp-kept-0501"})
    script = Script(
        httpx.Response(503), answer,  # charge-1
        httpx.Response(503), httpx.Response(200),  # the GET
        httpx.Response(503), httpx.Response(503),  # charge-2 gives up
    )  # fmt: skip
    events: list[idemclient.Event] = []
    journal = Journal(journal_path, durability="full")
    client = client_for(
        script, journal, sleeps, retry=RetryPolicy(max_attempts=2), hooks=[events.append],
        secret_headers=("X-Internal",), keep_headers=("X-Session-Locale",),
    )  # fmt: skip
    kept_headers = {"X-Trace": "kept-0401", "X-Session-Locale": "fr-kept-0402"}
    params = {**QUERY_SECRETS, "page": "2"}
    with idemclient.operation("charge-1"):
        client.post(
            "/charges", params=params, headers={**HEADER_SECRETS, **kept_headers}, json={"n": 1}
        )
    # what is sent is unchanged: every credential reached the server
    sent = script.requests[0]
    for name, value in HEADER_SECRETS.items():
        assert sent.headers[name] == value
    assert dict(sent.url.params) == params
    # a rerun with rotated credentials is the same operation: answered from the journal
    with idemclient.operation("charge-1"):
        replay = client.post(
            "/charges",
            params={**params, "api_key": rotated["api_key"]},
            headers={**HEADER_SECRETS, **kept_headers, "Authorization": rotated["Authorization"]},
            json={"n": 1},
        )
    assert replay.extensions["idempotency"]["replayed"] is True
    assert replay.headers["X-Request-Id"] == "resp-kept-0501"
    assert not set(RESPONSE_SECRETS) & set(replay.headers)
    # an unjournaled request, retried and logged
    client.get(f"https://user:{url_password}@api.example/charges", params=QUERY_SECRETS)
    errors: list[str] = []
    with idemclient.operation("charge-2"):
        with pytest.raises(RetriesExhaustedError) as exhausted:
            client.post("/charges", params=params, headers=HEADER_SECRETS, json={"n": 2})
        errors += [str(exhausted.value), repr(exhausted.value.operation)]
    with idemclient.operation("charge-2"), pytest.raises(OperationMismatchError) as mismatch:
        client.post("/charges", params=params, headers=HEADER_SECRETS, json={"n": 3})
    errors += [str(mismatch.value), repr(mismatch.value.operation)]
    assert "POST https://api.example/charges?page=2" in str(mismatch.value)
    assert len(script.requests) == 6

    journal.flush()
    wal = journal_path.with_name(journal_path.name + "-wal")
    shm = journal_path.with_name(journal_path.name + "-shm")
    # the WAL files vanish on the last close: read them now, and again after
    assert wal.exists()
    assert shm.exists()
    while_open = [p.read_bytes() for p in (journal_path, wal, shm)]
    stored = [
        repr(journal.operations()),
        *(repr(journal.request_of(op.key)) for op in journal.operations()),
        *(repr(journal.stored_response(op.key)) for op in journal.operations()),
    ]
    client.close()
    journal.close()
    after_close = [p.read_bytes() for p in (journal_path, wal, shm) if p.exists()]
    raw = b"\n".join(while_open + after_close)
    # what the request needs on resume is there (so the grep looks where the data is)
    for value in ("kept-0401", "fr-kept-0402", "resp-kept-0501", "charges?page=2"):
        assert value.encode() in raw, value
    texts = {
        "logs": caplog.text,
        "errors": "\n".join(errors),
        "events": "\n".join(repr(e) for e in events),
        "journal API": "\n".join(stored),
    }
    for secret in secrets:
        assert secret.encode() not in raw, secret
        for where, text in texts.items():
            assert secret not in text, (secret, where)


def test_a_rerun_with_a_rotated_credential_in_the_query_is_the_same_operation(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(ok())
    client = client_factory(script)
    for credential in ("old-credential", "new-credential"):
        with idemclient.operation("charge-9"):
            response = client.post(f"/charges?key={credential}&n=1", json={"n": 1})
    assert response.extensions["idempotency"]["replayed"] is True
    assert len(script.requests) == 1
    op = journal_of(client).get("charge-9")
    assert op is not None
    assert op.url == "https://api.example/charges?n=1"


@pytest.mark.anyio
async def test_async_transport_applies_the_same_rule(
    journal_path: Path, sleeps: list[float]
) -> None:
    script = AsyncScript(ok(headers={"X-Amz-Security-Token": "RESPAMZ", "X-Request-Id": "r"}))
    async with async_client(
        script, journal_path, sleeps, keep_headers=("X-Session-Locale",)
    ) as client:
        await client.post(
            "/charges?access_token=QTOKEN&n=1",
            json={},
            headers={"PRIVATE-TOKEN": "P", "X-Session-Locale": "fr", "X-Session-Id": "S"},
        )
    with Journal(journal_path) as journal:
        (op,) = journal.operations()
        assert op.url == "https://api.example/charges?n=1"
        _, _, headers, _ = journal.request_of(op.key)
        names = {"private-token", "x-session-locale", "x-session-id"}
        assert names & dict(headers).keys() == {"x-session-locale"}
        stored = journal.stored_response(op.key)
        assert stored is not None
        names = {k.lower() for k, _ in stored.headers}
        assert {"x-amz-security-token", "x-request-id"} & names == {"x-request-id"}


def test_lost_lease_stops_before_resending(journal_path: Path, sleeps: list[float]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # another process takes the operation over while this attempt is in flight
        with sqlite3.connect(journal_path) as db:
            db.execute("UPDATE operations SET lease_version = lease_version + 10")
        return httpx.Response(503)

    script = Script(ok())
    calls: list[httpx.Request] = []

    def recording(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return handler(request)

    client = client_for(recording, journal_path, sleeps)
    with pytest.raises(OperationInProgressError, match="taken over"):
        client.post("/charges", json={})
    assert len(calls) == 1
    assert script.requests == []


def test_transport_owns_a_journal_it_opened(journal_path: Path) -> None:
    transport = IdempotentTransport(httpx.MockTransport(Script(ok())), journal=journal_path)
    transport.close()
    with pytest.raises(JournalError, match="closed"):
        transport.journal.operations()
    shared = Journal(journal_path)
    IdempotentTransport(httpx.MockTransport(Script(ok())), journal=shared).close()
    assert shared.operations() == []


def test_invalid_transport_options(journal_path: Path) -> None:
    with pytest.raises(ValueError, match="key_style"):
        IdempotentTransport(journal=journal_path, key_style="quoted")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_header"):
        IdempotentTransport(journal=journal_path, key_header="Bad Header")


# -- async ----------------------------------------------------------------------------


class AsyncScript(Script):
    async def handle(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return self(request)


class ThreadRecordingJournal(Journal):
    """Records which thread each journal write ran on."""

    threads: list[int]

    def register_many(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.threads.append(threading.get_ident())
        return super().register_many(*args, **kwargs)  # type: ignore[arg-type]


def async_client(
    script: AsyncScript, journal: Path | Journal, sleeps: list[float], **options: object
) -> httpx.AsyncClient:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    transport = AsyncIdempotentTransport(
        httpx.MockTransport(script.handle),
        journal=journal,
        sleep=sleep,
        **options,  # type: ignore[arg-type]
    )
    return httpx.AsyncClient(transport=transport, base_url="https://api.example")


@pytest.mark.anyio
async def test_async_retries_reuse_one_key(journal_path: Path, sleeps: list[float]) -> None:
    script = AsyncScript(httpx.Response(503), httpx.RemoteProtocolError("stale"), ok())
    async with async_client(script, journal_path, sleeps) as client:
        response = await client.post("/charges", json={"amount": 5})
    assert response.status_code == 201
    assert len(set(script.keys)) == 1
    assert script.keys[0] is not None
    assert len(script.requests) == 3
    assert len(sleeps) == 2
    assert response.extensions["idempotency"]["attempts"] == 3


@pytest.mark.anyio
async def test_async_journal_runs_in_a_worker_thread(
    journal_path: Path, sleeps: list[float]
) -> None:
    journal = ThreadRecordingJournal(journal_path)
    journal.threads = []
    async with async_client(AsyncScript(ok()), journal, sleeps) as client:
        await client.post("/charges", json={})
    assert journal.threads
    assert threading.get_ident() not in journal.threads


@pytest.mark.anyio
async def test_async_conflict_and_named_replay(journal_path: Path, sleeps: list[float]) -> None:
    script = AsyncScript(httpx.Response(422))
    async with async_client(script, journal_path, sleeps) as client:
        async with idemclient.operation("a-1"):
            with pytest.raises(ConflictError):
                await client.post("/charges", json={})
        async with idemclient.operation("a-1"):
            with pytest.raises(ConflictError):
                await client.post("/charges", json={})
    assert len(script.requests) == 1

    script = AsyncScript(ok())
    async with async_client(script, journal_path, sleeps) as client:
        with idemclient.operation("a-2"):
            first = await client.post("/charges", json={})
        with idemclient.operation("a-2"):
            second = await client.post("/charges", json={})
    assert len(script.requests) == 1
    assert second.extensions["idempotency"]["replayed"] is True
    assert second.json() == first.json()
    assert second.request.headers["Idempotency-Key"] == first.extensions["idempotency"]["key"]


@pytest.mark.anyio
async def test_async_generator_body_and_exhaustion(journal_path: Path, sleeps: list[float]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    script = AsyncScript(httpx.Response(500))
    async with async_client(
        script, journal_path, sleeps, retry=RetryPolicy(max_attempts=2)
    ) as client:
        with pytest.raises(RetriesExhaustedError):
            await client.post("/upload", content=chunks())
    assert script.bodies == [b"abcd", b"abcd"]


def test_logs_carry_keys_and_decisions_but_no_secret(
    client_factory: Callable[..., httpx.Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="idemclient")
    client = client_factory(Script(httpx.Response(503), ok()))
    response = client.post(
        "https://user:URL_PASSWORD@api.example/charges",
        json={"card": "BODY_SECRET"},
        headers={"Authorization": "Bearer HEADER_SECRET"},
    )
    client.get("https://user:URL_PASSWORD@api.example/charges")
    key = response.extensions["idempotency"]["key"]
    assert key in caplog.text
    assert "retrying" in caplog.text
    for secret in ("URL_PASSWORD", "BODY_SECRET", "HEADER_SECRET"):
        assert secret not in caplog.text


def test_operation_names_are_per_thread(client_factory: Callable[..., httpx.Client]) -> None:
    client = client_factory(Script(ok()))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with idemclient.operation(f"thread-{n}"):
                client.post("/x", json={"n": n})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    names = sorted(op.name or "" for op in journal_of(client).operations())
    assert names == ["thread-0", "thread-1", "thread-2", "thread-3"]


@pytest.mark.anyio
async def test_operation_names_are_per_task(journal_path: Path, sleeps: list[float]) -> None:
    import anyio

    script = AsyncScript(ok())
    async with async_client(script, journal_path, sleeps) as client:

        async def task(n: int) -> None:
            async with idemclient.operation(f"task-{n}"):
                await anyio.sleep(0)
                await client.post("/x", json={"n": n})

        async with anyio.create_task_group() as group:
            for n in range(4):
                group.start_soon(task, n)
        names = sorted(op.name or "" for op in client._transport.journal.operations())  # type: ignore[attr-defined]
    assert names == ["task-0", "task-1", "task-2", "task-3"]


def test_replay_of_a_body_too_large_to_keep(journal_path: Path, sleeps: list[float]) -> None:
    journal = Journal(journal_path, max_response_body=5)
    script = Script(httpx.Response(201, content=b"0123456789", headers={"X-Id": "7"}))
    client = client_for(script, journal, sleeps)
    with idemclient.operation("big"):
        assert client.post("/x", json={}).content == b"0123456789"  # the caller gets it all
    # A rerun: never an empty answer that looks like a success
    with (
        idemclient.operation("big"),
        pytest.raises(idemclient.ResponseNotKeptError, match="the 10 bytes of its answer") as info,
    ):
        client.post("/x", json={})
    assert info.value.response is not None
    assert info.value.response.status_code == 201
    assert len(script.requests) == 1
    client = client_for(script, journal, sleeps, empty_replays=True)  # opted in
    with idemclient.operation("big"):
        replay = client.post("/x", json={})
    assert len(script.requests) == 1
    assert replay.status_code == 201
    assert replay.headers["X-Id"] == "7"
    assert replay.content == b""
    assert replay.extensions["idempotency"]["body_kept"] is False
    assert replay.extensions["idempotency"]["replayed"] is True


@pytest.mark.anyio
async def test_async_tasks_register_together(journal_path: Path, sleeps: list[float]) -> None:
    import anyio

    script = AsyncScript(ok())
    async with async_client(script, journal_path, sleeps) as client:

        async def place(n: int) -> None:
            async with idemclient.operation(f"order-{n}"):
                response = await client.post("/orders", json={"n": n})
            assert response.status_code == 201

        async with anyio.create_task_group() as group:
            for n in range(16):
                group.start_soon(place, n)
        ops = client._transport.journal.operations()  # type: ignore[attr-defined]
    assert len(ops) == 16
    assert {op.state for op in ops} == {"completed"}
    assert len({r.headers["Idempotency-Key"] for r in script.requests}) == 16


@pytest.mark.anyio
async def test_async_tasks_rerunning_done_and_new_operations_together(
    journal_path: Path, sleeps: list[float]
) -> None:
    # Registrations that wait together are one INSERT; a known name among them sends the
    # batch down the one-by-one path: the done ones replay, the new ones are sent.
    import anyio

    script = AsyncScript(ok())
    replayed: dict[int, bool] = {}
    async with async_client(script, journal_path, sleeps) as client:

        async def place(n: int) -> None:
            async with idemclient.operation(f"order-{n}"):
                response = await client.post("/orders", json={"n": n})
            assert response.status_code == 201
            replayed[n] = response.extensions["idempotency"]["replayed"]

        for count in (8, 16):  # a first run stops after 8; the rerun does all 16
            async with anyio.create_task_group() as group:
                for n in range(count):
                    group.start_soon(place, n)
    assert replayed == {n: n < 8 for n in range(16)}
    assert len(script.requests) == 16  # each order sent once
    with Journal(journal_path) as journal:
        assert {op.state for op in journal.operations()} == {"completed"}


@pytest.mark.anyio
async def test_async_tasks_all_fail_closed_on_a_locked_journal(
    journal_path: Path, sleeps: list[float]
) -> None:
    import anyio

    script = AsyncScript(ok())
    journal = Journal(journal_path, busy_timeout=0.05)
    failures: list[BaseException] = []
    holder = sqlite3.connect(journal_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        async with async_client(script, journal, sleeps) as client:

            async def place(n: int) -> None:
                try:
                    await client.post("/orders", json={"n": n})
                except JournalError as exc:
                    failures.append(exc)

            async with anyio.create_task_group() as group:
                for n in range(4):
                    group.start_soon(place, n)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(failures) == 4
    assert script.requests == []


class BrokenRegistration(Journal):
    """A journal whose registration itself breaks (not a JournalError: a bug, say)."""

    def register_many(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        import time

        time.sleep(0.05)  # let other tasks queue up behind the first
        raise RuntimeError("broken journal")


@pytest.mark.anyio
async def test_async_waiting_tasks_get_the_error_of_a_broken_registration(
    journal_path: Path, sleeps: list[float]
) -> None:
    import anyio

    script = AsyncScript(ok())
    errors: list[BaseException] = []
    async with async_client(script, BrokenRegistration(journal_path), sleeps) as client:

        async def place(n: int) -> None:
            try:
                await client.post("/orders", json={"n": n})
            except RuntimeError as exc:
                errors.append(exc)

        with anyio.fail_after(10):  # (a task left waiting would hang: its wait is shielded)
            async with anyio.create_task_group() as group:
                for n in range(4):
                    group.start_soon(place, n)
    assert len(errors) == 4
    assert script.requests == []


#: Header bytes that are not ASCII: a latin-1 value, a UTF-8 value, and both in one response
#: (then httpx decodes them all as iso-8859-1).
_LATIN1 = (b"X-Note", b"caf\xe9")
_UTF8 = (b"Content-Disposition", 'attachment; filename="résumé.pdf"'.encode())


@pytest.mark.parametrize(
    "headers", [[_LATIN1], [_UTF8], [_LATIN1, _UTF8]], ids=["latin-1", "utf-8", "both"]
)
@pytest.mark.parametrize("status", [201, 422])
def test_replay_reproduces_non_ascii_header_bytes(
    client_factory: Callable[..., httpx.Client], headers: list[tuple[bytes, bytes]], status: int
) -> None:
    sent = [(b"X-Request-Id", b"r1"), *headers, (b"Content-Length", b"2")]
    script = Script(httpx.Response(status, headers=sent, content=b"ok"))
    client = client_factory(script)

    def post() -> httpx.Response:
        with idemclient.operation("resume-upload"):
            if status != 422:
                return client.post("/files", content=b"pdf")
            with pytest.raises(ConflictError) as info:
                client.post("/files", content=b"pdf")
            assert info.value.response is not None
            return info.value.response

    first, replay = post(), post()
    assert len(script.requests) == 1
    assert replay.headers.raw == first.headers.raw == sent  # names' case included
    assert replay.headers.multi_items() == first.headers.multi_items()
    assert replay.read() == b"ok"


@pytest.mark.parametrize(
    ("column", "sent"),
    [
        ('[["x-note", "caf\\u00e9"]]', [(b"x-note", b"caf\xc3\xa9")]),
        ('[["x-note", "\\u0394"]]', [(b"x-note", b"\xce\x94")]),
        ('[["x-id", "7"]]', [(b"x-id", b"7")]),
    ],
    ids=["latin-1-range", "utf-8", "ascii"],
)
def test_replay_of_headers_journaled_before_the_encoding_was_kept(
    client_factory: Callable[..., httpx.Client],
    journal_path: Path,
    column: str,
    sent: list[tuple[bytes, bytes]],
) -> None:
    """Rows written before keep their text: a list of pairs decoded with httpx's encoding,
    which cannot say whether `é` came as latin-1 or UTF-8 bytes. A replay sends UTF-8: the
    same text for both, the same bytes for ASCII and UTF-8."""
    client = client_factory(Script(ok()))
    with idemclient.operation("old"):
        client.post("/x", json={})
    journal_of(client).flush()
    with sqlite3.connect(journal_path) as db:
        db.execute("UPDATE operations SET response_headers = ?", (column,))
    with idemclient.operation("old"):
        replay = client.post("/x", json={})
    assert replay.extensions["idempotency"]["replayed"] is True
    assert replay.headers.raw == sent
    assert replay.headers.multi_items() == [(k, v) for k, v in json.loads(column)]


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_malformed_retry_after_date_counts_as_absent(
    client_factory: Callable[..., httpx.Client], sleeps: list[float], method: str
) -> None:
    bad = {"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"}
    script = Script(httpx.Response(503, headers=bad), ok())
    client = client_factory(script)
    with idemclient.operation("charge-odd-hint"):
        response = client.request(method, "/charges", json={"amount": 5})
    assert response.status_code == 201
    assert len(script.requests) == 2
    assert len(sleeps) == 1
    assert sleeps[0] <= RetryPolicy().max_delay  # the backoff alone: no hint
    if method == "POST":
        op = journal_of(client).get("charge-odd-hint")
        assert op is not None
        assert (op.state, op.attempts) == ("completed", 2)


@pytest.mark.parametrize(
    ("options", "header", "quoted"),
    [
        ({}, "Idempotency-Key", False),
        ({"key_header": "X-Idempotency-Key"}, "X-Idempotency-Key", False),
        ({"key_style": "structured"}, "Idempotency-Key", True),
    ],
    ids=["default", "key_header", "structured"],
)
@pytest.mark.parametrize("status", [201, 422])
def test_a_replay_request_shows_the_operations_key(
    client_factory: Callable[..., httpx.Client],
    options: dict[str, object],
    header: str,
    quoted: bool,
    status: int,
) -> None:
    script = Script(httpx.Response(status, json={}))
    client = client_factory(script, **options)

    def post() -> httpx.Response:
        with idemclient.operation("charge-key"):
            if status != 422:
                return client.post("/charges", json={"amount": 5})
            with pytest.raises(ConflictError) as info:
                client.post("/charges", json={"amount": 5})
            assert info.value.response is not None
            return info.value.response

    post()
    replay = post()
    assert len(script.requests) == 1
    op = journal_of(client).get("charge-key")
    assert op is not None
    expected = f'"{op.key}"' if quoted else op.key
    assert script.requests[0].headers[header] == expected
    assert replay.request.headers[header] == expected  # not the key the rerun drew first


def test_error_responses_are_read_and_carry_their_request(
    client_factory: Callable[..., httpx.Client],
) -> None:
    """The response on a ConflictError or a RetriesExhaustedError is the caller's to read:
    in memory, with its request, the first time and when a rerun raises again."""
    client = client_factory(Script(httpx.Response(422, json={"error": "amount"})))
    for _ in range(2):  # sent, then answered from the journal
        with pytest.raises(ConflictError) as info, idemclient.operation("refused"):
            client.post("/charges", json={"amount": -1})
        assert info.value.response is not None
        assert info.value.response.json() == {"error": "amount"}
        assert info.value.response.request.url == "https://api.example/charges"
    client = client_factory(Script(httpx.Response(503, json={"error": "busy"})))
    with pytest.raises(RetriesExhaustedError) as gave_up:
        client.post("/charges", json={})
    assert gave_up.value.response is not None
    assert gave_up.value.response.json() == {"error": "busy"}
    assert gave_up.value.response.request.url == "https://api.example/charges"


def test_a_callers_structured_key_goes_out_as_written(
    client_factory: Callable[..., httpx.Client],
) -> None:
    script = Script(ok())
    client = client_factory(script)
    client.post("/x", json={}, headers={"Idempotency-Key": '"abc-1"'})
    assert script.requests[0].headers["Idempotency-Key"] == '"abc-1"'
    assert journal_of(client).get("abc-1") is not None


@pytest.mark.parametrize(
    ("written", "key_style"),
    [('"order-77"', "bare"), ("order-77", "structured")],
    ids=["quoted-under-bare", "bare-under-structured"],
)
def test_a_callers_key_is_resumed_as_the_caller_wrote_it(
    tmp_path: Path, written: str, key_style: Literal["bare", "structured"]
) -> None:
    """A resume sends a caller's key as the caller wrote it (quoted or bare), not in the
    client's style: a server that compares the header's value as written (Stripe) saw two
    keys, and acted twice."""
    api = AnswerLostOnce({"id": "o_77"})
    sent = api.keys
    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3", key_style=key_style,
        transport=httpx.MockTransport(api), retry=RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        with pytest.raises(RetriesExhaustedError):
            client.post("/orders", json={}, headers={"Idempotency-Key": written})
        assert [r.outcome for r in client.resume_pending()] == ["completed"]
    assert sent == [written, written]


def _following(tmp_path: Path, api: Handler) -> idemclient.Client:
    """A client that follows redirects, one attempt per call, on a journal in `tmp_path`."""
    return idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3", follow_redirects=True,
        transport=httpx.MockTransport(api), retry=RetryPolicy(max_attempts=1),
    )  # fmt: skip


@pytest.mark.parametrize("failure", ["timeout", "server error", "too many requests"])
def test_a_post_redirected_to_a_get_that_fails_is_the_same_operation_again(
    tmp_path: Path, failure: str
) -> None:
    """POST, 303 See Other, and the GET httpx follows fails (twice): the call fails after the
    operation was performed. The caller's retries right after are that operation, answered
    from the journal (the 303, followed again), not new ones under new keys: the server saw
    two keys and created the order twice (the second retry too, before replays were
    watched; a 429 to the GET, which an SDK retries, too)."""

    def hop(number: int, request: httpx.Request) -> httpx.Response:
        if number <= 2:
            if failure == "timeout":
                raise httpx.ReadTimeout("lost", request=request)
            return httpx.Response(503 if failure == "server error" else 429)
        return httpx.Response(200, json={"id": 1})

    api = SeeOther(hop)
    posts = api.posts
    with _following(tmp_path, api) as client:
        for _ in range(2):
            if failure == "timeout":
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/orders", json={"item": 1})
            else:
                assert client.post("/orders", json={"item": 1}).status_code >= 429
        again = client.post("/orders", json={"item": 1})
        assert again.json() == {"id": 1}
        assert again.history[0].extensions["idempotency"]["replayed"] is True
        assert len(posts) == 1
        # then done: the same request is an intended repeat
        client.post("/orders", json={"item": 1})
        assert len(posts) == 2
        assert posts[0] != posts[1]


def test_interrupted_as_its_registration_commits_a_resend_is_the_same_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a signal handler's exception) raised as the registration's commit returns:
    the row is written, the caller never learns it. The caller's resend right after takes the
    same key (refused while the lease the interrupted call took lasts, then sent under it),
    never a new one, which a resume of the first would have made a second operation."""
    from .test_journal import Clock

    clock = Clock()
    keys: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        return httpx.Response(201, json={"id": 1})

    journal = Journal(tmp_path / "j.sqlite3", clock=clock, auto_purge=None)
    register = journal.register

    def interrupted(*args: object, **kwargs: object) -> object:
        register(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(journal, "register", register)
        raise KeyboardInterrupt

    monkeypatch.setattr(journal, "register", interrupted)
    with idemclient.Client(
        base_url="https://api.example", journal=journal, transport=httpx.MockTransport(api)
    ) as client:
        with pytest.raises(KeyboardInterrupt):
            client.post("/charges", json={"amount": 5})
        (op,) = journal.operations()
        with pytest.raises(OperationInProgressError):
            client.post("/charges", json={"amount": 5})
        clock.now += 3600  # its lease ended
        assert client.post("/charges", json={"amount": 5}).status_code == 201
        assert keys == [op.key]
        assert [o.key for o in journal.operations()] == [op.key]


@pytest.mark.parametrize("in_block", [False, True], ids=["unnamed", "in-a-block"])
def test_an_auth_flow_that_refreshes_through_the_client_resends_the_same_operation(
    tmp_path: Path, in_block: bool
) -> None:
    """An OAuth-style auth flow: on 401 it POSTs to /refresh through the same client, then
    yields a new request. The resend is the 401'd operation (refused before any effect), not
    a new one beside it: the server saw two keys, and a resume (or a rerun of the block)
    then sent the first one too, performed twice."""
    charges: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/refresh":
            return httpx.Response(200, json={"token": "new"})
        charges.append(request.headers["idempotency-key"])
        if request.headers["authorization"] != "Bearer new":
            return httpx.Response(401)
        return httpx.Response(201, json={"id": 1})

    class Refreshing(httpx.Auth):
        token = "old"

        def auth_flow(
            self, request: httpx.Request
        ) -> Generator[httpx.Request, httpx.Response, None]:
            request.headers["Authorization"] = f"Bearer {self.token}"
            response = yield request
            if response.status_code == 401:
                self.token = client.post("/refresh").json()["token"]
                yield httpx.Request(
                    request.method, request.url, content=request.content,
                    headers={"Authorization": f"Bearer {self.token}",
                             "Content-Type": "application/json"},
                )  # fmt: skip

    client = idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3", auth=Refreshing(),
        transport=httpx.MockTransport(api),
    )  # fmt: skip
    with client:
        with idemclient.operation("charge-1") if in_block else contextlib.nullcontext():
            assert client.post("/charges", json={"amount": 5}).status_code == 201
        assert len(charges) == 2
        assert charges[0] == charges[1]
        assert client.resume_pending() == []
        assert [op.state for op in client.journal.operations()] == ["completed"] * 2
    assert len(charges) == 2


def test_a_redirect_hop_whose_body_is_cut_fails_the_call_of_its_operation(
    tmp_path: Path,
) -> None:
    """POST, 303, and the GET's answer is cut mid-body (read by httpx after the transport
    returned it): the retry right after is the operation, answered from the journal."""
    posts: list[str] = []
    gets = 0

    def cut() -> Iterator[bytes]:
        yield b'{"id":'
        raise httpx.RemoteProtocolError("peer closed connection mid-body")

    def api(request: httpx.Request) -> httpx.Response:
        nonlocal gets
        if request.method == "POST":
            posts.append(request.headers["idempotency-key"])
            return httpx.Response(303, headers={"location": "/orders/1"})
        gets += 1
        return httpx.Response(200, content=cut() if gets == 1 else b'{"id": 1}')

    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3", follow_redirects=True,
        transport=httpx.MockTransport(api), retry=RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/orders", json={"item": 1})
        assert client.post("/orders", json={"item": 1}).json() == {"id": 1}
    assert len(posts) == 1


def test_an_auth_flow_that_gets_a_token_before_each_post_keeps_the_retry_its_operation(
    tmp_path: Path,
) -> None:
    """An auth flow that fetches a token with a GET through the same client before every POST
    (CSRF, nonces): the POST's answer is lost after the server acted, and the caller's retry
    (its auth flow's GET first) is the same operation, not a second action."""
    api = AnswerLostOnce({"id": 1})

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"csrf": "t"})
        return api(request)

    class Csrf(httpx.Auth):
        def auth_flow(
            self, request: httpx.Request
        ) -> Generator[httpx.Request, httpx.Response, None]:
            token = yield httpx.Request("GET", "https://api.example/csrf")
            request.headers["X-CSRF"] = token.json()["csrf"]
            yield request

    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3", auth=Csrf(),
        transport=httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        with pytest.raises(RetriesExhaustedError):
            client.post("/orders", json={"item": 1})
        assert client.post("/orders", json={"item": 1}).status_code == 201
    assert len(api.keys) == 2
    assert len(set(api.keys)) == 1


@pytest.mark.parametrize("hop", ["corrupt gzip", "retry hint"])
def test_a_redirect_hop_that_fails_after_its_headers_fails_its_operations_call(
    tmp_path: Path, hop: str
) -> None:
    """POST, 303, and the followed GET is answered with a body that does not decode, or with
    a 400 that says `x-should-retry: true` (an SDK retries both): the retry is the same
    operation, answered from the journal."""

    def answer(number: int, request: httpx.Request) -> httpx.Response:
        if number == 1 and hop == "corrupt gzip":
            return httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"nope")
        if number == 1:
            return httpx.Response(400, headers={"x-should-retry": "true"})
        return httpx.Response(200, json={"id": 1})

    api = SeeOther(answer)
    posts = api.posts
    with _following(tmp_path, api) as client:
        if hop == "corrupt gzip":
            with pytest.raises(httpx.DecodingError):
                client.post("/orders", json={"item": 1})
        else:
            assert client.post("/orders", json={"item": 1}).status_code == 400
        assert client.post("/orders", json={"item": 1}).json() == {"id": 1}
    assert len(posts) == 1


@pytest.mark.parametrize("hop", ["hinted success", "streamed, closed early"])
def test_a_redirect_hop_that_succeeded_ends_its_operation(tmp_path: Path, hop: str) -> None:
    """A followed GET answered with a success (even one hinting `x-should-retry: true`), or
    streamed by the caller and closed before its end on purpose: the call succeeded, and an
    identical POST after it is a new operation."""
    posts: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posts.append(request.headers["idempotency-key"])
            return httpx.Response(303, headers={"location": f"/orders/{len(posts)}"})
        chunks = iter([b"x" * 10_000] * 10)  # on the wire: not read in advance
        return httpx.Response(200, headers={"x-should-retry": "true"}, content=chunks)

    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3", follow_redirects=True,
        transport=httpx.MockTransport(api),
    ) as client:  # fmt: skip
        for _ in range(2):
            if hop == "hinted success":
                assert client.post("/orders", json={"item": 1}).status_code == 200
            else:
                with client.stream("POST", "/orders", json={"item": 1}) as response:
                    next(response.iter_raw(10))
    assert len(set(posts)) == 2


def test_an_unjournaled_answer_given_up_for_a_retry_is_closed_unread(tmp_path: Path) -> None:
    """A GET answered 503 whose body is cut (or endless): closed, not read, and retried."""
    answers = [503, 200]

    def cut() -> Iterator[bytes]:
        yield b"busy"
        raise httpx.RemoteProtocolError("peer closed connection mid-body")

    def api(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        return httpx.Response(status, content=cut() if status == 503 else b"{}")

    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3",
        transport=httpx.MockTransport(api), sleep=lambda seconds: None,
    ) as client:  # fmt: skip
        assert client.get("/status").status_code == 200
    assert answers == []


@pytest.mark.anyio
async def test_an_async_get_answered_with_a_retryable_status_is_retried(tmp_path: Path) -> None:
    """The answer to retry is closed before the retry: an async transport's stream has no
    sync close (RuntimeError instead of a retry)."""
    answers = [503, 200]

    async def api(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"{}"

        return httpx.Response(answers.pop(0), content=body())

    async with idemclient.AsyncClient(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3",
        transport=httpx.MockTransport(api), sleep=_no_sleep,
    ) as client:  # fmt: skip
        assert (await client.get("/status")).status_code == 200
    assert answers == []


async def _no_sleep(seconds: float) -> None:
    return None


def test_an_operation_refused_with_401_is_set_aside_only_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set aside by another request, a 401'd operation is resent as itself only for a while
    (an auth flow's refresh): the same request much later is a new operation, not the old
    one (which may have expired meanwhile, and was then refused)."""
    keys: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/daily":
            keys.append(request.headers["idempotency-key"])
            return httpx.Response(401 if len(keys) == 1 else 201)
        return httpx.Response(201)

    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3",
        transport=httpx.MockTransport(api),
    ) as client:  # fmt: skip
        assert client.post("/daily", json={}).status_code == 401
        monkeypatch.setattr(idemclient._core, "_ASIDE_SECONDS", 0.0)
        client.post("/other", json={})  # sets it aside, for no time at all
        assert client.post("/daily", json={}).status_code == 201
    assert len(set(keys)) == 2


@pytest.mark.parametrize("acted", [True, False], ids=["acted-then-500", "500s-only"])
def test_a_retry_under_a_key_an_sdk_drew_anew_is_the_failed_operation_again(
    tmp_path: Path, acted: bool
) -> None:
    """stripe-python draws a new Idempotency-Key for every call. Its caller's retry, right
    after the operation failed, in the same thread: that operation again, under its key (the
    retry went out under the new key, a second payment; or, when nothing had acted, the
    resume then sent the first key too)."""
    keys: list[str] = []
    effects: set[str] = set()

    def api(request: httpx.Request) -> httpx.Response:
        key = request.headers["idempotency-key"]
        keys.append(key)
        if len(keys) == 1:
            if acted:
                effects.add(key)
            return httpx.Response(500)
        effects.add(key)
        return httpx.Response(201, json={"id": "pi_1"})

    with idemclient.Client(
        base_url="https://api.example", journal=tmp_path / "j.sqlite3",
        transport=httpx.MockTransport(api), retry=RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip

        def create() -> httpx.Response:  # as the SDK does: a new key per call
            return client.post("/v1/payment_intents", content=b"amount=5",
                               headers={"Idempotency-Key": str(uuid.uuid4())})  # fmt: skip

        with pytest.raises(RetriesExhaustedError):
            create()
        assert create().status_code == 201
        assert client.resume_pending() == []
    assert len(set(keys)) == 1
    assert len(effects) == 1


def test_a_trio_task_is_told_apart_by_weak_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under trio (no asyncio loop running), a request's place is a weak reference to trio's
    task, not its `id()`: a task started after another ended may get that id, and was taken
    for it (its different request then wiped the ended task's mark: a retry went out under
    a new key)."""
    import sys
    import types
    import weakref

    from idemclient._transport import _task_place

    class Task:
        pass

    task = Task()
    lowlevel = types.SimpleNamespace(current_task=lambda: task)
    monkeypatch.setitem(sys.modules, "trio", types.SimpleNamespace(lowlevel=lowlevel))
    place = _task_place()
    assert isinstance(place, weakref.ref)
    assert place() is task
    assert place == weakref.ref(task)
    assert place != weakref.ref(Task())

"""idemclient.testing: the fake idempotent server as a MockTransport handler, and test mode."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Literal

import anyio
import httpx
import pytest

import idemclient
from idemclient import IdempotentTransport, RetriesExhaustedError, RetryPolicy, _config
from idemclient.testing import Effect, IdempotentApp, IdempotentServer, Reply, set_testing


def mock_client(app: IdempotentApp, journal: Path, sleeps: list[float]) -> httpx.Client:
    transport = IdempotentTransport(
        httpx.MockTransport(app.handler), journal=journal, sleep=sleeps.append
    )
    return httpx.Client(transport=transport, base_url="https://api.example")


def test_app_semantics_through_mock_transport(journal_path: Path, sleeps: list[float]) -> None:
    app = IdempotentApp()
    app.inject("status", times=2, status=503, retry_after="1")
    app.inject("drop_after_acting")
    with mock_client(app, journal_path, sleeps) as client:
        response = client.post("/charges", json={"amount": 5})
    assert response.status_code == 201
    info = response.extensions["idempotency"]
    assert info["attempts"] == 4  # 503, 503, acted + dropped, replayed
    assert info["replayed"] is True
    assert sleeps[:2] == [1.0, 1.0]
    assert app.effect_count == 1
    assert app.requests_for(info["key"]) == 4
    assert app.duplicates() == 0
    assert app.effects[0].json() == {"amount": 5}
    assert app.effects[0].headers["idempotency-key"] == info["key"]


def test_app_refuses_a_reused_key_and_a_missing_key() -> None:
    app = IdempotentApp()
    with httpx.Client(transport=httpx.MockTransport(app.handler)) as raw:
        key = {"Idempotency-Key": "k1"}
        assert raw.post("https://x/a", json={"n": 1}, headers=key).status_code == 201
        replay = raw.post("https://x/a", json={"n": 1}, headers=key)
        assert replay.status_code == 201
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert raw.post("https://x/a", json={"n": 2}, headers=key).status_code == 422
        assert raw.post("https://x/b", json={"n": 1}, headers=key).status_code == 422
        assert raw.post("https://x/a", json={"n": 1}).status_code == 400
        effects = raw.get("https://x/_idem/effects").json()
        assert effects["count"] == 1
    assert app.effect_count == 1


def test_app_without_required_keys_acts_every_time() -> None:
    app = IdempotentApp(require_key=False)
    with httpx.Client(transport=httpx.MockTransport(app.handler)) as raw:
        raw.post("https://x/a", json={})
        raw.post("https://x/a", json={})
    assert app.effect_count == 2
    assert app.duplicates() == 1


@pytest.mark.anyio
async def test_async_handler_answers_409_while_in_flight() -> None:
    app = IdempotentApp()
    app.inject("slow_before_acting", seconds=0.2)
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(app.async_handler)) as raw:

        async def send(delay: float) -> None:
            await anyio.sleep(delay)
            r = await raw.post("https://x/a", json={}, headers={"Idempotency-Key": "k"})
            statuses.append(r.status_code)

        async with anyio.create_task_group() as group:
            group.start_soon(send, 0.0)
            group.start_soon(send, 0.05)
    assert statuses == [409, 201]
    assert app.effect_count == 1


def test_set_testing_turns_off_sleeping_and_caps_attempts(
    journal_path: Path, sleeps: list[float]
) -> None:
    app = IdempotentApp()
    app.inject("status", times=10, status=503, retry_after="60")
    with mock_client(app, journal_path, sleeps) as client:
        with set_testing(True, max_attempts=3):
            assert _config.testing_mode().on
            with pytest.raises(RetriesExhaustedError) as info:
                client.post("/charges", json={})
        assert info.value.attempts == 3
        assert sleeps == []
        assert not _config.testing_mode().on
        # outside test mode the same transport sleeps again
        with pytest.raises(RetriesExhaustedError):
            client.post("/x", json={}, extensions={"timeout": {}})
    assert sleeps == [60.0] * 4


def test_set_testing_as_a_call_and_validation() -> None:
    previous = _config.testing_mode()
    set_testing(True)
    try:
        assert _config.testing_mode().on
        assert _config.testing_mode().apply(RetryPolicy()).max_attempts == 5
    finally:
        set_testing(previous.on, max_attempts=previous.max_attempts)
    with pytest.raises(ValueError, match="max_attempts"):
        set_testing(True, max_attempts=0)
    assert _config.testing_mode() == previous


def test_server_effects_endpoint(server: IdempotentServer) -> None:
    with httpx.Client(base_url=server.url) as raw:
        raw.post("/a", json={"x": 1}, headers={"Idempotency-Key": '"quoted-key"'})
        data = json.loads(raw.get("/_idem/effects").content)
    assert data["effects"] == [
        {"key": "quoted-key", "method": "POST", "path": "/a", "body": {"x": 1}}
    ]


def test_quickstart_style_usage_with_test_mode(journal_path: Path) -> None:
    app = IdempotentApp()
    app.inject("status", times=2, status=503)
    with (
        set_testing(True),
        idemclient.Client(
            journal=journal_path, transport=httpx.MockTransport(app.handler), base_url="https://x"
        ) as client,
    ):
        assert client.post("/orders", json={}).status_code == 201
    assert app.effect_count == 1


@pytest.mark.anyio
async def test_async_request_cancelled_before_acting_frees_its_key() -> None:
    app = IdempotentApp()
    app.inject("slow_before_acting", seconds=30)
    key = {"Idempotency-Key": "k"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(app.async_handler)) as raw:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(raw.post("https://x/a", json={}, headers=key), timeout=0.05)
        assert app.effect_count == 0  # the handler died before acting
        again = await raw.post("https://x/a", json={}, headers=key)  # was 409, forever
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert app.effect_count == 1


@pytest.mark.anyio
async def test_async_request_cancelled_after_acting_is_replayed() -> None:
    app = IdempotentApp()
    app.inject("slow_after_acting", seconds=30)
    key = {"Idempotency-Key": "k"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(app.async_handler)) as raw:
        task = asyncio.ensure_future(raw.post("https://x/a", json={}, headers=key))
        while app.effect_count == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await raw.post("https://x/a", json={}, headers=key)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert app.effect_count == 1


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["slow_before_acting", "slow_after_acting"])
async def test_a_cancelled_operation_finishes_once_when_run_again(
    journal_path: Path, fault: Literal["slow_before_acting", "slow_after_acting"]
) -> None:
    """What a user's cancellation test does: cancel an operation mid-flight, run it again."""
    app = IdempotentApp()
    app.inject(fault, seconds=30)
    with set_testing(True, max_attempts=3):
        async with idemclient.AsyncClient(
            journal=journal_path, transport=httpx.MockTransport(app.async_handler),
            base_url="https://api.example",
        ) as client:  # fmt: skip
            with anyio.move_on_after(0.1) as scope, idemclient.operation("order-1"):
                await client.post("/orders", json={"sku": "a"})
            assert scope.cancelled_caught
            with idemclient.operation("order-1"):
                response = await client.post("/orders", json={"sku": "a"})
    assert response.status_code == 201
    assert response.extensions["idempotency"]["replayed"] is (fault == "slow_after_acting")
    assert app.effect_count == 1
    assert app.duplicates() == 0


def test_server_does_not_act_on_a_body_cut_short(server: IdempotentServer) -> None:
    """A client that went away mid-body (a cancelled task, a killed process) must not leave
    an effect of a truncated body, nor make the complete request with that key a 422."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /charges HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 12\r\n\r\n{"a"'
        )
    complete = httpx.post(
        f"{server.url}/charges", content=b'{"a": 1234 }', headers={"Idempotency-Key": "k1",
        "Content-Type": "application/json"}, timeout=5,
    )  # fmt: skip
    assert complete.status_code == 201
    assert [effect.body for effect in server.effects] == [b'{"a": 1234 }']


class Events(IdempotentServer):
    """Answers as an API that streams: three events, each after the client saw the last."""

    def __init__(self) -> None:
        super().__init__()
        self.paced: list[int] = []

    def respond(self, effect: Effect, number: int) -> Reply:
        return Reply(200, (b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"), "text/event-stream")

    def pace(self, effect: Effect, index: int) -> None:
        self.paced.append(index)


def test_respond_shapes_the_answer_streams_chunks_and_replays_them_joined() -> None:
    with Events() as server, httpx.Client(base_url=server.url) as client:
        key = {"Idempotency-Key": "k-1"}
        with client.stream("POST", "/events", json={}, headers=key) as response:
            assert response.headers["content-type"] == "text/event-stream"
            assert "content-length" not in response.headers  # chunked, as it streams
            assert b"".join(response.iter_raw()) == b"data: a\n\ndata: b\n\ndata: c\n\n"
        assert server.paced == [1, 2]  # before each chunk after the first
        again = client.post("/events", json={}, headers=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == b"data: a\n\ndata: b\n\ndata: c\n\n"
    assert (server.effect_count, server.paced) == (1, [1, 2])


def test_respond_through_the_mock_transport_handler() -> None:
    app = Events()  # not started: its handler serves a MockTransport
    app.stop()
    with httpx.Client(transport=httpx.MockTransport(app.handler)) as client:
        response = client.post("https://api.example/e", json={}, headers={"Idempotency-Key": "k"})
    assert response.text == "data: a\n\ndata: b\n\ndata: c\n\n"
    assert app.paced == [1, 2]

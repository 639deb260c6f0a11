"""End to end against a real HTTP server on 127.0.0.1 (`idemclient.testing.IdempotentServer`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

import idemclient
from idemclient import ConflictError, OperationMismatchError, RetryPolicy
from idemclient.testing import IdempotentServer

FAST = RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=8)


def make_client(server: IdempotentServer, journal: Path, **options: object) -> idemclient.Client:
    options.setdefault("retry", FAST)
    return idemclient.Client(base_url=server.url, journal=journal, timeout=5.0, **options)  # type: ignore[arg-type]


def test_lost_response_after_the_server_acted(server: IdempotentServer, journal_path: Path) -> None:
    server.inject("drop_after_acting")
    with make_client(server, journal_path) as client:
        response = client.post("/charges", json={"amount": 500})
    assert response.status_code == 201
    info = response.extensions["idempotency"]
    assert info["attempts"] == 2
    assert info["replayed"] is True
    assert server.effect_count == 1
    assert server.requests_for(info["key"]) == 2


def test_503_then_success(server: IdempotentServer, journal_path: Path) -> None:
    server.inject("status", times=2, status=503, retry_after="0")
    with make_client(server, journal_path) as client:
        response = client.post("/charges", json={"amount": 1})
    assert response.status_code == 201
    assert response.extensions["idempotency"]["attempts"] == 3
    assert server.effect_count == 1


def test_409_while_the_first_request_is_in_flight(server: IdempotentServer, tmp_path: Path) -> None:
    """Two machines (two journals) send one caller-chosen key: one acts, the other waits."""
    server.inject("slow_before_acting", seconds=0.5)
    key = {"Idempotency-Key": "order-77"}
    results: dict[str, httpx.Response] = {}

    def first() -> None:
        with make_client(server, tmp_path / "a.sqlite3") as client:
            results["first"] = client.post("/orders", json={"cart": 1}, headers=key)

    thread = threading.Thread(target=first)
    thread.start()
    deadline = time.monotonic() + 5
    while server.requests_for("order-77") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    policy = RetryPolicy(base_delay=0.1, max_delay=0.2, max_attempts=30)
    with make_client(server, tmp_path / "b.sqlite3", retry=policy) as client:
        second = client.post("/orders", json={"cart": 1}, headers=key)
    thread.join(timeout=10)
    assert results["first"].status_code == 201
    assert second.status_code == 201
    assert second.json() == results["first"].json()
    assert second.extensions["idempotency"]["attempts"] >= 2  # it met a 409 first
    assert second.extensions["idempotency"]["replayed"] is True
    assert server.effect_count == 1


def test_422_key_reused_with_another_payload(server: IdempotentServer, tmp_path: Path) -> None:
    key = {"Idempotency-Key": "charge-key-1"}
    with make_client(server, tmp_path / "a.sqlite3") as client:
        client.post("/charges", json={"amount": 5}, headers=key)
    with make_client(server, tmp_path / "b.sqlite3") as client:
        with pytest.raises(ConflictError) as info:
            client.post("/charges", json={"amount": 6}, headers=key)
        assert info.value.response is not None
        assert info.value.response.status_code == 422
        assert "reused" in info.value.response.json()["error"]
        assert server.requests_for("charge-key-1") == 2
        op = client.journal.get("charge-key-1")
        assert op is not None
        assert op.state == "conflict"
    assert server.effect_count == 1


def test_named_rerun_sends_nothing(server: IdempotentServer, journal_path: Path) -> None:
    for _ in range(3):  # three runs of the same script
        with make_client(server, journal_path) as client, idemclient.operation("invoice-9"):
            response = client.post("/charges", json={"invoice": 9})
        assert response.status_code == 201
    assert server.effect_count == 1
    assert server.requests_for(response.extensions["idempotency"]["key"]) == 1


def test_mismatch_is_caught_before_the_server(server: IdempotentServer, journal_path: Path) -> None:
    with make_client(server, journal_path) as client:
        with idemclient.operation("invoice-9"):
            client.post("/charges", json={"invoice": 9})
        with pytest.raises(OperationMismatchError), idemclient.operation("invoice-9"):
            client.post("/charges", json={"invoice": 10})
    assert server.effect_count == 1


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    server = IdempotentServer()
    url = server.url
    server.stop()  # nothing listens on that port now
    sleeps: list[float] = []
    with idemclient.Client(
        base_url=url, journal=tmp_path / "j.sqlite3", retry=RetryPolicy(max_attempts=3),
        sleep=sleeps.append,
    ) as client:  # fmt: skip
        with pytest.raises(idemclient.RetriesExhaustedError) as info:
            client.post("/charges", json={})
        assert isinstance(info.value.__cause__, httpx.ConnectError)
        assert len(sleeps) == 2
        assert [op.state for op in client.journal.operations()] == ["pending"]


@pytest.mark.anyio
async def test_async_client_against_the_server(
    server: IdempotentServer, journal_path: Path
) -> None:
    server.inject("drop_after_acting")
    server.inject("status", times=1, status=503)
    async with idemclient.AsyncClient(
        base_url=server.url, journal=journal_path, retry=FAST, timeout=5.0
    ) as client:
        async with idemclient.operation("async-1"):
            response = await client.post("/orders", json={"cart": "c1"})
        async with idemclient.operation("async-1"):
            again = await client.post("/orders", json={"cart": "c1"})
    assert response.status_code == 201
    assert again.extensions["idempotency"]["replayed"] is True
    assert server.effect_count == 1

"""Event hooks: the observable life of a journaled operation."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import idemclient
from idemclient import ConflictError, Event, RetriesExhaustedError, RetryPolicy
from idemclient.testing import IdempotentApp


def client_with(
    app: IdempotentApp, journal: Path, events: list[Event], **kw: object
) -> idemclient.Client:
    return idemclient.Client(
        journal=journal,
        transport=httpx.MockTransport(app.handler),
        base_url="https://api.example",
        hooks=[events.append],
        sleep=lambda s: None,
        **kw,  # type: ignore[arg-type]
    )


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def test_events_of_a_retried_operation(journal_path: Path) -> None:
    app = IdempotentApp()
    app.inject("status", status=503, retry_after="2")
    events: list[Event] = []
    with client_with(app, journal_path, events) as client, idemclient.operation("op-1"):
        client.post("/charges", json={})
    assert kinds(events) == [
        "registered", "sending", "answered", "retrying", "sending", "answered", "recording",
        "completed",
    ]  # fmt: skip
    assert [e.attempt for e in events] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert events[2].status == 503
    assert events[3].delay is not None
    assert events[3].delay >= 2.0
    assert events[-1].status == 201
    assert {e.operation for e in events} == {"op-1"}
    assert len({e.key for e in events}) == 1
    assert events[0].url == "https://api.example/charges"


def test_events_of_a_replay_conflict_and_give_up(journal_path: Path) -> None:
    app = IdempotentApp()
    events: list[Event] = []
    with client_with(app, journal_path, events, retry=RetryPolicy(max_attempts=2)) as client:
        with idemclient.operation("op-1"):
            client.post("/charges", json={})
        events.clear()
        with idemclient.operation("op-1"):
            client.post("/charges", json={})
        assert kinds(events) == ["replayed"]

        events.clear()
        app.inject("status", status=422)
        with pytest.raises(ConflictError):
            client.post("/charges", json={"n": 2})
        assert kinds(events) == ["registered", "sending", "answered", "recording", "conflict"]

        events.clear()
        app.inject("status", status=503, times=2)
        with pytest.raises(RetriesExhaustedError):
            client.post("/charges", json={"n": 3})
        assert kinds(events)[-1] == "gave_up"

        events.clear()
        app.inject("drop_after_acting")
        client.post("/charges", json={"n": 4})
        assert isinstance(events[2].error, httpx.ReadError)


def test_a_failing_hook_is_logged_and_ignored(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("metrics backend down")

    app = IdempotentApp()
    with idemclient.Client(
        journal=journal_path, transport=httpx.MockTransport(app.handler), hooks=[broken]
    ) as client:
        assert client.post("https://x/a", json={}).status_code == 201
    assert "metrics backend down" in caplog.text
    assert app.effect_count == 1


def test_unjournaled_requests_emit_nothing(journal_path: Path) -> None:
    events: list[Event] = []
    with client_with(IdempotentApp(), journal_path, events) as client:
        client.get("/charges")
    assert events == []


@pytest.mark.anyio
async def test_async_events(journal_path: Path) -> None:
    app = IdempotentApp()
    app.inject("status", status=429)
    events: list[Event] = []

    async def no_sleep(seconds: float) -> None:
        pass

    async with idemclient.AsyncClient(
        journal=journal_path,
        transport=httpx.MockTransport(app.async_handler),
        hooks=[events.append],
        sleep=no_sleep,
    ) as client:
        await client.post("https://x/a", json={})
    assert kinds(events) == [
        "registered", "sending", "answered", "retrying", "sending", "answered", "recording",
        "completed",
    ]  # fmt: skip

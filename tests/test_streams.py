"""Streams stream: a journaled success reaches the caller chunk by chunk and is recorded when
the stream ends; one closed before its end leaves the operation pending; a rerun replays the
whole stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import idemclient
from idemclient import Journal

CHUNKS = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]


class Stream:
    """A server that streams its answer and checks the caller saw each chunk before the
    next one is made: an answer read whole before the caller sees it fails here."""

    def __init__(self) -> None:
        self.seen = 0
        self.acted: dict[str, int] = {}

    def chunks(self) -> Iterator[bytes]:
        for i, chunk in enumerate(CHUNKS):
            if i and self.seen < i:
                raise AssertionError(f"chunk {i + 1} made before the caller saw chunk {i}")
            yield chunk

    async def achunks(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks():
            yield chunk

    def handler(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        self.acted[key] = self.acted.get(key, 0) + 1
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=self.chunks())  # fmt: skip

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        self.acted[key] = self.acted.get(key, 0) + 1
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=self.achunks())  # fmt: skip


def test_a_stream_reaches_the_caller_chunk_by_chunk_and_is_recorded_at_its_end(
    journal_path: Path,
) -> None:
    server = Stream()
    events: list[str] = []
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(server.handler),
                           hooks=[lambda e: events.append(e.kind)]) as client:  # fmt: skip
        with (
            idemclient.operation("reply-1"),
            client.stream("POST", "https://api.example/v1/messages", json={"q": 1}) as response,
        ):
            got = []
            for chunk in response.iter_raw():
                got.append(chunk)
                server.seen += 1
                if server.seen == 1:
                    op = client.journal.get("reply-1")
                    assert op is not None
                    assert op.state == "pending"  # not recorded before its end
        assert got == CHUNKS
        op = client.journal.get("reply-1")
        assert op is not None
        assert op.state == "completed"
        assert events[-2:] == ["recording", "completed"]
        with idemclient.operation("reply-1"):  # a rerun replays the whole stream
            replay = client.post("https://api.example/v1/messages", json={"q": 1})
        assert replay.content == b"".join(CHUNKS)
        assert replay.extensions["idempotency"]["replayed"] is True
    assert list(server.acted.values()) == [1]


def test_a_stream_closed_before_its_end_leaves_the_operation_pending(journal_path: Path) -> None:
    server = Stream()
    with idemclient.Client(journal=journal_path,
                           transport=httpx.MockTransport(server.handler)) as client:  # fmt: skip
        with (
            idemclient.operation("reply-1"),
            client.stream("POST", "https://api.example/v1/messages", json={}) as response,
        ):
            next(response.iter_raw())  # the caller stops after the first chunk
        op = client.journal.get("reply-1")
        assert op is not None
        assert op.state == "pending"
        # the lease was given back: the same process may send it again at once, same key
        server.seen = len(CHUNKS)
        with idemclient.operation("reply-1"):
            again = client.post("https://api.example/v1/messages", json={})
        assert again.content == b"".join(CHUNKS)
    assert list(server.acted.values()) == [2]  # one key: the server replays (here: acts)


def test_a_stream_too_large_to_keep_is_streamed_whole_and_not_replayed(
    journal_path: Path,
) -> None:
    server = Stream()
    server.seen = len(CHUNKS)
    journal = Journal(journal_path, max_response_body=10)
    with idemclient.Client(journal=journal, transport=httpx.MockTransport(server.handler)) as c:
        with idemclient.operation("big"):
            assert c.post("https://api.example/x", json={}).content == b"".join(CHUNKS)
        with idemclient.operation("big"), pytest.raises(idemclient.ResponseNotKeptError):
            c.post("https://api.example/x", json={})
    journal.close()


@pytest.mark.anyio
async def test_an_async_stream_reaches_the_caller_chunk_by_chunk(journal_path: Path) -> None:
    server = Stream()
    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(server.async_handler)
    ) as client:
        async with client.stream("POST", "https://api.example/v1/messages", json={}) as response:
            got = []
            async for chunk in response.aiter_raw():
                got.append(chunk)
                server.seen += 1
        assert got == CHUNKS
        (op,) = client.journal.operations()
        assert op.state == "completed"
        async with client.stream("POST", "https://api.example/other", json={}) as response:
            server.seen = 0
            async for _ in response.aiter_raw():
                server.seen += 1
                break
        ops = {o.url: o.state for o in client.journal.operations()}
        assert ops["https://api.example/other"] == "pending"

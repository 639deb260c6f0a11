"""Streams stream: a journaled success reaches the caller chunk by chunk and is recorded when
the stream ends; one closed before its end leaves the operation pending; a rerun replays the
whole stream."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

import idemclient
from idemclient import Journal

CHUNKS = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]


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


@pytest.mark.parametrize("read", [0, 1])
def test_a_stream_dropped_unclosed_stops_renewing_its_lease(journal_path: Path, read: int) -> None:
    """A streamed answer the caller lets go of without reading it to its end or closing it
    (`client.send(request, stream=True)` and forgotten): nobody records it nor gives its lease
    back, so the lease is no longer renewed and ends on its own (it was renewed for an
    hour, and a resume elsewhere waited that long). The operation stays pending."""
    server = Stream()
    with idemclient.Client(journal=journal_path,
                           transport=httpx.MockTransport(server.handler)) as client:  # fmt: skip
        request = client.build_request("POST", "https://api.example/v1/messages", json={})
        response = client.send(request, stream=True)
        chunks = response.iter_raw()
        if read:
            next(chunks)
        assert len(client.journal._holds.held()) == 1  # type: ignore[attr-defined]
        del response, chunks
        gc.collect()
        assert client.journal._holds.held() == {}  # type: ignore[attr-defined]
        (op,) = client.journal.operations()
        assert op.state == "pending"  # a rerun or resume gets the server's replay


@pytest.mark.anyio
async def test_an_async_stream_dropped_unclosed_stops_renewing_its_lease(
    journal_path: Path,
) -> None:
    server = Stream()
    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(server.async_handler)
    ) as client:
        request = client.build_request("POST", "https://api.example/v1/messages", json={})
        response = await client.send(request, stream=True)
        assert len(client.journal._holds.held()) == 1  # type: ignore[attr-defined]
        del response
        gc.collect()
        assert client.journal._holds.held() == {}  # type: ignore[attr-defined]


def test_a_stream_too_large_to_keep_is_streamed_whole_and_not_replayed(
    journal_path: Path,
) -> None:
    server = Stream()
    server.seen = len(CHUNKS)
    journal = Journal(journal_path, max_stream_body=10)
    with idemclient.Client(journal=journal, transport=httpx.MockTransport(server.handler)) as c:
        with idemclient.operation("big"):
            assert c.post("https://api.example/x", json={}).content == b"".join(CHUNKS)
        with idemclient.operation("big"), pytest.raises(idemclient.ResponseNotKeptError):
            c.post("https://api.example/x", json={})
    journal.close()


def test_a_stream_is_kept_up_to_its_own_larger_limit(journal_path: Path) -> None:
    """A streamed answer over `max_response_body` but within `max_stream_body` (16 MiB by
    default) is kept and replayed whole."""
    server = Stream()
    server.seen = len(CHUNKS)
    journal = Journal(journal_path, max_response_body=10)
    assert journal.max_stream_body == 16 * 1024 * 1024
    with idemclient.Client(journal=journal, transport=httpx.MockTransport(server.handler)) as c:
        with idemclient.operation("big"):
            assert c.post("https://api.example/x", json={}).content == b"".join(CHUNKS)
        with idemclient.operation("big"):
            again = c.post("https://api.example/x", json={})
        assert again.content == b"".join(CHUNKS)
        assert again.extensions["idempotency"]["replayed"] is True
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


def test_an_answer_that_breaks_mid_body_is_retried_under_the_same_key(journal_path: Path) -> None:
    """Only event streams reach the caller as they stream: any other success is read here,
    so that a connection lost mid-body is retried with the same key, as it always was."""
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])

        def body() -> Iterator[bytes]:
            yield b'{"id": '
            if len(keys) == 1:
                raise httpx.ReadError("connection lost mid-body")
            yield b'"ch_1"}'

        return httpx.Response(200, headers={"Content-Type": "application/json"}, content=body())

    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(handler),
                           sleep=lambda s: None) as client:  # fmt: skip
        assert client.post("https://api.example/x", json={}).json() == {"id": "ch_1"}
    assert len(keys) == 2
    assert len(set(keys)) == 1


def test_a_resend_after_an_interrupted_stream_continues_the_operation(journal_path: Path) -> None:
    server = Stream()
    with idemclient.Client(journal=journal_path,
                           transport=httpx.MockTransport(server.handler)) as client:  # fmt: skip
        with client.stream("POST", "https://api.example/v1/messages", json={}) as response:
            next(response.iter_raw())
            # closed mid-stream; reading on fails here (this server makes no chunk before
            # the caller saw the one before), so the operation stays pending
        server.seen = len(CHUNKS)
        again = client.post("https://api.example/v1/messages", json={})  # the SDK's retry
        assert again.content == b"".join(CHUNKS)
    assert list(server.acted.values()) == [2]  # one key, twice


def test_a_stream_closed_after_its_last_event_is_recorded(journal_path: Path) -> None:
    """An SDK stops reading at its last event (`data: [DONE]`) and closes before the body's
    end: the answer is whole, and recorded as read."""
    server = Stream()
    server.seen = len(CHUNKS)
    with idemclient.Client(journal=journal_path,
                           transport=httpx.MockTransport(server.handler)) as client:  # fmt: skip
        with client.stream("POST", "https://api.example/v1/messages", json={}) as response:
            for chunk in response.iter_raw():
                if chunk == CHUNKS[-1]:
                    break  # the last event: the SDK is done
        (op,) = client.journal.operations()
        assert op.state == "completed"


def test_a_stream_stopped_before_its_last_event_is_pending_at_once(journal_path: Path) -> None:
    """The caller stops a stream mid-way ("stop generating"): nothing more is read (the
    server may go on for long), and the operation stays pending under its key."""
    server = Stream()
    server.seen = len(CHUNKS)
    made: list[int] = []

    def endless() -> Iterator[bytes]:
        for i in range(10_000):  # bounded: far more than a caller that stops will read
            made.append(i)
            yield b"data: more\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        server.handler(request)
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=endless())  # fmt: skip

    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(handler)) as c:
        with idemclient.operation("reply-1"), c.stream("POST", "https://x/v1", json={}) as r:
            for _ in zip(range(2), r.iter_raw(), strict=False):
                pass
        assert len(made) <= 3  # not read on to the end
        (op,) = c.journal.operations()
        assert op.state == "pending"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stream_cut_mid_way_is_never_recorded_and_a_rerun_resends(
    journal_path: Path, asynchronous: bool
) -> None:
    """The connection is lost after two events: the caller gets the error, and the operation
    stays pending; a rerun sends it again under its key (the server replays it whole), never
    answering with the cut-off part."""
    acted: list[str] = []

    def cut(request: httpx.Request) -> Iterator[bytes]:
        yield CHUNKS[0]
        yield CHUNKS[1]
        raise httpx.ReadError("connection lost", request=request)

    async def acut(request: httpx.Request) -> AsyncIterator[bytes]:
        for chunk in cut(request):
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        acted.append(request.headers["Idempotency-Key"])
        if len(acted) > 1:
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=b"".join(CHUNKS))  # fmt: skip
        body = acut(request) if asynchronous else cut(request)
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body)

    async def read_whole(client: idemclient.AsyncClient) -> None:
        async with (
            idemclient.operation("reply-1"),
            client.stream("POST", "https://x/v1", json={}) as response,
        ):
            async for _ in response.aiter_raw():
                pass

    async def as_async() -> None:
        mock = httpx.MockTransport(handler)
        async with idemclient.AsyncClient(journal=journal_path, transport=mock) as client:
            with pytest.raises(httpx.ReadError):
                await read_whole(client)
            assert [op.state for op in client.journal.operations()] == ["pending"]
            async with idemclient.operation("reply-1"):
                again = await client.post("https://x/v1", json={})
            assert again.content == b"".join(CHUNKS)

    if asynchronous:
        import anyio

        anyio.run(as_async)
    else:
        with idemclient.Client(journal=journal_path,
                               transport=httpx.MockTransport(handler)) as client:  # fmt: skip
            with (
                pytest.raises(httpx.ReadError),
                idemclient.operation("reply-1"),
                client.stream("POST", "https://x/v1", json={}) as response,
            ):
                for _ in response.iter_raw():
                    pass
            assert [op.state for op in client.journal.operations()] == ["pending"]
            with idemclient.operation("reply-1"):
                again = client.post("https://x/v1", json={})
            assert again.content == b"".join(CHUNKS)
    assert len(acted) == 2
    assert len(set(acted)) == 1


@pytest.mark.anyio
async def test_tasks_do_not_inherit_their_parents_unfinished_operation(
    journal_path: Path,
) -> None:
    """A task copies its parent's context: the parent's failed operation must not absorb the
    tasks' own identical requests (each is its own operation)."""
    import asyncio

    keys: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        return httpx.Response(503 if len(keys) == 1 else 201)

    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(handler),
        retry=idemclient.RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        with pytest.raises(idemclient.RetriesExhaustedError):
            await client.post("https://api.example/x", json={"t": 2})
        await asyncio.gather(*(client.post("https://api.example/x", json={"t": 2})
                               for _ in range(3)))  # fmt: skip
    assert len(set(keys)) == 4


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stream_closed_after_its_last_event_does_not_wait_for_the_body_end(
    journal_path: Path, asynchronous: bool
) -> None:
    """A server (or a proxy) that holds the body's end back after the last event: the caller
    that closes the stream there is not kept waiting for it (nothing more is read), and the
    answer is recorded as read."""
    read_past: list[bool] = []

    def lingering() -> Iterator[bytes]:
        yield from CHUNKS
        read_past.append(True)  # what a drain would wait for (the server holds it back)
        yield b""

    async def alingering() -> AsyncIterator[bytes]:
        for chunk in lingering():
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=lingering())  # fmt: skip

    async def async_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=alingering())  # fmt: skip

    url = "https://api.example/v1/messages"
    if asynchronous:

        async def main() -> None:
            transport = httpx.MockTransport(async_handler)
            async with (
                idemclient.AsyncClient(journal=journal_path, transport=transport) as c,
                c.stream("POST", url, json={}) as response,
            ):
                async for chunk in response.aiter_raw():
                    if chunk == CHUNKS[-1]:
                        break

        anyio.run(main)
    else:
        with (
            idemclient.Client(journal=journal_path, transport=httpx.MockTransport(handler)) as c,
            c.stream("POST", url, json={}) as response,
        ):
            for chunk in response.iter_raw():
                if chunk == CHUNKS[-1]:
                    break
    assert read_past == []
    with Journal(journal_path) as journal:
        (op,) = journal.operations()
        assert op.state == "completed"
        stored = journal.stored_response(op.key)
        assert stored is not None
        assert stored.body == b"".join(CHUNKS)


@pytest.mark.parametrize("b_first", [False, True])
def test_a_stream_read_to_its_end_leaves_another_ones_resend_its_own(
    journal_path: Path, b_first: bool
) -> None:
    """Two streams open in one thread: A is read to its end (recorded), B is cut after the
    server acted. B's resend continues B's operation, under its key: A's end says nothing
    about B (it cleared the one mark of the thread, and the resend became a new operation,
    acted on twice)."""
    acted: dict[str, list[str]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        which = request.read().decode()
        acted.setdefault(which, []).append(request.headers["Idempotency-Key"])

        def chunks() -> Iterator[bytes]:
            yield CHUNKS[0]
            if "B" in which and len(acted[which]) == 1:
                raise httpx.ReadError("the connection was cut")
            yield from CHUNKS[1:]

        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=chunks())  # fmt: skip

    url = "https://api.example/v1/messages"
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(handler),
                           retry=idemclient.RetryPolicy(max_attempts=1)) as client:  # fmt: skip
        if b_first:  # (B's failure, not its send, is what its resend comes right after)
            b = client.send(client.build_request("POST", url, json="B"), stream=True)
            a = client.send(client.build_request("POST", url, json="A"), stream=True)
        else:
            a = client.send(client.build_request("POST", url, json="A"), stream=True)
            b = client.send(client.build_request("POST", url, json="B"), stream=True)
        assert b"".join(a.iter_raw()) == b"".join(CHUNKS)
        a.close()
        with pytest.raises(httpx.ReadError):
            b.read()
        b.close()
        again = client.post(url, json="B")  # the caller's (or its SDK's) retry
        assert again.content == b"".join(CHUNKS)
    assert len(acted['"B"']) == 2
    assert len(set(acted['"B"'])) == 1  # one key: the server replays (here: acts)
    with Journal(journal_path) as journal:
        assert {op.state for op in journal.operations()} == {"completed"}


@pytest.mark.anyio
async def test_calls_in_one_block_keep_their_own_unfinished_operations(
    journal_path: Path,
) -> None:
    """Inside one `operation()` block, two calls of an SDK gathered in tasks: the first's
    answer is lost after the server acted, the second completes meanwhile; the first's
    retry is still the first operation, under its name and key (the second's request, or
    its completion, took the block's one mark, and the retry became `job#3` under a new
    key: acted on twice)."""
    import asyncio

    acted: dict[str, list[str]] = {}
    second_done = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        which = request.read().decode()
        acted.setdefault(which, []).append(request.headers["Idempotency-Key"])
        if which == '"first"' and len(acted[which]) == 1:
            raise httpx.ReadError("the answer was lost after the server acted")
        return httpx.Response(201, json={"done": which})

    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(handler),
        retry=idemclient.RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip

        async def first() -> None:
            with pytest.raises(idemclient.RetriesExhaustedError):
                await client.post("https://api.example/x", json="first")
            await second_done.wait()  # the SDK backs off; the other call completes
            again = await client.post("https://api.example/x", json="first")
            assert again.status_code == 201

        async def second() -> None:
            await client.post("https://api.example/x", json="second")
            second_done.set()

        with idemclient.operation("job"):
            await asyncio.gather(first(), second())
        names = {op.name: op.state for op in client.journal.operations()}
    assert len(set(acted['"first"'])) == 1  # one key
    assert names == {"job": "completed", "job#2": "completed"}


@pytest.mark.anyio
async def test_a_stream_cut_while_another_call_waits_to_retry_leaves_that_retry_its_own(
    journal_path: Path,
) -> None:
    """In one block, a task opens a stream and hands it to a consumer; then its call B loses
    its answer after the server acted. The stream is cut while the task waits to retry B:
    B's retry is still B (the cut stream took the task's mark: a new key, acted twice)."""
    import asyncio

    b_keys: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/stream":

            async def chunks() -> AsyncIterator[bytes]:
                yield b"data: part 1\n\n"
                await asyncio.sleep(0.05)
                raise httpx.ReadError("the connection was cut")

            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=chunks())  # fmt: skip
        b_keys.append(request.headers["Idempotency-Key"])
        if len(b_keys) == 1:
            raise httpx.ReadError("the answer was lost after the server acted")
        return httpx.Response(201)

    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(handler),
        retry=idemclient.RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        with idemclient.operation("job"):
            stream = await client.send(
                client.build_request("POST", "https://api.example/stream", json={}), stream=True
            )

            async def consume() -> None:
                with pytest.raises(httpx.ReadError):
                    async for _ in stream.aiter_bytes():
                        pass
                await stream.aclose()

            consumer = asyncio.create_task(consume())
            with pytest.raises(idemclient.RetriesExhaustedError):
                await client.post("https://api.example/b", json={"b": 1})
            await consumer  # cut while B waits to be retried
            again = await client.post("https://api.example/b", json={"b": 1})
            assert again.extensions["idempotency"]["operation"] == "job#2"
    assert len(b_keys) == 2
    assert len(set(b_keys)) == 1


def test_a_stream_closed_unread_between_a_failure_and_its_retry(journal_path: Path) -> None:
    """A thread opens a stream; its call B fails after the server acted; it closes the stream
    unread; its resend of B is B again (another stream ending in between does not break
    "right after")."""
    b_keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/stream":
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=iter(CHUNKS))  # fmt: skip
        b_keys.append(request.headers["Idempotency-Key"])
        if len(b_keys) == 1:
            raise httpx.ReadError("the answer was lost after the server acted")
        return httpx.Response(201)

    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(handler),
                           retry=idemclient.RetryPolicy(max_attempts=1)) as client:  # fmt: skip
        stream = client.send(
            client.build_request("POST", "https://api.example/stream", json={}), stream=True
        )
        with pytest.raises(idemclient.RetriesExhaustedError):
            client.post("https://api.example/b", json={"b": 1})
        stream.close()
        assert client.post("https://api.example/b", json={"b": 1}).status_code == 201
    assert len(b_keys) == 2
    assert len(set(b_keys)) == 1

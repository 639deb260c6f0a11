"""Helpers for testing code that uses idemclient: a fake idempotent server and a no-sleep mode.

`IdempotentApp` has the IETF draft's semantics and serves as an `httpx.MockTransport` handler;
`IdempotentServer` is the same behind a real socket on 127.0.0.1 (a free port by default).
Every POST or PATCH with an `Idempotency-Key` header "acts" once (the act is recorded in
`effects`) and stores its answer:

* a key seen for the first time: act, answer 201 with a JSON body, remember the answer;
* the same key again, same request: replay the stored answer with `Idempotent-Replayed: true`;
* the same key with another method, path or body: 422;
* the same key while the first request is still being processed: 409;
* no key at all: 400 (unless `require_key=False`, then it acts every time).

Faults are injected per request with `inject()`: answer N times with a status (and
Retry-After) before acting, act and then drop the connection (the answer is lost), or act and
answer late. `set_testing()` turns backoff off for the whole process. Run the server
standalone with `python -m idemclient.testing --port 8000`.

Example:
    >>> with IdempotentServer() as server:
    ...     server.inject("status", times=2, status=503)
    ...     client = idemclient.Client(base_url=server.url, journal=tmp_path / "j.sqlite3")
    ...     client.post("/charges", json={"amount": 5})
    ...     assert server.effect_count == 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, TypeVar

import anyio
import httpx

from ._config import TestingMode, set_testing_mode
from ._family import family

__all__ = ["Effect", "IdempotentApp", "IdempotentServer", "Reply", "set_testing"]

FaultKind = Literal[
    "status", "reset_before_acting", "drop_after_acting", "slow_after_acting",
    "slow_before_acting",
]  # fmt: skip
#: Faults `set_chaos` draws from: (kind, status, Retry-After).
_CHAOS: tuple[tuple[FaultKind, int, str | None], ...] = (
    ("reset_before_acting", 0, None),
    ("drop_after_acting", 0, None),
    ("slow_before_acting", 0, None),
    ("status", 500, None),
    ("status", 503, None),
    ("status", 429, "0"),
)
_RESET = object()  # the connection is closed before the server acts


@dataclass(frozen=True, slots=True)
class Effect:
    """One act the server performed: what a duplicate charge would show up as."""

    key: str | None
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict, compare=False)

    def json(self) -> Any:
        """The body parsed as JSON (`None` if it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Reply:
    """What the server answers when it acts (see `IdempotentApp.respond`).

    `body` given as a tuple of chunks is sent chunk by chunk (the real server flushes each
    one, with chunked transfer encoding), as an API streams server-sent events; a replay of
    the key sends the joined bytes at once.
    """

    status: int = 201
    body: bytes | tuple[bytes, ...] = b""
    content_type: str = "application/json"

    def json(self) -> Any:
        """The body parsed as JSON (`None` if it is not JSON)."""
        try:
            return json.loads(self.joined)
        except ValueError:
            return None

    @property
    def joined(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else b"".join(self.body)


@dataclass
class _Fault:
    kind: FaultKind
    times: int
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0
    path: str | None = None


@dataclass
class _Entry:
    fingerprint: str
    done: bool = False
    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    chunks: tuple[bytes, ...] | None = None  # sent one by one, `body` unused
    effect: Effect | None = None  # the act this answers (for `pace`)

    @staticmethod
    def of(reply: Reply, headers: dict[str, str], effect: Effect | None = None) -> _Answer:
        headers = {"Content-Type": reply.content_type, **headers}
        if isinstance(reply.body, bytes):
            return _Answer(reply.status, reply.body, headers)
        return _Answer(reply.status, b"", headers, chunks=reply.body, effect=effect)


@dataclass(frozen=True, slots=True)
class _Work:
    """An act to perform: wait `before`, act, then answer after `after` (or drop)."""

    key: str | None
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    before: float
    after: float
    drop: bool


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Answer:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return _Answer(status, json.dumps(payload).encode(), headers)


def _parse_key(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _lost(request: httpx.Request, message: str) -> httpx.ReadError:
    """A lost connection, as the request's family (httpx or httpx2) reports it."""
    error: httpx.ReadError = family(request).ReadError(message, request=request)
    return error


class IdempotentApp:
    """The server's semantics without a socket: use it as an `httpx.MockTransport` handler.

    `handler` serves sync and async clients (its waits block); `async_handler` waits with
    `anyio.sleep`, so concurrent requests overlap (as a 409 test needs). A dropped answer is
    raised as `httpx.ReadError` after the act, as a lost connection would be.

    Example:
        >>> app = IdempotentApp()
        >>> app.inject("status", times=2, status=503)
        >>> transport = idemclient.IdempotentTransport(httpx.MockTransport(app.handler))
    """

    def __init__(
        self,
        *,
        require_key: bool = True,
        key_header: str = "Idempotency-Key",
        act_seconds: float = 0.0,
    ) -> None:
        self.require_key = require_key
        self.key_header = key_header
        self.act_seconds = act_seconds
        self._lock = threading.Lock()
        self._keys: dict[str, _Entry] = {}
        self._effects: list[Effect] = []
        self._requests: Counter[str] = Counter()
        self._faults: list[_Fault] = []
        self._chaos: tuple[float, random.Random, float] | None = None
        #: How many of each fault were applied, by name (`status-503`, `drop_after_acting`...).
        self.faults_applied: Counter[str] = Counter()

    # -- what tests look at ---------------------------------------------------------------

    @property
    def effects(self) -> list[Effect]:
        """Every act performed, in order."""
        with self._lock:
            return list(self._effects)

    @property
    def effect_count(self) -> int:
        with self._lock:
            return len(self._effects)

    @property
    def request_count(self) -> int:
        """How many POST/PATCH requests arrived, keyed or not, answered or not."""
        with self._lock:
            return sum(self._requests.values())

    def requests_for(self, key: str) -> int:
        """How many requests arrived with this key (replays and refusals included)."""
        with self._lock:
            return self._requests[key]

    def duplicates(self) -> int:
        """Acts beyond the first for the same method, path and body: 0 is the goal."""
        counts = Counter((e.method, e.path, e.body) for e in self.effects)
        return sum(n - 1 for n in counts.values())

    def inject(
        self,
        kind: FaultKind,
        *,
        times: int = 1,
        status: int = 503,
        retry_after: str | None = None,
        seconds: float = 0.0,
        path: str | None = None,
    ) -> None:
        """Apply a fault to the next `times` POST/PATCH requests (to `path`, if given).

        Kinds: `status` answers `status` (with `retry_after`) without acting;
        `drop_after_acting` acts, then closes the connection with no answer;
        `slow_after_acting` acts, then waits `seconds` before answering;
        `slow_before_acting` waits `seconds` (the key is in flight: 409 to others), then acts;
        `reset_before_acting` closes the connection without acting.
        """
        with self._lock:
            self._faults.append(_Fault(kind, times, status, retry_after, seconds, path))

    def set_chaos(
        self, probability: float, *, seed: int | None = None, seconds: float = 0.2
    ) -> None:
        """Give each POST/PATCH (with no injected fault pending) a random fault.

        With `probability`, one of: reset before acting, drop the answer after acting, act
        only after `seconds` (a client with a shorter timeout retries into a 409), 500, 503,
        or 429 with `Retry-After: 0`. `faults_applied` counts what was drawn. 0 turns it off.
        """
        with self._lock:
            self._chaos = (probability, random.Random(seed), seconds) if probability else None

    # -- the semantics, in two steps around the waits -------------------------------------

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            fault = None
            for queued in self._faults:
                if queued.times > 0 and queued.path in (None, path):
                    queued.times -= 1
                    fault = queued
                    break
            if fault is None and self._chaos is not None:
                probability, rng, seconds = self._chaos
                if rng.random() < probability:
                    kind, status, retry_after = rng.choice(_CHAOS)
                    fault = _Fault(kind, 1, status, retry_after, seconds)
            if fault is not None:
                name = f"status-{fault.status}" if fault.kind == "status" else fault.kind
                self.faults_applied[name] += 1
            return fault

    def _admit(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> _Answer | _Work | object:
        """Answer at once (GET, fault, refusal, replay), `_RESET`, or say what to act on."""
        if method not in ("POST", "PATCH"):
            if path == "/_idem/effects":
                effects = [
                    {"key": e.key, "method": e.method, "path": e.path, "body": e.json()}
                    for e in self.effects
                ]
                return _json(200, {"count": len(effects), "effects": effects})
            return _json(200, {"path": path})
        raw_key = headers.get(self.key_header.lower())
        key = _parse_key(raw_key) if raw_key is not None else None
        with self._lock:
            self._requests[key or ""] += 1
        fault = self._take_fault(path)
        if fault is not None and fault.kind == "reset_before_acting":
            return _RESET
        if fault is not None and fault.kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return _json(fault.status, {"error": "injected fault"}, extra)
        if key is None and self.require_key:
            return _json(400, {"error": f"missing {self.key_header} header"})
        if key is not None:
            fingerprint = hashlib.sha256(f"{method} {path}\n".encode() + body).hexdigest()
            with self._lock:
                entry = self._keys.get(key)
                if entry is None:
                    self._keys[key] = _Entry(fingerprint)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    return _json(422, {"error": "Idempotency-Key reused with another request"})
                if not entry.done:
                    return _json(409, {"error": "a request with this key is in progress"})
                return _Answer.of(
                    dataclasses.replace(entry.reply, body=entry.reply.joined),
                    {"Idempotent-Replayed": "true"},
                )
        kind = fault.kind if fault is not None else None
        seconds = fault.seconds if fault is not None else 0.0
        return _Work(
            key=key,
            method=method,
            path=path,
            body=body,
            headers=headers,
            before=self.act_seconds + (seconds if kind == "slow_before_acting" else 0.0),
            after=seconds if kind == "slow_after_acting" else 0.0,
            drop=kind == "drop_after_acting",
        )

    def _abandon(self, work: _Work) -> None:
        """Free the key of a request that ended before acting (cancelled, timed out): nothing
        happened, so the next request with it acts, as a real server frees the key of a
        handler that died. Until then the key stays in flight (409 to others), so the entry
        that is not done yet is this request's own."""
        if work.key is None:
            return
        with self._lock:
            entry = self._keys.get(work.key)
            if entry is not None and not entry.done:
                del self._keys[work.key]

    def respond(self, effect: Effect, number: int) -> Reply:
        """The answer to the `number`-th act (from 1): override it to answer as your API does.

        The default is 201 with `{"id": "res_<number>", "path": ..., "request": <the JSON
        body>}`. Whatever it returns is remembered under the key and replayed to a retry.

        Example:
            >>> class Payments(IdempotentServer):
            ...     def respond(self, effect, number):
            ...         return Reply(200, json.dumps({"id": f"pi_{number}"}).encode())
        """
        payload = {"id": f"res_{number}", "path": effect.path, "request": effect.json()}
        return Reply(201, json.dumps(payload).encode())

    def pace(self, effect: Effect, index: int) -> None:
        """Called before each chunk after the first of a chunked `Reply` (`index` from 1):
        override it to space a stream out (a test can wait here until its client has seen
        the chunks before). The default does not wait."""

    def _perform(self, work: _Work) -> _Answer:
        """Act once: record the effect and remember the answer under the key."""
        with self._lock:
            effect = Effect(work.key, work.method, work.path, work.body, work.headers)
            self._effects.append(effect)
            number = len(self._effects)
        reply = self.respond(effect, number)
        if work.key is not None:
            with self._lock:
                entry = self._keys[work.key]
                entry.done, entry.reply = True, reply
        return _Answer.of(reply, {}, effect)

    def _chunks(self, answer: _Answer) -> Iterator[bytes]:
        assert answer.chunks is not None
        assert answer.effect is not None
        for index, chunk in enumerate(answer.chunks):
            if index:
                self.pace(answer.effect, index)
            yield chunk

    async def _achunks(self, answer: _Answer) -> AsyncIterator[bytes]:
        for chunk in self._chunks(answer):
            yield chunk

    # -- as an httpx.MockTransport handler ------------------------------------------------

    @staticmethod
    def _request_parts(request: httpx.Request) -> tuple[str, str, dict[str, str]]:
        path = request.url.raw_path.decode("ascii")
        headers = {k.lower(): v for k, v in request.headers.items()}
        return request.method, path, headers

    def _response(
        self, answer: _Answer, request: httpx.Request, *, asynchronous: bool = False
    ) -> httpx.Response:
        """The answer in the request's family (httpx, or httpx2 under an httpx2 client)."""
        content: Any = answer.body
        if answer.chunks is not None:
            content = self._achunks(answer) if asynchronous else self._chunks(answer)
        response: httpx.Response = family(request).Response(
            answer.status, headers=answer.headers, content=content
        )
        return response

    def handler(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (for `httpx.MockTransport`); waits block the caller."""
        method, path, headers = self._request_parts(request)
        admitted = self._admit(method, path, headers, request.read())
        if isinstance(admitted, _Answer):
            return self._response(admitted, request)
        if not isinstance(admitted, _Work):
            raise family(request).ReadError(
                "connection reset before the server acted", request=request
            )
        time.sleep(admitted.before)
        answer = self._perform(admitted)
        if admitted.drop:
            raise family(request).ReadError(
                "connection closed after the server acted", request=request
            )
        time.sleep(admitted.after)
        return self._response(answer, request)

    async def async_handler(self, request: httpx.Request) -> httpx.Response:
        """`handler` for async clients, waiting with `anyio.sleep`.

        A request cancelled while it waits (its task cancelled, a timeout) is a handler that
        died. Before acting, nothing happened and its key is free again: a retry acts. After
        acting, the effect and the answer are recorded: a retry replays them.
        """
        method, path, headers = self._request_parts(request)
        admitted = self._admit(method, path, headers, await request.aread())
        if isinstance(admitted, _Answer):
            return self._response(admitted, request, asynchronous=True)
        if not isinstance(admitted, _Work):
            raise family(request).ReadError(
                "connection reset before the server acted", request=request
            )
        try:
            await anyio.sleep(admitted.before)
        except BaseException:  # cancelled before acting
            self._abandon(admitted)
            raise
        answer = self._perform(admitted)
        if admitted.drop:
            raise family(request).ReadError(
                "connection closed after the server acted", request=request
            )
        await anyio.sleep(admitted.after)
        return self._response(answer, request, asynchronous=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and the demo print their own summaries

    def _send(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.chunks is None:
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in self.server.app._chunks(answer):
            if chunk:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        app = self.server.app
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # the client went away mid-body: a real server acts on nothing
            self._hang_up()
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        admitted = app._admit(self.command, self.path, headers, body)
        if isinstance(admitted, _Answer):
            self._send(admitted)
            return
        if not isinstance(admitted, _Work):  # reset before acting
            self._hang_up()
            return
        time.sleep(admitted.before)
        answer = app._perform(admitted)
        if admitted.drop:  # the answer is lost: close the connection without a word
            self._hang_up()
            return
        time.sleep(admitted.after)
        self._send(answer)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: IdempotentApp) -> None:
        super().__init__(address, _Handler)
        self.app = app

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, crash) closes its end: that is what tests do.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


_Server_T = TypeVar("_Server_T", bound="IdempotentServer")


class IdempotentServer(IdempotentApp):
    """A real HTTP server on the loopback interface with IETF idempotency semantics.

    Args:
        host: the address to bind: only loopback addresses make sense for tests.
        port: `0` picks a free port; `url` tells which.
        require_key: answer 400 to a POST or PATCH without a key.
        key_header: the header carrying the key (quoted Structured Field strings are accepted).
        act_seconds: how long each act takes; a second request with the same key meanwhile
            gets 409.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        require_key: bool = True,
        key_header: str = "Idempotency-Key",
        act_seconds: float = 0.0,
    ) -> None:
        super().__init__(require_key=require_key, key_header=key_header, act_seconds=act_seconds)
        self._server = _Server((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self: _Server_T) -> _Server_T:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="idemclient-test-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self: _Server_T) -> _Server_T:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class set_testing:
    """Turn off backoff for the whole process, so that test suites run fast.

    While on, idemclient never sleeps between attempts (Retry-After included), and, with
    `max_attempts`, makes at most that many attempts per operation. Everything else (keys,
    journal, classification, the retry budget) works as in production: a transport's own
    `RetryBudget` lets 100 retries through whatever the traffic, and a test that fails
    every request on purpose sees retries cut as production would (`retry_budget=None` on
    the client turns that off). Call it, or use it as a context manager
    that restores the previous mode on exit.

    Example:
        >>> from idemclient.testing import set_testing
        >>> set_testing(True, max_attempts=2)          # e.g. in conftest.py
        >>> with set_testing(True):                    # or for one block
        ...     client.post("/charges", json={})
    """

    def __init__(self, testing: bool = True, *, max_attempts: int | None = None) -> None:
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._previous = set_testing_mode(TestingMode(testing, max_attempts))

    def __enter__(self) -> set_testing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        set_testing_mode(self._previous)


def main(argv: list[str] | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m idemclient.testing", description="A local idempotent HTTP server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--act-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    server = IdempotentServer(args.host, args.port, act_seconds=args.act_seconds)
    print(f"idempotent server on {server.url} (effects at {server.url}/_idem/effects)")
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()

"""A small idempotent HTTP server for tests and demos, with the IETF draft's semantics.

`IdempotentServer` listens on 127.0.0.1 (a free port by default). Every POST or PATCH with an
`Idempotency-Key` header "acts" once (the act is recorded in `effects`) and stores its answer:

* a key seen for the first time: act, answer 201 with a JSON body, remember the answer;
* the same key again, same request: replay the stored answer with `Idempotent-Replayed: true`;
* the same key with another method, path or body: 422;
* the same key while the first request is still being processed: 409;
* no key at all: 400 (unless `require_key=False`, then it acts every time).

Faults are injected per request with `inject()`: answer N times with a status (and
Retry-After) before acting, act and then drop the connection (the answer is lost), or act and
answer late. Run it standalone with `python -m idemclient.testing --port 8000`.

Example:
    >>> with IdempotentServer() as server:
    ...     server.inject("status", times=2, status=503)
    ...     client = idemclient.Client(base_url=server.url, journal=tmp_path / "j.sqlite3")
    ...     client.post("/charges", json={"amount": 5})
    ...     assert server.effect_count == 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

__all__ = ["Effect", "IdempotentServer"]

FaultKind = Literal["status", "drop_after_acting", "slow_after_acting", "slow_before_acting"]


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
    status: int = 0
    body: bytes = b""


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: dict[str, _Entry] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    faults: list[_Fault] = field(default_factory=list)


def _parse_key(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and the demo print their own summaries

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        state = self.server.state
        if self.path == "/_idem/effects":
            with state.lock:
                effects = [
                    {"key": e.key, "method": e.method, "path": e.path, "body": e.json()}
                    for e in state.effects
                ]
            self._json(200, {"count": len(effects), "effects": effects})
            return
        self._json(200, {"path": self.path})

    def do_POST(self) -> None:
        self._act()

    def do_PATCH(self) -> None:
        self._act()

    def do_PUT(self) -> None:
        self._body()
        self._json(200, {"path": self.path})

    def _take_fault(self) -> _Fault | None:
        state = self.server.state
        with state.lock:
            for fault in state.faults:
                if fault.times > 0 and fault.path in (None, self.path):
                    fault.times -= 1
                    return fault
        return None

    def _act(self) -> None:
        server, state = self.server, self.server.state
        body = self._body()
        raw_key = self.headers.get(server.key_header)
        key = _parse_key(raw_key) if raw_key is not None else None
        with state.lock:
            state.requests[key or ""] += 1
        fault = self._take_fault()
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            self._json(fault.status, {"error": "injected fault"}, headers)
            return
        if key is None:
            if server.require_key:
                self._json(400, {"error": f"missing {server.key_header} header"})
                return
            self._perform(None, body, fault)
            return
        fingerprint = hashlib.sha256(f"{self.command} {self.path}\n".encode() + body).hexdigest()
        with state.lock:
            entry = state.keys.get(key)
            if entry is None:
                state.keys[key] = _Entry(fingerprint)
            elif entry.fingerprint != fingerprint:
                conflict = True
            else:
                conflict = False
        if entry is not None:
            if conflict:
                self._json(422, {"error": "Idempotency-Key reused with another request"})
            elif not entry.done:
                self._json(409, {"error": "a request with this key is in progress"})
            else:
                self._send(entry.status, entry.body, {"Idempotent-Replayed": "true"})
            return
        self._perform(key, body, fault)

    def _perform(self, key: str | None, body: bytes, fault: _Fault | None) -> None:
        server, state = self.server, self.server.state
        if fault is not None and fault.kind == "slow_before_acting":
            time.sleep(fault.seconds)
        if server.act_seconds:
            time.sleep(server.act_seconds)
        with state.lock:
            headers = {k.lower(): v for k, v in self.headers.items()}
            effect = Effect(key, self.command, self.path, body, headers)
            state.effects.append(effect)
            number = len(state.effects)
            payload = json.dumps(
                {"id": f"res_{number}", "path": self.path, "request": effect.json()}
            )
            if key is not None:
                entry = state.keys[key]
                entry.done, entry.status, entry.body = True, 201, payload.encode()
        if fault is not None and fault.kind == "drop_after_acting":
            self._drop()
            return
        if fault is not None and fault.kind == "slow_after_acting":
            time.sleep(fault.seconds)
        self._send(201, payload.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        require_key: bool,
        key_header: str,
        act_seconds: float,
    ) -> None:
        super().__init__(address, _Handler)
        self.state = _State()
        self.require_key = require_key
        self.key_header = key_header
        self.act_seconds = act_seconds


class IdempotentServer:
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
        self._server = _Server(
            (host, port), require_key=require_key, key_header=key_header, act_seconds=act_seconds
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def effects(self) -> list[Effect]:
        """Every act performed, in order."""
        with self._server.state.lock:
            return list(self._server.state.effects)

    @property
    def effect_count(self) -> int:
        with self._server.state.lock:
            return len(self._server.state.effects)

    def requests_for(self, key: str) -> int:
        """How many requests arrived with this key (replays and refusals included)."""
        with self._server.state.lock:
            return self._server.state.requests[key]

    def duplicates(self) -> int:
        """Acts beyond the first for the same request body: 0 is the goal."""
        counts = Counter(e.body for e in self.effects)
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
        `slow_before_acting` waits `seconds` (the key is in flight: 409 to others), then acts.
        """
        with self._server.state.lock:
            self._server.state.faults.append(
                _Fault(kind, times, status, retry_after, seconds, path)
            )

    def start(self) -> IdempotentServer:
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

    def __enter__(self) -> IdempotentServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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

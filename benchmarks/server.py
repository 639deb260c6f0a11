"""A small, fast HTTP/1.1 server for benchmarks: keep-alive, answers every request 201.

It runs in its own process (so it never competes with the client for the GIL) on 127.0.0.1
and is not the bottleneck: it answers tens of thousands of requests per second, more than one
Python client can send. It replays a stored answer for a key it has seen (with
`Idempotent-Replayed: true`), so retries behave as against a real idempotent API.

Run: python benchmarks/server.py [PORT] [DELAY_MS]   (prints the port it listens on)

With DELAY_MS, each answer is written that many milliseconds after its request arrived, as a
remote API's network and processing time would delay it (requests wait concurrently).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

BODY = b'{"id":"ch_1","status":"succeeded"}'
RESPONSE = (
    b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
REPLAY = RESPONSE.replace(b"\r\n\r\n", b"\r\nidempotent-replayed: true\r\n\r\n", 1)


SEEN: set[bytes] = set()  # keys answered once: their next request is a replay
DELAY = 0.0  # seconds before each answer


class Protocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
                elif name == b"idempotency-key":
                    key = value.strip()
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            if key and key in SEEN:
                answer = REPLAY
            else:
                if key:
                    SEEN.add(key)
                answer = RESPONSE
            if DELAY:
                asyncio.get_running_loop().call_later(DELAY, self.answer, answer)
            else:
                self.transport.write(answer)

    def answer(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Protocol, "127.0.0.1", port, backlog=1024)
    sockets = server.sockets
    print(sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) > 2:
        DELAY = float(sys.argv[2]) / 1000
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))

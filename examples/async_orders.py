"""Async: many named operations at once with idemclient.AsyncClient.

The journal is written from a worker thread, so its fsync never blocks the event loop.
Run: .venv/bin/python examples/async_orders.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import idemclient
from idemclient.testing import IdempotentServer


async def place(client: idemclient.AsyncClient, order: int) -> int:
    async with idemclient.operation(f"order-{order}"):
        response = await client.post("/orders", json={"order": order})
    return response.status_code


async def main() -> None:
    with IdempotentServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.inject("status", times=3, status=503)
        journal = Path(tmp) / "orders.sqlite3"
        retry = idemclient.RetryPolicy(base_delay=0.05)
        for run in (1, 2):  # the second run is answered from the journal
            async with idemclient.AsyncClient(
                base_url=server.url, journal=journal, retry=retry
            ) as client:
                statuses = await asyncio.gather(*(place(client, n) for n in range(10)))
            print(f"run {run}: {statuses.count(201)} of {len(statuses)} orders answered 201")
        print(f"server effects: {server.effect_count}")


if __name__ == "__main__":
    asyncio.run(main())

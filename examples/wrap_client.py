"""Wrap an httpx.Client you already have: base URL, headers and auth keep working.

Run: .venv/bin/python examples/wrap_client.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

import idemclient
from idemclient.testing import IdempotentServer


def main() -> None:
    with IdempotentServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.inject("drop_after_acting")  # the first answer is lost after the server acted
        client = httpx.Client(
            base_url=server.url,
            headers={"Authorization": "Bearer sk_test_123", "X-Tenant": "acme"},
            timeout=10.0,
        )
        client = idemclient.wrap(client, journal=Path(tmp) / "orders.sqlite3")
        with client:
            response = client.post("/orders", json={"sku": "book", "qty": 1})
            info = response.extensions["idempotency"]
            print(f"HTTP {response.status_code}, attempts {info['attempts']}, "
                  f"replayed by the server: {info['replayed']}")  # fmt: skip
            print(f"GET is retried but never journaled: {client.get('/orders').status_code}")
        print(
            f"server effects: {server.effect_count} (the lost answer did not cause a second order)"
        )


if __name__ == "__main__":
    main()

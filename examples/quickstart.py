"""Quickstart: one POST, made safe to retry, against a local idempotent server.

Run: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import idemclient
from idemclient.testing import IdempotentServer


def main() -> None:
    with IdempotentServer() as server, tempfile.TemporaryDirectory() as tmp:
        # The server fails twice before it acts: idemclient retries with the same key.
        server.inject("status", times=2, status=503)
        journal = Path(tmp) / "quickstart.sqlite3"
        with idemclient.Client(base_url=server.url, journal=journal) as client:
            response = client.post("/orders", json={"cart": "c1"})
            info = response.extensions["idempotency"]
            print(f"HTTP {response.status_code} {response.json()}")
            print(f"key {info['key']} after {info['attempts']} attempts")
        print(f"server effects: {server.effect_count} (the order was placed once)")


if __name__ == "__main__":
    main()

"""An httpx2 client (the httpx continuation openai and anthropic build on), made safe to
retry: the same `wrap()`, answers and errors in httpx2's own classes.

Run: .venv/bin/python examples/httpx2_client.py [BASE_URL]
Without a URL it starts a local idempotent server that loses the first answer, and keeps
its journal in a temporary directory.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import httpx2

import idemclient
from idemclient.testing import IdempotentServer


def main() -> None:
    with contextlib.ExitStack() as stack:
        journal = None  # $IDEMCLIENT_JOURNAL, else the user state directory
        if len(sys.argv) > 1:
            base_url = sys.argv[1]
        else:
            server = stack.enter_context(IdempotentServer())
            server.inject("drop_after_acting")  # the server acts, the answer is lost
            base_url = server.url
            journal = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "j.sqlite3"
        client = idemclient.wrap(httpx2.Client(base_url=base_url, timeout=10.0), journal=journal)
        with client, idemclient.operation("order-basket-7"):
            response = client.post("/orders", json={"basket": 7})
        info = response.extensions["idempotency"]
        kind = f"{type(response).__module__}.{type(response).__name__}"
        print(f"{kind} {response.status_code}, attempts {info['attempts']}, "
              f"replayed by the server: {info['replayed']}")  # fmt: skip


if __name__ == "__main__":
    main()

"""A batch of named operations that kills itself with SIGKILL at a chosen moment.

Run by tests/test_crash_windows.py (never collected by pytest):

    python tests/crash_child.py URL JOURNAL COUNT KILL_AT_EVENT KILL_AT_INDEX sync|async

Operation `op-<i>` is a POST to `/ops/<i>`. When the operation numbered KILL_AT_INDEX reaches
the event KILL_AT_EVENT (see `idemclient.Event`), the process sends itself SIGKILL: no
cleanup, no flush, exactly like a crash. `none` never kills. Prints `done` at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import idemclient


def main(argv: list[str]) -> int:
    url, journal, count_text, kill_kind, kill_index_text, mode = argv
    count, kill_index = int(count_text), int(kill_index_text)
    target = f"op-{kill_index}"

    def hook(event: idemclient.Event) -> None:
        if event.kind == kill_kind and event.operation == target:
            os.kill(os.getpid(), signal.SIGKILL)

    retry = idemclient.RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=10)
    if mode == "sync":
        with idemclient.Client(
            base_url=url, journal=journal, retry=retry, hooks=[hook], timeout=10.0
        ) as client:
            for i in range(count):
                with idemclient.operation(f"op-{i}"):
                    client.post(f"/ops/{i}", json={"op": i})
    else:

        async def run() -> None:
            async with idemclient.AsyncClient(
                base_url=url, journal=journal, retry=retry, hooks=[hook], timeout=10.0
            ) as client:
                for i in range(count):
                    async with idemclient.operation(f"op-{i}"):
                        await client.post(f"/ops/{i}", json={"op": i})

        asyncio.run(run())
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Thousands of operations through lost answers, resets, 5xx, 409 in flight and 429s.

A real loopback server injects a random fault into a share of the requests; several threads
send named operations through one `idemclient.Client`. Operations whose attempts run out
stay pending and are finished by `resume_pending` once the storm is over. The figures printed
at the end must show 0 duplicates and 0 lost operations.

Run: .venv/bin/python -m tests.stress.chaos [--operations N] [--workers N] [--probability P]
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import idemclient
from idemclient.testing import IdempotentServer


@dataclass
class Figures:
    operations: int
    workers: int
    attempts: int = 0
    retries: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    gave_up_then_resumed: int = 0
    resume_passes: int = 0
    completed: int = 0
    duplicates: int = 0
    lost: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("operations", self.operations),
            ("worker threads", self.workers),
            ("attempts sent", self.attempts),
            ("retries (same key)", self.retries),
            *((f"fault: {name}", n) for name, n in sorted(self.faults.items())),
            ("gave up, then finished by resume", self.gave_up_then_resumed),
            ("resume passes", self.resume_passes),
            ("completed", self.completed),
            ("duplicates (server acted twice)", self.duplicates),
            ("lost (never completed)", self.lost),
            ("seconds", round(self.seconds, 1)),
        ]
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value:>8}" for label, value in rows)


def run(
    operations: int = 2000, workers: int = 8, probability: float = 0.3, seed: int = 1
) -> Figures:
    figures = Figures(operations, workers)
    lock = threading.Lock()
    started = time.monotonic()

    def count(event: idemclient.Event) -> None:
        if event.kind in ("sending", "retrying"):
            with lock:
                figures.attempts += event.kind == "sending"
                figures.retries += event.kind == "retrying"

    with tempfile.TemporaryDirectory() as tmp, IdempotentServer() as server:
        server.set_chaos(probability, seed=seed, seconds=0.15)
        journal = idemclient.Journal(Path(tmp) / "chaos.sqlite3", busy_timeout=60.0)
        retry = idemclient.RetryPolicy(base_delay=0.005, max_delay=0.02, max_attempts=6)
        timeout = httpx.Timeout(10.0, read=0.1)  # shorter than a slow act: retries meet 409
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(operations):
            todo.put(i)
        with idemclient.Client(
            base_url=server.url, journal=journal, retry=retry, timeout=timeout, hooks=[count]
        ) as client:

            def worker() -> None:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        with idemclient.operation(f"chaos-{i}"):
                            client.post(f"/ops/{i}", json={"op": i})
                    except idemclient.RetriesExhaustedError:
                        with lock:
                            figures.gave_up_then_resumed += 1
                    except Exception as exc:  # anything else is a bug worth reporting
                        with lock:
                            figures.errors.append(f"chaos-{i}: {type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=worker) for _ in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
            server.set_chaos(0)
            for _ in range(5):  # the storm is over: finish what gave up
                if not journal.pending():
                    break
                figures.resume_passes += 1
                client.resume_pending()
        per_path = Counter(e.path for e in server.effects)
        ops = {op.name: op for op in journal.operations()}
        journal.close()
        figures.faults = Counter(server.faults_applied)
    figures.duplicates = sum(n - 1 for n in per_path.values())
    figures.completed = sum(op.state == "completed" for op in ops.values())
    figures.lost = sum(
        1
        for i in range(operations)
        if per_path[f"/ops/{i}"] == 0
        or ops.get(f"chaos-{i}") is None
        or ops[f"chaos-{i}"].state != "completed"
    )
    figures.seconds = time.monotonic() - started
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--probability", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    figures = run(args.operations, args.workers, args.probability, args.seed)
    print(figures.table())
    for error in figures.errors[:20]:
        print("error:", error)
    ok = figures.duplicates == 0 and figures.lost == 0 and not figures.errors
    print("0 duplicates, 0 lost" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

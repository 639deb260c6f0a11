"""One of several processes working through the same operations on one shared journal.

Run by tests/test_concurrency.py:  python tests/contention_child.py URL JOURNAL COUNT SEED

JOURNAL is an SQLite path or a PostgreSQL URL (then each process may play a host of its own,
set by the test in `IDEMCLIENT_HOST`).

Two threads each go through operations op-0 .. op-<COUNT-1> in a shuffled order. An operation
another holder has in flight (OperationInProgressError) is put back and tried again later,
a bounded number of times. Any other error ends the process with a message: a "database is
locked" reaching the caller would be a bug. Prints `ok <completed> <replayed>` at the end.
"""

from __future__ import annotations

import random
import sys
import threading
import time

import idemclient
from idemclient.journal import JournalBackend


def main(argv: list[str]) -> int:
    url, journal_path, count_text, seed_text = argv
    count, seed = int(count_text), int(seed_text)
    journal: JournalBackend
    if journal_path.startswith(("postgresql://", "postgres://")):
        journal = idemclient.PostgresJournal(journal_path)
    else:
        journal = idemclient.Journal(journal_path, busy_timeout=30.0)
    retry = idemclient.RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=20)
    client = idemclient.Client(base_url=url, journal=journal, retry=retry, timeout=10.0)
    errors: list[str] = []
    tally = {"completed": 0, "replayed": 0}
    lock = threading.Lock()

    def worker(worker_seed: int) -> None:
        todo = list(range(count))
        random.Random(worker_seed).shuffle(todo)
        tries = 0
        while todo and tries < count * 50:
            tries += 1
            i = todo.pop(0)
            try:
                with idemclient.operation(f"op-{i}"):
                    response = client.post(f"/ops/{i}", json={"op": i})
            except idemclient.OperationInProgressError:
                todo.append(i)
                time.sleep(0.005)
                continue
            except Exception as exc:
                with lock:
                    errors.append(f"op-{i}: {type(exc).__name__}: {exc}")
                return
            with lock:
                replayed = response.extensions["idempotency"]["replayed"]
                tally["replayed" if replayed else "completed"] += 1
        if todo:
            with lock:
                errors.append(f"gave up with {len(todo)} operations left")

    threads = [threading.Thread(target=worker, args=(seed * 10 + n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    client.close()
    journal.close()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    print(f"ok {tally['completed']} {tally['replayed']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Kill a batch at random moments, many times, and check every operation happened once.

Each repetition starts a loopback server and a fresh journal, runs a batch of named
operations in a child process, and kills it with SIGKILL: either at a random window of a
random operation (from an event hook), or after a random delay. Then the batch is finished
by a rerun, or by `resume_pending` and a rerun, and checked: each operation acted on exactly
once by the server, completed in the journal, under the key the server saw.

Run: .venv/bin/python -m tests.stress.random_kills [--repetitions 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import idemclient
from idemclient.testing import IdempotentServer
from tests.crashkit import WINDOWS, check_exactly_once, child_command, run_child

COUNT = 6


def one_run(window: str, rng: random.Random, tmp: Path) -> str:
    """One kill and recovery; returns how the kill landed."""
    victim = rng.randrange(COUNT)
    mode = rng.choice(["sync", "async"])
    finish = rng.choice(["rerun", "resume"])
    journal = tmp / f"{window}-{time.monotonic_ns()}.sqlite3"
    with IdempotentServer() as server:
        if window == "retrying":
            server.inject("status", status=503, path=f"/ops/{victim}")
        if window == "time":
            child = subprocess.Popen(
                child_command(server, journal, COUNT, "none", victim, mode),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.8))
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            landed = "killed" if child.wait(timeout=60) == -signal.SIGKILL else "finished first"
        else:
            code = run_child(server, journal, COUNT, window, victim, mode).returncode
            assert code == -signal.SIGKILL, code
            landed = "killed"
        if finish == "resume" and journal.exists():
            with idemclient.Client(base_url=server.url, journal=journal, timeout=10.0) as client:
                for result in client.resume_pending():
                    assert result.outcome == "completed", result
        run_child(server, journal, COUNT, "none", victim, mode)
        check_exactly_once(server, journal, COUNT)
    return f"{window}: {landed}"


def run(repetitions: int = 20, seed: int = 1) -> Counter[str]:
    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for window in [*WINDOWS, "time"]:
            for _ in range(repetitions):
                tally[one_run(window, rng, Path(tmp))] += 1
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=20, help="per window")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    tally = run(args.repetitions, args.seed)
    for outcome, n in sorted(tally.items()):
        print(f"{outcome:<28} {n:>5}")
    print(f"{sum(tally.values())} runs in {time.monotonic() - started:.0f}s: every operation "
          "performed exactly once, none lost")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The crash-and-resume demo (`make demo`).

1. Starts a local idempotent server (IETF semantics) on 127.0.0.1.
2. Runs a batch of named charges in a child process and kills it with SIGKILL halfway, while
   the server has acted on a charge but its answer has not arrived yet.
3. Runs the same batch again, and prints what happened: every invoice charged exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import idemclient
from idemclient.testing import IdempotentServer

COUNT = 20
KILL_AT = 10
BATCH = Path(__file__).with_name("charge_batch.py")


def run_batch(url: str, journal: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(BATCH), url, str(journal), str(COUNT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, IdempotentServer(act_seconds=0.02) as server:
        journal = Path(tmp) / "billing.sqlite3"
        victim = f"inv-{KILL_AT:03d}"
        # The server acts on this charge, then holds its answer back: the crash comes then.
        server.inject("slow_after_acting", seconds=5.0, path=f"/invoices/{victim}/charges")

        print(f"server on {server.url}, journal {journal}")
        print(f"run 1: charging {COUNT} invoices, SIGKILL while {victim} awaits its answer")
        first = run_batch(server.url, journal)
        deadline = time.monotonic() + 60
        while server.effect_count < KILL_AT and time.monotonic() < deadline:
            if first.poll() is not None:
                break
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        out, _ = first.communicate()
        print(
            f"  killed pid {first.pid} (exit {first.returncode}) after {len(out.splitlines())} "
            f"answers; the server had acted {server.effect_count} times"
        )
        with idemclient.Journal(journal) as j:
            states = Counter(op.state for op in j.operations())
            pending = [op for op in j.operations("pending")]
        print(
            f"  journal: {dict(states)}; pending: "
            + ", ".join(f"{op.name} (attempts {op.attempts})" for op in pending)
        )

        print("run 2: the same batch again")
        second = run_batch(server.url, journal)
        out, err = second.communicate(timeout=120)
        if second.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        summary = json.loads(out.splitlines()[-1])

        charged = Counter(e.json()["invoice"] for e in server.effects)
        duplicates = sum(n - 1 for n in charged.values())
        rows = [
            ("invoices in the batch", COUNT),
            ("invoices charged by the server", len(charged)),
            ("server effects (charges made)", server.effect_count),
            ("duplicate charges", duplicates),
            ("run 2: answered from the journal", summary["from_journal"]),
            ("run 2: resent, replayed by server", summary["replayed_by_server"]),
            ("run 2: sent for the first time", summary["sent"]),
        ]
        width = max(len(label) for label, _ in rows)
        print()
        print(f"{'':-<{width + 8}}")
        for label, value in rows:
            print(f"{label:<{width}}  {value:>6}")
        print(f"{'':-<{width + 8}}")
        ok = duplicates == 0 and len(charged) == COUNT == server.effect_count
        print("every invoice charged exactly once" if ok else "MISMATCH: see above")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

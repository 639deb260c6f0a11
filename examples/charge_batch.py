"""A cron-style batch of named charges: safe to kill at any point and run again.

Each charge is a named operation (`charge-<invoice>`). A rerun after a crash answers finished
charges from the journal without sending, resends the interrupted one with its original key
(the server replays instead of charging twice), and sends the rest.

Run: .venv/bin/python examples/charge_batch.py URL JOURNAL [COUNT]
Prints one line per charge, then a JSON summary line.
"""

from __future__ import annotations

import json
import sys

import idemclient


def invoices(count: int) -> list[str]:
    return [f"inv-{i:03d}" for i in range(1, count + 1)]


def main(argv: list[str]) -> int:
    url, journal = argv[0], argv[1]
    count = int(argv[2]) if len(argv) > 2 else 20
    summary = {"from_journal": 0, "replayed_by_server": 0, "sent": 0}
    with idemclient.Client(base_url=url, journal=journal, timeout=30.0) as client:
        for invoice in invoices(count):
            before = client.journal.get(f"charge-{invoice}")
            with idemclient.operation(f"charge-{invoice}"):
                response = client.post(
                    f"/invoices/{invoice}/charges", json={"invoice": invoice, "amount": 500}
                )
            info = response.extensions["idempotency"]
            if before is not None and before.state == "completed":
                how = "from_journal"
            elif info["replayed"]:
                how = "replayed_by_server"
            else:
                how = "sent"
            summary[how] += 1
            print(f"{invoice}: HTTP {response.status_code} ({how}, key {info['key']})", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A fleet on one PostgreSQL journal: workers on four hosts (`IDEMCLIENT_HOST`) run one
batch at once, two are killed with SIGKILL mid-batch, a resumer on a fifth host finishes
(taking over the killed hosts' operations once their leases end): every order performed
once, none lost. The same run is `make fleet-demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parent.parent / "examples" / "fleet_demo.py"


def test_four_hosts_two_killed_a_fifth_resumes_every_order_once(pg_dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO), "--dsn", pg_dsn], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "SIGKILL to host-1 and host-2" in out
    assert "orders in the journal: 40, all completed" in out
    assert "orders the server performed: 40" in out
    assert out.rstrip().endswith("duplicates 0")

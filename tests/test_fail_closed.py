"""A journal that cannot be written means the request is not sent; a lost completion write
leaves the operation pending, and a resume gets the server's replay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import idemclient
from idemclient import Journal, JournalError
from idemclient.testing import IdempotentServer

FULL_DISK_CHILD = """
import resource, signal, sys
import idemclient

url, journal = sys.argv[1:3]
client = idemclient.Client(base_url=url, journal=journal)
# From here on the disk is "full": no file may grow past 1000 bytes.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    client.post("/charges", json={"amount": 5})
except idemclient.JournalError as exc:
    print("JournalError", exc.path, flush=True)
    sys.exit(3)
print("sent", flush=True)
"""

READ_ONLY_CHILD = """
import os, sys
import httpx
import idemclient

url, journal = sys.argv[1:3]
inner = httpx.HTTPTransport()  # built while the interpreter's files are still readable
if os.geteuid() == 0:  # root ignores permissions: become nobody first
    os.setgid(65534)
    os.setuid(65534)
try:
    transport = idemclient.IdempotentTransport(inner, journal=journal)
    client = httpx.Client(base_url=url, transport=transport)
    client.post("/charges", json={"amount": 5})
except idemclient.JournalError as exc:
    print("JournalError", exc.path, flush=True)
    sys.exit(3)
print("sent", flush=True)
"""


def run(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(code)
    script.chmod(0o644)
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
    )


def test_full_disk_sends_nothing(server: IdempotentServer, tmp_path: Path) -> None:
    journal = tmp_path / "full" / "journal.sqlite3"
    result = run(tmp_path, FULL_DISK_CHILD, server.url, str(journal))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.split() == ["JournalError", str(journal)]
    assert server.request_count == 0


def test_read_only_directory_sends_nothing(server: IdempotentServer, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    tmp_path.chmod(0o755)  # let an unprivileged child reach the script and the directory
    result = run(tmp_path, READ_ONLY_CHILD, server.url, str(locked / "journal.sqlite3"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("JournalError")
    assert server.request_count == 0


class CompletionFails(Journal):
    """A journal whose completion write fails (the disk filled up while the request flew)."""

    def finish(self, *args: Any, **kwargs: Any) -> None:
        raise JournalError("could not record the response: disk full", path=str(self.path))


def test_failed_completion_write_raises_and_resume_gets_the_replay(
    server: IdempotentServer, journal_path: Path
) -> None:
    broken = CompletionFails(journal_path)
    with (
        idemclient.Client(base_url=server.url, journal=broken) as client,
        pytest.raises(JournalError, match="disk full"),
        idemclient.operation("op"),
    ):
        client.post("/charges", json={"amount": 5})
    assert server.effect_count == 1  # the server did act
    op = broken.get("op")
    assert op is not None
    assert op.state == "pending"  # the answer was not recorded: still resumable
    broken.close()
    with idemclient.Client(base_url=server.url, journal=journal_path) as client:
        # the lease was given back: no need to wait for it to expire
        results = client.resume_pending()
    assert [r.outcome for r in results] == ["completed"]
    assert results[0].response is not None
    assert results[0].response.extensions["idempotency"]["replayed"] is True
    assert server.effect_count == 1


def test_journal_file_and_sidecars_are_private(server: IdempotentServer, tmp_path: Path) -> None:
    journal = tmp_path / "new-dir" / "journal.sqlite3"
    old = os.umask(0o022)
    try:
        with idemclient.Client(base_url=server.url, journal=journal) as client:
            client.post("/charges", json={})
            for path in journal.parent.iterdir():
                assert path.stat().st_mode & 0o077 == 0, path
    finally:
        os.umask(old)
    assert journal.parent.stat().st_mode & 0o777 == 0o700

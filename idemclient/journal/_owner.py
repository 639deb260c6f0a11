"""Lease owners: which process holds an operation, and whether it still runs.

An owner is `host:pid:start-time`. The start time tells a reused pid from the holder; the host
part is the machine's name, or `IDEMCLIENT_HOST` (containers whose host names repeat; tests
that play several hosts on one machine). A holder on another host cannot be looked at: it is
assumed alive, and its operation waits until its lease ends.
"""

from __future__ import annotations

import os
import socket

__all__ = ["DEFAULT_LEASE_MARGIN", "HOST", "current_owner", "owner_alive"]

#: seconds a lease outlasts its request's timeouts (`PostgresJournal(lease_margin=...)`
#: changes it for holders on other hosts)
DEFAULT_LEASE_MARGIN = 30.0


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


#: the host part of lease owners; IDEMCLIENT_HOST overrides it (containers whose host names
#: repeat; tests that play several hosts on one machine)
HOST = os.environ.get("IDEMCLIENT_HOST") or socket.gethostname()


def current_owner() -> str:
    """This process as a lease owner: host, pid and start time (pids are reused)."""
    pid = os.getpid()
    return f"{HOST}:{pid}:{_process_start_time(pid) or '0'}"


def owner_alive(owner: str) -> bool:
    """Whether the owner still runs. A holder on another host is assumed alive."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3:
        return True
    host, pid_text, start = parts
    if host != HOST:
        return True
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    if start == "0":
        return True
    return _process_start_time(pid) == start

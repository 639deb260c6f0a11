"""The rules of a registration and a claim, as one pure function that every backend calls.

No SQL and no I/O here: a backend looks the stored row up, asks these rules, and stores what
they say (`Write`). So SQLite and PostgreSQL journals decide alike.
"""

from __future__ import annotations

from datetime import timedelta

__all__ = ["DEFAULT_PURGE_HORIZON", "DEFAULT_RETENTION"]

#: how long a server keeps a key, unless the journal says otherwise (its own retention)
DEFAULT_RETENTION = timedelta(hours=24)
#: finished operations are kept this long by default before `purge` may delete them
DEFAULT_PURGE_HORIZON = timedelta(days=30)

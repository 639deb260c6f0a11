"""What both backends answer the same way: reading operations back, and the upkeep a person
or the command line asks for. Written once, in SQL that SQLite and PostgreSQL both accept;
a backend gives its table, its parameter mark, and how it reads and writes (its own
connections, transactions and locks)."""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from idemclient._records import (
    FINISHED,
    STATES,
    VERDICTS,
    Decision,
    JournalStats,
    Operation,
    Registration,
    State,
    StoredResponse,
    Verdict,
    VerdictKind,
    utc,
)

from ._decide import DEFAULT_PURGE_HORIZON
from ._leases import Holds, Lease
from ._rows import (
    COLUMNS,
    headers_from_json,
    headers_json,
    operation,
    stored_request,
    stored_response,
)

if TYPE_CHECKING:
    import asyncio

__all__ = ["ReadBack", "checked_auto_purge"]

Row = tuple[Any, ...]
#: a statement to run in the same transaction, made from the operation's row as it was
Also = Callable[[Row], tuple[str, Sequence[Any]]]
logger = logging.getLogger("idemclient")

#: the most keys `by_keys` asks for in one statement
KEYS_PER_READ = 500
#: how often a journal's upkeep thread looks whether the daily purge is due, in seconds
UPKEEP_EVERY = 3600.0
_DAY = 86400.0


def _stamp(seconds: float) -> str:
    """A time as the settings table keeps it: whole seconds, zero-padded, so that the text
    compares as the number does in both engines."""
    return f"{max(0, int(seconds)):012d}"


def checked_auto_purge(auto_purge: timedelta | None) -> timedelta | None:
    if auto_purge is not None and auto_purge <= timedelta(0):
        raise ValueError("auto_purge must be positive, or None to turn the automatic purge off")
    return auto_purge


def _upkeep(ref: weakref.ref[ReadBack], stop: threading.Event) -> None:
    """The upkeep thread of one journal: the daily purge, looked at now and every hour,
    until the journal is closed or dropped. Never on a caller's path."""
    first = True
    while True:
        journal = ref()
        if journal is None or journal._upkeep_stop.is_set():
            return
        try:
            journal._on_upkeep()
            if not first:  # (read when it was opened)
                journal.refresh_retention()
            journal.purge_if_due()
        except Exception as exc:  # the journal unreachable a while: next hour
            logger.debug("journal %s: the automatic purge did not run: %s", journal, exc)
        journal._upkeep_ran.set()
        del journal
        first = False
        if stop.wait(UPKEEP_EVERY):
            return


class ReadBack:
    """The read-back and upkeep methods of `JournalBackend`, for a backend that gives:

    * `_table`: the operations table as SQL names it; `_mark`: its parameter mark;
    * `_read(action, sql, params, flush=True, long=False)`: rows (`long`: a read that may
      take long, a backlog with its bodies), with the completions this process holds
      written first (a list must show them) unless `flush` is false;
    * `_read_operations(action, sql, params)`: rows (of `COLUMNS`) of operations as this
      process sees them (its held completions included, written or laid over);
    * `_change_state(name_or_key, verb, allowed, sets, *params, also=None)`: `UPDATE ... SET
      sets` on an operation found by name, else key, in one of `allowed` states, and the
      statement `also` makes of its row, in one transaction;
    * `_write_statement(action, sql, params, unbounded=False)`: one statement in a
      transaction of its own: its row count (`unbounded`: a long one, such as a large purge,
      that a backend's command timeout must not cut short);
    * `_saw_backlog(rows)`: told the rows of `pending_requests`, read with `_backlog_columns`
      after `COLUMNS` (a backend that claims against what it read keeps them).
    * `_on_upkeep()`: what it does hourly on the upkeep thread besides the purge (PostgreSQL:
      measure the server's clock again).
    """

    retention: timedelta
    #: finished operations older than this (never less than the retention) are purged
    #: automatically once a day; `None`: never (the journal's `auto_purge=` argument)
    auto_purge: timedelta | None = None
    _table: str
    _settings_table: str
    _retention_setting: str  # the name of the retention's row in the settings table
    _decisions_table: str
    _retired_table: str  # the keys that reissued operations gave up: key -> operation id
    max_response_body: int
    _mark: str
    _backlog_columns = ""
    _clock: Callable[[], float]
    _upkeep_stop: threading.Event
    _upkeep_ran: threading.Event  # set once the upkeep thread has looked (for tests)
    _holds: Holds  # the operations this process holds, their leases renewed

    if TYPE_CHECKING:  # what each backend defines (see the class docstring)

        def _read(
            self,
            action: str,
            sql: str,
            params: Sequence[Any] = (),
            *,
            flush: bool = True,
            long: bool = False,
        ) -> list[Row]: ...

        def _read_operations(self, action: str, sql: str, params: Sequence[Any]) -> list[Row]: ...

        def _change_state(
            self,
            name_or_key: str,
            verb: str,
            allowed: tuple[State, ...],
            sets: str,
            *params: Any,
            also: Also | None = None,
        ) -> Operation: ...

        def _write_statement(
            self, action: str, sql: str, params: Sequence[Any], *, unbounded: bool = False
        ) -> int: ...

    def _saw_backlog(self, rows: list[Row]) -> None:
        """Nothing to keep, unless a backend says otherwise."""

    def _on_upkeep(self) -> None:
        """What a backend does hourly besides the purge (on the upkeep thread): nothing,
        unless it says otherwise."""

    # -- reading back ---------------------------------------------------------------------

    def request_of(self, key: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
        """The stored request of an operation: method, URL, headers (no secrets), body."""
        method, url, headers, body, _ = self.stored_request(key)
        return method, url, headers, body

    def stored_request(self, key: str) -> tuple[str, str, list[tuple[str, str]], bytes, str]:
        """`request_of`, and the encoding that turns the headers back into their bytes."""
        rows = self._read(
            "read the stored request",
            f"SELECT method, url, headers, body FROM {self._table} WHERE key = {self._mark}",
            (key,),
        )
        if not rows:
            raise KeyError(key)
        method, url, headers, body = rows[0]
        pairs, encoding = headers_from_json(headers)
        return method, url, pairs, bytes(body), encoding

    def pending_requests(
        self,
    ) -> list[tuple[Operation, tuple[str, str, list[tuple[str, str]], bytes, str]]]:
        """The pending operations with their stored requests, oldest first, in one read."""
        rows = self._read(
            "read the pending requests",
            f"SELECT {COLUMNS}{self._backlog_columns}, headers, body FROM {self._table} "
            "WHERE state = 'pending' ORDER BY created_at, id",
            long=True,
        )
        self._saw_backlog(rows)
        return [(operation(r), stored_request(r)) for r in rows]

    def _lookup(self, name_or_key: str) -> Row | None:
        """The row with this name, else with this key (a name wins over a key)."""
        m = self._mark
        rows = self._read_operations(
            "look the operation up",
            f"SELECT {COLUMNS} FROM {self._table} WHERE name = {m} OR key = {m} "
            f"ORDER BY CASE WHEN name = {m} THEN 0 ELSE 1 END LIMIT 1",
            (name_or_key, name_or_key, name_or_key),
        )
        return rows[0] if rows else None

    def stored_response(self, name_or_key: str) -> StoredResponse | None:
        """The journaled final response of an operation, if it has one."""
        row = self._lookup(name_or_key)
        return stored_response(row) if row is not None else None

    def get(self, name_or_key: str) -> Operation | None:
        """The operation with this name, else with this key; `None` if neither is known."""
        row = self._lookup(name_or_key)
        return operation(row) if row is not None else None

    def by_keys(self, keys: Iterable[str]) -> dict[str, Operation]:
        """The operations with these keys, by key (a key not known is left out), in one
        read for up to `KEYS_PER_READ` of them: a resume reads its sends back this way."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Operation] = {}
        for start in range(0, len(wanted), KEYS_PER_READ):
            among, params = self._among(wanted[start : start + KEYS_PER_READ])
            sql = f"SELECT {COLUMNS} FROM {self._table} WHERE key {among}"
            for row in self._read_operations("read the operations back", sql, params):
                found[row[1]] = operation(row)
        return found

    def _among(self, values: list[str]) -> tuple[str, Sequence[Any]]:
        """SQL that tests a value against `values`, and its parameters: `IN (?, ?, ...)`,
        unless a backend has a better way (one statement for any number of them)."""
        return f"IN ({', '.join([self._mark] * len(values))})", values

    def operations(self, state: State | None = None) -> list[Operation]:
        """Every operation, oldest first; only those in `state` if given."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
        where, params = (f"WHERE state = {self._mark}", (state,)) if state else ("", ())
        rows = self._read(
            "list operations",
            f"SELECT {COLUMNS} FROM {self._table} {where} ORDER BY created_at, id",
            params,
        )
        return [operation(r) for r in rows]

    def refresh_retention(self) -> timedelta:
        """The retention as the journal stores it now, read again and kept: another process
        may have changed it (`set_retention`, `idemclient retention --set`). Done hourly by
        the upkeep thread, and at the start of `expire_stale` and `pending` (a resume)."""
        rows = self._read(
            "read the retention",
            f"SELECT value FROM {self._settings_table} WHERE name = {self._mark}",
            (self._retention_setting,),
            flush=False,  # (the answers this process holds are no part of it)
        )
        if rows:
            self.retention = timedelta(seconds=float(rows[0][0]))
        return self.retention

    def pending(self) -> list[Operation]:
        """Operations a resume would send: pending, oldest first (expired ones excluded)."""
        cutoff = self._clock() - self.refresh_retention().total_seconds()
        rows = self._read(
            "list pending operations",
            f"SELECT {COLUMNS} FROM {self._table} WHERE state = 'pending' "
            f"AND (first_sent_at IS NULL OR first_sent_at >= {self._mark}) "
            "ORDER BY created_at, id",
            (cutoff,),
        )
        return [operation(r) for r in rows]

    def stats(self) -> JournalStats:
        """Operations by state and the oldest pending one, in one aggregate query (one read
        snapshot; no row is loaded): cheap for monitoring however large the journal."""
        rows = self._read(
            "count operations",
            f"SELECT state, COUNT(*), NULL, NULL, NULL FROM {self._table} GROUP BY state "
            "UNION ALL SELECT * FROM (SELECT NULL, 0, name, key, created_at FROM "
            f"{self._table} WHERE state = 'pending' ORDER BY created_at, id LIMIT 1) AS oldest",
        )
        states = dict.fromkeys(STATES, 0) | {r[0]: r[1] for r in rows if r[0] is not None}
        oldest = next((r for r in rows if r[0] is None), None)
        if oldest is None:
            return JournalStats(states)
        return JournalStats(states, oldest[2], oldest[3], utc(oldest[4]))

    # -- upkeep ---------------------------------------------------------------------------

    def abandon(self, name_or_key: str) -> Operation:
        """Mark a pending, expired or parked operation `abandoned`: it is never sent again.

        Raises:
            KeyError: no operation has this name or key.
            ValueError: the operation is already finished (completed, conflict, abandoned).
        """
        return self._change_state(
            name_or_key, "abandon", ("pending", "expired", "parked"),
            f"state = 'abandoned', updated_at = {self._mark}, lease_owner = NULL, "
            "lease_expires = NULL",
            self._clock(),
        )  # fmt: skip

    def unpark(self, name_or_key: str) -> Operation:
        """Make a parked operation pending again, with its key: the next run or resume sends it.

        Raises:
            KeyError: no operation has this name or key.
            ValueError: the operation is not parked.
        """
        return self._change_state(
            name_or_key, "unpark", ("parked",),
            f"state = 'pending', recoveries = 0, updated_at = {self._mark}, "
            "last_error = 'unparked by a person'",
            self._clock(),
        )  # fmt: skip

    def reissue(self, name_or_key: str) -> Operation:
        """Give an expired operation a new key, so that it can be sent again.

        Only for a person who has checked that the server did not perform it: the server
        may have forgotten the old key, so the new key does not protect against a duplicate
        of the first send. The old key is kept as `previous_key`; the name stays.

        Raises:
            KeyError: no operation has this name or key.
            ValueError: the operation is not expired.
        """
        m = self._mark
        return self._change_state(
            name_or_key, "reissue", ("expired",),
            f"state = 'pending', previous_key = key, key = {m}, attempts = 0, "
            "first_sent_at = NULL, recoveries = 0, lease_owner = NULL, lease_expires = NULL, "
            f"updated_at = {m}, last_error = 'reissued with a new key by a person'",
            str(uuid.uuid4()), self._clock(),
        )  # fmt: skip

    def purge(
        self,
        older_than: timedelta = DEFAULT_PURGE_HORIZON,
        *,
        states: tuple[State, ...] = FINISHED,
    ) -> int:
        """Delete finished operations last updated more than `older_than` ago; the count.

        Only `completed`, `conflict` and `abandoned` rows can be purged, and never sooner than
        the retention: a rerun of a named operation must find its answer after the server has
        forgotten the key. Pending and expired rows are never purged.
        """
        if older_than < self.refresh_retention():  # (another process may have changed it)
            raise ValueError(
                f"older_than ({older_than}) must not be shorter than the retention "
                f"({self.retention})"
            )
        bad = [s for s in states if s not in FINISHED]
        if bad:
            raise ValueError(f"only finished states can be purged, not {', '.join(bad)}")
        if not states:
            return 0
        return self._purge(older_than, states)

    def _purge(self, older_than: timedelta, states: tuple[State, ...] = FINISHED) -> int:
        """`purge`, its arguments checked."""
        cutoff = self._clock() - older_than.total_seconds()
        marks = ", ".join(self._mark for _ in states)
        purged = self._write_statement(
            "purge operations",
            f"DELETE FROM {self._table} WHERE state IN ({marks}) AND updated_at < {self._mark}",
            (*states, cutoff),
            unbounded=True,
        )
        if purged:  # the keys that purged operations gave up, and their decisions
            self._write_statement(
                "purge given-up keys",
                f"DELETE FROM {self._retired_table} WHERE NOT EXISTS (SELECT 1 FROM "
                f"{self._table} AS o WHERE o.id = {self._retired_table}.id)",
                (),
                unbounded=True,
            )
            self._write_statement(
                "purge decisions",
                f"DELETE FROM {self._decisions_table} WHERE decided_at < {self._mark} AND NOT "
                f"EXISTS (SELECT 1 FROM {self._table} AS o WHERE o.key = "
                f"{self._decisions_table}.key OR o.previous_key = {self._decisions_table}.key)",
                (cutoff,),
                unbounded=True,
            )
        return purged

    def purge_if_due(self) -> int | None:
        """The automatic purge: finished operations last updated more than `auto_purge` ago
        (never less than the retention) deleted, if no journal on this store did it within
        the last day; the count, or `None` when it was not due (or `auto_purge` is `None`).

        The time of the last purge is kept in the journal itself, and taken with one
        conditional write: of many processes sharing a journal, one purges a day. Pending,
        expired and parked operations are never purged. The journal's upkeep thread calls
        this when the journal opens and every hour after; a caller need not.
        """
        if self.auto_purge is None:
            return None
        now, m, settings = self._clock(), self._mark, self._settings_table
        due = self._write_statement(
            "schedule the daily purge",
            f"INSERT INTO {settings} (name, value) VALUES ('last_purge', {m}) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value "
            f"WHERE settings.value < {m}",
            (_stamp(now), _stamp(now - _DAY)),
        )
        if due != 1:
            return None
        # never sooner than the retention as stored now (another process may have made it
        # longer since it was read): the day's purge, its slot taken, is not refused
        purged = self._purge(max(self.auto_purge, self.refresh_retention()))
        if purged:
            logger.info("journal %s: purged %d finished operations (automatic)", self, purged)
        return purged

    def _start_upkeep(self) -> None:
        """Start the upkeep thread, unless `auto_purge` is `None`; and keep the leases this
        process holds alive (`_leases`)."""
        self._holds = Holds(self._renew_leases, self._clock)
        self._upkeep_stop, self._upkeep_ran = threading.Event(), threading.Event()
        if self.auto_purge is None:
            return
        threading.Thread(
            target=_upkeep, args=(weakref.ref(self), self._upkeep_stop),
            name="idemclient-journal-upkeep", daemon=True,
        ).start()  # fmt: skip

    def _stop_upkeep(self) -> None:
        stop = getattr(self, "_upkeep_stop", None)
        if stop is not None:
            stop.set()
        holds = getattr(self, "_holds", None)
        if holds is not None:
            holds.close()

    # -- leases held by this process ------------------------------------------------------

    def _holding(
        self,
        registration: Registration,
        owner: str,
        lease: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Registration:
        """`registration`, a claim that sends it held (and its lease renewed) until it is
        recorded, released or given back (`_let_go`); made for a task of `loop` (a
        coroutine of a journal with native async I/O), tied to it (`Holds.tie`)."""
        if registration.decision is Decision.SEND:
            key = registration.operation.key
            self._holds.hold(key, registration.lease_version, owner, lease, loop)
        return registration

    def _let_go(self, key: str, version: int) -> None:
        self._holds.drop(key, version)

    def _tie_to_loop(self, key: str, version: int, loop: asyncio.AbstractEventLoop) -> None:
        """The lease of `key` at `version` is held by a task of `loop` (`Holds.tie`)."""
        self._holds.tie(key, version, loop)

    def _let_go_later(self, key: str, version: int) -> None:
        """`_let_go`, safe from a flow the garbage collector closes (takes no lock)."""
        self._holds.forget(key, version)

    def _renew_leases(self, leases: Sequence[Lease], now: float) -> set[str]:
        """Extend leases this process holds, each fenced by its holder and version: an
        operation finished, released or taken over since is left alone. The keys renewed."""
        m = self._mark
        sql = (
            f"UPDATE {self._table} SET lease_expires = {m} WHERE key = {m} "
            f"AND lease_version = {m} AND lease_owner = {m} AND state = 'pending'"
        )
        renewed: set[str] = set()
        for key, version, owner, lease in leases:
            if self._write_statement("renew a lease", sql, (now + lease, key, version, owner)):
                renewed.add(key)
        return renewed

    # -- reconciling expired operations ---------------------------------------------------

    def reconcile(
        self,
        name_or_key: str,
        verdict: VerdictKind,
        decided_by: str,
        *,
        response: StoredResponse | None = None,
        detail: str | None = None,
    ) -> Operation:
        """Decide on an expired operation and journal the decision, in one transaction.

        `happened`: it is `completed`, with `response` as its answer (a rerun replays it)
        or, without one, with none kept (a rerun raises `ResponseNotKeptError`).
        `not_happened`: it is reissued (a new key, pending, never sent: the next resume or
        rerun sends it). `unknown` and `error` (the check failed): it stays expired. Each
        decision is kept with `decided_by`, the time and `detail` (`decisions()`).

        Raises:
            KeyError: no operation has this name or key.
            ValueError: the operation is not expired, or `verdict` is not one of `VERDICTS`.
        """
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        m, now = self._mark, self._clock()
        said = f"{decided_by} found that it {verdict.replace('_', ' ')}"
        if verdict in ("unknown", "error"):
            said = f"{decided_by} could not tell whether it happened ({verdict})"
        if detail:
            said += f": {detail}"

        def audit(row: Row) -> tuple[str, Sequence[Any]]:
            return (
                f"INSERT INTO {self._decisions_table} (key, name, verdict, decided_by, "
                f"decided_at, detail) VALUES ({m}, {m}, {m}, {m}, {m}, {m})",
                (row[1], row[0], verdict, decided_by, now, detail),
            )

        freed = "lease_owner = NULL, lease_expires = NULL"
        if verdict == "happened" and response is not None:
            body, kept = response.body, response.body_kept
            if len(body) > self.max_response_body:
                body, kept = b"", False
            sets = (
                f"state = 'completed', updated_at = {m}, response_status = {m}, "
                f"response_headers = {m}, response_body = {m}, response_body_kept = {m}, "
                f"{freed}, last_error = {m}"
            )
            headers = headers_json(response.headers, response.encoding)
            params: tuple[Any, ...] = (now, response.status, headers, body, int(kept), said)
        elif verdict == "happened":
            sets = f"state = 'completed', updated_at = {m}, {freed}, last_error = {m}"
            params = (now, said)
        elif verdict == "not_happened":
            sets = (
                f"state = 'pending', previous_key = key, key = {m}, attempts = 0, "
                f"first_sent_at = NULL, recoveries = 0, {freed}, updated_at = {m}, "
                f"last_error = {m}"
            )
            params = (str(uuid.uuid4()), now, f"reissued with a new key: {said}")
        else:
            sets, params = f"updated_at = {m}, last_error = {m}", (now, said)
        return self._change_state(name_or_key, "reconcile", ("expired",), sets, *params, also=audit)

    def decisions(self, name_or_key: str) -> list[Verdict]:
        """The decisions journaled on an operation (under any of its keys), oldest first.
        `KeyError` if no operation has this name or key."""
        row = self._lookup(name_or_key)
        if row is None:
            raise KeyError(name_or_key)
        m = self._mark
        rows = self._read(
            "read the decisions",
            f"SELECT key, name, verdict, decided_by, decided_at, detail FROM "
            f"{self._decisions_table} WHERE key = {m} OR key = {m} OR name = {m} "
            "ORDER BY decided_at, id",
            (row[1], row[19] or row[1], row[0]),
        )
        return [Verdict(r[0], r[1], r[2], r[3], utc(r[4]), r[5]) for r in rows]

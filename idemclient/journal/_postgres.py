"""The PostgreSQL journal, for fleets: the same contract as the SQLite one, shared by workers
on many hosts.

Its tables live in their own PostgreSQL schema (`idemclient` unless told otherwise),
versioned in its `settings` table, created (or migrated forward) by whichever process comes
first: creators take turns under a transaction-scoped advisory lock. A registration or claim
is one transaction whose commit is synchronous (`synchronous_commit = on`) before the caller
sends anything; completions are held in memory and written together in the background, like
SQLite's (a lost one only means a resume gets the server's replay). Rows of a known operation
are read `FOR UPDATE`, so two hosts never decide on one operation at once; a resume reads them
`FOR UPDATE SKIP LOCKED`, so resumers on several hosts split one backlog instead of queueing
behind each other. The registration rules are `_decide`'s, as for SQLite.

Each journal call is a flow: a generator of the statements to run (`_Sql`), carried out
by `_run` on a connection of the pool, or by `_arun` on an async connection of the running
event loop, so the async transport needs no worker thread and the SQL is written once.

psycopg 3 and psycopg-pool are imported only here (extra `idemclient[postgres]`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from idemclient._errors import JournalError
from idemclient._records import (
    Decision,
    Operation,
    Registration,
    RequestRecord,
    State,
    StoredResponse,
)

from . import _decide
from ._decide import (
    DEFAULT_PURGE_HORIZON,
    DEFAULT_RETENTION,
    ClaimUpdate,
    Decided,
    Expire,
    Insert,
    Limits,
    Park,
)
from ._owner import DEFAULT_LEASE_MARGIN, owner_alive
from ._readback import Also, ReadBack, checked_auto_purge
from ._rows import (
    COLUMNS,
    headers_from_json,
    headers_json,
    operation,
    stored_row,
)
from ._together import Together

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool
    from typing_extensions import Self

__all__ = [
    "SCHEMA_VERSION",
    "PostgresJournal",
    "is_postgres_url",
    "postgres_journal_exists",
    "shown",
]

logger = logging.getLogger("idemclient")

#: completions written by one statement (8 parameters each, far below PostgreSQL's limit)
_ROWS_PER_STATEMENT = 500


@dataclass(frozen=True, slots=True)
class _Sql:
    """One statement of a flow (`_run`, `_arun`): the flow gets back its rows (none for a
    statement that returns none) and its row count."""

    text: str
    params: Sequence[Any] | Mapping[str, Any] = ()


_Result = tuple[list[tuple[Any, ...]], int]
_BEGIN, _COMMIT, _ROLLBACK = _Sql("BEGIN"), _Sql("COMMIT"), _Sql("ROLLBACK")
_RELAXED = _Sql("SET LOCAL synchronous_commit = off")  # the session's commits are synchronous
_UNBOUNDED = _Sql("SET LOCAL statement_timeout = 0")  # a long statement (a large purge)
_LIST_PATIENCE = 10.0  # a long read (a backlog) may take this many command timeouts
T = TypeVar("T")
#: the statements of one journal call, the same for a connection and an async connection
_Flow = Generator[_Sql, _Result, T]


def _drive(conn: psycopg.Connection[Any], flow: _Flow[T]) -> T:
    """Run a flow's statements on a connection (autocommit: a flow says BEGIN and COMMIT);
    a transaction the flow leaves open by raising is rolled back."""
    in_transaction = False
    try:
        sql = next(flow)
        while True:
            cur = conn.execute(sql.text, sql.params)
            in_transaction = sql is _BEGIN or (in_transaction and sql not in (_COMMIT, _ROLLBACK))
            sql = flow.send((cur.fetchall() if cur.description else [], cur.rowcount))
    except StopIteration as stop:
        return cast("T", stop.value)
    except BaseException:
        if in_transaction and not conn.closed:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
        raise
    finally:
        flow.close()


async def _adrive(conn: psycopg.AsyncConnection[Any], flow: _Flow[T]) -> T:
    """`_drive` on an async connection."""
    in_transaction = False
    try:
        sql = next(flow)
        while True:
            cur = await conn.execute(sql.text, sql.params)
            in_transaction = sql is _BEGIN or (in_transaction and sql not in (_COMMIT, _ROLLBACK))
            rows = await cur.fetchall() if cur.description else []
            sql = flow.send((rows, cur.rowcount))
    except StopIteration as stop:
        return cast("T", stop.value)
    except BaseException:
        if in_transaction and not conn.closed:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    finally:
        flow.close()


def _one(sql: _Sql) -> _Flow[int]:
    """One statement: its row count."""
    _, count = yield sql
    return count


class _LoopConnections:
    """The async connections of one journal in one event loop (an async connection belongs
    to the loop that opened it): the idle ones, and permits for at most `pool_size` at once."""

    def __init__(self, size: int) -> None:
        self.idle: list[psycopg.AsyncConnection[Any]] = []
        self.permits = asyncio.Semaphore(size)


def _finish_all(connections: list[psycopg.AsyncConnection[Any]]) -> None:
    """Close async connections from any thread, without their loop (no await: the client
    side of the socket is closed at once; the server ends the session)."""
    while connections:
        conn = connections.pop()  # held until closed: its last reference would warn
        with contextlib.suppress(Exception):
            conn.pgconn.finish()


class _Watch:
    """One journal call on one connection, and when the server must have answered it."""

    __slots__ = ("deadline", "fd", "fired")

    def __init__(self, deadline: float, fd: int) -> None:
        self.deadline, self.fd, self.fired = deadline, fd, False


class _Watchdog:
    """Ends the journal calls that the server leaves unanswered past their deadline, by
    shutting their connection's socket down: the call fails at once with `JournalError`
    (the connection is then discarded), where it would otherwise wait forever (a frozen
    server host, a network that drops everything, a proxy that stops forwarding). A
    statement timeout alone cannot do that: it runs on the server.

    One thread per process, started by the first call watched, ended after `IDLE_SECONDS`
    without one; it looks every `TICK` seconds. A forked child starts its own.
    """

    TICK = 0.25
    IDLE_SECONDS = 10.0

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._watched: set[_Watch] = set()
        self._running = False

    @contextlib.contextmanager
    def watching(self, fd: int, seconds: float | None) -> Iterator[_Watch | None]:
        """Watch the socket `fd` while the body runs (not at all when `seconds` is `None`)."""
        if seconds is None:
            yield None
            return
        watch = _Watch(time.monotonic() + seconds, fd)
        with self._lock:
            if not self._running:
                thread = threading.Thread(
                    target=self._serve, name="idemclient-journal-watchdog", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread can be started: the call is not made
                    raise JournalError(f"could not watch the journal call: {exc}") from exc
                self._running = True
            self._watched.add(watch)
        try:
            yield watch
        finally:
            with self._lock:  # from here on, the socket is no longer ours to shut
                self._watched.discard(watch)

    def _serve(self) -> None:
        idle_since: float | None = None
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                if not self._watched:  # ended after a while without calls
                    idle_since = idle_since or now
                    if now - idle_since >= self.IDLE_SECONDS:
                        self._running = False
                        return
                    continue
                idle_since = None
                for watch in self._watched:
                    if watch.deadline <= now and not watch.fired:
                        watch.fired = True
                        _shut(watch.fd)


def _shut(fd: int) -> None:
    """Shut a socket down for reading and writing, leaving its descriptor to its owner."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


_watchdog = _Watchdog()


#: New operations, claimed, one row per element of the arrays (`unnest`): the statement's
#: text is the same for one row or many, so that psycopg parses it once and the server
#: prepares it, instead of a statement of its own for each number of rows
_INSERT = (
    "INSERT INTO {table} (name, key, state, method, url, headers, body, fingerprint, attempts, "
    "created_at, updated_at, first_sent_at, lease_owner, lease_expires, lease_version, "
    "key_header, key_style) "
    "SELECT v.name, v.key, 'pending', v.method, v.url, v.headers, v.body, v.fingerprint, 1, "
    "%(now)b, %(now)b, %(now)b, v.owner, v.expires, 1, v.key_header, v.key_style "
    "FROM unnest(%(name)b::text[], %(key)b::text[], %(method)b::text[], %(url)b::text[], "
    "%(headers)b::text[], %(body)b::bytea[], %(fingerprint)b::text[], %(owner)b::text[], "
    "%(expires)b::float8[], %(key_header)b::text[], %(key_style)b::text[]) "
    "AS v(name, key, method, url, headers, body, fingerprint, owner, expires, key_header, "
    "key_style) "
    "WHERE NOT EXISTS (SELECT 1 FROM {retired} AS r WHERE r.key = v.key) "
    "ON CONFLICT DO NOTHING RETURNING key"
)
_CLAIM = (
    "UPDATE {table} SET attempts = %s, lease_version = %s, lease_owner = %s, "
    "lease_expires = %s, updated_at = %s, recoveries = %s, first_sent_at = %s, url = %s, "
    "fingerprint = %s, last_error = %s WHERE key = %s"
)

#: what a resume's claim made on a row read before (no lock) adds to its fence: the row,
#: if sent before, is within the retention as the settings keep it now (shortened since the
#: backlog was read, the claim changes nothing, and the row is decided again, locked)
_WITHIN_RETENTION = (
    "({sent} IS NULL OR {sent} >= {now} - "
    "(SELECT value::float8 FROM {settings} WHERE name = 'retention_seconds'))"
)


#: `_CLAIM` for several rows, each fenced by the `xmin` it was read with; rows locked in key
#: order, those locked by another transaction skipped (left to the one-by-one path)
_CLAIM_MANY = (
    "WITH v AS (SELECT * FROM unnest(%b::int[], %b::int[], %b::text[], %b::float8[], "
    "%b::float8[], %b::int[], %b::float8[], %b::text[], %b::text[], %b::text[], %b::text[], "
    "%b::text[]::xid[]) AS v(attempts, lease_version, lease_owner, lease_expires, updated_at, "
    "recoveries, first_sent_at, url, fingerprint, last_error, key, seen)), "
    "locked AS (SELECT t.key FROM {table} AS t JOIN v ON t.key = v.key AND t.xmin = v.seen "
    "ORDER BY t.key FOR UPDATE OF t SKIP LOCKED) "
    "UPDATE {table} AS t SET attempts = v.attempts, lease_version = v.lease_version, "
    "lease_owner = v.lease_owner, lease_expires = v.lease_expires, updated_at = v.updated_at, "
    "recoveries = v.recoveries, first_sent_at = v.first_sent_at, url = v.url, "
    "fingerprint = v.fingerprint, last_error = v.last_error "
    "FROM v WHERE t.key = v.key AND t.xmin = v.seen AND t.key IN (SELECT key FROM locked) "
    "AND "
    + _WITHIN_RETENTION.format(sent="t.first_sent_at", now="v.updated_at", settings="{settings}")
    + " "
    "RETURNING t.key"
)


def _arrivals(
    requests: Sequence[tuple[RequestRecord, str, float]], arrived: Sequence[float] | None
) -> list[tuple[float, tuple[RequestRecord, str, float]]]:
    """Each request with the moment it was asked for (`arrived`, else now)."""
    moments = [time.monotonic()] * len(requests) if arrived is None else arrived
    return list(zip(moments, requests, strict=True))


def _columns(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Rows of values as columns: one array parameter each, for `unnest`."""
    return [list(column) for column in zip(*rows, strict=True)]


def _claim_values(write: ClaimUpdate) -> tuple[Any, ...]:
    # Times as floats: a clock may give ints, and an array of both cannot be sent.
    first_sent_at = None if write.first_sent_at is None else float(write.first_sent_at)
    return (
        write.attempts, write.lease_version, write.lease_owner, float(write.lease_expires),
        float(write.updated_at), write.recoveries, first_sent_at, write.url,
        write.fingerprint, write.last_error, write.key,
    )  # fmt: skip


#: Bumped by every schema change; migrations go forward only.
SCHEMA_VERSION = 3
#: the oldest version a read-only look reads as it is (version 3 added only what writers use)
_READABLE_FROM = 2
_EXTRA = "pip install 'idemclient[postgres]'"


def is_postgres_url(text: object) -> bool:
    """Whether a journal location is a PostgreSQL URL (`postgresql://` or `postgres://`)."""
    return isinstance(text, str) and text.lower().startswith(("postgresql://", "postgres://"))


#: the keywords of a libpq connection string (PostgreSQL 16's, and older ones)
_LIBPQ_KEYWORDS = frozenset(
    [
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "require_auth",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "requiressl",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
    ]
)
_PAIR = re.compile(r"\s*(\w+)\s*=\s*(?:'(?:[^'\\]|\\.)*'|(?:\\.|[^\s'\\])*)\s*")
#: a `keyword=` at the start of the text or after a space: where a libpq string has one
_KEYWORD_AT = re.compile(r"(?:^|\s)(\w+)\s*=")


def is_postgres_location(text: object) -> bool:
    """Whether a journal location names a PostgreSQL database: a URL, or a libpq connection
    string (`host=db.internal user=app`, `service=billing`: nothing but `keyword=value`
    pairs, one of libpq's keywords among them; one libpq does not know is for it to
    refuse), which is never taken for a file name."""
    if is_postgres_url(text):
        return True
    if not isinstance(text, str) or "=" not in text:
        return False
    at, keys = 0, []
    while at < len(text):
        pair = _PAIR.match(text, at)
        if pair is None or pair.end() == at:
            # Not pairs all through (a quote left open, a stray word): still PostgreSQL's if
            # it says two of `host=`, `dbname=`, ... where a libpq string does, and does not
            # start as a path does, for the driver to refuse by name. As a file name, it made
            # a journal no other host sees, named after the DSN (its password included),
            # and sent. (A path such as `backups/host=a (copy).sqlite3` stays a path.)
            if text.startswith(("/", ".", "~")):
                return False
            found = {m.group(1).lower() for m in _KEYWORD_AT.finditer(text)}
            return len(found & _LIBPQ_KEYWORDS) >= 2
        keys.append(pair.group(1).lower())
        at = pair.end()
    return any(key in _LIBPQ_KEYWORDS for key in keys)


def split_schema(dsn: str) -> tuple[str, str | None]:
    """A URL's `schema=` query parameter (idemclient's, not libpq's: the schema that holds
    the journal's tables), and the URL without it; a DSN without one as it is."""
    if not is_postgres_url(dsn):
        return dsn, None
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:  # (an IPv6 host left open: "Invalid IPv6 URL")
        raise JournalError(
            f"journal {shown(dsn)}: not a valid PostgreSQL URL: {exc}", path=shown(dsn)
        ) from None
    pairs = [pair for pair in parts.query.split("&") if pair]
    mine = [pair for pair in pairs if pair.partition("=")[0] == "schema"]
    if not mine:
        return dsn, None
    rest = "&".join(pair for pair in pairs if pair not in mine)
    schema = unquote(mine[-1].partition("=")[2])
    if not _plain_identifier(schema):
        raise JournalError(
            f"journal {shown(dsn)}: schema= must be a plain identifier (letters, digits, "
            f"_), not {schema!r}",
            path=shown(dsn),
        )
    return urlunsplit(parts._replace(query=rest)), schema


def _plain_identifier(name: str) -> bool:
    return bool(name) and name.replace("_", "").isalnum()


def libpq_dsn(dsn: str) -> str:
    """The DSN as libpq takes it: a URL's scheme in lower case (libpq knows no other)."""
    if is_postgres_url(dsn):
        scheme, _, rest = dsn.partition(":")
        return f"{scheme.lower()}:{rest}"
    return dsn


def _passwords(dsn: str) -> list[str]:
    """The passwords written in a DSN (as `user:secret@`, `?password=`, `password=`)."""
    found: list[str] = []
    if is_postgres_url(dsn):
        # Read off the text itself, as each reader may split it: up to the first "@" before
        # a "/" (libpq, which takes "#" and "?" in a password), the last "@" before any of
        # "/?#" (urlsplit), or the last "@" at all (a password with a "/" or an "@" in it,
        # which libpq then takes for part of the host, and quotes in its error).
        rest = dsn.partition("://")[2]
        for userinfo in (
            rest[: len(rest.split("/", 1)[0])].partition("@")[0] if "@" in rest else "",
            re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[0],
            rest.rpartition("@")[0],
        ):
            if ":" in userinfo:
                password = userinfo.partition(":")[2]
                found.append(password)
                found.extend(re.split(r"[@/?#:]", password))  # (each piece quoted alone)
        query = dsn.partition("?")[2].partition("#")[0]
        for match in re.finditer(r"(?:^|&)(?:ssl)?password=([^&]*)", query, re.I):
            found.append(match.group(1))
    else:
        for match in _PASSWORD_PAIR.finditer(dsn):
            found.append(match.group(2).strip("'"))
            for word in dsn[match.end() :].split():  # (unquoted, with a space: libpq ends
                if "=" in word:  # it at the space, and quotes the rest in its error)
                    break
                found.append(word)
        found.extend(p.replace("\\", "") for p in list(found))  # (as libpq reads escapes)
        for password in list(found):
            found.extend(password.split())  # (each piece quoted alone)
    # the longest first: a piece replaced before its whole would leave the rest shown
    kept = {p for p in found if p and (len(p) >= 3 or p == found[0])}  # ("" would match all)
    return sorted(kept, key=len, reverse=True)


def scrubbed(text: str, dsn: str) -> str:
    """`text` (a driver's error, which may quote the DSN it was given) without the DSN's
    passwords."""
    for password in _passwords(dsn):
        text = text.replace(password, "***")
    return text


# (a quoted value left open runs to the end: a malformed string's password is hidden too)
_PASSWORD_PAIR = re.compile(
    r"""(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:\\.|[^\s'\\])+)""", re.I
)
_PASSWORD_PARAM = re.compile(r"((?:^|&)(?:ssl)?password=)[^&]*", re.I)


def shown(dsn: str) -> str:
    """The DSN as it may be shown (errors, the command line, `journal.path`): no password,
    neither in a URL (`user:secret@`, `?password=`) nor in a libpq `key=value` string."""
    if not is_postgres_url(dsn):
        text = _PASSWORD_PAIR.sub(r"\1***", dsn)
        for password in _passwords(dsn):  # (the rest of one with a space, unquoted)
            text = text.replace(password, "***")
        return text
    try:
        parts = urlsplit(dsn)
    except ValueError:  # not a URL that parses: every password written in it hidden
        for password in sorted(_passwords(dsn), key=len, reverse=True):
            dsn = dsn.replace(password, "***")
        return dsn
    if parts.query:
        parts = parts._replace(query=_PASSWORD_PARAM.sub(r"\1***", parts.query))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}:***@{netloc[1]}")
    text = urlunsplit(parts)
    for password in _passwords(dsn):  # (one with "#", "?" or "/" in it: urlsplit cut it)
        text = text.replace(password, "***")
    return text


def postgres_journal_exists(dsn: str, schema: str | None = None) -> bool:
    """Whether the database at `dsn` holds an idemclient journal (in `schema`, else the one
    the URL names, else `idemclient`). Raises `JournalError` if it cannot be asked."""
    driver, _ = _drivers()
    plain, named = split_schema(libpq_dsn(dsn))
    schema = schema or named or "idemclient"
    try:
        with driver.connect(plain, connect_timeout=10, autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".settings',)).fetchone()
    except driver.Error as exc:
        raise JournalError(
            f"journal {shown(dsn)}: could not look for the journal: {scrubbed(str(exc), dsn)}",
            path=shown(dsn),
        ) from exc
    return found is not None and found[0] is not None


def _drivers() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise JournalError(
            f"a PostgreSQL journal needs psycopg 3 and psycopg-pool: {_EXTRA}"
        ) from exc
    return psycopg, psycopg_pool


def _schema_sql(schema: str) -> list[str]:
    q = f'"{schema}"'
    return [
        f"""CREATE TABLE {q}.operations (
            id              BIGSERIAL PRIMARY KEY,
            name            TEXT,
            key             TEXT NOT NULL UNIQUE,
            state           TEXT NOT NULL,
            method          TEXT NOT NULL,
            url             TEXT NOT NULL,
            headers         TEXT NOT NULL,
            body            BYTEA NOT NULL,
            fingerprint     TEXT NOT NULL,
            attempts        INTEGER NOT NULL,
            created_at      DOUBLE PRECISION NOT NULL,
            updated_at      DOUBLE PRECISION NOT NULL,
            first_sent_at   DOUBLE PRECISION,
            lease_owner     TEXT,
            lease_expires   DOUBLE PRECISION,
            lease_version   INTEGER NOT NULL,
            response_status INTEGER,
            response_headers TEXT,
            response_body   BYTEA,
            response_body_kept INTEGER,
            last_error      TEXT,
            recoveries      INTEGER NOT NULL DEFAULT 0,
            previous_key    TEXT,
            key_header      TEXT,
            key_style       TEXT,
            moved_fingerprint TEXT
        )""",
        f"CREATE UNIQUE INDEX operations_name ON {q}.operations (name) WHERE name IS NOT NULL",
        f"CREATE INDEX operations_pending ON {q}.operations (created_at, id) "
        "WHERE state = 'pending'",
        f"CREATE INDEX operations_finished ON {q}.operations (updated_at) WHERE state <> 'pending'",
        f"CREATE TABLE {q}.settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        *_v1_to_v2(schema),
        *_v2_to_v3(schema),
    ]


def _v1_to_v2(schema: str) -> list[str]:
    """Version 2 keeps the decisions taken on expired operations (`reconcile`)."""
    q = f'"{schema}"'
    return [
        f"CREATE TABLE {q}.decisions (id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, name TEXT, "
        "verdict TEXT NOT NULL, decided_by TEXT NOT NULL, decided_at DOUBLE PRECISION NOT "
        "NULL, detail TEXT)",
        f"CREATE INDEX decisions_key ON {q}.decisions (key)",
    ]


def _v2_to_v3(schema: str) -> list[str]:
    """Version 3 keeps the keys that operations gave up (reissued), each with its operation's
    row: a request that still carries one is that operation, never a new one (the insert of
    a new operation skips them). Those reissued before it are known by their previous_key."""
    q = f'"{schema}"'
    return [
        f"CREATE TABLE {q}.retired_keys (key TEXT PRIMARY KEY, id BIGINT NOT NULL)",
        f"INSERT INTO {q}.retired_keys (key, id) SELECT previous_key, id FROM {q}.operations "
        "WHERE previous_key IS NOT NULL ON CONFLICT DO NOTHING",
    ]


#: from version N to N + 1: the statements, run under the creators' advisory lock
_MIGRATIONS: dict[int, Callable[[str], list[str]]] = {1: _v1_to_v2, 2: _v2_to_v3}


#: every PostgresJournal not closed: their held completions are written at exit
_open: weakref.WeakSet[PostgresJournal] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for journal in list(_open):
        with contextlib.suppress(Exception):
            journal.close()


#: what a forked child inherited (pools, async connections): never used, never closed, for
#: closing one would end the parent's session on the server through the shared socket
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    _watchdog._reset()
    for journal in list(_open):
        journal._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PostgresJournal(ReadBack):
    """The journal in PostgreSQL: one database shared by the workers of a fleet.

    Args:
        dsn: a `postgresql://` (or `postgres://`) URL, or a libpq connection string.
        retention: how long the server keeps a key; a property of the journal, as for
            SQLite: stored by whoever creates it (24 hours if not given), read when `None`,
            changed only by `set_retention()`; a different value raises `ValueError`.
        lease_margin: seconds added to a request's timeouts for the lease of its holder. A
            holder on another host cannot be checked for liveness, so its operation waits
            until that lease ends before another host takes it over. A live holder renews
            its lease while it reads the answer (each time half of it has passed).
        schema: the PostgreSQL schema that holds the tables.
        max_response_body, max_stream_body, max_recoveries, flush_delay, auto_purge: as for
            `Journal` (the daily purge is done by one process of the fleet a day).
        pool_size: connections kept open at most (one per thread sending at the same time).
        connect_timeout: seconds to wait for a connection before `JournalError`.
        command_timeout: seconds the server may take over one journal call (a statement,
            a lock it waits for, a transaction left open) before `JournalError`: the call
            ends then even if the server or the network went silent, and the request it
            was for is not sent. `None`: wait as long as it takes. A resume's backlog
            may take ten times as long; a purge is never cut short. Dead connections are
            also found by TCP keepalives and, with libpq 12 or newer, `tcp_user_timeout`,
            unless the DSN sets them itself.
        clock: the wall clock in seconds for the times the journal stores (leases among
            them); `None`: the database server's, as this host's `time.time()` plus the
            offset between the two measured when the journal opens (and hourly after), so
            that hosts whose clocks disagree still agree on when a lease ends.
        read_only: inspect only: nothing is created, migrated or written.

    Raises:
        JournalError: the driver is missing (it names the extra), the server cannot be
            reached, the user may not create or use the schema, or the schema comes from a
            newer idemclient. Nothing is sent through a journal that could not be opened.

    Example:
        >>> journal = PostgresJournal("postgresql://app@db.internal/orders")
        >>> client = idemclient.Client(journal=journal, base_url="https://api.example")
    """

    def __init__(
        self,
        dsn: str,
        *,
        retention: timedelta | None = None,
        lease_margin: float = 30.0,
        schema: str = "idemclient",
        max_response_body: int = 1024 * 1024,
        max_stream_body: int = 16 * 1024 * 1024,
        max_recoveries: int = 3,
        flush_delay: float = 0.05,
        pool_size: int = 32,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
        clock: Callable[[], float] | None = None,
        read_only: bool = False,
        auto_purge: timedelta | None = DEFAULT_PURGE_HORIZON,
    ) -> None:
        self.auto_purge = None if read_only else checked_auto_purge(auto_purge)
        if retention is not None and retention <= timedelta(0):
            raise ValueError("retention must be positive")
        given = libpq_dsn(dsn)
        dsn, named = split_schema(given)
        if named is not None:
            if schema not in (named, "idemclient"):
                raise ValueError(f"the DSN names schema {named!r}, and schema= {schema!r}")
            schema = named
        if not _plain_identifier(schema):
            raise ValueError(f"schema must be a plain identifier, not {schema!r}")
        if lease_margin < 0:
            raise ValueError("lease_margin must not be negative")
        if command_timeout is not None and command_timeout <= 0:
            raise ValueError("command_timeout must be positive (or None)")
        self.dsn = dsn
        self._identity = (dsn, schema)  # journals of this process on the same tables
        self.path = shown(given)  # where it is, as errors and the CLI name it
        self.schema = schema
        self.lease_margin = lease_margin
        self.max_response_body = max_response_body
        self.max_stream_body = max_stream_body
        self.max_recoveries = max_recoveries
        self.flush_delay = flush_delay
        self.read_only = read_only
        self._offset = 0.0  # the server's clock minus this host's (`clock=None`)
        self._clock = clock if clock is not None else self._server_time
        self._server_clock = clock is None
        self._table = f'"{schema}".operations'
        self._settings = self._settings_table = f'"{schema}".settings'
        self._retention_setting = "retention_seconds"
        self._decisions_table = f'"{schema}".decisions'
        self._retired_table = f'"{schema}".retired_keys'
        self._closed = False
        self._held: list[tuple[Any, ...]] = []  # completions not written yet
        # every completion not committed yet (held, or being written), by key: what a read
        # of one operation lays over the row it reads (see `_as_written`)
        self._unwritten: dict[str, tuple[Any, ...]] = {}
        # the rows of the last `pending_requests`, with their row versions (`xmin`): what a
        # resume's claim of one of them compares against instead of locking it (`_claim_seen`)
        self._seen: dict[str, tuple[tuple[Any, ...], str]] = {}
        self._held_lock = threading.Lock()
        self._held_ready = threading.Condition(self._held_lock)
        self._writing = threading.Lock()  # held while completions are being written
        self._flusher: threading.Thread | None = None
        self._together = self._new_together()
        #: when the last batch that found the server out of reach ended, and its error
        self._outage: tuple[float, JournalError] | None = None
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopConnections] = (
            weakref.WeakKeyDictionary()
        )
        self._async_lock = threading.Lock()
        driver, pools = _drivers()
        self._driver, self._pools = driver, pools
        self._errors: tuple[type[BaseException], ...] = (driver.Error, pools.PoolTimeout)
        self._connect_kwargs = self._settings_for_connections()
        # One connection first, alone: a wrong database, role or password, or no server,
        # is told at once in the server's or libpq's own words (a pool only times out).
        with self._as_journal_error("connect to"):
            driver.connect(self.dsn, **self._connect_kwargs).close()
        self._pool = self._new_pool()
        try:
            with self._as_journal_error("connect to"):
                self._pool.open(wait=True, timeout=connect_timeout)
            self.retention = self._open(retention)
        except BaseException:
            self._pool.close()
            raise
        _open.add(self)
        self._start_upkeep()

    def __repr__(self) -> str:
        return f"<PostgresJournal {self.path!r} schema={self.schema!r}>"

    def _settings_for_connections(self) -> dict[str, Any]:
        """What every connection of the journal is opened with, beside the DSN: the DSN's
        own `options` are kept, after the command timeouts (so they may change them) and
        before `synchronous_commit=on` (every commit waits for its WAL flush unless a write
        says otherwise, whatever the server's, the role's or the DSN's default)."""
        try:
            given = self._driver.conninfo.conninfo_to_dict(self.dsn)
        except self._driver.Error as exc:  # (it may quote the password: not chained)
            raise JournalError(
                f"journal {self.path}: not a valid connection string or URL: "
                f"{scrubbed(str(exc), self.dsn)}",
                path=self.path,
            ) from None
        options = []
        seconds = self.command_timeout
        if seconds is not None:
            ms = max(1, round(seconds * 1000))
            options += [
                f"-c statement_timeout={ms}",
                f"-c idle_in_transaction_session_timeout={ms}",
            ]
        if given.get("options"):
            options.append(str(given["options"]))
        options.append("-c synchronous_commit=on")
        settings: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, int(self._connect_timeout)),
            "options": " ".join(options),
        }
        if seconds is not None:  # a dead peer is noticed, not waited on
            probes = {
                "keepalives": 1,
                "keepalives_idle": max(1, int(seconds / 3)),
                "keepalives_interval": max(1, int(seconds / 6)),
                "keepalives_count": 3,
            }
            if self._driver.pq.version() >= 120000:
                probes["tcp_user_timeout"] = max(1, round(seconds * 1000))
            settings.update({k: v for k, v in probes.items() if k not in given})
        return settings

    def _new_pool(self) -> psycopg_pool.ConnectionPool[psycopg.Connection[Any]]:
        pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = self._pools.ConnectionPool(
            self.dsn, min_size=1, max_size=self._pool_size, open=False,
            timeout=self._connect_timeout, kwargs=self._connect_kwargs,
            name="idemclient-journal",
        )  # fmt: skip
        return pool

    def _new_together(
        self,
    ) -> Together[tuple[float, tuple[RequestRecord, str, float]], Registration | JournalError]:
        """The gathering of concurrent threads' registrations (`register_many`)."""

        def stand_in(
            exc: BaseException, items: Sequence[tuple[float, tuple[RequestRecord, str, float]]]
        ) -> BaseException:
            named = ", ".join(
                f"{r.name!r} (key {r.key})" if r.name is not None else f"with key {r.key}"
                for _, (r, _, _) in items
            )
            return JournalError(
                f"journal {self.path}: could not register operation {named}: the statement "
                f"that registered it with other threads' failed ({exc!r}). It was not sent; "
                "it may be in the journal all the same: the same request sent again here "
                "takes its key, and a resume sends it once",
                path=self.path,
            )

        return Together(self._register_now, stand_in)

    def _after_fork(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing's fork): connections of its
        own, fresh locks, and none of the parent's held answers (the parent writes them).
        The parent's connections are left untouched: their sockets are the parent's."""
        _inherited.append((self._pool, self._async))
        self._async = weakref.WeakKeyDictionary()
        self._async_lock = threading.Lock()
        self._held, self._unwritten = [], {}
        self._held_lock = threading.Lock()
        self._held_ready = threading.Condition(self._held_lock)
        self._writing = threading.Lock()
        self._flusher = None
        self._together = self._new_together()
        if self._closed:
            return
        self._pool = self._new_pool()
        self._pool.open(wait=False)  # connects in the background, on first need at the latest

    @property
    def closed(self) -> bool:
        return self._closed

    # -- connections and errors -----------------------------------------------------------

    @contextlib.contextmanager
    def _as_journal_error(self, action: str) -> Iterator[None]:
        try:
            yield
        except JournalError:
            raise
        except self._errors as exc:
            said = scrubbed(str(exc), self.dsn)  # (a host name libpq cut out of a password)
            raise JournalError(
                f"journal {self.path}: could not {action}: {said}".rstrip(), path=self.path
            ) from (exc if said == str(exc) else None)

    @contextlib.contextmanager
    def _connection(
        self, action: str, *, patience: float | None = 1.0
    ) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool for one call, watched for `patience` times the
        `command_timeout` (`None`: not watched)."""
        if self._closed:
            raise JournalError(f"journal {self.path} is closed", path=self.path)
        with (
            self._as_journal_error(action),
            self._pool.connection() as conn,
            self._watched(conn, action, patience) as watch,
        ):
            try:
                yield conn
            finally:
                if watch is not None and watch.fired:  # its socket is shut: not reused
                    conn.close()

    @contextlib.contextmanager
    def _watched(
        self,
        conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
        action: str,
        patience: float | None = 1.0,
    ) -> Iterator[_Watch | None]:
        """The body's call on `conn`, ended by the watchdog after `patience` times the
        `command_timeout` (`None`: never): then a `JournalError` that says so."""
        timeout = self.command_timeout
        seconds = None if timeout is None or patience is None else timeout * patience
        with _watchdog.watching(conn.pgconn.socket, seconds) as watch:
            try:
                yield watch
            except self._errors as exc:
                if watch is None or not watch.fired:
                    raise
                times = f"{patience:g} x " if patience != 1 else ""
                raise JournalError(
                    f"journal {self.path}: could not {action}: no answer from the server "
                    f"within {seconds:g} s ({times}command_timeout); it may still carry out "
                    "what it was sent when it wakes",
                    path=self.path,
                ) from exc

    def _writable(self) -> None:
        if self.read_only:
            raise JournalError(f"journal {self.path} was opened read-only", path=self.path)

    @contextlib.contextmanager
    def _transaction(self, action: str, *, durable: bool = True) -> Iterator[Any]:
        """A transaction; its commit waits for the server's WAL flush when `durable`."""
        self._writable()
        with self._connection(action) as conn, conn.transaction():
            cur = conn.cursor()
            if not durable:  # the session's commits are synchronous (`options`)
                cur.execute("SET LOCAL synchronous_commit = off")
            yield cur

    def _run(self, action: str, flow: _Flow[T]) -> T:
        """Carry a flow out on a connection of the pool."""
        with self._connection(action) as conn:
            return _drive(conn, flow)

    async def _arun(self, action: str, flow: _Flow[T]) -> T:
        """Carry a flow out on an async connection of the running loop: no worker thread."""
        if self._closed:
            flow.close()
            raise JournalError(f"journal {self.path} is closed", path=self.path)
        loop = asyncio.get_running_loop()
        with self._async_lock:
            mine = self._async.get(loop)
            if mine is None:
                mine = self._async[loop] = _LoopConnections(self._pool_size)
                weakref.finalize(loop, _finish_all, mine.idle)
        with self._as_journal_error(action):
            async with mine.permits:
                conn = mine.idle.pop() if mine.idle else await self._aconnect()
                watch = None
                try:
                    with self._watched(conn, action) as watch:
                        return await _adrive(conn, flow)
                finally:
                    if conn.broken or conn.closed or self._closed or (watch and watch.fired):
                        _finish_all([conn])
                    else:
                        mine.idle.append(conn)

    async def _aconnect(self) -> psycopg.AsyncConnection[Any]:
        conn: psycopg.AsyncConnection[Any] = await self._driver.AsyncConnection.connect(
            self.dsn, **self._connect_kwargs
        )
        return conn

    def _read(
        self,
        action: str,
        sql: str,
        params: Sequence[Any] = (),
        *,
        flush: bool = True,
        long: bool = False,
    ) -> list[tuple[Any, ...]]:
        """Rows read; for a list (`flush`), the completions of this process written first,
        so that it sees its own answers. A read of one operation need not wait for them: it
        lays them over the row instead (`_as_written`).

        A `long` read (a resume's backlog, with the bodies) may take ten times the command
        timeout, and the server does not cut it short: thousands of requests may take
        longer than one command timeout to arrive, while the server is sending."""
        if flush:
            for journal in self._siblings():
                journal.flush()
        if not long:
            with self._connection(action) as conn:
                return cast("list[tuple[Any, ...]]", conn.execute(sql, params).fetchall())
        with self._connection(action, patience=_LIST_PATIENCE) as conn, conn.transaction():
            conn.execute(_UNBOUNDED.text)
            return cast("list[tuple[Any, ...]]", conn.execute(sql, params).fetchall())

    def _siblings(self) -> list[PostgresJournal]:
        """The open journals of this process on these tables, this one first."""
        return [self] + [j for j in list(_open) if j is not self and j._identity == self._identity]

    def _unwritten_of(self, key: str | None = None) -> list[tuple[Any, ...]]:
        """The completions (of `key`, else all) that this process holds, not committed yet,
        by any of its journals on these tables."""
        found: list[tuple[Any, ...]] = []
        for journal in self._siblings():
            with journal._held_lock:
                if key is None:
                    found.extend(journal._unwritten.values())
                elif (params := journal._unwritten.get(key)) is not None:
                    found.append(params)
        return found

    @staticmethod
    def _as_written(row: Any, unwritten: Sequence[tuple[Any, ...]]) -> Any:
        """A row of `COLUMNS` as it is once the completions of this process are written:
        the one fenced to this row's lease version, if it is still pending, is laid over it
        (what the batched UPDATE in `flush` will do to it, and only that)."""
        if row is None or row[2] != "pending":
            return row
        for state, updated_at, status, headers, body, kept, key, version in unwritten:
            if key == row[1] and version == row[14]:
                row = list(row)
                row[2], row[7], row[8], row[9] = state, updated_at, status, None
                row[12], row[13], row[15], row[16], row[17] = None, None, headers, body, kept
                return tuple(row)
        return row

    # -- schema ---------------------------------------------------------------------------

    def _server_time(self) -> float:
        """The database server's clock, as this host reckons it."""
        return time.time() + self._offset

    def _measure_offset(self, conn: psycopg.Connection[Any]) -> None:
        """How far the server's clock is from this host's, from one round trip."""
        before = time.time()
        row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
        after = time.time()
        if row is not None:
            self._offset = float(row[0]) - (before + after) / 2

    def _on_upkeep(self) -> None:
        if self._server_clock:
            with self._connection("read the server's clock") as conn:
                self._measure_offset(conn)

    def _open(self, retention: timedelta | None) -> timedelta:
        # not cut short by the command timeout: it may wait for other processes creating or
        # upgrading the schema, and an upgrade may copy a large table
        with self._connection("open the journal", patience=None) as conn:
            if self._server_clock:
                self._measure_offset(conn)
            if self.read_only:
                exists = conn.execute("SELECT to_regclass(%s)", (self._settings,)).fetchone()
                if exists is None or exists[0] is None:
                    raise JournalError(
                        f"journal {self.path}: no idemclient journal in schema {self.schema!r}",
                        path=self.path,
                    )
                return self._check(conn, retention)
            with conn.transaction():
                conn.execute(_UNBOUNDED.text)
                # creators (and migrators) take turns, whoever comes first creates
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._settings,))
                exists = conn.execute("SELECT to_regclass(%s)", (self._settings,)).fetchone()
                if exists is None or exists[0] is None:
                    # a schema made for it beforehand (by a role that may create schemas,
                    # for one that may not) is used as it is
                    found = conn.execute("SELECT to_regnamespace(%s)", (f'"{self.schema}"',))
                    if (found.fetchone() or (None,))[0] is None:
                        conn.execute(f'CREATE SCHEMA "{self.schema}"')
                    for statement in _schema_sql(self.schema):
                        conn.execute(statement)
                    kept = retention or DEFAULT_RETENTION
                    conn.execute(
                        f"INSERT INTO {self._settings} VALUES ('schema_version', %s), "
                        "('retention_seconds', %s)",
                        (str(SCHEMA_VERSION), repr(kept.total_seconds())),
                    )
                self._migrate(conn)
                return self._check(conn, retention)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        """Bring an older schema forward (in the caller's transaction, under its lock)."""
        found = conn.execute(
            f"SELECT value FROM {self._settings} WHERE name = 'schema_version'"
        ).fetchone()
        version = int(found[0]) if found else 0
        if not 1 <= version < SCHEMA_VERSION:
            return  # current, or newer: `_check` says so
        for step in range(version, SCHEMA_VERSION):
            logger.info("journal %s: upgrading from schema version %d", self.path, step)
            for statement in _MIGRATIONS[step](self.schema):
                conn.execute(statement)
        conn.execute(
            f"UPDATE {self._settings} SET value = %s WHERE name = 'schema_version'",
            (str(SCHEMA_VERSION),),
        )

    def _check(self, conn: psycopg.Connection[Any], retention: timedelta | None) -> timedelta:
        settings = dict(conn.execute(f"SELECT name, value FROM {self._settings}").fetchall())
        version = int(settings.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} (schema {self.schema!r}) was written by a newer "
                f"idemclient (version {version}; this one knows up to {SCHEMA_VERSION}): "
                "upgrade idemclient",
                path=self.path,
            )
        if version < _READABLE_FROM:  # only a read-only look: a writer has upgraded it
            raise JournalError(
                f"journal {self.path} (schema {self.schema!r}) has schema version {version} "
                f"and must be upgraded to {SCHEMA_VERSION} first: open it once with a role "
                "that may write it",
                path=self.path,
            )
        if "retention_seconds" not in settings:
            raise JournalError(
                f"journal {self.path} (schema {self.schema!r}) is damaged: its settings "
                "lack the retention; it was left untouched",
                path=self.path,
            )
        stored = timedelta(seconds=float(settings["retention_seconds"]))
        if retention is not None and abs(retention - stored) > timedelta(milliseconds=1):
            raise ValueError(
                f"journal {self.path} keeps a retention of {stored}, not {retention}: use "
                "set_retention() (or `idemclient retention --set`) to change it"
            )
        return stored

    def set_retention(self, retention: timedelta) -> None:
        if retention <= timedelta(0):
            raise ValueError("retention must be positive")
        with self._transaction("set the retention") as cur:
            cur.execute(
                f"UPDATE {self._settings} SET value = %s WHERE name = 'retention_seconds'",
                (repr(retention.total_seconds()),),
            )
        self.retention = retention

    # -- one operation's life -------------------------------------------------------------

    def _limits(self) -> Limits:
        return Limits(self.retention, self.max_recoveries, owner_alive)

    def _row(self, column: str, value: str, *, skip_locked: bool = False) -> _Flow[Any]:
        """The row, locked for this transaction, as it is once this process's completions
        are written. Those are looked up after the read: a completion of this row cannot be
        committed in between, its UPDATE waits for the lock this read takes."""
        lock = "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"
        where = f"{column} = %s"
        if column == "given up":  # the operation that gave this key up (`reissue`)
            where = f"id = (SELECT id FROM {self._retired_table} WHERE key = %s)"
        # with the retention as the settings keep it now (another process may have changed
        # it): the rules decide on this row with it
        rows, _ = yield _Sql(
            f"SELECT {COLUMNS}, (SELECT value FROM {self._settings} WHERE name = "
            f"'retention_seconds') FROM {self._table} WHERE {where} {lock}",
            (value,),
        )
        if not rows:
            return None
        *row, retention = rows[0]
        if retention is not None:
            self.retention = timedelta(seconds=float(retention))
        return self._as_written(tuple(row), self._unwritten_of(row[1]))

    def _locked_elsewhere(self, column: str, value: str) -> _Flow[Any]:
        """The row that `FOR UPDATE SKIP LOCKED` skipped: another resumer is claiming it."""
        rows, _ = yield _Sql(f"SELECT {COLUMNS} FROM {self._table} WHERE {column} = %s", (value,))
        return rows[0] if rows else None

    def register(self, record: RequestRecord, owner: str, lease_seconds: float) -> Registration:
        (result,) = self.register_many([(record, owner, lease_seconds)])
        if isinstance(result, JournalError):
            raise result
        return result

    def register_many(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        *,
        arrived: Sequence[float] | None = None,
    ) -> list[Registration | JournalError]:
        """New operations inserted together: one statement, one synchronous commit (rows
        already taken are decided alone); every other registration its own durable
        transaction. A failed one stops only itself, unless its error says the server is out
        of reach (then the rest fail with it, instead of each waiting as long again).

        Threads that register at the same time are gathered (`Together`): while one batch
        is committed, the registrations that arrive wait, and go together in the next one.
        Each thread returns once its own are committed (or have failed). One that waited
        for a batch that found the server out of reach fails with it, without being tried:
        no thread waits more than about one `command_timeout` for an unreachable server.
        `arrived`: when each was asked for, if before this call (`time.monotonic()`; the
        async transport's tasks queue before it calls)."""
        return self._held_ones(requests, self._together.run(_arrivals(requests, arrived)))

    def _held_ones(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        results: list[Registration | JournalError],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[Registration | JournalError]:
        """`results`, those that send held (their leases renewed) until they are recorded,
        released or given back; for tasks of `loop`, if given."""
        for (_, owner, lease_seconds), result in zip(requests, results, strict=True):
            if isinstance(result, Registration):
                self._holding(result, owner, self._lease(lease_seconds), loop)
        return results

    def _register_now(
        self, items: Sequence[tuple[float, tuple[RequestRecord, str, float]]]
    ) -> list[Registration | JournalError]:
        """`register_many` for one batch (each request with the moment it arrived)."""
        results, tried = self._not_waited(items)
        if tried:
            self._tried(results, tried, self._register_batch([items[i][1] for i in tried]))
        return cast("list[Registration | JournalError]", results)

    def _not_waited(
        self, items: Sequence[tuple[float, tuple[RequestRecord, str, float]]]
    ) -> tuple[list[Registration | JournalError | None], list[int]]:
        """The results of a batch so far, and which of its requests to try. Those that
        arrived before the last batch that found the server out of reach ended waited for it:
        they fail with its error, not tried again (each would wait another command timeout)."""
        outage = self._outage
        results: list[Registration | JournalError | None] = [None] * len(items)
        tried: list[int] = []
        for i, (arrived, _) in enumerate(items):
            if outage is not None and arrived < outage[0]:
                results[i] = self._waited_for(outage[1])
            else:
                tried.append(i)
        return results, tried

    def _tried(
        self,
        results: list[Registration | JournalError | None],
        tried: list[int],
        done: list[Registration | JournalError],
    ) -> None:
        """Fill in the `results` of the requests `tried`; if the server was out of reach,
        note when that was found (`_not_waited`)."""
        for i, result in zip(tried, done, strict=True):
            results[i] = result
        lost = [r for r in done if isinstance(r, JournalError) and self._out_of_reach(r)]
        if lost:
            self._outage = (time.monotonic(), lost[0])

    def _waited_for(self, error: JournalError) -> JournalError:
        """The error of a registration that waited for a batch that failed with `error`
        (the server out of reach), and is not tried again."""
        waited = JournalError(
            f"{error} (this registration waited for that one, and was not tried again)",
            path=self.path,
        )
        waited.__cause__ = error.__cause__
        return waited

    def _register_batch(
        self, requests: Sequence[tuple[RequestRecord, str, float]]
    ) -> list[Registration | JournalError]:
        """`register_many` for one batch, on one connection of the pool."""
        steps = self._registering(requests)
        try:
            call = next(steps)
            while True:
                try:
                    result = self._run(*call)
                except JournalError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as stop:
            return cast("list[Registration | JournalError]", stop.value)

    async def aregister_many(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        *,
        arrived: Sequence[float] | None = None,
    ) -> list[Registration | JournalError]:
        """`register_many` on async connections of the running loop (`AsyncJournalSteps`).
        Those `arrived` (monotonic) before the end of a batch that found the server out of
        reach waited for it: they fail with its error, not tried again."""
        results, tried = self._not_waited(_arrivals(requests, arrived))
        if tried:
            done = await self._aregister_batch([requests[i] for i in tried])
            self._tried(results, tried, done)
        done = cast("list[Registration | JournalError]", results)
        return self._held_ones(requests, done, asyncio.get_running_loop())

    async def _aregister_batch(
        self, requests: Sequence[tuple[RequestRecord, str, float]]
    ) -> list[Registration | JournalError]:
        """`_register_batch` on an async connection of the running loop."""
        steps = self._registering(requests)
        try:
            call = next(steps)
            while True:
                try:
                    result = await self._arun(*call)
                except JournalError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(result)
        except StopIteration as stop:
            return cast("list[Registration | JournalError]", stop.value)

    def _registering(
        self, requests: Sequence[tuple[RequestRecord, str, float]]
    ) -> Generator[tuple[str, _Flow[Any]], Any, list[Registration | JournalError | None]]:
        """What `register_many` does, as the calls to make (an action and its flow), each
        answered with its result or thrown its `JournalError`: the same for both drivers."""
        results: list[Registration | JournalError | None] = [None] * len(requests)
        failed: JournalError | None = None  # the server out of reach: for all that are left
        if len(requests) > 1:  # (one alone: `_register` inserts it as cheaply)
            try:
                yield "register the operations", self._insert_new(requests, results)
            except JournalError as exc:  # then each is tried alone, for its own error
                failed = exc if self._out_of_reach(exc) else None
            claims = self._plain_claims(requests, results) if failed is None else {}
            if len(claims) > 1:  # (one alone: `_register` claims it as cheaply)
                try:
                    yield "claim the operations", self._claim_seen_many(claims, results)
                except JournalError as exc:
                    failed = exc if self._out_of_reach(exc) else None
            if failed is None and sum(result is None for result in results) > 1:
                try:
                    yield "look the operations up", self._settled_many(requests, results)
                except JournalError as exc:
                    failed = exc if self._out_of_reach(exc) else None
        for i, (record, owner, lease_seconds) in enumerate(requests):
            if results[i] is None:
                if failed is not None:
                    results[i] = failed
                    continue
                try:
                    results[i] = yield (
                        "register the operation",
                        self._register(record, owner, lease_seconds),
                    )
                except JournalError as exc:
                    results[i] = exc
                    failed = exc if self._out_of_reach(exc) else None
        return results

    def _settled_many(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        results: list[Registration | JournalError | None],
    ) -> _Flow[None]:
        """Decide, among the registrations not decided yet, those of operations that are
        finished already (a rerun of a batch that completed: each replays its answer), on
        their rows read in one statement, unlocked: a row that is no longer pending changes
        no more (but for a purge, a reissue or an unpark, and a decision read just before
        one of those was true when it was read). The others (new, pending) are left to
        `_register`, which decides on each row locked, one by one."""
        wanted = [(i, *request) for i, request in enumerate(requests) if results[i] is None]
        names = [record.name for _, record, _, _ in wanted if record.name is not None]
        keys = [record.key for _, record, _, _ in wanted]
        lay_over = self._laying_over()
        rows, _ = yield _Sql(
            f"SELECT {COLUMNS} FROM {self._table} WHERE name = ANY(%s) OR key = ANY(%s)",
            (names, keys),
        )
        rows = lay_over(rows)
        by_name = {row[0]: row for row in rows if row[0] is not None}
        by_key = {row[1]: row for row in rows}
        now, limits = self._clock(), self._limits()
        for i, record, owner, lease_seconds in wanted:
            look_by_name, look_by_key = _decide.lookups(record)
            name_row = by_name.get(record.name) if look_by_name and record.name else None
            key_row = by_key.get(record.key) if look_by_key else None
            row = name_row if record.name is not None else key_row
            if row is None or row[2] == "pending":
                continue  # new, or pending: decided locked
            decided = _decide.register(
                record,
                stored_row(name_row) if name_row is not None else None,
                stored_row(key_row) if key_row is not None else None,
                owner=owner, lease_seconds=lease_seconds, now=now, limits=limits,
            )  # fmt: skip
            if decided.write is None:
                results[i] = decided.registration

    def _out_of_reach(self, error: JournalError) -> bool:
        """Whether `error` says the server could not be reached or did not answer in time
        (no connection, the connection lost, the command timeout, a shutdown), not that one
        registration was wrong: then the others of its batch are not tried one by one, each
        waiting as long again, but fail with it."""
        cause, errors = error.__cause__, self._driver.errors
        if cause is None:  # the journal's own refusal (a key that collides, a closed journal)
            return False
        if isinstance(cause, self._pools.PoolTimeout):
            return True
        return type(cause) in (self._driver.OperationalError, self._driver.InterfaceError) or (
            isinstance(cause, (errors.QueryCanceled, errors.AdminShutdown, errors.CannotConnectNow))
        )

    def _insert_new(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        results: list[Registration | JournalError | None],
    ) -> _Flow[None]:
        """Insert the new operations among `requests` (two or more) in one statement: each
        inserted one's `results` entry becomes its registration. One whose name or key is
        taken (by a row, or by an earlier one of the batch) is left to `_register`."""
        batch: dict[str, tuple[int, RequestRecord, str, float]] = {}
        for i, (record, owner, lease_seconds) in enumerate(requests):
            if not record.resume and record.key not in batch:
                batch[record.key] = (i, record, owner, self._lease(lease_seconds))
        if len(batch) < 2:
            return  # one alone: `_register` inserts it as cheaply
        self._writable()
        now = self._clock()
        inserted = yield from self._insert([item[1:] for item in batch.values()], now)
        for key in inserted:
            i, record, _, _ = batch[key]
            results[i] = _decide.new_registration(record, now)

    def _lease(self, lease_seconds: float) -> float:
        """The lease asked for (the request's timeouts plus the default margin), with this
        journal's `lease_margin` instead."""
        return max(lease_seconds - DEFAULT_LEASE_MARGIN, 0.0) + self.lease_margin

    def _register(
        self, record: RequestRecord, owner: str, lease_seconds: float
    ) -> _Flow[Registration]:
        self._writable()
        lease_seconds = self._lease(lease_seconds)
        # A known operation that finished moments ago in this process is read as finished
        # (`_row` lays its completion over the row): no wait for the flusher.
        if not record.resume:  # the common case, a new operation: one INSERT, committed
            now = self._clock()
            if (yield from self._insert([(record, owner, lease_seconds)], now)):
                return _decide.new_registration(record, now)
        seen = self._seen.pop(record.key, None) if record.resume else None
        if seen is not None:
            claimed = yield from self._claim_seen(record, owner, lease_seconds, *seen)
            if claimed is not None:
                return claimed
        return (yield from self._carrying(self._register_known(record, owner, lease_seconds)))

    def _register_known(
        self, record: RequestRecord, owner: str, lease_seconds: float
    ) -> _Flow[Registration]:
        """The registration of an operation that may be known: decided on its rows, locked."""
        now = self._clock()
        by_name, by_key = _decide.lookups(record)
        name_row = key_row = None
        looked: list[tuple[str, str]] = []
        if by_name and record.name is not None:
            name_row = yield from self._row("name", record.name, skip_locked=record.resume)
            looked.append(("name", record.name))
        if by_key:
            key_row = yield from self._row("key", record.key, skip_locked=record.resume)
            looked.append(("key", record.key))
            if key_row is None and not record.resume:  # a key a reissued operation gave up
                key_row = yield from self._row("given up", record.key)
        if record.resume:  # a row skipped as locked: another resumer is claiming it
            for (column, value), found in zip(looked, (name_row, key_row), strict=False):
                busy = found or (yield from self._locked_elsewhere(column, value))
                if found is None and busy is not None:
                    return Registration(
                        Decision.IN_PROGRESS, operation(busy),
                        detail="being claimed by another resumer",
                    )  # fmt: skip
        decided = _decide.register(
            record,
            stored_row(name_row) if name_row is not None else None,
            stored_row(key_row) if key_row is not None else None,
            owner=owner, lease_seconds=lease_seconds, now=now, limits=self._limits(),
        )  # fmt: skip
        if isinstance(decided.write, Insert):
            if not (yield from self._insert([(record, owner, lease_seconds)], now)):
                raise JournalError(
                    f"journal {self.path}: operation key {record.key!r} collides with another",
                    path=self.path,
                )
            return decided.registration
        return (yield from self._store(decided, record.body))

    def _claim_seen(
        self, record: RequestRecord, owner: str, lease_seconds: float, row: Any, xmin: str
    ) -> _Flow[Registration | None]:
        """Claim a resumed operation as `pending_requests` read it: one UPDATE, committed,
        that changes the row only if no one has written it since (its `xmin`, the
        transaction that wrote this version of the row, is the same). `None` when the row
        changed, or the rules decided anything but a plain claim: the caller then decides
        on the row read again, locked (`FOR UPDATE SKIP LOCKED`).

        Two resumers that read the same backlog both try; one UPDATE wins, the other's finds
        a newer row and changes nothing, and its caller sees the winner's live lease."""
        decided = self._plain_claim(record, owner, lease_seconds, row)
        if decided is None:
            return None
        assert isinstance(decided.write, ClaimUpdate)
        within = _WITHIN_RETENTION.format(sent="first_sent_at", now="%s", settings=self._settings)
        _, count = yield _Sql(
            _CLAIM.format(table=self._table) + f" AND xmin = %s::xid AND {within}",
            (*_claim_values(decided.write), xmin, float(decided.write.updated_at)),
        )
        return decided.registration if count == 1 else None

    def _plain_claim(
        self, record: RequestRecord, owner: str, lease_seconds: float, row: Any
    ) -> Decided | None:
        """The rules' claim of a resumed operation on the row `pending_requests` read, if
        they decide a plain claim (one UPDATE of that row); else `None`."""
        stored = stored_row(self._as_written(row, self._unwritten_of(row[1])))
        if stored.operation.state != "pending" or self.read_only:
            return None
        by_name, by_key = _decide.lookups(record)
        if by_name and stored.operation.name != record.name:
            return None
        decided = _decide.register(
            record, stored if by_name else None, stored if by_key else None,
            owner=owner, lease_seconds=lease_seconds, now=self._clock(), limits=self._limits(),
        )  # fmt: skip
        write = decided.write
        if not isinstance(write, ClaimUpdate) or write.compare_body:
            return None
        return decided

    def _plain_claims(
        self,
        requests: Sequence[tuple[RequestRecord, str, float]],
        results: list[Registration | JournalError | None],
    ) -> dict[str, tuple[int, Decided, str]]:
        """The resumed operations among `requests` that the rules would claim plainly on
        the rows `pending_requests` read: key -> (index, decision, row version)."""
        claims: dict[str, tuple[int, Decided, str]] = {}
        for i, (record, owner, lease_seconds) in enumerate(requests):
            if results[i] is not None or not record.resume or record.key in claims:
                continue
            seen = self._seen.get(record.key)
            if seen is None:
                continue
            decided = self._plain_claim(record, owner, self._lease(lease_seconds), seen[0])
            if decided is not None:
                claims[record.key] = (i, decided, seen[1])
        return claims

    def _claim_seen_many(
        self,
        claims: dict[str, tuple[int, Decided, str]],
        results: list[Registration | JournalError | None],
    ) -> _Flow[None]:
        """`_claim_seen` for several resumed operations (`_plain_claims`) in one statement:
        each claimed one's `results` entry becomes its registration. The rows are locked in
        key order, skipping those another resumer is claiming (no two resumers wait on each
        other); those, and rows written since they were read, are left to `_register`, which
        reads them again, locked."""
        rows_of: list[tuple[Any, ...]] = []
        for _, decided, xmin in claims.values():
            assert isinstance(decided.write, ClaimUpdate)
            rows_of.append((*_claim_values(decided.write), xmin))
        for key in claims:
            self._seen.pop(key, None)  # tried: a row left out is read again, locked
        statement = _CLAIM_MANY.format(table=self._table, settings=self._settings)
        rows, _ = yield _Sql(statement, _columns(rows_of))
        for (key,) in rows:
            i, decided, _ = claims[key]
            results[i] = decided.registration

    def _insert(
        self, items: Sequence[tuple[RequestRecord, str, float]], now: float
    ) -> _Flow[set[str]]:
        """Insert new operations (record, owner, lease seconds), claimed: the keys of those
        inserted. One whose name or key is taken is not (a row another host is inserting at
        this moment is waited for, then counts as taken)."""
        rows, _ = yield _Sql(
            _INSERT.format(table=self._table, retired=self._retired_table),
            {
                "now": now,
                "name": [record.name for record, _, _ in items],
                "key": [record.key for record, _, _ in items],
                "method": [record.method for record, _, _ in items],
                "url": [record.url for record, _, _ in items],
                "headers": [
                    headers_json(record.headers, record.headers_encoding) for record, _, _ in items
                ],
                "body": [record.body for record, _, _ in items],
                "fingerprint": [record.fingerprint for record, _, _ in items],
                "owner": [owner for _, owner, _ in items],
                "expires": [now + lease_seconds for _, _, lease_seconds in items],
                "key_header": [record.key_header for record, _, _ in items],
                "key_style": [record.key_style for record, _, _ in items],
            },
        )
        return {row[0] for row in rows}

    def _store(self, decided: Decided, body: bytes = b"") -> _Flow[Registration]:
        write, registration = decided.write, decided.registration
        if isinstance(write, ClaimUpdate):
            yield _Sql(_CLAIM.format(table=self._table), _claim_values(write))
            if write.compare_body:
                rows, _ = yield _Sql(
                    f"SELECT body, headers FROM {self._table} WHERE key = %s", (write.key,)
                )
                stored_body, headers = rows[0]
                registration = _decide.with_stored_body(
                    registration, body, bytes(stored_body), headers_from_json(headers)[0]
                )
        elif isinstance(write, Expire):
            yield _Sql(
                f"UPDATE {self._table} SET state = 'expired', updated_at = %s, "
                "lease_owner = NULL, lease_expires = NULL WHERE key = %s",
                (write.updated_at, write.key),
            )
        elif isinstance(write, Park):
            yield _Sql(
                f"UPDATE {self._table} SET state = 'parked', recoveries = %s, updated_at = %s, "
                "lease_owner = NULL, lease_expires = NULL, last_error = %s WHERE key = %s",
                (write.recoveries, write.updated_at, write.reason, write.key),
            )
        else:
            assert write is None, write
        return registration

    def claim(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> Registration:
        flow = self._claim(key, version, owner, lease_seconds, last_error)
        claimed = self._run("claim the next attempt", flow)
        return self._holding(claimed, owner, self._lease(lease_seconds))

    async def aclaim(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> Registration:
        """`claim` on an async connection of the running loop (`AsyncJournalSteps`)."""
        flow = self._claim(key, version, owner, lease_seconds, last_error)
        claimed = await self._arun("claim the next attempt", flow)
        return self._holding(claimed, owner, self._lease(lease_seconds), asyncio.get_running_loop())

    def _claim(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> _Flow[Registration]:
        self._writable()
        lease_seconds = self._lease(lease_seconds)
        return self._carrying(self._claim_locked(key, version, owner, lease_seconds, last_error))

    def _claim_locked(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> _Flow[Registration]:
        # another holder in this process may have finished it: `_row` sees that
        row = yield from self._row("key", key)
        if row is None:
            raise JournalError(
                f"journal {self.path}: operation with key {key!r} is no longer in the "
                "journal; not resent",
                path=self.path,
            )
        decided = _decide.claim(
            stored_row(row), version, owner=owner, lease_seconds=lease_seconds,
            last_error=last_error, now=self._clock(), limits=self._limits(),
        )  # fmt: skip
        return (yield from self._store(decided))

    def unclaim(self, key: str, version: int, *, fresh: bool, never_sent: bool = False) -> None:
        self._let_go(key, version)
        flow = self._unclaim(key, version, fresh, never_sent)
        self._run("give the unsent operation back", flow)

    async def aunclaim(
        self, key: str, version: int, *, fresh: bool, never_sent: bool = False
    ) -> None:
        """`unclaim` on an async connection of the running loop (`AsyncJournalSteps`)."""
        self._let_go(key, version)
        flow = self._unclaim(key, version, fresh, never_sent)
        await self._arun("give the unsent operation back", flow)

    def _unclaim(self, key: str, version: int, fresh: bool, never_sent: bool) -> _Flow[None]:
        self._writable()
        if fresh:
            sql = _Sql(
                f"DELETE FROM {self._table} WHERE key = %s AND lease_version = %s "
                "AND state = 'pending'",
                (key, version),
            )
        else:
            sql = _Sql(
                f"UPDATE {self._table} SET first_sent_at = CASE WHEN %s OR attempts <= 1 "
                "THEN NULL ELSE first_sent_at END, attempts = GREATEST(attempts - 1, 0), "
                "lease_owner = NULL, lease_expires = NULL, lease_version = lease_version + 1, "
                "updated_at = %s, last_error = 'cancelled before it was sent' "
                "WHERE key = %s AND lease_version = %s AND state = 'pending'",
                (never_sent, self._clock(), key, version),
            )
        yield from self._carrying(_one(sql), durable=False)

    def release(
        self,
        key: str,
        version: int,
        last_error: str | None,
        *,
        moved_fingerprint: str | None = None,
        never_sent: bool = False,
    ) -> bool:
        self._let_go(key, version)
        flow = self._release(key, version, last_error, moved_fingerprint, never_sent)
        return self._run("release the operation", flow)

    async def arelease(
        self,
        key: str,
        version: int,
        last_error: str | None,
        *,
        moved_fingerprint: str | None = None,
        never_sent: bool = False,
    ) -> bool:
        """`release` on an async connection of the running loop (`AsyncJournalSteps`)."""
        self._let_go(key, version)
        flow = self._release(key, version, last_error, moved_fingerprint, never_sent)
        return await self._arun("release the operation", flow)

    def _release(
        self,
        key: str,
        version: int,
        last_error: str | None,
        moved_fingerprint: str | None,
        never_sent: bool,
    ) -> _Flow[bool]:
        self._writable()
        sql = _Sql(
            f"UPDATE {self._table} SET lease_owner = NULL, lease_expires = NULL, "
            "updated_at = %s, last_error = %s, "
            "moved_fingerprint = COALESCE(%s, moved_fingerprint), "
            "first_sent_at = CASE WHEN %s THEN NULL ELSE first_sent_at END "
            "WHERE key = %s AND lease_version = %s",
            (self._clock(), last_error, moved_fingerprint, never_sent, key, version),
        )
        count = yield from self._carrying(_one(sql), durable=False)
        return count == 1

    # -- completions: held, written together ------------------------------------------------

    def finish(
        self,
        key: str,
        version: int,
        state: Literal["completed", "conflict"],
        response: StoredResponse,
        *,
        streamed: bool = False,
    ) -> None:
        """Record the final response, soon: held in memory and written with others by a
        background thread within `flush_delay` (no network I/O on the caller's path), and
        before any read through this journal, by `flush()`, `close()` and at exit."""
        self._let_go(key, version)
        body, kept = response.body, response.body_kept
        if len(body) > (self.max_stream_body if streamed else self.max_response_body):
            body, kept = b"", False
        headers = headers_json(response.headers, response.encoding)
        params = (state, self._clock(), response.status, headers, body, int(kept), key, version)
        with self._held_lock:
            if self._closed:
                raise JournalError(
                    f"journal {self.path} is closed: the answer for key {key} was not "
                    "recorded; the operation stays pending (a resume gets the server's replay)",
                    path=self.path,
                )
            self._held.append(params)
            self._unwritten[key] = params
            self._held_ready.notify()
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="idemclient-journal-flush pg", daemon=True
                )
                self._flusher.start()

    def flush(self) -> None:
        """Write the held completions now; when it returns, every completion held before the
        call is committed (one being written by the flusher included)."""
        if not self._held and not self._writing.locked():
            return  # nothing held, nothing being written: no lock for the readers to share
        with self._writing:
            with self._held_lock:
                items, self._held = self._held, []
            if not items:
                return
            try:
                with self._connection("record responses") as conn:
                    for sql in self._finish_statements(items):
                        conn.execute(sql.text, sql.params)  # one round trip for a chunk
            except BaseException:
                with self._held_lock:  # not written: kept for the next try
                    self._held[:0] = items
                raise
            self._written(items)

    def _finish_statements(
        self, items: Sequence[tuple[Any, ...]], *, waitless: bool = False
    ) -> list[_Sql]:
        """The statements that write held completions (`finish`'s parameters), up to 500 a
        statement, each returning the keys it wrote. Each is fenced (the same lease version,
        still pending), so that writing one again, or after another holder took the
        operation over, changes nothing. A `waitless` one skips the rows other transactions
        have locked (they stay held, for the flusher), so that it never waits while its
        transaction holds locks: a carried write takes part in no deadlock."""
        skip = (
            f" AND t.key IN (SELECT key FROM {self._table} WHERE key = ANY(%s::text[]) "
            "FOR UPDATE SKIP LOCKED)"
        )
        statements = []
        for start in range(0, len(items), _ROWS_PER_STATEMENT):
            chunk = items[start : start + _ROWS_PER_STATEMENT]
            params = _columns(chunk)
            if waitless:
                params.append(params[6])
            statements.append(
                _Sql(
                    f"UPDATE {self._table} AS t SET state = v.state, updated_at = v.updated_at, "
                    "response_status = v.status, response_headers = v.headers, "
                    "response_body = v.body, response_body_kept = v.kept, lease_owner = NULL, "
                    "lease_expires = NULL, last_error = NULL FROM unnest(%b::text[], "
                    "%b::float8[], %b::int[], %b::text[], %b::bytea[], %b::int[], %b::text[], "
                    "%b::int[]) AS v(state, updated_at, status, headers, body, kept, key, version) "
                    "WHERE t.key = v.key AND t.lease_version = v.version AND t.state = 'pending'"
                    + (skip if waitless else "")
                    + " RETURNING t.key",
                    params,
                )
            )
        return statements

    def _carrying(
        self, body: _Flow[T], *, durable: bool = True, unbounded: bool = False
    ) -> _Flow[T]:
        """`body` in one transaction, committed (synchronously, when `durable`), that also
        writes the completions this journal holds: a process killed moments after its
        answers arrived keeps those a later write carried (else a rerun would take each for
        a recovery from a crash, and in a crash loop park operations that had their answers).

        The carried completions are written after the body, without waiting for a row lock
        (`waitless`); until the commit they stay held, and `flush()` writes them too if it is
        called meanwhile (again, harmlessly: the write is fenced)."""
        yield _BEGIN
        if not durable:
            yield _RELAXED
        if unbounded:
            yield _UNBOUNDED
        result = yield from body
        with self._held_lock:
            carried = list(self._held)
        written: set[str] = set()
        for sql in self._finish_statements(carried, waitless=True):
            rows, _ = yield sql
            written.update(row[0] for row in rows)
        yield _COMMIT
        if written:
            self._written([params for params in carried if params[6] in written])
        return result

    def _written(self, items: Sequence[tuple[Any, ...]]) -> None:
        """Completions committed (or fenced out): no longer held, and the rows say them."""
        done = {id(params) for params in items}
        with self._held_lock:
            self._held = [params for params in self._held if id(params) not in done]
            for params in items:
                if self._unwritten.get(params[6]) is params:
                    del self._unwritten[params[6]]

    def _flush_loop(self) -> None:
        delay = self.flush_delay
        while True:
            with self._held_lock:
                while not self._held:
                    if self._closed or not self._held_ready.wait(timeout=30.0):
                        self._flusher = None
                        return
            time.sleep(delay)
            try:
                self.flush()
            except JournalError as exc:
                if self._closed:
                    return
                if delay == self.flush_delay:
                    logger.warning("journal %s: could not write responses: %s", self.path, exc)
                delay = min(delay * 2 or 0.05, 5.0)
            else:
                delay = self.flush_delay

    def close(self) -> None:
        if self._closed:
            return
        self._stop_upkeep()
        try:
            if not self.read_only:
                self.flush()
        finally:
            with self._held_lock:
                self._closed = True
                self._held_ready.notify_all()
            self._pool.close()
            with self._async_lock:
                for mine in list(self._async.values()):
                    _finish_all(mine.idle)
            _open.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading back ---------------------------------------------------------------------

    def size_bytes(self) -> int:
        """The journal's tables on the server, indexes included, in bytes."""
        rows = self._read(
            "measure the journal",
            "SELECT pg_total_relation_size(%s) + pg_total_relation_size(%s)",
            (self._table, self._settings),
        )
        return int(rows[0][0])

    # -- upkeep ---------------------------------------------------------------------------

    def expire_stale(self, select: Callable[[Operation], bool] | None = None) -> list[Operation]:
        now = self._clock()
        cutoff = now - self.refresh_retention().total_seconds()
        with self._transaction("expire stale operations") as cur:
            cur.execute(
                f"SELECT {COLUMNS} FROM {self._table} WHERE state = 'pending' "
                "AND first_sent_at IS NOT NULL AND first_sent_at < %s ORDER BY created_at "
                "FOR UPDATE SKIP LOCKED",
                (cutoff,),
            )
            # not one whose answer this process holds: it is finished, not stale
            rows = [r for r in cur.fetchall() if r == self._as_written(r, self._unwritten_of(r[1]))]
            chosen = [op for op in map(operation, rows) if select is None or select(op)]
            keys = [op.key for op in chosen]
            if keys:
                cur.execute(
                    f"UPDATE {self._table} SET state = 'expired', updated_at = %s, "
                    "lease_owner = NULL, lease_expires = NULL WHERE key = ANY(%s) "
                    f"RETURNING {COLUMNS}",
                    (now, keys),
                )
                return sorted((operation(r) for r in cur.fetchall()), key=lambda o: o.created_at)
        return []

    def _change_state(
        self,
        name_or_key: str,
        verb: str,
        allowed: tuple[State, ...],
        sets: str,
        *params: Any,
        also: Also | None = None,
    ) -> Operation:
        self._writable()
        flow = self._carrying(self._changed(name_or_key, verb, allowed, sets, params, also))
        return self._run(f"{verb} the operation", flow)

    def _changed(
        self,
        name_or_key: str,
        verb: str,
        allowed: tuple[State, ...],
        sets: str,
        params: Any,
        also: Also | None,
    ) -> _Flow[Operation]:
        row = (yield from self._row("name", name_or_key)) or (
            yield from self._row("key", name_or_key)
        )
        if row is None:
            raise KeyError(name_or_key)
        if row[2] not in allowed:
            raise ValueError(
                f"operation {name_or_key!r} is {row[2]}: only {', '.join(allowed)} "
                f"operations can be given to {verb}"
            )
        rows, _ = yield _Sql(
            f"UPDATE {self._table} SET {sets} WHERE key = %s RETURNING {COLUMNS}",
            (*params, row[1]),
        )
        if also is not None:
            yield _Sql(*also(row))
        if rows[0][1] != row[1]:  # reissued: its old key is refused to new operations
            yield _Sql(
                f"INSERT INTO {self._retired_table} (key, id) SELECT %s, id FROM {self._table} "
                "WHERE key = %s ON CONFLICT (key) DO UPDATE SET id = excluded.id",
                (row[1], rows[0][1]),
            )
        return operation(rows[0])

    # -- what `ReadBack` asks of a backend ----------------------------------------------

    _mark = "%s"
    _backlog_columns = ", xmin::text"

    def _saw_backlog(self, rows: list[tuple[Any, ...]]) -> None:
        """Kept, with their row versions (`xmin`): what a resume's claim of one of them
        compares against instead of locking it (`_claim_seen`)."""
        n = len(COLUMNS.split(","))
        self._seen = {r[1]: (r[:n], r[n]) for r in rows}

    def _among(self, values: list[str]) -> tuple[str, Sequence[Any]]:
        """`= ANY(%s)` with one array: one statement text (prepared once) for any number."""
        return "= ANY(%s)", (values,)

    def _read_operations(
        self, action: str, sql: str, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Without waiting for the flusher: the completions of this process, taken before
        the read (one committed in between is in the row read), are laid over the rows."""
        lay_over = self._laying_over()
        return lay_over(self._read(action, sql, params, flush=False))

    def _laying_over(self) -> Callable[[Sequence[Any]], list[Any]]:
        """What lays the completions this process holds now (taken before a read: one
        committed in between is in the rows read) over rows of `COLUMNS` read after."""
        held: dict[str, list[tuple[Any, ...]]] = {}
        for completion in self._unwritten_of():
            held.setdefault(completion[6], []).append(completion)
        return lambda rows: [self._as_written(row, held.get(row[1], ())) for row in rows]

    def _write_statement(
        self, action: str, sql: str, params: Sequence[Any], *, unbounded: bool = False
    ) -> int:
        for journal in self._siblings():  # held completions first: a purge must see them
            journal.flush()
        self._writable()
        flow = self._carrying(_one(_Sql(sql, params)), durable=False, unbounded=unbounded)
        with self._connection(action, patience=None if unbounded else 1.0) as conn:
            return _drive(conn, flow)

"""The SQLite journal: what was asked, under which key, and what came back.

The embedded `JournalBackend`. It decides nothing itself: a registration or a claim looks
the rows up, asks the rules (`_decide`), and stores what they say. What is SQLite's own lives
here: connections per thread, group commit of registrations, batched completions, fork
handling, and schema migrations.

One file, one table. Every read-then-write runs in an explicit `BEGIN IMMEDIATE` transaction
(a deferred transaction that later upgrades to a write fails at once with "database is
locked" instead of waiting). Every sqlite3 or OS error becomes a `JournalError` naming the file,
in one place: `_errors_as_journal_error`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import platformdirs

if TYPE_CHECKING:
    from typing_extensions import Self

from idemclient._errors import JournalError
from idemclient._records import (
    JournalStats,
    Operation,
    Registration,
    RequestRecord,
    State,
    StoredResponse,
)

from . import _decide
from ._decide import DEFAULT_PURGE_HORIZON, DEFAULT_RETENTION
from ._owner import owner_alive
from ._readback import Also, ReadBack, checked_auto_purge
from ._rows import (
    COLUMNS,
    headers_from_json,
    headers_json,
    operation,
    stored_row,
)

__all__ = ["SCHEMA_VERSION", "Journal", "default_journal_path"]

#: Bumped by every schema change; migrations go forward only (`_MIGRATIONS`).
SCHEMA_VERSION = 5
#: the oldest version a read-only look reads as it is (version 5 added only what writers use)
_READABLE_FROM = 4
_SQLITE_MAGIC = b"SQLite format 3\x00"

_V2COLUMNS = """
    id              INTEGER PRIMARY KEY,
    name            TEXT,                   -- NULL for an unnamed operation
    key             TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    method          TEXT NOT NULL,
    url             TEXT NOT NULL,          -- user info removed
    headers         TEXT NOT NULL,          -- JSON pairs, secrets removed
    body            BLOB NOT NULL,          -- the exact bytes sent on every attempt
    fingerprint     TEXT NOT NULL,          -- sha256 of method, URL and body
    attempts        INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    first_sent_at   REAL,                   -- NULL until the first claim: provably never sent
    lease_owner     TEXT,                   -- host:pid:process-start-time
    lease_expires   REAL,
    lease_version   INTEGER NOT NULL,       -- fences writes of a holder that was taken over
    response_status INTEGER,
    response_headers TEXT,
    response_body   BLOB,
    response_body_kept INTEGER,
    last_error      TEXT,
    recoveries      INTEGER NOT NULL DEFAULT 0,  -- claims that found the last holder gone
    -- previous_key: the key this one replaced (reissue)
    previous_key    TEXT"""
# Version 2's table: version 1 journals are first upgraded to it, then to the current one.
_TABLE_V2 = f"CREATE TABLE operations ({_V2COLUMNS}\n)"
_TABLE = f"""CREATE TABLE operations ({_V2COLUMNS},
    key_header      TEXT,                   -- the header that carries the key, and its style
    key_style       TEXT,                   -- (NULL: written before version 3)
    moved_fingerprint TEXT                  -- the request a 307/308 sent it on as
)"""
# Properties of the file that every client, resumer and the CLI must agree on (the retention).
_SETTINGS_TABLE = "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
# Decisions on expired operations (reconcile): who or what decided, when, what was found.
_DECISIONS = (
    "CREATE TABLE decisions (id INTEGER PRIMARY KEY, key TEXT NOT NULL, name TEXT, "
    "verdict TEXT NOT NULL, decided_by TEXT NOT NULL, decided_at REAL NOT NULL, detail TEXT)",
    "CREATE INDEX decisions_key ON decisions (key)",
)
# Names are unique among named operations; unnamed ones (most, in bulk use) stay out of the
# index, which spares each of their inserts an index write. Resume and expiry scan only
# pending rows, and purge only finished ones: that stays cheap however large the journal grows.
_INDEXES = (
    "CREATE UNIQUE INDEX operations_name ON operations (name) WHERE name IS NOT NULL",
    "CREATE INDEX operations_pending ON operations (created_at) WHERE state = 'pending'",
    "CREATE INDEX operations_finished ON operations (updated_at) WHERE state != 'pending'",
)


# Keys that operations gave up (`reissue`, a reconcile that found it not done), each with its
# operation's row: a request that still carries one (a caller's retry of the call that failed
# before a person reissued it, an SDK's stored key) is that operation, never a new one (it
# would be sent under the given-up key, and the operation again under its new key). The
# trigger turns the insert of such a key into an IntegrityError, as a taken key is.
_RETIRED = (
    "CREATE TABLE retired_keys (key TEXT PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TRIGGER operations_retired_key BEFORE INSERT ON operations "
    "WHEN EXISTS (SELECT 1 FROM retired_keys WHERE key = NEW.key) "
    "BEGIN SELECT RAISE(ABORT, 'the key was given up by its operation'); END",
)


def _create(db: sqlite3.Connection, table: str = _TABLE) -> None:
    db.execute(table)
    for index in _INDEXES:
        db.execute(index)


def _create_settings(db: sqlite3.Connection) -> None:
    db.execute(_SETTINGS_TABLE)


def _v3_to_v4(db: sqlite3.Connection) -> None:
    """Version 4 keeps the decisions taken on expired operations (`Journal.reconcile`)."""
    for statement in _DECISIONS:
        db.execute(statement)


def _v4_to_v5(db: sqlite3.Connection) -> None:
    """Version 5 keeps the keys that operations gave up (`retired_keys`), and refuses them
    to new operations. Those reissued before it are known by their `previous_key`."""
    for statement in _RETIRED:
        db.execute(statement)
    db.execute(
        "INSERT OR IGNORE INTO retired_keys (key, id) "
        "SELECT previous_key, id FROM operations WHERE previous_key IS NOT NULL"
    )


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 1 indexed every name, NULLs included (a column UNIQUE constraint, which only a
    rebuild removes): copy the rows into the version 2 table."""
    db.execute("ALTER TABLE operations RENAME TO operations_v1")
    db.execute("DROP INDEX IF EXISTS operations_pending")
    db.execute("DROP INDEX IF EXISTS operations_finished")
    _create(db, _TABLE_V2)
    db.execute("INSERT INTO operations SELECT * FROM operations_v1")
    db.execute("DROP TABLE operations_v1")


def _v2_to_v3(db: sqlite3.Connection) -> None:
    """Version 3 stores how each operation's key goes out (header, style) and the journal's
    retention (the opener's, or the default, is stored: see `Journal`)."""
    db.execute("ALTER TABLE operations ADD COLUMN key_header TEXT")
    db.execute("ALTER TABLE operations ADD COLUMN key_style TEXT")
    db.execute("ALTER TABLE operations ADD COLUMN moved_fingerprint TEXT")
    _create_settings(db)


#: from version N to N + 1, in the caller's transaction
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
    4: _v4_to_v5,
}


# A new operation, claimed: the parameters are `_new_row`'s.
_INSERT_INTO = (
    "INTO operations (name, key, state, method, url, headers, body, fingerprint, attempts, "
    "created_at, updated_at, first_sent_at, lease_owner, lease_expires, lease_version, "
    "key_header, key_style)"
)
_INSERT_VALUES = "(?, ?, 'pending', ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, 1, ?, ?)"
_INSERT_OR_IGNORE = f"INSERT OR IGNORE {_INSERT_INTO} VALUES {_INSERT_VALUES}"


_FINISH = (
    "UPDATE operations SET state = ?, updated_at = ?, response_status = ?, "
    "response_headers = ?, response_body = ?, response_body_kept = ?, "
    "lease_owner = NULL, lease_expires = NULL, last_error = NULL "
    "WHERE key = ? AND lease_version = ? AND state = 'pending'"
)

# Batches are written with one statement each: the sqlite3 module lets go of the GIL for every
# statement, and a thread that holds the write lock while it waits to get the GIL back (other
# threads are busy with HTTP) keeps every other registration waiting. Rows per statement stay
# under SQLite's oldest limit of 999 parameters.
_ROWS_PER_STATEMENT = 64
#: The WAL is checkpointed (copied into the database file, then reused from its start) by
#: the flusher thread, after a flush, once this many operations were registered since the
#: last checkpoint (about 1000 pages of WAL): not by the commit of a registration, which
#: would hold its request for the milliseconds the copy and its fsyncs take.
_CHECKPOINT_EVERY = 250
#: SQLite's own automatic checkpoint, at this many WAL pages, stays as a backstop: it bounds
#: the WAL when no flusher runs (registrations whose answers are never recorded).
_BACKSTOP_PAGES = 4000
# UPDATE ... FROM: SQLite 3.33 (2020) and newer; older libraries write completions one by one.
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _insert_rows(rows: int) -> str:
    """A plain INSERT of `rows` new operations: all or none (a known name or key aborts it)."""
    return f"INSERT {_INSERT_INTO} VALUES " + ", ".join([_INSERT_VALUES] * rows)


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _finish_rows(rows: int) -> str:
    """`_FINISH` for `rows` completions at once (the same parameters, row after row)."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return (
        "UPDATE operations SET state = v.column1, updated_at = v.column2, "
        "response_status = v.column3, response_headers = v.column4, response_body = v.column5, "
        "response_body_kept = v.column6, lease_owner = NULL, lease_expires = NULL, "
        f"last_error = NULL FROM (VALUES {values}) AS v WHERE operations.key = v.column7 "
        "AND operations.lease_version = v.column8 AND operations.state = 'pending'"
    )


def _new_row(
    record: RequestRecord, owner: str, lease_seconds: float, now: float
) -> tuple[Any, ...]:
    return (
        record.name, record.key, record.method, record.url,
        headers_json(record.headers, record.headers_encoding),
        record.body, record.fingerprint, now, now, now, owner, now + lease_seconds,
        record.key_header, record.key_style,
    )  # fmt: skip


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _ROWS_PER_STATEMENT] for i in range(0, len(items), _ROWS_PER_STATEMENT)]


# The writes the registration rules ask for (`_decide.Write`): SQL only stores.
_EXPIRE = (
    "UPDATE operations SET state = 'expired', updated_at = ?, lease_owner = NULL, "
    "lease_expires = NULL WHERE key = ?"
)
_PARK = (
    "UPDATE operations SET state = 'parked', recoveries = ?, updated_at = ?, "
    "lease_owner = NULL, lease_expires = NULL, last_error = ? WHERE key = ?"
)
_CLAIM = (
    "UPDATE operations SET attempts = ?, lease_version = ?, lease_owner = ?, lease_expires = ?, "
    "updated_at = ?, recoveries = ?, first_sent_at = ?, url = ?, fingerprint = ?, "
    "last_error = ? WHERE key = ?"
)
logger = logging.getLogger("idemclient")
#: every Journal of this process that is not closed
_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()
#: the files whose journals hold answers not written yet (a strong reference, until written)
_unwritten: set[_SharedFile] = set()


@atexit.register
def _flush_at_exit() -> None:
    journals = list(_open_journals)
    for shared in list(_unwritten):
        journals.extend(j for j in shared.holders if not j._closed)
    for journal in journals:
        with contextlib.suppress(Exception):
            journal.flush()


class _SharedFile:
    """What every `Journal` of this process on one file shares: one per file and process.

    Two journals on one file (a worker that makes a client per job, a caller's journal beside
    a client's own) must see each other's answers at once: the completions held in memory
    live here, so a read or registration through either journal writes them first. They also
    take turns at writing under one lock, and one flusher thread writes for all of them.
    """

    def __init__(self, identity: tuple[int, int]) -> None:
        self.identity = identity  # (device, inode) of the file
        self.journals: weakref.WeakSet[Journal] = weakref.WeakSet()  # the open ones
        # This process's descriptor of the file, opened to create it and look at its first
        # bytes. Closing it while an SQLite connection of this process is open on the file
        # would drop every POSIX lock of the process on it, SQLite's own included: another
        # process closing its last connection would then delete the write-ahead log this one
        # is still writing to (its registrations lost to every reader). So it is closed only
        # once no journal and no connection (`_Connection`) of this process has the file
        # open (`_release_if_unused`), or with this object, which each of them holds.
        self.users = 0  # connections open, or being opened
        self.journals_open = 0
        self.fd_lock = threading.RLock()  # (a connection's finalizer may run in any thread)
        # the descriptor, in a box the finalizer can close without holding this object
        self._fd_box: list[int | None] = [None]
        weakref.finalize(self, _SharedFile._close_box, self._fd_box).atexit = False
        self.reset()

    @property
    def fd(self) -> int | None:
        return self._fd_box[0]

    @staticmethod
    def _close_box(box: list[int | None]) -> None:
        fd, box[0] = box[0], None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def keep(self, fd: int) -> None:
        """Keep `fd` as the file's descriptor (one more is closed now, if no connection of
        this process is open on the file, else kept open too)."""
        with self.fd_lock:
            old, self._fd_box[0] = self._fd_box[0], fd
            if old is not None:
                if self.users:
                    _kept_fds.append(old)  # (rare: a file reopened while connections are)
                else:
                    os.close(old)

    def linked(self) -> bool:
        """Whether the file this process holds is still in a directory (not deleted: its
        inode may be another file's by now)."""
        with self.fd_lock:
            return self.fd is not None and os.fstat(self.fd).st_nlink > 0

    def add_user(self) -> None:
        with self.fd_lock:
            self.users += 1

    def drop_user(self) -> None:
        """A connection of this process on the file closed."""
        with self.fd_lock:
            self.users = max(0, self.users - 1)
            self._release_if_unused()

    def opened(self) -> None:
        """A journal of this process opened the file."""
        with self.fd_lock:
            self.journals_open += 1

    def closed(self) -> None:
        """A journal of this process on the file was closed."""
        with self.fd_lock:
            self.journals_open = max(0, self.journals_open - 1)
            self._release_if_unused()

    def _release_if_unused(self) -> None:
        """Close the descriptor once no journal and no connection of this process has the
        file open: none holds a lock it could drop, and none checks the file's identity (an
        open journal keeps it, so that the inode cannot become another file's, made anew at
        the path, and pass for this one). A client per job leaves no descriptor behind."""
        if self.users == 0 and self.journals_open == 0:
            _SharedFile._close_box(self._fd_box)

    def reset(self) -> None:
        """Fresh locks and nothing held: at creation, and in a child after `fork()` (a lock
        that a parent's thread held at the fork would never be released in the child, and
        the parent's held completions are the parent's to write)."""
        self.write_lock = threading.Lock()
        self.deferred: list[tuple[Any, ...]] = []
        # The journals whose answers are held here, unwritten: kept alive until written, so
        # that a client dropped without close() (a client per job) does not lose them.
        self.holders: set[Journal] = set()
        self.deferred_lock = threading.Lock()
        self.deferred_ready = threading.Condition(self.deferred_lock)
        self.flusher_pid = 0
        self.flusher_idle = 30.0
        # operations registered through this file in this process, and that count at the
        # last checkpoint the flusher made (`_checkpoint_if_due`)
        self.registered = 0
        self.checkpointed = 0
        # reads in progress outside the write lock: a fork or a close waits for them to end
        # (`drain`), and while one waits (`draining`), no read starts
        self.readers = 0
        self.draining = 0
        self.reading = threading.Condition(threading.Lock())

    def drain(self) -> None:
        """Wait, holding `reading`, until no read is under way; none starts meanwhile, nor
        until `undrain` (the caller holds `reading` from here on)."""
        self.reading.acquire()
        self.draining += 1
        while self.readers:
            self.reading.wait()

    def undrain(self) -> None:
        """After `drain`: reads may start again."""
        self.draining -= 1
        self.reading.notify_all()
        self.reading.release()

    def any_open(self) -> Journal | None:
        for journal in list(self.journals):
            if not journal._closed:
                return journal
        return None


#: connections a forked child inherited: never used, never closed (closing one could end
#: what the parent's connection relies on); none, unless a fork found one it could not close
_inherited: list[sqlite3.Connection] = []
#: the journals that have opened connections in this process (open or not: one being opened)
_connected: weakref.WeakSet[Journal] = weakref.WeakSet()
_files_lock = threading.Lock()
_files: weakref.WeakValueDictionary[tuple[int, int], _SharedFile] = weakref.WeakValueDictionary()


_held_at_fork: list[Callable[[], None]] = []  # what releases what `_before_fork` took


def _before_fork() -> None:
    """Before a fork: let journal writes and reads in progress finish, start none until it
    is done, and close every SQLite connection of this process (each process opens its own
    again when it next uses a journal).

    SQLite keeps state per process and file (its locks, the WAL index) that a child would
    inherit with any connection left open. The child's own connections would then take no
    locks of their own: the parent closing its last connection would checkpoint and delete
    the WAL under the child's writes, and the child's registrations would be lost (and sent
    again by a rerun). A child inheriting a transaction in progress could never write."""
    _files_lock.acquire()
    for shared in list(_files.values()):
        shared.write_lock.acquire()
        _held_at_fork.append(shared.write_lock.release)
        shared.drain()
        _held_at_fork.append(shared.undrain)
    for journal in list(_connected):
        journal._close_connections(for_fork=True)


def _after_fork_in_parent() -> None:
    while _held_at_fork:
        _held_at_fork.pop()()
    _files_lock.release()


def _after_fork_in_child() -> None:
    """A child of `fork()` starts clean: its own locks, queues and threads, nothing of the
    parent's (gunicorn --preload, multiprocessing's fork start method)."""
    global _files_lock
    _held_at_fork.clear()  # the child's locks are new ones (reset below)
    _files_lock = threading.Lock()
    _unwritten.clear()
    for shared in list(_files.values()):
        shared.reset()
    for journal in list(_open_journals):
        journal._after_fork()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)


class _Connection(sqlite3.Connection):
    """An SQLite connection that tells its file's `_SharedFile` when it closes (explicitly,
    or collected unclosed): while any is open, the file's descriptor stays open."""

    _released: Callable[[], object]

    def close(self) -> None:
        super().close()  # (if this raises, it is not closed: its finalizer tells, later)
        released = getattr(self, "_released", None)
        if released is not None:
            released()


#: descriptors of a file replaced by another descriptor of it while connections were open:
#: never closed (see `_SharedFile.fd`)
_kept_fds: list[int] = []


class _ThreadConnection:
    """A thread's connection, held in the journal's thread-local storage."""

    __slots__ = ("__weakref__", "db", "generation", "pid", "wal")

    def __init__(self, pid: int, db: sqlite3.Connection, generation: int) -> None:
        self.pid = pid
        self.db = db
        self.generation = generation  # the journal's, when it was opened (see `_connection`)
        #: the write-ahead log this connection writes to (device, inode), once seen: SQLite
        #: never deletes it while a connection is open, so another one is someone's doing
        self.wal: tuple[int, int] | None = None


@dataclass
class _Ticket:
    """One registration waiting for a group commit."""

    record: RequestRecord
    owner: str
    lease_seconds: float
    result: Registration | None = None
    error: JournalError | None = None


def default_journal_path() -> Path:
    """`$IDEMCLIENT_JOURNAL` if set, else `journal.sqlite3` in the user state directory."""
    env = os.environ.get("IDEMCLIENT_JOURNAL")
    if env:
        if env.lower().startswith(("postgresql://", "postgres://")):
            raise JournalError(
                "IDEMCLIENT_JOURNAL names a PostgreSQL journal, and this is the SQLite one: "
                "open it with idemclient.open_journal() or PostgresJournal"
            )
        return Path(env).expanduser()
    return platformdirs.user_state_path("idemclient") / "journal.sqlite3"


class Journal(ReadBack):
    """The durable record of operations: one SQLite file in WAL mode.

    Args:
        path: the file; `None` means `$IDEMCLIENT_JOURNAL` or the user state directory.
            A missing parent directory is created with mode 0700, a new file with mode 0600.
        retention: how long the server keeps a key. A pending operation sent at least once
            and older than this becomes `expired` and is never resent automatically. It is a
            property of the file, so that every client, resumer and the command line agree:
            stored by whoever creates the journal (24 hours if not given), read from the file
            when `None`, changed only by `set_retention()`. A value that differs from the
            file's raises `ValueError`.
        durability: `"full"` fsyncs the register/claim commit before the request is sent (it
            survives a power loss); `"normal"` survives a crash of the process, not of the
            machine. Completion writes need no fsync: if one is lost, a resume resends the
            same key and the server replays its answer.
        busy_timeout: seconds to wait for another process's write lock before `JournalError`.
        max_response_body: bytes of a final response body kept for replays.
        max_stream_body: the same for an answer the caller streamed (server-sent events:
            a model's reply, a long listing), larger by default because streams are. An
            answer over its limit is recorded with its status and headers only; a rerun of
            it raises `ResponseNotKeptError` (unless empty replays were asked for).
        flush_delay: seconds a completion may wait in memory, gathering others to share one
            commit (see `finish`); if the process dies meanwhile, a resume gets the server's
            replay.
        max_recoveries: how many times an operation is taken over from a holder that vanished
            mid-operation (a crash, a kill) before it is `parked` for a person: an operation
            whose send keeps killing the process must not crash every rerun.
        read_only: open an existing journal for inspection only (`operations`, `get`,
            `pending`, `stored_response`): nothing is created, upgraded or written, so a user
            who may read the file but not write it can look into it.
        auto_purge: finished operations (completed, conflict, abandoned) last updated longer
            ago than this (30 days; never less than the retention) are deleted automatically,
            at most once a day per journal file (whichever process comes first), by a
            background thread: when the journal opens and hourly after. Pending, expired and
            parked operations are never purged. `None` turns it off (`purge()` by hand).

    Raises:
        JournalError: the file cannot be created or opened, is not an SQLite database, is
            corrupt, or comes from a newer idemclient. It is never replaced.

    Example:
        >>> journal = Journal("billing.sqlite3")
        >>> [op.name for op in journal.pending()]
        ['charge-41']
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        retention: timedelta | None = None,
        durability: Literal["full", "normal"] = "full",
        busy_timeout: float = 10.0,
        max_response_body: int = 1024 * 1024,
        max_stream_body: int = 16 * 1024 * 1024,
        max_recoveries: int = 3,
        flush_delay: float = 0.05,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
        auto_purge: timedelta | None = DEFAULT_PURGE_HORIZON,
    ) -> None:
        self.auto_purge = None if read_only else checked_auto_purge(auto_purge)
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        if retention is not None and retention <= timedelta(0):
            raise ValueError("retention must be positive")
        self.path = Path(path).expanduser() if path is not None else default_journal_path()
        self.durability = durability
        self.busy_timeout = busy_timeout
        self.max_response_body = max_response_body
        self.max_stream_body = max_stream_body
        self.max_recoveries = max_recoveries
        self.read_only = read_only
        self._clock = clock
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        # connections of threads that have ended, to close (appended by a finalizer: no lock)
        self._retired: list[tuple[int, sqlite3.Connection]] = []
        self._queue_lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self.flush_delay = flush_delay
        self._closing = False
        self._closed = False
        self._generation = 0  # one more each time every connection is closed for a fork
        self._shared = self._open_file()
        self._identity = self._shared.identity
        try:
            self.retention = self._open(retention)
        except BaseException:
            self._close_connections()
            self._shared.closed()
            raise
        if not read_only:  # the journals that may write what any of them holds
            self._shared.journals.add(self)
        _open_journals.add(self)
        self._start_upkeep()

    def __repr__(self) -> str:
        return f"<Journal {str(self.path)!r} durability={self.durability!r}>"

    @property
    def closed(self) -> bool:
        """Whether `close()` has begun: nothing more is written through this journal."""
        return self._closing

    def _after_fork(self) -> None:
        """In a child after `fork()`: fresh locks and queues; the parent's connections stay
        untouched (SQLite connections must not be used, nor closed, across a fork)."""
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue = []
        self._local = threading.local()
        self._retired = []

    # -- connections ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors_as_journal_error(self, action: str) -> Iterator[None]:
        """The one boundary where sqlite3 and OS errors become `JournalError`."""
        try:
            yield
        except sqlite3.Error as exc:
            raise JournalError(
                f"could not {action}: journal {self.path}: {exc}", path=str(self.path)
            ) from exc
        except OSError as exc:
            raise JournalError(
                f"could not {action}: journal {self.path}: {exc}", path=str(self.path)
            ) from exc

    def _open_file(self) -> _SharedFile:
        """Create the file if need be (not when read-only), check that it is SQLite's, and
        return what this process shares of it, with its identity (device, inode): a file
        deleted or replaced later is detected. Counted as open on it (`_SharedFile.opened`)
        from here on: a descriptor of it is never closed while a journal or a connection of
        this process is (see `_SharedFile.fd`)."""
        with self._errors_as_journal_error("open the journal"), _files_lock:
            try:
                found = os.stat(self.path)
            except FileNotFoundError:
                known = None
            else:
                known = _files.get((found.st_dev, found.st_ino))
            shared = None
            if known is not None:  # open here already: look through its descriptor
                with known.fd_lock:
                    if known.linked():
                        assert known.fd is not None
                        head = os.pread(known.fd, 20, 0)
                        known.opened()
                        shared = known
            if shared is None:
                if self.read_only:
                    fd = os.open(self.path, os.O_RDONLY)
                else:
                    parent = self.path.parent
                    if not parent.exists():
                        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                # (never closed here: a connection of this process may be open on the file)
                stat = os.fstat(fd)
                identity = (stat.st_dev, stat.st_ino)
                shared = _files.get(identity) or _SharedFile(identity)
                if shared.fd is not None and not shared.linked():  # a deleted file's inode
                    shared = _SharedFile(identity)
                _files[identity] = shared
                with shared.fd_lock:
                    shared.keep(fd)
                    shared.opened()
                head = os.pread(fd, 20, 0)
        try:
            if head and head[: len(_SQLITE_MAGIC)] != _SQLITE_MAGIC[: len(head)]:
                raise JournalError(
                    f"journal {self.path} is not an SQLite database; it was left untouched "
                    "(move it away or pass another path)",
                    path=str(self.path),
                )
            hot = Path(f"{self.path}-journal").exists()  # (only a writer can roll it back)
            if len(head) == 20 and head[18:20] != b"\x02\x02" and not hot:
                # An SQLite database not in WAL mode (every journal is): the first connection
                # would switch it to WAL, for good, before its tables are looked at. Look
                # first.
                self._look_before_wal()
        except BaseException:
            shared.closed()
            raise
        return shared

    def _look_before_wal(self) -> None:
        """Refuse, untouched, an SQLite database that is not an idemclient journal (another
        application's), or one of a newer idemclient, looking through a read-only
        connection: the journal's own would turn it to WAL mode at once."""
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
        with self._errors_as_journal_error("open the journal"):
            db = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout)
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = {
                    row[0]
                    for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
            finally:
                db.close()
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self.path} has schema version {version}, newer than this "
                f"idemclient understands ({SCHEMA_VERSION}): upgrade idemclient",
                path=str(self.path),
            )
        if tables and "operations" not in tables:
            raise JournalError(
                f"{self.path} is an SQLite database but not an idemclient journal (it has "
                f"tables {sorted(tables)}); it was left untouched",
                path=str(self.path),
            )

    def _check_identity(self) -> None:
        """Fail closed if the file was deleted or replaced while in use: writing on would
        record intents where no later run looks (a rerun would then send again)."""
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise JournalError(
                f"journal {self.path} is gone ({exc.strerror}): it was deleted or moved while "
                "in use; nothing was sent",
                path=str(self.path),
            ) from exc
        if (stat.st_dev, stat.st_ino) != self._identity:
            raise JournalError(
                f"journal {self.path} was replaced by another file while in use; nothing was "
                "sent (open the journal again to use the new file)",
                path=str(self.path),
            )

    def _wal_seen(self) -> tuple[int, int] | None:
        """The identity (device, inode) of the write-ahead log at the journal's path."""
        try:
            stat = os.stat(f"{self.path}-wal")
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def _check_wal(self) -> None:
        """Fail closed if this connection's write-ahead log was deleted or replaced while in
        use (a cleanup of what looked like temporary files): SQLite would go on appending
        intents to the unlinked file, which no other process and no later run reads."""
        holder: _ThreadConnection | None = getattr(self._local, "conn", None)
        if holder is None:
            return
        seen = self._wal_seen()
        if holder.wal is None:
            holder.wal = seen
        elif seen != holder.wal:
            raise JournalError(
                f"journal {self.path}: its write-ahead log ({self.path}-wal) was deleted or "
                "replaced while in use; nothing was sent (what was written to it since is "
                "lost to every other reader: open the journal again, and check what a rerun "
                "would send)",
                path=str(self.path),
            )

    def _open(self, retention: timedelta | None) -> timedelta:
        """Check the schema (create or upgrade it) and settle the retention."""
        with self._errors_as_journal_error("open the journal"), self._reading():
            db = self._connection()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} has schema version {version}, newer than this "
                    f"idemclient understands ({SCHEMA_VERSION}): upgrade idemclient",
                    path=str(self.path),
                )
            if version == 0 and self.read_only:
                tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                found = sorted(row[0] for row in tables)
                raise JournalError(
                    f"{self.path} is an SQLite database but not an idemclient journal (it "
                    f"has tables {found})"
                    if found
                    else f"journal {self.path} is empty: nothing has been journaled there yet",
                    path=str(self.path),
                )
            if version < SCHEMA_VERSION:
                if self.read_only and version >= _READABLE_FROM:
                    pass  # read as it is: what it lacks only writers use
                elif self.read_only:
                    raise JournalError(
                        f"journal {self.path} has schema version {version} and must be "
                        f"upgraded to {SCHEMA_VERSION} first: open it once with write access",
                        path=str(self.path),
                    )
                else:
                    self._migrate(db, retention)
            db.execute("SELECT 1 FROM operations LIMIT 1").fetchall()
            row = db.execute("SELECT value FROM settings WHERE name = 'retention'").fetchone()
        if row is None:  # only a read-only look at a journal nobody has written to yet
            return retention or DEFAULT_RETENTION
        stored = timedelta(seconds=float(row[0]))
        # stored as float seconds: equal within a millisecond is the same retention
        if retention is not None and abs(retention - stored) > timedelta(milliseconds=1):
            raise ValueError(
                f"journal {self.path} keeps keys for {stored} (a property of the file, set "
                f"when it was created), not {retention}: pass retention=None to use it, or "
                "change it for every user of the file with Journal.set_retention() or "
                "`idemclient retention`"
            )
        return stored

    def _migrate(self, db: sqlite3.Connection, retention: timedelta | None) -> None:
        try:
            # (inside: an interruption as it returns must not leave the write lock held)
            db.execute("BEGIN IMMEDIATE")
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current == 0:
                tables = db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                ).fetchall()
                if tables:
                    raise JournalError(
                        f"{self.path} is an SQLite database but not an idemclient journal "
                        f"(it has tables {sorted(t[0] for t in tables)}); it was left untouched",
                        path=str(self.path),
                    )
                _create(db)
                _create_settings(db)
                _v3_to_v4(db)
                _v4_to_v5(db)
            else:
                for version in range(current, SCHEMA_VERSION):
                    logger.info("journal %s: upgrading from schema version %d", self.path, version)
                    _MIGRATIONS[version](db)
            if current < SCHEMA_VERSION:  # not done by another process meanwhile
                seconds = (retention or DEFAULT_RETENTION).total_seconds()
                db.execute(
                    "INSERT OR IGNORE INTO settings (name, value) VALUES ('retention', ?)",
                    (repr(seconds),),
                )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def set_retention(self, retention: timedelta) -> None:
        """Change the file's retention, for every client, resumer and command that opens it
        from now on (journals already open read it again before deciding on an operation
        known already: a rerun, a retry, a resume).

        Shortening it makes operations expire sooner (never resent automatically); lengthen
        it only to match what the server really keeps, or a resend could act twice.
        """
        if retention <= timedelta(0):
            raise ValueError("retention must be positive")
        with self._write("change the retention") as db:
            db.execute(
                "INSERT OR REPLACE INTO settings (name, value) VALUES ('retention', ?)",
                (repr(retention.total_seconds()),),
            )
        self.retention = retention

    def _uri(self) -> str:
        path = urllib.parse.quote(str(self.path.absolute()))
        if not self.read_only:
            return f"file:{path}?mode=rw"
        # Reading a WAL database needs its -shm file, created on demand; a reader who may not
        # write the directory cannot create it. With no -wal file, everything committed is in
        # the database file itself, which such a reader then opens as immutable.
        wal = Path(f"{self.path}-wal")
        if not wal.exists() and not os.access(self.path.parent, os.W_OK):
            return f"file:{path}?mode=ro&immutable=1"
        return f"file:{path}?mode=ro"

    def _connection(self, relaxed: bool = False) -> sqlite3.Connection:
        """This thread's connection. Never carried across fork(): a child opens its own.

        `relaxed` is a second connection for writes that need no fsync (a completion, a
        released lease: if lost, a resume resends the same key and the server replays). Under
        `durability="normal"` it is the same connection.
        """
        if self._closed:
            raise JournalError(f"journal {self.path} is closed", path=str(self.path))
        relaxed = relaxed and self.durability == "full"
        slot = "relaxed" if relaxed else "conn"
        pid = os.getpid()
        cached: _ThreadConnection | None = getattr(self._local, slot, None)
        if cached is not None and cached.pid == pid and cached.generation == self._generation:
            return cached.db
        self._close_retired()
        # mode=rw: never create the file here (it was created, checked and given its mode
        # when the journal was opened; a file deleted since must not silently come back empty).
        # isolation_level=None: no implicit transactions; we say BEGIN IMMEDIATE ourselves,
        # and a lone INSERT or UPDATE commits by itself (one statement, one transaction).
        # check_same_thread=False only so that close() may close every thread's connection.
        shared = self._shared
        shared.add_user()  # (before it opens: the file's descriptor stays open from now on)
        try:
            db = sqlite3.connect(
                self._uri(),
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
                factory=_Connection,
            )
        except BaseException:
            shared.drop_user()
            raise
        # once, when it is closed or collected unclosed
        db._released = weakref.finalize(db, shared.drop_user)
        try:
            if not self.read_only:
                self._configure(db, relaxed)
        except BaseException:
            db.close()
            raise
        holder = _ThreadConnection(pid, db, self._generation)
        if not self.read_only:
            with contextlib.suppress(sqlite3.Error):
                db.execute("SELECT 1 FROM sqlite_master LIMIT 1")  # (opens the log)
            holder.wal = self._wal_seen()
        _connected.add(self)
        # When this thread ends, its thread-local holder goes, and the connection is retired:
        # closed by the next thread that opens one, or by close(). A program that starts a
        # thread per request keeps only the connections of its live threads open.
        weakref.finalize(holder, self._retired.append, (pid, db)).atexit = False
        setattr(self._local, slot, holder)
        with self._lock:
            self._connections.append((pid, db))
        return db

    def _configure(self, db: sqlite3.Connection, relaxed: bool) -> None:
        # WAL: readers never block the writer, and a commit is one append (+ fsync if FULL).
        # Turning a new file to WAL takes an exclusive lock and does not wait for a busy one
        # (the busy timeout does not apply): when many processes create one journal at once,
        # wait here for the one that is doing it.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        # FULL fsyncs the WAL on every commit: the intent survives a power loss.
        # NORMAL fsyncs only at checkpoints: it survives a crash of the process.
        # OFF (relaxed writes only): the next FULL commit's fsync makes them durable too,
        # since the WAL is one file written in order.
        sync = "OFF" if relaxed else "FULL" if self.durability == "full" else "NORMAL"
        db.execute(f"PRAGMA synchronous = {sync}")
        # The WAL file stays bounded by checkpoints, run only by connections that fsync: a
        # checkpoint without fsync could let the WAL be reused before the database file holds
        # what it copied, and lose durable intents on a power loss. The flusher thread makes
        # them (`_checkpoint_if_due`); SQLite's own, at a larger size, is the backstop.
        db.execute(f"PRAGMA wal_autocheckpoint = {0 if relaxed else _BACKSTOP_PAGES}")

    def _close_retired(self) -> None:
        """Close the connections of threads that have ended (nobody else uses them)."""
        if not self._retired:
            return
        retired = []
        while self._retired:
            retired.append(self._retired.pop())
        with self._lock:
            self._connections = [c for c in self._connections if c not in retired]
        pid = os.getpid()
        for owner_pid, db in retired:
            if owner_pid == pid:
                self._close_one(db)

    def _close_one(self, db: sqlite3.Connection) -> None:
        """Close a connection of this process that no thread is using. The last one closed
        checkpoints the WAL into the database file and deletes it: with the syncs of `FULL`,
        whichever it is (a relaxed one would do it unsynced, and a power cut could then lose
        what the WAL had made durable)."""
        with contextlib.suppress(sqlite3.Error):  # (refused inside a transaction)
            if not self.read_only and not db.in_transaction:
                db.execute("PRAGMA synchronous = FULL")
        with contextlib.suppress(sqlite3.Error):  # a transaction left open is rolled back
            db.close()

    def _writable(self) -> None:
        if self.read_only:
            raise JournalError(
                f"journal {self.path} was opened read-only: nothing can be written",
                path=str(self.path),
            )

    @contextlib.contextmanager
    def _write(self, action: str, *, relaxed: bool = False) -> Iterator[sqlite3.Connection]:
        """One `BEGIN IMMEDIATE` transaction; its COMMIT is durable per `durability` (not
        fsynced if `relaxed`). Held completions are written in it too.

        Threads of this process queue on a lock first: SQLite's own busy handler sleeps for
        milliseconds between tries, far longer than a commit takes.
        """
        self._writable()
        with self._errors_as_journal_error(action), self._shared.write_lock:
            db = self._connection(relaxed)
            try:
                # (inside: an interruption as it returns must not leave the write lock held)
                db.execute("BEGIN IMMEDIATE")
                self._flush_in(db)
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # (interrupted before or during the COMMIT)
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def _write_one(
        self, action: str, sql: str, params: tuple[Any, ...], *, relaxed: bool = False
    ) -> int:
        """One statement, its own transaction: the number of rows it changed."""
        self._writable()
        with self._errors_as_journal_error(action), self._shared.write_lock:
            return self._connection(relaxed).execute(sql, params).rowcount

    def _read(
        self,
        action: str,
        sql: str,
        params: Sequence[Any] = (),
        *,
        flush: bool = True,
        long: bool = False,
    ) -> list[tuple[Any, ...]]:
        # This process sees its own answers, held by any journal of it on the file (a
        # read-only one has none of its own: a writable one writes them); `flush=False`: a
        # read that needs none of them (a setting).
        writer = self if not self.read_only else self._shared.any_open()
        if flush and writer is not None:
            writer.flush()
        with self._errors_as_journal_error(action), self._reading():
            return cast("list[tuple[Any, ...]]", self._connection().execute(sql, params).fetchall())

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A use of this thread's connection outside the write lock: counted, so that a fork
        waits for it to end (and none starts until the fork is done)."""
        shared = self._shared
        with shared.reading:
            while shared.draining:  # a fork or a close is waiting for the reads to end
                shared.reading.wait()
            shared.readers += 1
        try:
            yield
        finally:
            with shared.reading:
                shared.readers -= 1
                if not shared.readers:
                    shared.reading.notify_all()

    def close(self) -> None:
        """Write held completions, close every connection this journal opened. Later use
        raises `JournalError`."""
        if self._closed:
            return
        self._stop_upkeep()
        shared = self._shared
        with shared.deferred_lock:
            # From here on the flusher no longer writes through this journal, and a late
            # `finish` raises unless another journal of this process on the file is open.
            self._closing = True
            shared.journals.discard(self)
        if not self.read_only:
            try:
                self.flush()
            except JournalError:
                logger.warning("journal %s: could not write responses", self.path, exc_info=True)
        _open_journals.discard(self)
        # Every write, the flusher thread's included, runs under the write lock, and every
        # read outside it is counted (`_reading`): holding the one and with no read under
        # way, no connection is in use when it is closed (closing a connection that another
        # thread is executing on can crash the sqlite3 module).
        with shared.write_lock:
            with shared.deferred_lock:
                self._closed = True
                shared.deferred_ready.notify_all()
            shared.drain()
            try:
                self._close_connections()
            finally:
                shared.undrain()
                shared.closed()

    def _close_connections(self, *, for_fork: bool = False) -> None:
        """Close every connection this journal opened in this process (no thread may be
        using one: the caller holds the write lock, and for a fork no read is in progress);
        each thread opens a new one when it next needs it."""
        with self._lock:
            connections, self._connections = self._connections, []
            self._generation += 1
        retired, self._retired = self._retired, []
        pid = os.getpid()
        for owner_pid, db in connections + retired:
            if owner_pid == pid:
                self._close_one(db)
            elif not for_fork:  # inherited across fork(): not ours to close, nor the GC's
                _inherited.append(db)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the operation's life -------------------------------------------------------------

    @staticmethod
    def _find(db: sqlite3.Connection, column: str, value: str) -> tuple[Any, ...] | None:
        row = db.execute(
            f"SELECT {COLUMNS} FROM operations WHERE {column} = ?", (value,)
        ).fetchone()
        return cast("tuple[Any, ...] | None", row)

    def _row(self, db: sqlite3.Connection, column: str, value: str) -> _decide.StoredRow | None:
        row = self._find(db, column, value)
        return stored_row(row) if row is not None else None

    @staticmethod
    def _given_up(db: sqlite3.Connection, key: str) -> _decide.StoredRow | None:
        """The operation that gave `key` up for a new one (`reissue`), if any."""
        row = db.execute(
            f"SELECT {COLUMNS} FROM operations WHERE id = "
            "(SELECT id FROM retired_keys WHERE key = ?)",
            (key,),
        ).fetchone()
        return stored_row(row) if row is not None else None

    def _limits(self, db: sqlite3.Connection) -> _decide.Limits:
        """The rules' limits, with the retention as the file keeps it now (read in the
        caller's transaction: another process may have changed it since this one opened)."""
        row = db.execute("SELECT value FROM settings WHERE name = 'retention'").fetchone()
        if row is not None:
            self.retention = timedelta(seconds=float(row[0]))
        return _decide.Limits(self.retention, self.max_recoveries, owner_alive)

    def register(self, record: RequestRecord, owner: str, lease_seconds: float) -> Registration:
        """Look the operation up and, if it is to be sent, claim it: one durable commit.

        Unknown: insert it, claimed. Known: a different request is a mismatch; a finished one
        is answered from the journal; a pending one is claimed if its lease is free.

        Threads of this process that register at the same time share one commit (and one
        fsync): whoever takes the write lock commits every registration queued by then.
        """
        (result,) = self.register_many([(record, owner, lease_seconds)])
        if isinstance(result, JournalError):
            raise result
        return result

    def register_many(
        self, requests: Sequence[tuple[RequestRecord, str, float]]
    ) -> list[Registration | JournalError]:
        """`register` for several operations at once, in one commit where possible.

        Each result is the `Registration`, or the `JournalError` that stopped it. Used by the
        async transport to register the operations of concurrent tasks together.
        """
        self._writable()
        tickets = [_Ticket(record, owner, lease) for record, owner, lease in requests]
        with self._queue_lock:
            self._queue.extend(tickets)
        with self._shared.write_lock:
            if any(t.result is None and t.error is None for t in tickets):
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    with self._errors_as_journal_error("register the operation"):
                        self._commit_batch(batch)
                    self._shared.registered += len(batch)
                except JournalError as exc:
                    for queued in batch:
                        queued.error = exc
                except BaseException:  # interrupted: the others go back in line
                    with self._queue_lock:
                        self._queue[:0] = [queued for queued in batch if queued not in tickets]
                    raise
        results: list[Registration | JournalError] = []
        for ticket in tickets:
            if ticket.error is not None:
                results.append(ticket.error)
            else:
                assert ticket.result is not None
                results.append(self._holding(ticket.result, ticket.owner, ticket.lease_seconds))
        return results

    def _commit_batch(self, batch: list[_Ticket]) -> None:
        self._check_identity()
        db = self._connection()
        self._check_wal()
        now = self._clock()
        if self._insert_new(db, batch, now):
            return
        try:
            # (inside: an interruption as it returns must not leave the write lock held)
            db.execute("BEGIN IMMEDIATE")
            # A known operation may have finished in this process moments ago: write the held
            # completions first, so that the lookups below see them.
            self._flush_in(db)
            for ticket in batch:
                ticket.result = self._register_in(
                    db, ticket.record, ticket.owner, ticket.lease_seconds, now
                )
            db.execute("COMMIT")
        except BaseException:
            for ticket in batch:
                ticket.result = None
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    @staticmethod
    def _insert_new(db: sqlite3.Connection, batch: list[_Ticket], now: float) -> bool:
        """The common case, operations the journal does not know yet: one INSERT for all of
        them, a transaction by itself. `False`, with nothing written, if any name or key is
        known or any is a resume: then each is decided on its own."""
        if any(ticket.record.resume for ticket in batch):
            return False
        rows = [_new_row(t.record, t.owner, t.lease_seconds, now) for t in batch]
        chunks = _chunks(rows)
        try:
            if len(chunks) > 1:
                db.execute("BEGIN IMMEDIATE")
            for chunk in chunks:
                db.execute(_insert_rows(len(chunk)), [v for row in chunk for v in row])
            if len(chunks) > 1:
                db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError):  # a known name or key: nothing changed
                return False
            raise
        for ticket in batch:
            ticket.result = _decide.new_registration(ticket.record, now)
        return True

    @staticmethod
    def _insert(
        db: sqlite3.Connection,
        record: RequestRecord,
        owner: str,
        lease_seconds: float,
        now: float,
    ) -> Registration | None:
        """Insert a new operation, claimed; `None` if its name or key is taken."""
        values = _new_row(record, owner, lease_seconds, now)
        try:
            if db.execute(_INSERT_OR_IGNORE, values).rowcount != 1:
                return None
        except sqlite3.IntegrityError:  # a given-up key (`_RETIRED`'s trigger)
            return None
        return _decide.new_registration(record, now)

    def _register_in(
        self,
        db: sqlite3.Connection,
        record: RequestRecord,
        owner: str,
        lease_seconds: float,
        now: float,
    ) -> Registration:
        """`register`'s decision (`_decide.register`), stored in the caller's transaction."""
        # The common case, a new operation: one INSERT. It changes nothing if the name or key
        # is known already; the rules sort that out.
        if not record.resume and (inserted := self._insert(db, record, owner, lease_seconds, now)):
            return inserted
        by_name, by_key = _decide.lookups(record)
        key_row = None
        if by_key:
            key_row = self._row(db, "key", record.key)
            if key_row is None and not record.resume:  # a key a reissued operation gave up
                key_row = self._given_up(db, record.key)
        decided = _decide.register(
            record,
            self._row(db, "name", record.name) if by_name and record.name is not None else None,
            key_row,
            owner=owner, lease_seconds=lease_seconds, now=now, limits=self._limits(db),
        )  # fmt: skip
        if isinstance(decided.write, _decide.Insert):
            inserted = self._insert(db, record, owner, lease_seconds, now)
            if inserted is None:
                raise JournalError(
                    f"journal {self.path}: operation key {record.key!r} collides with another",
                    path=str(self.path),
                )
            return inserted
        return self._store(db, decided, record.body)

    @staticmethod
    def _store(db: sqlite3.Connection, decided: _decide.Decided, body: bytes = b"") -> Registration:
        """Make the write the rules asked for (an insert excepted: the caller makes it, with
        its record), in the caller's transaction; the registration to return. `body` is the
        request's, compared with the stored one if the rules ask (a multipart rerun)."""
        write, registration = decided.write, decided.registration
        if isinstance(write, _decide.ClaimUpdate):
            db.execute(_CLAIM, (
                write.attempts, write.lease_version, write.lease_owner, write.lease_expires,
                write.updated_at, write.recoveries, write.first_sent_at, write.url,
                write.fingerprint, write.last_error, write.key,
            ))  # fmt: skip
            if write.compare_body:
                stored_body, headers = db.execute(
                    "SELECT body, headers FROM operations WHERE key = ?", (write.key,)
                ).fetchone()
                registration = _decide.with_stored_body(
                    registration, body, bytes(stored_body), headers_from_json(headers)[0]
                )
        elif isinstance(write, _decide.Expire):
            db.execute(_EXPIRE, (write.updated_at, write.key))
        elif isinstance(write, _decide.Park):
            db.execute(_PARK, (write.recoveries, write.updated_at, write.reason, write.key))
        else:
            assert write is None, write
        return registration

    def claim(
        self, key: str, version: int, owner: str, lease_seconds: float, last_error: str | None
    ) -> Registration:
        """Claim one more attempt for the holder at `version`: one durable commit.

        `Decision.SEND` with the new `lease_version` (its `operation.attempts` counts this
        attempt), or why the attempt must not be sent: `EXPIRED` (sent before and now older
        than the retention, as after a machine that slept through a backoff: the server may
        have forgotten the key), `ABANDONED` (a person abandoned it meanwhile), `COMPLETED` or
        `CONFLICT` (another holder finished it: its answer is in `response`), `PARKED`, or
        `IN_PROGRESS` (another holder took it over: this one is fenced out).
        """
        now = self._clock()
        with self._write("claim the next attempt") as db:
            self._check_identity()
            row = self._find(db, "key", key)
            if row is None:
                raise JournalError(
                    f"journal {self.path}: operation with key {key!r} is no longer in the "
                    "journal; not resent",
                    path=str(self.path),
                )
            decided = _decide.claim(
                stored_row(row), version, owner=owner, lease_seconds=lease_seconds,
                last_error=last_error, now=now, limits=self._limits(db),
            )  # fmt: skip
            claimed = self._store(db, decided)
        return self._holding(claimed, owner, lease_seconds)

    def unclaim(self, key: str, version: int, *, fresh: bool, never_sent: bool = False) -> None:
        """Undo a claim whose request was provably never sent (its task was cancelled, or the
        caller interrupted, before the send began), so that a retry in this same process can
        send it at once instead of waiting for the lease to end.

        A `fresh` operation (inserted by that very registration) is deleted, as if it had
        never been registered: nothing of it reached the server, and nothing is left for a
        resume to send behind the caller's back. A known one gets its attempt back and its
        lease freed (and, if that was its first attempt, or if `never_sent` says no attempt
        before it reached the server either, counts as never sent again).
        """
        self._let_go(key, version)
        if fresh:
            sql = "DELETE FROM operations WHERE key = ? AND lease_version = ? AND state = 'pending'"
            params: tuple[Any, ...] = (key, version)
        else:
            sql = (
                "UPDATE operations SET first_sent_at = CASE WHEN ? OR attempts <= 1 THEN NULL "
                "ELSE first_sent_at END, attempts = MAX(attempts - 1, 0), lease_owner = NULL, "
                "lease_expires = NULL, lease_version = lease_version + 1, updated_at = ?, "
                "last_error = 'cancelled before it was sent' "
                "WHERE key = ? AND lease_version = ? AND state = 'pending'"
            )
            params = (never_sent, self._clock(), key, version)
        self._write_one("give the unsent operation back", sql, params, relaxed=True)

    def finish(
        self,
        key: str,
        version: int,
        state: Literal["completed", "conflict"],
        response: StoredResponse,
        *,
        streamed: bool = False,
    ) -> None:
        """Record the final response, soon: the write is held in memory and batched.

        Its body is kept up to `max_response_body` bytes (`max_stream_body` for a `streamed`
        answer); a larger one is recorded with its status and headers only.

        A completion needs no commit of its own: until it is written the operation merely
        looks pending, and if the process dies first, a resume resends the same key and the
        server replays. A background thread writes the held completions together, one commit
        for all of them, within `flush_delay` seconds; they are also written before any read
        of this file by any journal of this process, by a claim or a registration of a known
        operation (in the same commit), by `flush()` and `close()`, and at exit. A new
        operation's registration does not wait for them. A write fenced out (another holder
        took the operation over) changes nothing and is logged.

        Raises:
            JournalError: this journal is closed, and no other journal of this process is
                open on the file to write the answer: the operation stays pending (a resume
                resends the same key and the server replays its answer).
        """
        self._let_go(key, version)
        body, kept = response.body, response.body_kept
        if len(body) > (self.max_stream_body if streamed else self.max_response_body):
            body, kept = b"", False
        headers = headers_json(response.headers, response.encoding)
        params = (state, self._clock(), response.status, headers, body, int(kept), key, version)
        shared = self._shared
        with shared.deferred_lock:
            if self._closing and shared.any_open() is None:
                raise JournalError(
                    f"journal {self.path} is closed: the answer for key {key} was not "
                    "recorded; the operation stays pending (a resume gets the server's replay)",
                    path=str(self.path),
                )
            shared.deferred.append(params)
            shared.holders.add(self)
            _unwritten.add(shared)
            shared.deferred_ready.notify()
        self._ensure_flusher()

    def flush(self) -> None:
        """Write the completions still held in memory by any journal of this process on this
        file (see `finish`): one statement, a transaction by itself, for up to 64 of them.

        When it returns, every completion held before the call is committed, also one that
        another thread (the flusher, a registration) had taken to write and not yet
        committed: a read right after it sees them all."""
        shared = self._shared
        if not shared.deferred:
            if shared.flusher_pid == os.getpid():  # completions held lately: one may be
                with shared.write_lock:  # in the middle of its write: wait for its commit
                    pass
            return
        self._writable()
        with self._errors_as_journal_error("record responses"), shared.write_lock:
            db = self._connection(relaxed=True)
            if len(shared.deferred) <= _ROWS_PER_STATEMENT:
                self._flush_in(db)
                return
            try:
                # (inside: an interruption as it returns must not leave the write lock held)
                db.execute("BEGIN IMMEDIATE")
                self._flush_in(db)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _flush_in(self, db: sqlite3.Connection) -> None:
        """Write the held completions (inside the caller's transaction, if one is open)."""
        shared = self._shared
        with shared.deferred_lock:
            items, shared.deferred = shared.deferred, []
        if not items:
            return
        try:
            if _UPDATE_FROM and len(items) > 1:
                written = 0
                for chunk in _chunks(items):
                    flat = [v for params in chunk for v in params]
                    written += db.execute(_finish_rows(len(chunk)), flat).rowcount
                if written != len(items):
                    self._warn_fenced(db, items)
            else:
                for params in items:
                    if db.execute(_FINISH, params).rowcount != 1:
                        self._warn_fenced(db, [params])
        except BaseException:
            with shared.deferred_lock:  # not written: keep them for the next commit
                shared.deferred[:0] = items
            raise
        with shared.deferred_lock:
            if not shared.deferred:  # all written: nothing to keep the journals alive for
                shared.holders.clear()
                _unwritten.discard(shared)

    def _checkpoint_if_due(self) -> None:
        """Checkpoint the WAL if enough was registered since the last time (by the flusher
        thread, after a flush: off the path of any request), through a connection that
        fsyncs. Passive checkpoints, which wait for no lock: the first copies the bulk of
        the WAL while registrations go on; the second, with this process's writers held
        back, copies what they appended meanwhile (a few pages), so that the whole WAL is
        in the database file and the next commit starts it again from its beginning (else
        it grew until SQLite's backstop). One that cannot finish (another process's reader
        holds old pages, or its writer appends) is made again later."""
        shared = self._shared
        if shared.registered - shared.checkpointed < _CHECKPOINT_EVERY or self.read_only:
            return
        shared.checkpointed = shared.registered
        with self._errors_as_journal_error("checkpoint the journal"):
            with self._reading():
                self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            # (the write lock first, as a close or a fork takes it, before waiting for reads)
            with shared.write_lock:
                self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _warn_fenced(self, db: sqlite3.Connection, items: Sequence[tuple[Any, ...]]) -> None:
        """Name the completions that were not written: after the write, an operation that
        does not hold its response is one another holder took over (or finished)."""
        for params in items:
            state, updated_at, key, version = params[0], params[1], params[6], params[7]
            row = db.execute(
                "SELECT state, updated_at, lease_version FROM operations WHERE key = ?", (key,)
            ).fetchone()
            if row is None or tuple(row) != (state, updated_at, version):
                logger.warning(
                    "journal %s: the response for key %s was not recorded: the operation "
                    "was taken over (or finished) by another holder",
                    self.path, key,
                )  # fmt: skip

    def _ensure_flusher(self) -> None:
        shared = self._shared
        pid = os.getpid()
        if shared.flusher_pid == pid:
            return
        with shared.deferred_lock:
            if shared.flusher_pid == pid:
                return
            shared.flusher_pid = pid
            thread = threading.Thread(
                target=_flush_loop, args=(shared, self.flush_delay),
                name=f"idemclient-journal-flush {self.path.name}", daemon=True,
            )  # fmt: skip
            thread.start()

    def release(
        self,
        key: str,
        version: int,
        last_error: str | None,
        *,
        moved_fingerprint: str | None = None,
        never_sent: bool = False,
    ) -> bool:
        """Give the lease back, leaving the operation pending with its last error.

        `moved_fingerprint`: a 307/308 sent the request on; the request with this fingerprint
        (the same one at the new URL) is then accepted as this operation's next attempt.
        `never_sent`: no attempt ever reached the server (every connection was refused):
        it stays provably never sent, so no retention expires it.
        """
        self._let_go(key, version)
        changed = self._write_one(
            "release the operation",
            "UPDATE operations SET lease_owner = NULL, lease_expires = NULL, "
            "updated_at = ?, last_error = ?, moved_fingerprint = COALESCE(?, moved_fingerprint), "
            "first_sent_at = CASE WHEN ? THEN NULL ELSE first_sent_at END "
            "WHERE key = ? AND lease_version = ?",
            (self._clock(), last_error, moved_fingerprint, never_sent, key, version),
            relaxed=True,
        )
        return changed == 1

    # -- inspection and upkeep ------------------------------------------------------------

    def expire_stale(self, select: Callable[[Operation], bool] | None = None) -> list[Operation]:
        """Mark pending operations sent once and older than the retention as `expired` (only
        those `select` accepts, if given: a resumer expires its own API's operations)."""
        now = self._clock()
        cutoff = now - self.refresh_retention().total_seconds()
        with self._write("expire stale operations") as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM operations WHERE state = 'pending' "
                "AND first_sent_at IS NOT NULL AND first_sent_at < ? ORDER BY created_at",
                (cutoff,),
            ).fetchall()
            keys = [r[1] for r in rows if select is None or select(operation(r))]
            for key in keys:
                db.execute(_EXPIRE, (now, key))
            rows = [self._find(db, "key", key) for key in keys]
        return [operation(r) for r in rows if r is not None]

    #: what `stats()` answers
    Stats = JournalStats

    # -- what `ReadBack` asks of a backend ----------------------------------------------

    _table = "operations"
    _settings_table = "settings"
    _retention_setting = "retention"
    _decisions_table = "decisions"
    _retired_table = "retired_keys"
    _mark = "?"

    def _read_operations(
        self, action: str, sql: str, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        return self._read(action, sql, params)  # held completions written first

    def _write_statement(
        self, action: str, sql: str, params: Sequence[Any], *, unbounded: bool = False
    ) -> int:
        with self._write(action) as db:  # held completions are written in it first
            return db.execute(sql, params).rowcount

    def _change_state(
        self,
        name_or_key: str,
        verb: str,
        allowed: tuple[State, ...],
        sets: str,
        *params: Any,
        also: Also | None = None,
    ) -> Operation:
        """`UPDATE ... SET sets` (`?` params, then the key) on an operation in one of
        `allowed` states, and the statement `also` makes of its row, in one transaction."""
        with self._write(f"{verb} the operation") as db:
            row = self._find(db, "name", name_or_key) or self._find(db, "key", name_or_key)
            if row is None:
                raise KeyError(name_or_key)
            if row[2] not in allowed:
                raise ValueError(
                    f"operation {name_or_key!r} is {row[2]}: only {', '.join(allowed)} "
                    f"operations can be given to {verb}"
                )
            db.execute(f"UPDATE operations SET {sets} WHERE key = ?", (*params, row[1]))
            if also is not None:
                db.execute(*also(row))
            updated = self._find(db, "name", row[0]) if row[0] else None
            updated = updated or self._find(db, "key", row[1])
            # (an unnamed one reissued: under its new key, the old one its previous_key)
            updated = updated or self._find(db, "previous_key", row[1])
            assert updated is not None
            if updated[1] != row[1]:  # reissued: its old key is refused to new operations
                db.execute(
                    "INSERT OR REPLACE INTO retired_keys (key, id) "
                    "SELECT ?, id FROM operations WHERE key = ?",
                    (row[1], updated[1]),
                )
        return operation(updated)


def _flush_loop(shared: _SharedFile, flush_delay: float) -> None:
    """The flusher thread of one file: writes the completions that the journals of this
    process hold, through whichever of them is open, gathering them for `flush_delay`."""
    delay = flush_delay
    while True:
        with shared.deferred_lock:
            while not shared.deferred:
                # Idle (a completion would have notified), or every journal closed: end this
                # thread; the next completion starts another. An unused journal keeps none.
                if not shared.deferred_ready.wait(timeout=shared.flusher_idle) or (
                    shared.any_open() is None
                ):
                    shared.flusher_pid = 0
                    return
        time.sleep(delay)  # let more completions gather
        journal = shared.any_open()
        if journal is None:  # the last close wrote what was held
            with shared.deferred_lock:
                shared.flusher_pid = 0
            return
        try:
            journal.flush()
        except JournalError as exc:
            if journal._closed:
                continue
            if delay == flush_delay:  # say it once, then try again less often
                logger.warning("journal %s: could not write responses: %s", journal.path, exc)
            delay = min(delay * 2 or 0.05, 5.0)
        else:
            delay = flush_delay
            try:
                journal._checkpoint_if_due()
            except JournalError as exc:  # (the backstop checkpoints instead)
                logger.debug("journal %s: could not checkpoint: %s", journal.path, exc)

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from idemclient import Journal, JournalError
from idemclient._records import Decision, Registration, RequestRecord, StoredResponse
from idemclient.journal import default_journal_path
from idemclient.journal._owner import current_owner
from idemclient.journal._sqlite import SCHEMA_VERSION

LEASE = 60.0


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(
    name: str | None = "op-1",
    key: str = "key-1",
    body: bytes = b'{"amount": 5}',
    *,
    key_given: bool = False,
    fingerprint: str | None = None,
    resume: bool = False,
) -> RequestRecord:
    return RequestRecord(
        name=name,
        key=key,
        key_given=key_given,
        method="POST",
        url="https://api.example/charges",
        headers=[("content-type", "application/json")],
        body=body,
        fingerprint=fingerprint or f"fp-{body!r}",
        resume=resume,
    )


def dead_owner() -> str:
    """The owner string of a process that has exited."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from idemclient.journal._owner import current_owner; print(current_owner())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return child.stdout.strip()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def journal(journal_path: Path, clock: Clock) -> Journal:
    # no automatic purge: a test that moves the clock on purges by hand
    return Journal(journal_path, clock=clock, auto_purge=None)


def test_new_operation_is_registered_claimed_and_sent(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    assert reg.decision is Decision.SEND
    assert reg.lease_version == 1
    op = journal.get("op-1")
    assert op is not None
    assert (op.state, op.attempts, op.key, op.method) == ("pending", 1, "key-1", "POST")
    assert journal.get("key-1") == op
    assert journal.request_of("key-1") == (
        "POST",
        "https://api.example/charges",
        [("content-type", "application/json")],
        b'{"amount": 5}',
    )


def test_completed_operation_is_answered_from_the_journal(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    stored = StoredResponse(201, [("content-type", "application/json")], b'{"id": 1}')
    journal.finish("key-1", reg.lease_version, "completed", stored)
    again = journal.register(record(), current_owner(), LEASE)
    assert again.decision is Decision.COMPLETED
    assert again.response == stored
    op = journal.get("op-1")
    assert op is not None
    assert (op.state, op.response_status, op.attempts) == ("completed", 201, 1)


def test_conflict_is_remembered(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "conflict", StoredResponse(422, [], b"no"))
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.CONFLICT


def test_same_name_with_another_request_is_a_mismatch(journal: Journal) -> None:
    journal.register(record(), current_owner(), LEASE)
    reg = journal.register(record(body=b"other"), current_owner(), LEASE)
    assert reg.decision is Decision.MISMATCH
    assert "another request" in reg.detail


def test_caller_key_identifies_the_operation(journal: Journal) -> None:
    journal.register(record(name=None, key="k", key_given=True), current_owner(), LEASE)
    reg = journal.register(record(name=None, key="k", key_given=True, body=b"x"), "o", LEASE)
    assert reg.decision is Decision.MISMATCH
    # a name with a key that belongs to another operation
    reg = journal.register(record(name="other", key="k", key_given=True), "o", LEASE)
    assert reg.decision is Decision.MISMATCH
    assert "belongs to another operation" in reg.detail


def test_live_holder_blocks_and_dead_holder_is_free_at_once(journal: Journal) -> None:
    journal.register(record(), current_owner(), LEASE)
    # this process is alive: a second claimer is refused
    assert journal.register(record(), "other-claimer", LEASE).decision is Decision.IN_PROGRESS
    with sqlite3.connect(journal.path) as db:
        db.execute("UPDATE operations SET lease_owner = ?", (dead_owner(),))
    reg = journal.register(record(), current_owner(), LEASE)
    assert reg.decision is Decision.SEND
    assert reg.lease_version == 2
    op = journal.get("op-1")
    assert op is not None
    assert op.attempts == 2


def test_holder_on_another_host_blocks_until_its_lease_expires(
    journal: Journal, clock: Clock
) -> None:
    journal.register(record(), "elsewhere.example:123:456", LEASE)
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.IN_PROGRESS
    clock.now += LEASE + 1
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.SEND


def test_writes_are_fenced_by_the_lease_version(journal: Journal, clock: Clock) -> None:
    first = journal.register(record(), "elsewhere.example:1:1", LEASE)
    clock.now += LEASE + 1
    second = journal.register(record(), current_owner(), LEASE)
    assert second.lease_version == first.lease_version + 1
    # the paused first holder wakes up: its writes change nothing
    journal.finish("key-1", first.lease_version, "completed", StoredResponse(201, [], b"a"))
    journal.flush()
    op = journal.get("key-1")
    assert op is not None
    assert op.state == "pending"
    fenced = journal.claim("key-1", first.lease_version, "x", LEASE, None)
    assert fenced.decision is Decision.IN_PROGRESS
    assert "taken over" in fenced.detail
    assert not journal.release("key-1", first.lease_version, "late")
    journal.finish("key-1", second.lease_version, "completed", StoredResponse(201, [], b"b"))
    reg = journal.register(record(), current_owner(), LEASE)
    assert reg.response is not None
    assert reg.response.body == b"b"


def test_claim_counts_attempts_and_records_the_last_error(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    claimed = journal.claim("key-1", reg.lease_version, current_owner(), LEASE, "HTTP 503")
    assert claimed.decision is Decision.SEND
    assert (claimed.lease_version, claimed.operation.attempts) == (reg.lease_version + 1, 2)
    op = journal.get("key-1")
    assert op is not None
    assert op.last_error == "HTTP 503"


def test_expiry_after_retention_only_when_sent(journal_path: Path, clock: Clock) -> None:
    journal = Journal(journal_path, clock=clock, retention=timedelta(hours=1))
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, "ReadTimeout")
    assert [op.name for op in journal.pending()] == ["op-1"]
    clock.now += 3601
    assert journal.pending() == []
    expired = journal.expire_stale()
    assert [op.state for op in expired] == ["expired"]
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.EXPIRED
    # never sent: resent whatever its age
    with sqlite3.connect(journal.path) as db:
        db.execute(
            "UPDATE operations SET state = 'pending', first_sent_at = NULL, attempts = 0, "
            "created_at = 0"
        )
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.SEND


def test_register_turns_an_old_pending_operation_expired(journal_path: Path, clock: Clock) -> None:
    journal = Journal(journal_path, clock=clock, retention=timedelta(hours=1))
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, None)
    clock.now += 7200
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.EXPIRED
    op = journal.get("op-1")
    assert op is not None
    assert op.state == "expired"


def test_abandon(journal: Journal) -> None:
    journal.register(record(), current_owner(), LEASE)
    assert journal.abandon("op-1").state == "abandoned"
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.ABANDONED
    with pytest.raises(ValueError, match="is abandoned"):
        journal.abandon("key-1")
    with pytest.raises(KeyError):
        journal.abandon("nope")


def test_operations_filter_and_order(journal: Journal, clock: Clock) -> None:
    for i in range(3):
        clock.now += 1
        journal.register(record(name=f"op-{i}", key=f"k-{i}", body=bytes([i])), "o", LEASE)
    journal.abandon("op-1")
    assert [op.name for op in journal.operations()] == ["op-0", "op-1", "op-2"]
    assert [op.name for op in journal.operations("abandoned")] == ["op-1"]
    with pytest.raises(ValueError, match="state must be one of"):
        journal.operations("done")  # type: ignore[arg-type]


def test_purge_keeps_pending_and_respects_retention(journal: Journal, clock: Clock) -> None:
    done = journal.register(record(name="done", key="k1"), "o", LEASE)
    journal.finish("k1", done.lease_version, "completed", StoredResponse(200, [], b""))
    journal.register(record(name="pending", key="k2"), "o", LEASE)
    with pytest.raises(ValueError, match="shorter than the retention"):
        journal.purge(older_than=timedelta(hours=1))
    with pytest.raises(ValueError, match="only finished states"):
        journal.purge(states=("pending",))
    assert journal.purge() == 0
    clock.now += timedelta(days=31).total_seconds()
    assert journal.purge() == 1
    assert [op.name for op in journal.operations()] == ["pending"]


def test_large_response_body_is_not_kept(journal_path: Path) -> None:
    journal = Journal(journal_path, max_response_body=10)
    reg = journal.register(record(), "o", LEASE)
    journal.finish("key-1", reg.lease_version, "completed", StoredResponse(200, [], b"x" * 11))
    again = journal.register(record(), "o", LEASE)
    assert again.response == StoredResponse(200, [], b"", body_kept=False)


def test_file_and_directory_modes(journal: Journal) -> None:
    journal.register(record(), "o", LEASE)
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(journal.path.parent.stat().st_mode) == 0o700
    for suffix in ("-wal", "-shm"):
        side = journal.path.with_name(journal.path.name + suffix)
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0


def test_wal_mode_and_schema_version(journal: Journal) -> None:
    with sqlite3.connect(journal.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopening_keeps_the_operations(journal_path: Path) -> None:
    with Journal(journal_path) as first:
        first.register(record(), "o", LEASE)
    with Journal(journal_path) as second:
        assert [op.name for op in second.operations()] == ["op-1"]


def test_not_a_database_is_reported_by_path_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is my shopping list, not a journal\n" * 10)
    before = path.read_bytes()
    with pytest.raises(JournalError, match="not an SQLite database") as info:
        Journal(path)
    assert info.value.path == str(path)
    assert path.read_bytes() == before


def test_corrupt_journal_is_reported_by_path(journal_path: Path) -> None:
    with Journal(journal_path) as j:
        for i in range(50):
            j.register(record(name=f"op-{i}", key=f"k-{i}", body=os.urandom(2000)), "o", LEASE)
    data = bytearray(journal_path.read_bytes())
    data[100 : 4096 * 3] = b"\xff" * (4096 * 3 - 100)
    journal_path.write_bytes(bytes(data))
    for side in ("-wal", "-shm"):
        Path(str(journal_path) + side).unlink(missing_ok=True)
    with pytest.raises(JournalError, match=str(journal_path)):
        Journal(journal_path).operations()
    assert journal_path.read_bytes() == bytes(data)


def test_truncated_journal_is_reported(journal_path: Path) -> None:
    with Journal(journal_path) as j:
        j.register(record(), "o", LEASE)
    Path(str(journal_path) + "-wal").unlink(missing_ok=True)
    journal_path.write_bytes(journal_path.read_bytes()[:10])
    with pytest.raises(JournalError, match=str(journal_path)):
        Journal(journal_path)


#: The version 1 schema, as idemclient 0.1.0.dev0 journals were written before version 2.
V1_SCHEMA = """
CREATE TABLE operations (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE, key TEXT NOT NULL UNIQUE, state TEXT NOT NULL,
    method TEXT NOT NULL, url TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
    fingerprint TEXT NOT NULL, attempts INTEGER NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, first_sent_at REAL, lease_owner TEXT, lease_expires REAL,
    lease_version INTEGER NOT NULL, response_status INTEGER, response_headers TEXT,
    response_body BLOB, response_body_kept INTEGER, last_error TEXT,
    recoveries INTEGER NOT NULL DEFAULT 0, previous_key TEXT
);
CREATE INDEX operations_pending ON operations (created_at) WHERE state = 'pending';
CREATE INDEX operations_finished ON operations (updated_at) WHERE state != 'pending';
PRAGMA user_version = 1;
"""


def test_a_version_1_journal_is_upgraded_with_its_operations(journal_path: Path) -> None:
    journal_path.parent.mkdir(mode=0o700)
    with sqlite3.connect(journal_path) as db:
        db.executescript(V1_SCHEMA)
        db.execute(
            "INSERT INTO operations (name, key, state, method, url, headers, body, fingerprint, "
            "attempts, created_at, updated_at, first_sent_at, lease_version, response_status, "
            "response_headers, response_body, response_body_kept) VALUES ('charge-1', 'k-1', "
            "'completed', 'POST', 'https://api.example/charges', '[]', x'7b7d', 'fp', 2, 1.0, "
            "2.0, 1.0, 2, 201, '[[\"content-type\", \"application/json\"]]', x'6f6b', 1)"
        )
        db.execute(
            "INSERT INTO operations (name, key, state, method, url, headers, body, fingerprint, "
            "attempts, created_at, updated_at, lease_version) VALUES (NULL, 'k-2', 'pending', "
            "'POST', 'https://api.example/orders', '[]', x'', 'fp2', 1, 3.0, 3.0, 1)"
        )
    with Journal(journal_path, auto_purge=None) as journal:  # its rows are from 1970
        done = journal.get("charge-1")
        assert done is not None
        assert (done.key, done.state, done.attempts, done.response_status) == (
            "k-1", "completed", 2, 201,
        )  # fmt: skip
        assert journal.stored_response("k-1") == StoredResponse(
            201, [("content-type", "application/json")], b"ok", True
        )
        assert [op.key for op in journal.pending()] == ["k-2"]
        # version 2: unnamed operations are not in the name index; names stay unique
        journal.register(record(name=None, key="k-3"), "o", LEASE)
        again = journal.register(record(name="charge-1", key="k-4", key_given=True), "o", LEASE)
        assert again.decision is Decision.MISMATCH
    with sqlite3.connect(journal_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert db.execute("SELECT count(*) FROM decisions").fetchone() == (0,)  # version 4
        assert db.execute("SELECT count(*) FROM retired_keys").fetchone() == (0,)  # version 5
        indexes = {
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"operations_name", "operations_pending", "operations_finished"} <= indexes
        assert db.execute(
            "SELECT count(*) FROM sqlite_master WHERE name LIKE '%v1%'"
        ).fetchone() == (0,)


def test_a_version_4_journal_keeps_the_keys_its_reissued_operations_gave_up(
    journal_path: Path, clock: Clock
) -> None:
    """Reissued before version 5 kept given-up keys: the upgrade finds them by their
    `previous_key`, and a request that still carries one is refused, not a new operation."""
    with Journal(journal_path, clock=clock, auto_purge=None) as journal:
        reg = journal.register(record(name=None, key_given=True), "o", LEASE)
        journal.release("key-1", reg.lease_version, "lost")
        clock.now += 25 * 3600
        journal.expire_stale()
        new_key = journal.reissue("key-1").key
    with sqlite3.connect(journal_path) as db:  # as version 4 left it
        db.execute("DROP TRIGGER operations_retired_key")
        db.execute("DROP TABLE retired_keys")
        db.execute("PRAGMA user_version = 4")
    with Journal(journal_path, read_only=True) as reader:  # read as it is: no upgrade needed
        assert [op.key for op in reader.operations()] == [new_key]
    with Journal(journal_path, clock=clock, auto_purge=None) as journal:
        old = journal.register(record(name=None, key_given=True), "o", LEASE)
        assert (old.decision, old.operation.key) == (Decision.MISMATCH, new_key)
        assert [op.key for op in journal.operations()] == [new_key]


def test_a_second_journal_on_the_file_keeps_this_processs_locks(journal_path: Path) -> None:
    """Opening a second journal on a file this process uses closed a descriptor of it, which
    dropped every POSIX lock of the process on the file, SQLite's included: another process
    closing its last connection then deleted the write-ahead log under this one, whose
    later registrations no other reader saw (a rerun sent them again)."""
    first = Journal(journal_path)
    first.register(record(name="op-1", key="k-1"), "o", LEASE)
    second = Journal(journal_path)
    code = (
        "import sys; from idemclient import Journal; "
        "from tests.test_journal import record; "
        "j = Journal(sys.argv[1]); j.register(record(name='op-b', key='k-b'), 'o', 60.0); "
        "j.close()"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code, str(journal_path)], check=True, cwd=root)
    assert Path(f"{journal_path}-wal").exists()
    first.register(record(name="op-2", key="k-2"), "o", LEASE)  # seen by every reader
    with sqlite3.connect(journal_path) as db:
        names = {row[0] for row in db.execute("SELECT name FROM operations")}
    assert names == {"op-1", "op-b", "op-2"}
    second.close()
    first.close()


def test_a_journal_dropped_unclosed_leaves_the_next_ones_locks(journal_path: Path) -> None:
    """A journal dropped without close() is collected before its connection (a reference
    cycle keeps that one for a later pass): the file's descriptor, closed with the journal,
    took every lock of the process with it while the connection was still open, and the
    next journal's connection never took them again (SQLite counts them as held). Another
    process closing its last connection then deleted the write-ahead log under this one."""
    import gc

    Journal(journal_path, auto_purge=None).close()
    gc.disable()
    try:
        first = Journal(journal_path, auto_purge=None)
        first.pending()
        del first
        gc.collect()
        second = Journal(journal_path, auto_purge=None)
        second.register(record(name="op-1", key="k-1"), "o", LEASE)
        wal = os.stat(f"{journal_path}-wal").st_ino
        code = (
            "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
            "db.execute('SELECT count(*) FROM operations').fetchall(); db.close()"
        )
        subprocess.run([sys.executable, "-c", code, str(journal_path)], check=True)
        assert os.stat(f"{journal_path}-wal").st_ino == wal  # not deleted under this one
        second.register(record(name="op-2", key="k-2"), "o", LEASE)
        second.close()
    finally:
        gc.enable()


def test_journals_closed_leave_no_descriptor_open(tmp_path: Path) -> None:
    """A client per job, each on a journal of its own, closed: no descriptor of their files
    stays open (a closed journal still referenced kept one, and a long worker ran out)."""
    before = len(os.listdir("/proc/self/fd"))
    kept = []
    for i in range(50):
        journal = Journal(tmp_path / f"job-{i}" / "journal.sqlite3", auto_purge=None)
        journal.register(record(name="op", key=f"k-{i}"), "o", LEASE)
        journal.close()
        kept.append(journal)  # still referenced
    assert len(os.listdir("/proc/self/fd")) - before < 5


def test_a_write_ahead_log_deleted_while_in_use_fails_closed(journal_path: Path) -> None:
    """`rm journal.sqlite3-*` under a running process: SQLite would go on appending intents
    to the unlinked log, which no rerun reads (it sends them again). Refused instead."""
    with Journal(journal_path) as journal:
        journal.register(record(name="op-1", key="k-1"), "o", LEASE)
        for suffix in ("-wal", "-shm"):
            Path(f"{journal_path}{suffix}").unlink()
        with pytest.raises(JournalError, match="write-ahead log"):
            journal.register(record(name="op-2", key="k-2"), "o", LEASE)


def test_newer_schema_is_refused(journal_path: Path) -> None:
    Journal(journal_path).close()
    with sqlite3.connect(journal_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="newer than this idemclient"):
        Journal(journal_path)


@pytest.mark.parametrize("user_version", [0, 3])
@pytest.mark.parametrize("read_only", [False, True])
def test_foreign_sqlite_database_is_refused_and_left_untouched(
    tmp_path: Path, user_version: int, read_only: bool
) -> None:
    """Another application's database (rollback journal, its own user_version even) is
    refused by name, byte for byte as it was: it was switched to WAL mode for good (and one
    whose user_version looked like an old journal's was half upgraded) before its tables
    were looked at, while the error said it was left untouched."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
        db.execute(f"PRAGMA user_version = {user_version}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(JournalError, match="not an idemclient journal"):
        Journal(path, read_only=read_only)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_an_empty_file_looked_at_read_only_says_so(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.touch()
    with pytest.raises(JournalError, match="is empty: nothing has been journaled there yet"):
        Journal(path, read_only=True)
    assert path.read_bytes() == b""


def test_unusable_directory_is_a_journal_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")
    with pytest.raises(JournalError, match="could not open the journal") as info:
        Journal(tmp_path / "file" / "j.sqlite3")
    assert info.value.path == str(tmp_path / "file" / "j.sqlite3")


def test_lock_held_past_the_busy_timeout_is_a_journal_error(journal_path: Path) -> None:
    journal = Journal(journal_path, busy_timeout=0.05)
    other = sqlite3.connect(journal_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(JournalError, match="locked"):
            journal.register(record(), "o", LEASE)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert journal.operations() == []


def test_closed_journal_refuses_to_register(journal_path: Path) -> None:
    journal = Journal(journal_path)
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.register(record(), "o", LEASE)


def test_default_path_honours_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IDEMCLIENT_JOURNAL", str(tmp_path / "env.sqlite3"))
    assert default_journal_path() == tmp_path / "env.sqlite3"
    assert Journal().path == tmp_path / "env.sqlite3"
    monkeypatch.delenv("IDEMCLIENT_JOURNAL")
    assert default_journal_path().name == "journal.sqlite3"
    assert "idemclient" in str(default_journal_path())


def test_invalid_options_are_refused(journal_path: Path) -> None:
    with pytest.raises(ValueError, match="durability"):
        Journal(journal_path, durability="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retention"):
        Journal(journal_path, retention=timedelta(0))


def test_a_forked_child_opens_its_own_connection(journal: Journal) -> None:
    journal.register(record(), "o", LEASE)
    parent_conn = journal._connection()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's connection
        code = 0
        try:
            if journal._connection() is parent_conn:
                code = 3
            journal.register(record(name="child", key="kc"), "o", LEASE)
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert journal.get("child") is not None


def test_repeated_recoveries_park_the_operation(journal_path: Path) -> None:
    journal = Journal(journal_path, max_recoveries=2)
    journal.register(record(), dead_owner(), LEASE)
    gone = dead_owner()
    for expected in (1, 2):
        reg = journal.register(record(), current_owner(), LEASE)
        assert reg.decision is Decision.SEND
        assert reg.operation.recoveries == expected
        with sqlite3.connect(journal.path) as db:  # this holder dies too
            db.execute("UPDATE operations SET lease_owner = ?", (gone,))
    reg = journal.register(record(), current_owner(), LEASE)
    assert reg.decision is Decision.PARKED
    assert "parked after 3 recoveries" in reg.detail
    op = journal.get("op-1")
    assert op is not None
    assert (op.state, op.recoveries) == ("parked", 3)
    assert journal.pending() == []
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.PARKED
    # a person unparks it: sent again with the same key
    assert journal.unpark("op-1").state == "pending"
    reg = journal.register(record(), current_owner(), LEASE)
    assert reg.decision is Decision.SEND
    assert reg.operation.key == "key-1"
    with pytest.raises(ValueError, match="only parked"):
        journal.unpark("op-1")


def test_a_clean_release_is_not_a_recovery(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, "HTTP 503")
    again = journal.register(record(), current_owner(), LEASE)
    assert again.operation.recoveries == 0


def test_reissue_gives_an_expired_operation_a_new_key(journal_path: Path, clock: Clock) -> None:
    journal = Journal(journal_path, clock=clock, retention=timedelta(hours=1))
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, None)
    with pytest.raises(ValueError, match="only expired"):
        journal.reissue("op-1")
    clock.now += 7200
    journal.expire_stale()
    op = journal.reissue("op-1")
    assert (op.state, op.attempts, op.previous_key) == ("pending", 0, "key-1")
    assert op.key != "key-1"
    reg = journal.register(record(), current_owner(), LEASE)
    assert reg.decision is Decision.SEND
    assert reg.operation.key == op.key
    with pytest.raises(KeyError):
        journal.reissue("nope")


def test_held_completions_are_written_before_a_read(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b"ok"))
    # another process (a plain connection) may not see it yet; this journal always does
    op = journal.get("op-1")
    assert op is not None
    assert op.state == "completed"
    with sqlite3.connect(journal.path) as db:
        assert db.execute("SELECT state FROM operations").fetchone() == ("completed",)


def test_new_operations_registered_together_are_one_insert(journal: Journal) -> None:
    statements: list[str] = []
    journal._connection().set_trace_callback(statements.append)
    batch = [(record(name=f"op-{i}", key=f"k-{i}"), "o", LEASE) for i in range(3)]
    results = journal.register_many(batch)
    assert [r.decision for r in results if isinstance(r, Registration)] == [Decision.SEND] * 3
    # one statement, a transaction by itself (SQLite traces it again for each run of the
    # trigger that refuses a given-up key: once per row)
    assert len(set(statements)) == 1
    assert statements[0].startswith("INSERT INTO operations")
    assert [op.name for op in journal.pending()] == ["op-0", "op-1", "op-2"]


def test_a_known_operation_in_a_batch_is_decided_on_its_own(journal: Journal) -> None:
    done = journal.register(record(name="done", key="k-done"), "o", LEASE)
    journal.finish("k-done", done.lease_version, "completed", StoredResponse(201, [], b"ok"))
    results = journal.register_many(
        [
            (record(name="new-1", key="k-new-1"), "o", LEASE),
            (record(name="done", key="k-other"), "o", LEASE),  # a rerun of "done"
            (record(name="new-2", key="k-new-2"), "o", LEASE),
        ]
    )
    decisions = [r.decision if isinstance(r, Registration) else r for r in results]
    assert decisions == [Decision.SEND, Decision.COMPLETED, Decision.SEND]
    assert {op.name for op in journal.pending()} == {"new-1", "new-2"}


@pytest.mark.parametrize("update_from", [True, False], ids=["one-statement", "row-by-row"])
def test_many_held_completions_are_written_and_fenced_ones_named(
    journal: Journal,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    update_from: bool,
) -> None:
    monkeypatch.setattr("idemclient.journal._sqlite._UPDATE_FROM", update_from)
    for i in range(70):  # more than one statement holds
        journal.register(record(name=f"op-{i}", key=f"k-{i}"), "elsewhere.example:1:1", LEASE)
    clock.now += LEASE + 1
    taken = journal.register(record(name="op-7", key="k-7"), current_owner(), LEASE)
    assert taken.lease_version == 2
    for i in range(70):  # the first holder finishes all of them, op-7 too late
        journal.finish(f"k-{i}", 1, "completed", StoredResponse(201, [], f"{i}".encode()))
    with caplog.at_level("WARNING", logger="idemclient"):
        journal.flush()
    assert [op.name for op in journal.pending()] == ["op-7"]
    assert journal.stored_response("op-69") == StoredResponse(201, [], b"69", True)
    fenced = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert len(fenced) == 1
    assert "k-7" in fenced[0]


def test_the_flusher_writes_held_completions_by_itself(journal_path: Path) -> None:
    import time

    journal = Journal(journal_path, flush_delay=0.01)
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b"ok"))
    deadline = time.monotonic() + 10
    state = None
    while time.monotonic() < deadline:
        with sqlite3.connect(journal.path) as db:
            state = db.execute("SELECT state FROM operations").fetchone()[0]
        if state == "completed":
            break
        time.sleep(0.01)
    assert state == "completed"
    journal.close()


def test_a_read_waits_for_completions_another_thread_is_writing(journal_path: Path) -> None:
    """The flusher has taken the held completions and not committed them yet: a read in
    this process waits for that commit instead of seeing the operation still pending."""
    import threading

    journal = Journal(journal_path, flush_delay=60)
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b"ok"))
    taken, commit = threading.Event(), threading.Event()

    def flusher_mid_write() -> None:
        with journal._shared.write_lock:
            db = journal._connection(relaxed=True)
            db.execute("BEGIN IMMEDIATE")
            journal._flush_in(db)  # taken: no longer held in memory
            taken.set()
            commit.wait(timeout=0.5)  # the read below must wait for this commit
            db.execute("COMMIT")

    thread = threading.Thread(target=flusher_mid_write)
    thread.start()
    assert taken.wait(timeout=10)
    op = journal.get("key-1")
    thread.join(timeout=10)
    assert op is not None
    assert op.state == "completed"
    journal.close()


def test_close_writes_held_completions(journal_path: Path) -> None:
    journal = Journal(journal_path, flush_delay=60)
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b"ok"))
    journal.close()
    with sqlite3.connect(journal_path) as db:
        assert db.execute("SELECT state FROM operations").fetchone() == ("completed",)


def test_threads_registering_together_share_commits(journal_path: Path) -> None:
    import threading

    journal = Journal(journal_path)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                r = journal.register(record(name=f"t{n}-{i}", key=f"k{n}-{i}"), "o", LEASE)
                assert r.decision is Decision.SEND
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(journal.operations()) == 160
    journal.close()


def test_an_idle_flusher_thread_ends_and_a_new_one_starts(journal_path: Path) -> None:
    import time

    journal = Journal(journal_path, flush_delay=0.01)
    shared = journal._shared
    shared.flusher_idle = 0.05

    def flushing() -> bool:  # this file's flusher runs (other tests' may come and go)
        return shared.flusher_pid != 0

    for round_ in range(2):
        reg = journal.register(record(name=f"op-{round_}", key=f"k-{round_}"), "o", LEASE)
        journal.finish(f"k-{round_}", reg.lease_version, "completed", StoredResponse(201, [], b""))
        assert flushing()  # started by the answer
        deadline = time.monotonic() + 10
        while flushing() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not flushing()  # it wrote the answer, then ended when idle
        with sqlite3.connect(journal.path) as db:
            state = db.execute("SELECT state FROM operations WHERE key = ?", (f"k-{round_}",))
            assert state.fetchone() == ("completed",)
    journal.close()


CLOSE_RACE = """
import random, sys, time
from idemclient._records import RequestRecord, StoredResponse
from idemclient.journal import Journal

for round_ in range(100):
    journal = Journal(f"{sys.argv[1]}/j{round_}.sqlite3", flush_delay=0.0)
    for i in range(100):
        rec = RequestRecord(None, f"k-{i}", False, "POST", "http://x/", [], b"{}", "fp")
        journal.register(rec, "o", 60.0)
    for i in range(100):
        journal.finish(f"k-{i}", 1, "completed", StoredResponse(201, [], b"ok"))
    time.sleep(random.uniform(0, 0.001))
    journal.close()  # perhaps while the flusher thread is writing
"""


def test_close_while_the_flusher_writes_is_safe(tmp_path: Path) -> None:
    # Closing a connection another thread executes on can crash the sqlite3 module: close()
    # must wait for the flusher's write. A crash kills the process, so it runs in a child.
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_RACE, str(tmp_path)], capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def test_connections_of_ended_threads_are_closed(journal_path: Path) -> None:
    import threading

    def open_files() -> int:
        fds = Path("/proc/self/fd")
        return sum(
            1 for fd in fds.iterdir() if str(journal_path) in os.path.realpath(fd)
        ) if fds.exists() else 0  # fmt: skip

    journal = Journal(journal_path)
    journal.pending()  # this thread's connection
    baseline = open_files()

    def work(n: int) -> None:  # a thread per request, as some servers do
        journal.register(record(name=f"op-{n}", key=f"k-{n}"), "o", LEASE)
        assert journal.get(f"op-{n}") is not None

    for n in range(60):
        thread = threading.Thread(target=work, args=(n,))
        thread.start()
        thread.join(timeout=30)
    last = threading.Thread(target=journal.pending)  # opening one closes the retired ones
    last.start()
    last.join(timeout=30)
    assert len(journal.operations()) == 60
    assert len(journal._connections) <= 3  # this thread's, and the flusher's
    if baseline:
        assert open_files() <= baseline + 6
    journal.close()


# -- the retention is a property of the file ----------------------------------------------


def test_retention_is_stored_in_the_file_and_changed_only_explicitly(journal_path: Path) -> None:
    Journal(journal_path, retention=timedelta(hours=1)).close()
    with Journal(journal_path) as journal:  # the CLI, a resumer: they read the file's
        assert journal.retention == timedelta(hours=1)
    with Journal(journal_path, retention=timedelta(hours=1)) as journal:
        assert journal.retention == timedelta(hours=1)
    with pytest.raises(ValueError, match="keeps keys for 1:00:00"):
        Journal(journal_path, retention=timedelta(hours=24))
    with Journal(journal_path) as journal:
        journal.set_retention(timedelta(hours=6))
    with Journal(journal_path, read_only=True) as journal:
        assert journal.retention == timedelta(hours=6)
    fresh = journal_path.with_name("fresh.sqlite3")
    with Journal(fresh) as journal:
        assert journal.retention == timedelta(hours=24)


def test_a_claim_past_the_retention_expires_instead_of_sending(
    journal_path: Path, clock: Clock
) -> None:
    """A retry after a long suspend (the machine slept through a backoff) must not resend an
    operation the server may have forgotten."""
    journal = Journal(journal_path, clock=clock, retention=timedelta(hours=24))
    reg = journal.register(record(), current_owner(), LEASE)
    clock.now += 25 * 3600
    claimed = journal.claim("key-1", reg.lease_version, current_owner(), LEASE, "HTTP 503")
    assert claimed.decision is Decision.EXPIRED
    op = journal.get("key-1")
    assert op is not None
    assert (op.state, op.attempts) == ("expired", 1)
    journal.close()


def test_a_claim_sees_an_abandoned_or_finished_operation(journal: Journal) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    journal.abandon("op-1")
    assert journal.claim("key-1", reg.lease_version, "o", LEASE, None).decision is (
        Decision.ABANDONED
    )


# -- several journals, one file, one process ------------------------------------------------


def test_journals_on_one_file_see_each_others_answers_at_once(journal_path: Path) -> None:
    """A worker that makes a client (and a journal) per job: the answer the first journal
    holds in memory is seen by the second at once, not as "in progress by another process"
    (our own pid)."""
    first = Journal(journal_path, flush_delay=60)
    second = Journal(journal_path, flush_delay=60)
    reg = first.register(record(), current_owner(), LEASE)
    first.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b"done"))
    again = second.register(record(), current_owner(), LEASE)
    assert again.decision is Decision.COMPLETED
    assert again.response is not None
    assert again.response.body == b"done"
    op = second.get("op-1")
    assert op is not None
    assert op.state == "completed"
    first.close()
    second.close()


def test_a_late_finish_is_written_by_another_journal_or_refused(journal_path: Path) -> None:
    first = Journal(journal_path, flush_delay=60)
    second = Journal(journal_path, flush_delay=60)
    reg = first.register(record(), current_owner(), LEASE)
    first.close()
    # another journal of this process on the file is open: it writes the answer
    first.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b"late"))
    stored = second.stored_response("op-1")
    assert stored is not None
    assert stored.body == b"late"
    reg2 = second.register(record(name="op-2", key="key-2"), current_owner(), LEASE)
    second.close()
    # nobody is left to write it: not dropped silently
    with pytest.raises(JournalError, match="closed: the answer for key key-2 was not recorded"):
        second.finish("key-2", reg2.lease_version, "completed", StoredResponse(201, [], b""))


# -- the file itself ----------------------------------------------------------------------


def test_a_deleted_journal_fails_closed_and_is_not_recreated(journal_path: Path) -> None:
    journal = Journal(journal_path)
    journal.register(record(), current_owner(), LEASE)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal_path}{suffix}").unlink(missing_ok=True)
    with pytest.raises(JournalError, match="deleted or moved while in use") as info:
        journal.register(record(name="op-2", key="key-2"), current_owner(), LEASE)
    assert info.value.path == str(journal_path)
    # a new thread (a new connection) does not bring an empty journal back either
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            journal.register(record(name="op-3", key="key-3"), current_owner(), LEASE)
        except JournalError as exc:
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert len(errors) == 1
    assert not journal_path.exists()
    journal.close()


def test_a_replaced_journal_fails_closed(journal_path: Path, tmp_path: Path) -> None:
    journal = Journal(journal_path)
    journal.register(record(), current_owner(), LEASE)
    other = tmp_path / "other.sqlite3"
    Journal(other).close()
    os.replace(other, journal_path)
    with pytest.raises(JournalError, match="replaced by another file"):
        journal.register(record(name="op-2", key="key-2"), current_owner(), LEASE)
    journal.close()


STAMPEDE_CHILD = """
import sys, time
from idemclient import Journal
path, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
with Journal(path) as journal:
    journal.operations()
print("ok")
"""


def test_many_processes_creating_one_journal_at_once(tmp_path: Path) -> None:
    """Before the fix, some got JournalError at `PRAGMA journal_mode = WAL` ("database is
    locked": the busy timeout does not apply there)."""
    for round_ in range(3):
        path = tmp_path / f"new-{round_}" / "journal.sqlite3"
        start = time.time() + 1.0
        children = [
            subprocess.Popen(
                [sys.executable, "-c", STAMPEDE_CHILD, str(path), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(12)
        ]
        results = [child.communicate(timeout=60) for child in children]
        failures = [err for (out, err) in results if out.strip() != "ok"]
        assert failures == []


def test_read_only_opens_nothing_for_writing(journal_path: Path) -> None:
    with Journal(journal_path) as journal:
        journal.register(record(), current_owner(), LEASE)
    with Journal(journal_path, read_only=True) as look:
        assert [op.name for op in look.pending()] == ["op-1"]
        with pytest.raises(JournalError, match="read-only"):
            look.abandon("op-1")
        with pytest.raises(JournalError, match="read-only"):
            look.register(record(name="op-2", key="k-2"), current_owner(), LEASE)
    with pytest.raises(JournalError, match="No such file"):
        Journal(journal_path.with_name("missing.sqlite3"), read_only=True)
    assert not journal_path.with_name("missing.sqlite3").exists()


@pytest.mark.parametrize(
    ("encoding", "column"),
    [
        # ASCII and UTF-8 text is stored as it always was: a list of pairs
        ("ascii", '[["X-Id", "7"]]'),
        ("utf-8", '[["X-Id", "7"]]'),
        # iso-8859-1 text names its encoding, or it would be read back as UTF-8
        ("iso-8859-1", '{"encoding": "iso-8859-1", "headers": [["X-Id", "7"]]}'),
    ],
    ids=["ascii", "utf-8", "iso-8859-1"],
)
def test_response_headers_keep_the_encoding_they_were_decoded_with(
    journal: Journal, journal_path: Path, encoding: str, column: str
) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    stored = StoredResponse(201, [("X-Id", "7")], b"ok", encoding=encoding)
    journal.finish("key-1", reg.lease_version, "completed", stored)
    journal.flush()
    with sqlite3.connect(journal_path) as db:
        assert db.execute("SELECT response_headers FROM operations").fetchone() == (column,)
    expected = encoding if encoding == "iso-8859-1" else "utf-8"  # a list reads as UTF-8
    assert journal.stored_response("op-1") == StoredResponse(
        201, [("X-Id", "7")], b"ok", encoding=expected
    )


def test_a_read_only_journal_sees_answers_held_in_this_process(journal_path: Path) -> None:
    journal = Journal(journal_path, flush_delay=60)
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", StoredResponse(201, [], b""))
    with Journal(journal_path, read_only=True) as look:
        op = look.get("op-1")
        assert op is not None
        assert op.state == "completed"
    journal.close()


def test_a_retention_equal_to_the_files_up_to_float_precision(journal_path: Path) -> None:
    odd = timedelta(days=999_999, microseconds=1)
    Journal(journal_path, retention=odd).close()
    with Journal(journal_path, retention=odd) as journal:
        assert abs(journal.retention - odd) < timedelta(milliseconds=1)


def test_a_journal_closes_its_last_connection_with_full_syncs(journal: Journal) -> None:
    """The last connection closed checkpoints the WAL and deletes it: whichever connection
    it is (a relaxed one does not sync), it is closed with `synchronous = FULL`."""
    done: list[str] = []

    class Connection:
        in_transaction = False

        def execute(self, sql: str) -> None:
            if self.in_transaction:
                raise sqlite3.OperationalError("Safety level may not be changed inside a txn")
            done.append(sql)

        def close(self) -> None:
            done.append("close")

    journal._close_one(Connection())  # type: ignore[arg-type]
    assert done == ["PRAGMA synchronous = FULL", "close"]
    # one left inside a transaction (a COMMIT that failed) is closed all the same: rolled back
    done.clear()
    stuck = Connection()
    stuck.in_transaction = True
    journal._close_one(stuck)  # type: ignore[arg-type]
    assert done == ["close"]


def test_the_flusher_checkpoints_the_wal_off_the_request_path(
    journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The WAL is copied into the database file by the flusher thread, after a flush, once
    enough was registered (not by the commit of a registration, which would hold its
    request for the copy and its fsyncs): the database file holds the operations while the
    journal is still open, and the WAL is then started again from its beginning."""
    from idemclient.journal import _sqlite

    monkeypatch.setattr(_sqlite, "_CHECKPOINT_EVERY", 20)
    journal = Journal(journal_path, flush_delay=0.01)
    journal.operations()  # the schema exists
    empty = journal_path.stat().st_size
    done = StoredResponse(201, [], b"{}")
    for i in range(60):
        reg = journal.register(record(None, key=f"k{i}"), current_owner(), 60.0)
        journal.finish(reg.operation.key, reg.lease_version, "completed", done)
    deadline = time.monotonic() + 10
    while journal_path.stat().st_size == empty:  # the flusher's checkpoint copied them
        assert time.monotonic() < deadline, "the WAL was never checkpointed"
        time.sleep(0.01)
    with sqlite3.connect(journal_path) as other:  # (read in the database file itself)
        assert other.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    registering = journal._connection()
    assert registering.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (
        _sqlite._BACKSTOP_PAGES
    )
    journal.close()
    with Journal(journal_path) as again:
        assert len(again.operations()) == 60

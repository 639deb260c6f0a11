"""The journal contract (`idemclient.journal.JournalBackend`), run against every backend:
SQLite, and PostgreSQL on a throwaway server. The same decisions, the same fencing, the same
upkeep, whichever stores the rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from idemclient import JournalError, PostgresJournal
from idemclient._records import Decision, RequestRecord, StoredResponse
from idemclient.journal import JournalBackend, _readback, open_journal
from idemclient.journal._owner import DEFAULT_LEASE_MARGIN, current_owner

from .test_journal import Clock, dead_owner, record

LEASE = 60.0


OK = StoredResponse(201, [("content-type", "application/json")], b'{"id": 1}')

Opener = Callable[..., JournalBackend]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens journals at one location of the backend under test (the same one each call)."""
    if request.param == "sqlite":
        location = str(tmp_path / "journal.sqlite3")
    else:
        location = request.getfixturevalue("pg_dsn")
    opened: list[JournalBackend] = []

    def open_(**options: Any) -> JournalBackend:
        journal = open_journal(location, **options)
        opened.append(journal)
        return journal

    yield open_
    for journal in opened:
        journal.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def journal(opener: Opener, clock: Clock) -> JournalBackend:
    # no automatic purge: a test that moves the clock on purges by hand
    return opener(clock=clock, auto_purge=None)


def test_a_new_operation_is_inserted_claimed_and_fresh(journal: JournalBackend) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    assert (reg.decision, reg.lease_version, reg.fresh) == (Decision.SEND, 1, True)
    op = journal.get("op-1")
    assert op is not None
    assert (op.key, op.state, op.attempts) == ("key-1", "pending", 1)
    assert journal.stored_request("key-1")[3] == b'{"amount": 5}'


def test_a_live_holder_keeps_it_and_its_answer_is_replayed(journal: JournalBackend) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    again = journal.register(record(), current_owner(), LEASE)
    assert again.decision is Decision.IN_PROGRESS
    journal.finish("key-1", reg.lease_version, "completed", OK)
    done = journal.register(record(), current_owner(), LEASE)  # a read sees held answers
    assert done.decision is Decision.COMPLETED
    assert done.response == OK
    assert journal.stored_response("op-1") == OK


def test_another_request_under_a_known_name_or_key_is_a_mismatch(journal: JournalBackend) -> None:
    journal.register(record(), current_owner(), LEASE)
    other = journal.register(record(body=b"{}"), current_owner(), LEASE)
    assert other.decision is Decision.MISMATCH
    by_key = journal.register(record(name=None, body=b"{}", key_given=True), current_owner(), LEASE)
    assert by_key.decision is Decision.MISMATCH


def test_a_vanished_holder_is_taken_over_and_fenced_out(journal: JournalBackend) -> None:
    dead = dead_owner()
    first = journal.register(record(), dead, LEASE)
    second = journal.register(record(), current_owner(), LEASE)
    assert (second.decision, second.lease_version) == (Decision.SEND, first.lease_version + 1)
    assert second.operation.recoveries == 1
    # the old holder's writes change nothing now
    assert journal.release("key-1", first.lease_version, "late") is False
    journal.finish("key-1", first.lease_version, "completed", OK)
    journal.flush()
    op = journal.get("key-1")
    assert op is not None
    assert op.state == "pending"
    stale = journal.claim("key-1", first.lease_version, current_owner(), LEASE, None)
    assert stale.decision is Decision.IN_PROGRESS


def test_a_holder_on_another_host_is_waited_out_until_its_lease_ends(
    journal: JournalBackend, clock: Clock
) -> None:
    journal.register(record(), "far-away-host:123:456", LEASE)
    held = journal.register(record(), current_owner(), LEASE)
    assert held.decision is Decision.IN_PROGRESS
    clock.now += LEASE + 1
    taken = journal.register(record(), current_owner(), LEASE)
    assert taken.decision is Decision.SEND
    assert taken.operation.attempts == 2


def test_claims_release_and_unclaim(journal: JournalBackend) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    nxt = journal.claim("key-1", reg.lease_version, current_owner(), LEASE, "HTTP 503")
    assert (nxt.decision, nxt.operation.attempts) == (Decision.SEND, 2)
    assert journal.release("key-1", nxt.lease_version, "gave up") is True
    again = journal.register(record(), current_owner(), LEASE)
    assert (again.decision, again.operation.attempts) == (Decision.SEND, 3)
    journal.unclaim("key-1", again.lease_version, fresh=False)
    op = journal.get("key-1")
    assert op is not None
    assert (op.attempts, op.last_error) == (2, "cancelled before it was sent")
    fresh = journal.register(record(name="op-2", key="key-2"), current_owner(), LEASE)
    journal.unclaim("key-2", fresh.lease_version, fresh=True)
    assert journal.get("key-2") is None


@pytest.mark.parametrize("never_sent", [False, True])
def test_an_unclaimed_retry_of_a_never_sent_operation_stays_never_sent(
    journal: JournalBackend, clock: Clock, never_sent: bool
) -> None:
    """A claim given back unsent (cancelled before the send) after earlier attempts that
    never reached the server either (`never_sent`): the operation stays provably never sent,
    and no retention expires it. Without `never_sent` (an earlier attempt may have reached
    it), a claim past the first leaves it sent."""
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, "refused", never_sent=never_sent)
    again = journal.register(record(), current_owner(), LEASE)
    assert again.sent_before is not never_sent
    journal.unclaim("key-1", again.lease_version, fresh=False, never_sent=never_sent)
    clock.now += 25 * 3600
    late = journal.register(record(), current_owner(), LEASE)
    assert late.decision is (Decision.SEND if never_sent else Decision.EXPIRED)


def test_past_the_retention_a_sent_operation_expires(journal: JournalBackend, clock: Clock) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, "lost")
    clock.now += 25 * 3600
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.EXPIRED
    assert [op.state for op in journal.operations()] == ["expired"]
    reissued = journal.reissue("op-1")
    assert (reissued.state, reissued.previous_key, reissued.attempts) == ("pending", "key-1", 0)


def test_an_unnamed_expired_operation_is_reissued_by_its_key(
    journal: JournalBackend, clock: Clock
) -> None:
    """Reissued by its key, an unnamed operation is found again under its new one (the
    change was committed, then the look-up by the old key failed: an AssertionError)."""
    reg = journal.register(record(name=None), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, "lost")
    clock.now += 25 * 3600
    assert journal.register(record(name=None, key_given=True), current_owner(), LEASE).decision is (
        Decision.EXPIRED
    )
    reissued = journal.reissue("key-1")
    assert (reissued.state, reissued.previous_key, reissued.name) == ("pending", "key-1", None)
    assert reissued.key != "key-1"


def _reissued(journal: JournalBackend, clock: Clock, key: str, name: str | None) -> str:
    """Send `key`'s operation, lose it, let it expire, reissue it: its new key."""
    reg = journal.register(record(name=name, key=key, key_given=True), current_owner(), LEASE)
    assert reg.decision is Decision.SEND
    journal.release(reg.operation.key, reg.lease_version, "lost")
    clock.now += 25 * 3600
    assert journal.expire_stale() != []
    return journal.reissue(name or reg.operation.key).key


def test_a_key_given_up_by_a_reissue_is_never_a_new_operation(
    journal: JournalBackend, clock: Clock
) -> None:
    """A request that still carries the key its operation gave up when a person reissued it
    (a caller's retry of the call that failed, an SDK's stored key) is that operation: refused,
    nothing sent. It was inserted as a new operation and sent under the old key, which the
    server had forgotten, and a resume then sent the reissued one: performed twice."""
    second = _reissued(journal, clock, "key-1", None)
    old = record(name=None, key="key-1", key_given=True)
    refused = journal.register(old, current_owner(), LEASE)
    assert refused.decision is Decision.MISMATCH
    assert refused.operation.key == second
    assert "given up" in (refused.detail or "")
    # with new operations, in one batch (one insert for all of them, where it can)
    fresh = record(name=None, key="key-9", key_given=True)
    results = journal.register_many(
        [(old, current_owner(), LEASE), (fresh, current_owner(), LEASE)]
    )
    assert [r.decision for r in results if not isinstance(r, JournalError)] == [
        Decision.MISMATCH, Decision.SEND
    ]  # fmt: skip
    # reissued again: both keys it gave up are still its own
    third = _reissued(journal, clock, second, None)
    for key in ("key-1", second):
        again = journal.register(record(name=None, key=key, key_given=True), current_owner(), LEASE)
        assert (again.decision, again.operation.key) == (Decision.MISMATCH, third)
    assert sorted(op.key for op in journal.operations()) == sorted([third, "key-9"])


def test_a_named_operation_rerun_with_a_key_it_gave_up_goes_out_under_its_new_key(
    journal: JournalBackend, clock: Clock
) -> None:
    new_key = _reissued(journal, clock, "key-1", "op-1")
    reg = journal.register(record(key="key-1", key_given=True), current_owner(), LEASE)
    assert (reg.decision, reg.operation.key) == (Decision.SEND, new_key)
    assert [op.key for op in journal.operations()] == [new_key]


def test_a_never_sent_operation_does_not_expire(journal: JournalBackend, clock: Clock) -> None:
    reg = journal.register(record(), current_owner(), LEASE)
    journal.release("key-1", reg.lease_version, "refused", never_sent=True)
    clock.now += 25 * 3600
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.SEND


def test_an_operation_whose_holders_keep_vanishing_is_parked(journal: JournalBackend) -> None:
    dead = dead_owner()
    for _ in range(4):  # the first claim, then three recoveries
        assert journal.register(record(), dead, LEASE).decision is Decision.SEND
    parked = journal.register(record(), current_owner(), LEASE)
    assert parked.decision is Decision.PARKED
    assert journal.unpark("op-1").state == "pending"
    assert journal.register(record(), current_owner(), LEASE).decision is Decision.SEND


def test_expire_stale_pending_and_abandon(journal: JournalBackend, clock: Clock) -> None:
    for i in range(3):
        reg = journal.register(record(f"op-{i}", f"key-{i}"), current_owner(), LEASE)
        journal.release(f"key-{i}", reg.lease_version, "lost")
    clock.now += 25 * 3600
    assert [op.name for op in journal.pending()] == []
    expired = journal.expire_stale(lambda op: op.name != "op-1")
    assert [op.name for op in expired] == ["op-0", "op-2"]
    assert [op.state for op in journal.operations()] == ["expired", "pending", "expired"]
    assert journal.abandon("op-1").state == "abandoned"
    with pytest.raises(ValueError, match="abandoned"):
        journal.abandon("op-1")
    with pytest.raises(KeyError):
        journal.abandon("nobody")


def test_purge_deletes_only_finished_rows_past_the_horizon(
    journal: JournalBackend, clock: Clock
) -> None:
    done = journal.register(record("done", "k-done"), current_owner(), LEASE)
    journal.finish("k-done", done.lease_version, "completed", OK)
    journal.register(record("waiting", "k-waiting"), current_owner(), LEASE)
    journal.flush()
    with pytest.raises(ValueError, match="retention"):
        journal.purge(timedelta(hours=1))
    clock.now += 31 * 86400
    assert journal.purge() == 1
    assert [op.name for op in journal.operations()] == ["waiting"]


def test_the_retention_belongs_to_the_journal(opener: Opener) -> None:
    first = opener(retention=timedelta(hours=2))
    assert first.retention == timedelta(hours=2)
    assert opener().retention == timedelta(hours=2)  # read from where it is stored
    with pytest.raises(ValueError, match="retention"):
        opener(retention=timedelta(hours=3))
    first.set_retention(timedelta(hours=5))
    assert opener().retention == timedelta(hours=5)


def test_a_large_answer_keeps_status_and_headers_only(opener: Opener) -> None:
    journal = opener(max_response_body=4)
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", OK)
    stored = journal.stored_response("key-1")
    assert stored is not None
    assert (stored.status, stored.body, stored.body_kept) == (201, b"", False)


def test_threads_registering_one_name_at_once_send_it_once(opener: Opener) -> None:
    journals = [opener() for _ in range(4)]
    results: list[Decision] = []
    lock = threading.Lock()

    def work(journal: JournalBackend) -> None:
        for _ in range(5):
            decision = journal.register(record(), current_owner(), LEASE).decision
            with lock:
                results.append(decision)

    threads = [threading.Thread(target=work, args=(j,)) for j in journals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 20
    assert results.count(Decision.SEND) == 1
    assert set(results) == {Decision.SEND, Decision.IN_PROGRESS}


def test_a_closed_journal_refuses_a_late_answer(opener: Opener) -> None:
    journal = opener()
    reg = journal.register(record(), current_owner(), LEASE)
    journal.close()
    assert journal.closed
    with pytest.raises(JournalError):
        journal.finish("key-1", reg.lease_version, "completed", OK)
    with pytest.raises(JournalError):
        journal.register(record("op-2", "key-2"), current_owner(), LEASE)


def test_an_answer_held_in_memory_is_seen_through_every_journal_of_the_process(
    opener: Opener, clock: Clock
) -> None:
    """Completions wait in memory for the flusher (an hour here): every read and decision
    through any journal of this process on the same store sees them all the same."""
    mine, other = opener(clock=clock, flush_delay=3600), opener(clock=clock, flush_delay=3600)
    reg = mine.register(record(), current_owner(), LEASE)
    late = mine.register(record("op-2", "key-2"), dead_owner(), LEASE)
    mine.finish("key-1", reg.lease_version, "completed", OK)
    taken = other.register(record("op-2", "key-2"), current_owner(), LEASE)
    mine.finish("key-2", late.lease_version, "completed", OK)  # fenced out: taken over
    for journal in (other, mine):
        op = journal.get("op-1")
        assert op is not None
        assert (op.state, op.response_status) == ("completed", 201)
        assert journal.stored_response("key-1") == OK
        again = journal.register(record(), current_owner(), LEASE)
        assert (again.decision, again.response) == (Decision.COMPLETED, OK)
        assert (
            journal.claim("key-1", reg.lease_version, current_owner(), LEASE, None).decision
            is Decision.COMPLETED
        )
        stale = journal.get("op-2")
        assert stale is not None
        assert (stale.state, stale.attempts) == ("pending", 2)
        found = journal.by_keys(["key-2", "key-1", "no-such-key", "key-1"])
        assert sorted(found) == ["key-1", "key-2"]
        assert (found["key-1"].state, found["key-1"].response_status) == ("completed", 201)
        assert (found["key-2"].state, found["key-2"].attempts) == ("pending", 2)
    with pytest.raises(ValueError, match="completed"):
        other.abandon("op-1")
    assert taken.lease_version == late.lease_version + 1
    third = mine.register(record("op-3", "key-3"), current_owner(), LEASE)
    clock.now += 25 * 3600  # all past the retention
    mine.finish("key-3", third.lease_version, "completed", OK)
    # only the unanswered one expires: a held answer means it is finished, not stale
    assert [op.name for op in other.expire_stale()] == ["op-2"]
    assert [op.state for op in other.operations()] == ["completed", "expired", "completed"]


def test_operations_are_read_back_by_key_many_at_once(
    journal: JournalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`by_keys`: each known key's operation as it is now, in reads of up to KEYS_PER_READ
    keys (3 here), an unknown key left out; no key, no read."""
    monkeypatch.setattr(_readback, "KEYS_PER_READ", 3)
    regs = [
        journal.register(record(f"op-{i}", f"key-{i}"), current_owner(), LEASE) for i in range(7)
    ]
    for i in (0, 4, 6):
        journal.finish(f"key-{i}", regs[i].lease_version, "completed", OK)
    journal.release("key-5", regs[5].lease_version, "lost")
    found = journal.by_keys([f"key-{i}" for i in range(8)])
    assert {k: (op.name, op.state) for k, op in found.items()} == {
        f"key-{i}": (f"op-{i}", "completed" if i in (0, 4, 6) else "pending") for i in range(7)
    }
    assert found["key-5"].last_error == "lost"
    assert journal.by_keys([]) == {}


def test_a_resume_decides_on_the_row_as_it_is_now_not_as_the_backlog_read_it(
    opener: Opener,
) -> None:
    mine, other = opener(), opener()
    for i in (1, 2, 3):
        reg = mine.register(record(f"op-{i}", f"key-{i}"), current_owner(), LEASE)
        mine.release(f"key-{i}", reg.lease_version, "lost")
    backlog = mine.pending_requests()  # what a resume reads first, then claims one by one
    assert [op.name for op, _ in backlog] == ["op-1", "op-2", "op-3"]
    assert other.register(record("op-1", "key-1"), "far-away-host:1:2", LEASE).decision is (
        Decision.SEND
    )
    other.abandon("op-2")

    def resumed(i: int) -> Decision:
        again = record(f"op-{i}", f"key-{i}", key_given=True, resume=True)
        return mine.register(again, current_owner(), LEASE).decision

    assert resumed(1) is Decision.IN_PROGRESS  # another host holds it now
    assert resumed(2) is Decision.ABANDONED
    assert resumed(3) is Decision.SEND
    assert resumed(3) is Decision.IN_PROGRESS  # claimed once, by the first
    op = mine.get("op-3")
    assert op is not None
    assert op.attempts == 2


def test_registrations_made_together_decide_as_one_by_one(journal: JournalBackend) -> None:
    """What the async transport commits for tasks that wait together: new operations go in
    at once, and one whose name an earlier one of the batch took, or a known one, is decided
    as it would be alone."""
    known = journal.register(record("known", "k-known"), current_owner(), LEASE)
    journal.finish("k-known", known.lease_version, "completed", OK)
    results = journal.register_many(
        [
            (record("a", "k-a"), current_owner(), LEASE),
            (record("b", "k-b"), current_owner(), LEASE),
            (record("a", "k-a2"), current_owner(), LEASE),  # taken by the first: ours, live
            (record("known", "k-other"), current_owner(), LEASE),  # answered: replayed
            (record("b", "k-b3", body=b"{}"), current_owner(), LEASE),  # not the same request
        ]
    )
    decisions = [r.decision if not isinstance(r, Exception) else r for r in results]
    assert decisions == [
        Decision.SEND, Decision.SEND, Decision.IN_PROGRESS, Decision.COMPLETED, Decision.MISMATCH,
    ]  # fmt: skip
    assert [op.name for op in journal.operations()] == ["known", "a", "b"]
    assert [op.key for op in journal.operations()] == ["k-known", "k-a", "k-b"]


def _looked(journal: JournalBackend) -> JournalBackend:
    """The journal once its upkeep thread has made its first pass (bounded: 10 s)."""
    assert journal._upkeep_ran.wait(10)  # type: ignore[attr-defined]
    return journal


def test_the_daily_purge_runs_at_open_once_a_day_and_spares_unfinished_rows(
    opener: Opener, clock: Clock
) -> None:
    setup = opener(clock=clock, auto_purge=None)
    for name in ("done", "dropped", "waiting", "stale"):
        reg = setup.register(record(name, f"k-{name}"), current_owner(), LEASE)
        if name == "done":
            setup.finish("k-done", reg.lease_version, "completed", OK)
        else:
            setup.release(f"k-{name}", reg.lease_version, "lost", never_sent=name == "waiting")
    setup.abandon("dropped")
    clock.now += 25 * 3600
    assert [op.name for op in setup.expire_stale()] == ["stale"]
    clock.now += 31 * 86400
    assert setup.purge_if_due() is None  # turned off
    assert len(setup.operations()) == 4
    opened = _looked(opener(clock=clock))  # the upkeep thread purged as the journal opened
    assert [op.name for op in opened.operations()] == ["waiting", "stale"]
    # once a day for the whole journal: not again today, through any journal of it
    finished = setup.register(record("later", "k-later"), current_owner(), LEASE)
    setup.finish("k-later", finished.lease_version, "completed", OK)
    clock.now += 3600
    assert opened.purge_if_due() is None
    assert _looked(opener(clock=clock)).purge_if_due() is None
    clock.now += 32 * 86400
    assert opened.purge_if_due() == 1  # the day is over: "later" is 32 days old
    assert [op.name for op in opened.operations()] == ["waiting", "stale"]


def test_the_automatic_purge_keeps_what_the_retention_protects(
    opener: Opener, clock: Clock
) -> None:
    journal = opener(clock=clock, auto_purge=None, retention=timedelta(days=40))
    reg = journal.register(record(), current_owner(), LEASE)
    journal.finish("key-1", reg.lease_version, "completed", OK)
    journal.flush()
    clock.now += 35 * 86400  # past `auto_purge`, within the retention
    shorter = _looked(opener(clock=clock, auto_purge=timedelta(hours=1)))
    assert [op.name for op in shorter.operations()] == ["op-1"]
    clock.now += 6 * 86400
    assert shorter.purge_if_due() == 1
    with pytest.raises(ValueError, match="auto_purge"):
        opener(auto_purge=timedelta(0))


def _expired(journal: JournalBackend, clock: Clock, *names: str) -> None:
    for name in names:
        reg = journal.register(record(name, f"k-{name}"), current_owner(), LEASE)
        journal.release(f"k-{name}", reg.lease_version, "read timeout")
    clock.now += 25 * 3600
    assert sorted(op.name or "" for op in journal.expire_stale()) == sorted(names)


def test_reconciling_an_expired_operation_acts_on_the_verdict_and_keeps_it(
    journal: JournalBackend, clock: Clock
) -> None:
    _expired(journal, clock, "paid", "lost", "unsure", "answered")
    found = journal.reconcile("paid", "happened", "billing.check", detail="charge ch_1 found")
    assert (found.state, found.response_status) == ("completed", None)
    assert journal.register(record("paid", "k-paid"), current_owner(), LEASE).decision is (
        Decision.COMPLETED
    )
    answer = StoredResponse(200, [("content-type", "application/json")], b'{"id": "ch_2"}')
    done = journal.reconcile("answered", "happened", "billing.check", response=answer)
    assert journal.stored_response("answered") == answer
    assert done.response_status == 200
    again = journal.reconcile("lost", "not_happened", "billing.check")
    assert (again.state, again.previous_key, again.attempts) == ("pending", "k-lost", 0)
    assert again.key != "k-lost"
    assert [op.name for op in journal.pending()] == ["lost"]  # the next resume sends it
    for verdict in ("unknown", "error"):
        still = journal.reconcile("unsure", verdict, "billing.check", detail="API down")
        assert still.state == "expired"
    trail = journal.decisions("unsure")
    assert [(v.verdict, v.decided_by, v.detail) for v in trail] == [
        ("unknown", "billing.check", "API down"), ("error", "billing.check", "API down"),
    ]  # fmt: skip
    assert trail[0].decided_at == trail[1].decided_at  # the journal's clock
    lost = journal.decisions(again.key)  # found under its new key, decided under the old
    assert [(v.key, v.verdict) for v in lost] == [("k-lost", "not_happened")]
    with pytest.raises(ValueError, match="expired"):
        journal.reconcile("paid", "happened", "billing.check")  # completed now: not expired
    with pytest.raises(ValueError, match="verdict"):
        journal.reconcile("unsure", "maybe", "billing.check")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        journal.decisions("nobody")
    clock.now += 31 * 86400
    assert journal.purge() == 2  # the two completed; their decisions go with them
    assert journal.decisions("unsure") != []
    with pytest.raises(KeyError):
        journal.decisions("paid")


@pytest.mark.parametrize("ending", ["finish", "release"])
def test_a_held_lease_is_renewed_until_the_answer_is_recorded_or_released(
    opener: Opener, ending: str
) -> None:
    """A holder still reading its answer past its lease keeps it: its journal renews the
    lease, so that another host's registration of the operation finds it in progress, not
    free. Once the answer is recorded (or the lease released) nothing is renewed."""
    short = 1.5
    journal = opener(auto_purge=None)
    if isinstance(journal, PostgresJournal):  # its leases are the timeouts + `lease_margin`
        journal.close()
        journal = opener(auto_purge=None, lease_margin=short)
        lease = DEFAULT_LEASE_MARGIN
    else:
        lease = short
    held = journal.register(record(), current_owner(), lease)
    assert held.decision is Decision.SEND
    time.sleep(short * 2.5)  # its first lease ended long ago
    elsewhere = journal.register(record(), "another-host:1:1", lease)
    assert elsewhere.decision is Decision.IN_PROGRESS, elsewhere
    if ending == "finish":
        journal.finish("key-1", held.lease_version, "completed", OK)
        assert journal.register(record(), "another-host:1:1", lease).decision is (
            Decision.COMPLETED
        )
        assert "key-1" not in journal._holds.held()  # type: ignore[attr-defined]
    else:
        journal.release("key-1", held.lease_version, "the caller gave up")
        assert "key-1" not in journal._holds.held()  # type: ignore[attr-defined]
        taken = journal.register(record(), "another-host:1:1", lease)
        assert taken.decision is Decision.SEND  # released: free for another holder


def test_a_retention_changed_elsewhere_is_read_again_by_a_resume(opener: Opener) -> None:
    """An operator shortens the retention (the server forgets keys sooner): a journal that
    was open before reads it again at its next resume (`expire_stale`, `pending`), not
    only when reopened, so it does not resend what the server may have forgotten."""
    worker, operator = opener(), opener()
    assert worker.retention == timedelta(hours=24)
    operator.set_retention(timedelta(hours=1))
    assert worker.retention == timedelta(hours=24)  # not read at every request
    worker.pending()
    assert worker.retention == timedelta(hours=1)
    operator.set_retention(timedelta(hours=2))
    worker.expire_stale()
    assert worker.retention == timedelta(hours=2)
    assert worker.refresh_retention() == timedelta(hours=2)


def test_a_retention_shortened_elsewhere_holds_for_an_open_journal_at_once(
    opener: Opener, clock: Clock
) -> None:
    """The operator shortens the retention while a worker's journal is open: the worker's
    rerun (a registration) and retry (a claim) of an operation sent two hours ago decide on
    the new retention, read in their own transaction, and do not send it again."""
    worker, operator = opener(clock=clock), opener(clock=clock)
    reg = worker.register(record(), current_owner(), LEASE)
    worker.release("key-1", reg.lease_version, "lost")
    retry = worker.register(record("op-2", "key-2"), current_owner(), LEASE)
    clock.now += 2 * 3600
    operator.set_retention(timedelta(hours=1))
    assert worker.register(record(), current_owner(), LEASE).decision is Decision.EXPIRED
    claimed = worker.claim("key-2", retry.lease_version, current_owner(), LEASE, "lost")
    assert claimed.decision is Decision.EXPIRED
    assert worker.retention == timedelta(hours=1)


def test_a_resume_claims_nothing_past_a_retention_shortened_since_it_read_its_backlog(
    opener: Opener, clock: Clock
) -> None:
    """A resume read its backlog, then an operator shortened the retention: the claims it
    makes on the rows it read (PostgreSQL's fast path, one statement for many) are fenced by
    the retention as stored now, and what is past it expires instead of being sent."""
    worker, operator = opener(clock=clock), opener(clock=clock)
    for i in (1, 2, 3):
        reg = worker.register(record(f"op-{i}", f"key-{i}"), current_owner(), LEASE)
        worker.release(f"key-{i}", reg.lease_version, "lost")
    clock.now += 2 * 3600
    assert len(worker.pending_requests()) == 3  # the resume's read: all within 24 hours
    operator.set_retention(timedelta(hours=1))

    def resumed(i: int) -> tuple[RequestRecord, str, float]:
        return record(f"op-{i}", f"key-{i}", key_given=True, resume=True), current_owner(), LEASE

    assert worker.register(*resumed(1)).decision is Decision.EXPIRED
    many = worker.register_many([resumed(2), resumed(3)])
    assert [r.decision for r in many if not isinstance(r, JournalError)] == [Decision.EXPIRED] * 2
    assert [op.state for op in worker.operations()] == ["expired"] * 3


def test_a_purge_checks_its_horizon_against_the_retention_stored_now(opener: Opener) -> None:
    """Another process lengthened the retention: a purge through a journal opened before
    refuses a horizon shorter than the new one (those rows' keys the server still keeps)."""
    mine, operator = opener(), opener()
    operator.set_retention(timedelta(days=40))
    with pytest.raises(ValueError, match="retention"):
        mine.purge(older_than=timedelta(days=30))


def test_the_daily_purge_takes_a_retention_made_longer_since_it_was_read(
    opener: Opener, clock: Clock
) -> None:
    """Another process made the retention longer than `auto_purge`: the daily purge, its
    slot taken, purges no sooner than the new retention instead of refusing (which would
    skip the day's purge for every process)."""
    mine, operator = opener(clock=clock), opener(clock=clock, auto_purge=None)
    assert mine._upkeep_ran.wait(10)  # type: ignore[attr-defined]  # the day's slot taken
    operator.set_retention(timedelta(days=40))
    clock.now += 2 * 86400.0  # due again
    assert mine.purge_if_due() == 0
    assert mine.retention == timedelta(days=40)

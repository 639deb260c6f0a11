"""The registration rules (`idemclient.journal._decide`): a pure function, table by table."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from idemclient._records import Decision, Operation, RequestRecord, StoredResponse, utc
from idemclient.journal import _decide
from idemclient.journal._decide import (
    ClaimUpdate,
    Decided,
    Expire,
    Insert,
    Limits,
    Park,
    StoredRow,
)

NOW = 1_800_000_000.0
RETENTION = timedelta(hours=24)
URL = "https://api.example/charges"
LIMITS = Limits(retention=RETENTION, max_recoveries=3, alive=lambda owner: owner == "alive")


def rec(**changes: Any) -> RequestRecord:
    base = RequestRecord(
        name="op", key="k", key_given=False, method="POST", url=URL, headers=[], body=b"{}",
        fingerprint="fp",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def row(*, op: dict[str, Any] | None = None, **changes: Any) -> StoredRow:
    operation = Operation(
        "op", "k", "pending", "POST", URL, 1, utc(NOW - 60), utc(NOW - 60), None, None
    )
    base = StoredRow(
        operation=dataclasses.replace(operation, **(op or {})),
        fingerprint="fp",
        first_sent_at=NOW - 60,
        lease_owner=None,
        lease_expires=None,
        lease_version=1,
    )
    return dataclasses.replace(base, **changes)


def register(
    record: RequestRecord, by_name: StoredRow | None = None, by_key: StoredRow | None = None
) -> Decided:
    return _decide.register(
        record, by_name, by_key, owner="me", lease_seconds=60.0, now=NOW, limits=LIMITS
    )


def claim(stored: StoredRow, version: int = 1) -> Decided:
    return _decide.claim(
        stored, version, owner="me", lease_seconds=60.0, last_error="HTTP 503", now=NOW,
        limits=LIMITS,
    )  # fmt: skip


# -- which rows a registration reads ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key_given", "resume", "expected"),
    [
        ("op", False, False, (True, False)),
        ("op", True, False, (True, True)),
        (None, True, False, (False, True)),
        (None, False, True, (False, True)),
        (None, False, False, (False, False)),
    ],
)
def test_lookups(name: str | None, key_given: bool, resume: bool, expected: Any) -> None:
    assert _decide.lookups(rec(name=name, key_given=key_given, resume=resume)) == expected


# -- new operations --------------------------------------------------------------------------


def test_an_unknown_operation_is_inserted_and_claimed() -> None:
    decided = register(rec())
    assert decided.write == Insert()
    reg = decided.registration
    assert (reg.decision, reg.lease_version, reg.fresh) == (Decision.SEND, 1, True)
    op = reg.operation
    assert (op.name, op.key, op.state, op.attempts, op.created_at) == (
        "op", "k", "pending", 1, utc(NOW),
    )  # fmt: skip
    assert reg == _decide.new_registration(rec(), NOW)


def test_a_row_found_by_key_is_ignored_when_the_key_is_ours() -> None:
    """No name and a key drawn for this call: a row with that key is not this operation's."""
    assert register(rec(name=None), by_key=row()).write == Insert()


# -- finished operations ---------------------------------------------------------------------


@pytest.mark.parametrize("state", ["completed", "conflict", "abandoned", "expired", "parked"])
def test_a_finished_operation_is_said_as_it_is_with_its_answer(state: str) -> None:
    answer = StoredResponse(201, [("content-type", "application/json")], b"{}")
    stored = row(op={"state": state}, response=answer)
    for decided in (register(rec(), by_name=stored), claim(stored)):
        assert decided.write is None
        assert decided.registration.decision is Decision(state)
        assert decided.registration.response == answer
        assert decided.registration.operation == stored.operation


# -- mismatches ------------------------------------------------------------------------------


def test_another_request_under_a_known_name_is_a_mismatch() -> None:
    decided = register(rec(fingerprint="other"), by_name=row())
    assert decided.write is None
    assert decided.registration.decision is Decision.MISMATCH
    assert "another request (POST https://api.example/charges)" in decided.registration.detail


def test_a_resume_is_not_checked_against_the_fingerprint() -> None:
    decided = register(rec(name=None, resume=True, fingerprint="other"), by_key=row())
    assert decided.registration.decision is Decision.SEND


@pytest.mark.parametrize(
    ("state", "decision"), [("pending", Decision.SEND), ("completed", Decision.MISMATCH)]
)
def test_a_moved_fingerprint_counts_only_while_pending(state: str, decision: Decision) -> None:
    """A 307/308 sent the request on: the request at its new URL is the same operation, but
    only while the operation is pending."""
    stored = row(op={"state": state}, moved_fingerprint="moved")
    moved_url = "https://api.example/v2/charges"
    decided = register(rec(url=moved_url, fingerprint="moved"), by_name=stored)
    assert decided.registration.decision is decision
    if decision is Decision.SEND:
        assert isinstance(decided.write, ClaimUpdate)
        assert decided.write.url == moved_url
        assert decided.write.fingerprint == "fp"  # the operation's own, kept


def test_a_given_key_that_belongs_to_another_named_operation_is_a_mismatch() -> None:
    other = row(op={"name": "other-op", "key": "k"})
    for by_name in (None, row(op={"key": "k-op"})):
        decided = register(rec(key_given=True), by_name=by_name, by_key=other)
        assert decided.registration.decision is Decision.MISMATCH
        assert decided.registration.operation == other.operation
        assert decided.registration.detail == "key 'k' already belongs to another operation"


def test_a_given_key_with_a_name_that_holds_it_is_that_operation() -> None:
    stored = row()
    decided = register(rec(key_given=True), by_name=stored, by_key=stored)
    assert decided.registration.decision is Decision.SEND


def test_a_name_with_another_key_given_keeps_the_journals_key() -> None:
    """Inside a named operation the journal's key is the key (an SDK's per-call key goes)."""
    decided = register(rec(key="sdk-key", key_given=True), by_name=row())
    assert decided.registration.decision is Decision.SEND
    assert decided.registration.operation.key == "k"


def test_a_given_key_without_a_name_is_looked_up_by_key() -> None:
    decided = register(rec(name=None, key_given=True), by_key=row(op={"name": None}))
    assert decided.registration.decision is Decision.SEND
    assert register(rec(name=None, key_given=True)).write == Insert()


# -- retention ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_sent_at", "decision"),
    [
        (NOW - RETENTION.total_seconds(), Decision.SEND),  # exactly at the edge: still kept
        (NOW - RETENTION.total_seconds() - 0.001, Decision.EXPIRED),
        (None, Decision.SEND),  # never sent: no retention applies, however old
    ],
)
def test_retention_edge(first_sent_at: float | None, decision: Decision) -> None:
    stored = row(first_sent_at=first_sent_at, op={"created_at": utc(NOW - 10 * 86400)})
    for decided in (register(rec(), by_name=stored), claim(stored)):
        assert decided.registration.decision is decision
        if decision is Decision.EXPIRED:
            assert decided.write == Expire("k", NOW)
            assert decided.registration.operation.state == "expired"
            assert decided.registration.operation.updated_at == utc(NOW)


# -- leases and recoveries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "expires", "decision"),
    [
        ("alive", NOW + 1, Decision.IN_PROGRESS),  # a live holder, lease running
        ("alive", NOW, Decision.SEND),  # its lease ends exactly now: free
        ("dead", NOW + 1, Decision.SEND),  # its holder is gone
        (None, None, Decision.SEND),  # given back
    ],
)
def test_lease(owner: str | None, expires: float | None, decision: Decision) -> None:
    decided = register(rec(), by_name=row(lease_owner=owner, lease_expires=expires))
    assert decided.registration.decision is decision
    if decision is Decision.IN_PROGRESS:
        assert decided.write is None
        assert decided.registration.detail == f"held by alive until {utc(NOW + 1)}"


@pytest.mark.parametrize(
    ("owner", "recoveries", "decision", "after"),
    [
        (None, 3, Decision.SEND, 3),  # given back properly: no recovery
        ("dead", 2, Decision.SEND, 3),  # recoveries == max_recoveries: still sent
        ("dead", 3, Decision.PARKED, 4),  # max_recoveries + 1: parked for a person
    ],
)
def test_recoveries(owner: str | None, recoveries: int, decision: Decision, after: int) -> None:
    stored = row(lease_owner=owner, lease_expires=NOW - 1, op={"recoveries": recoveries})
    decided = register(rec(), by_name=stored)
    reg = decided.registration
    assert reg.decision is decision
    assert reg.operation.recoveries == after
    if decision is Decision.PARKED:
        assert isinstance(decided.write, Park)
        assert (decided.write.key, decided.write.recoveries) == ("k", 4)
        assert decided.write.reason == reg.detail == reg.operation.last_error
        assert "parked after 4 recoveries" in reg.detail
        assert "last holder dead" in reg.detail
        assert reg.operation.state == "parked"
    else:
        assert isinstance(decided.write, ClaimUpdate)
        assert decided.write.recoveries == after


# -- claims ------------------------------------------------------------------------------------


def test_a_pending_operation_is_claimed_for_one_more_attempt() -> None:
    stored = row(first_sent_at=None, op={"attempts": 2, "last_error": "old"}, lease_version=4)
    decided = register(rec(), by_name=stored)
    assert decided.write == ClaimUpdate(
        key="k", lease_version=5, lease_owner="me", lease_expires=NOW + 60.0, attempts=3,
        first_sent_at=NOW, recoveries=0, url=URL, fingerprint="fp", last_error="old",
        updated_at=NOW,
    )  # fmt: skip
    reg = decided.registration
    assert (reg.decision, reg.lease_version, reg.fresh) == (Decision.SEND, 5, False)
    assert reg.operation == dataclasses.replace(stored.operation, attempts=3, updated_at=utc(NOW))


def test_claim_by_the_holder() -> None:
    decided = claim(row(lease_owner="me", lease_expires=NOW + 5, lease_version=2), version=2)
    assert isinstance(decided.write, ClaimUpdate)
    assert decided.write.first_sent_at == NOW - 60  # kept: the first send's time
    assert (decided.write.lease_version, decided.write.attempts) == (3, 2)
    assert decided.write.last_error == "HTTP 503"
    reg = decided.registration
    assert (reg.decision, reg.lease_version) == (Decision.SEND, 3)
    assert (reg.operation.attempts, reg.operation.last_error) == (2, "HTTP 503")


@pytest.mark.parametrize(("owner", "detail"), [("other", "other"), (None, "another holder")])
def test_claim_by_a_holder_taken_over_is_fenced_out(owner: str | None, detail: str) -> None:
    decided = claim(row(lease_owner=owner, lease_version=3), version=2)
    assert decided.write is None
    assert decided.registration.decision is Decision.IN_PROGRESS
    assert decided.registration.detail == f"taken over by {detail}"


# -- resume and rebase -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fingerprint"),
    [
        ("https://api.example/charges", "fp"),  # where it was: the same request
        ("https://API.example/v2/charges", "fp"),  # same origin, another path: same request
        ("https://new.example/charges", "new-fp"),  # rebased to another origin: now this one
        ("http://api.example/charges", "new-fp"),  # another scheme is another origin
    ],
)
def test_resume_sends_to_its_url_and_rebase_changes_the_fingerprint(
    url: str, fingerprint: str
) -> None:
    record = rec(name=None, resume=True, url=url, fingerprint="new-fp", body=b"--multi")
    decided = register(record, by_key=row())
    assert isinstance(decided.write, ClaimUpdate)
    assert (decided.write.url, decided.write.fingerprint) == (url, fingerprint)
    assert decided.registration.operation.url == url
    assert not decided.write.compare_body  # a resume sends the stored body itself


# -- a multipart rerun sends the first attempt's bytes -----------------------------------------


@pytest.mark.parametrize(("body", "compare"), [(b"--boundary\r\n", True), (b"{}", False)])
def test_a_body_that_may_be_multipart_is_compared(body: bytes, compare: bool) -> None:
    decided = register(rec(body=body), by_name=row())
    assert isinstance(decided.write, ClaimUpdate)
    assert decided.write.compare_body is compare


def test_with_stored_body() -> None:
    reg = register(rec(body=b"--new"), by_name=row()).registration
    headers = [("content-type", "multipart/form-data; boundary=old")]
    assert _decide.with_stored_body(reg, b"--old", b"--old", headers) is reg
    resent = _decide.with_stored_body(reg, b"--new", b"--old", headers)
    assert (resent.body, resent.content_type) == (b"--old", "multipart/form-data; boundary=old")

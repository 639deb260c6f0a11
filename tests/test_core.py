"""The sans-IO core: names, keys, plans, and a flow driven by hand, step by step."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from idemclient import InvalidOperationError, RetryPolicy
from idemclient._core import (
    Call,
    Emit,
    Received,
    Register,
    Send,
    Settings,
    Sleep,
    check_name,
    fingerprint,
    keyed_flow,
    lease_seconds,
    parse_key,
    plan,
)
from idemclient._journal import Decision, Operation, Registration

SETTINGS = Settings.build(
    retry=RetryPolicy(jitter=False),
    methods=("POST", "PATCH"),
    key_header="Idempotency-Key",
    key_style="bare",
    secret_headers=("X-Signature",),
    max_body_size=1024,
)


@pytest.mark.parametrize("name", ["a", "charge-42", "x" * 200, "naïve ✓"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 201, "tab\there", "nul\x00", 42, None])
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidOperationError):
        check_name(name)


@pytest.mark.parametrize(
    ("raw", "key"),
    [("abc", "abc"), ('"abc"', "abc"), (" abc ", "abc"), ("a b", "a b"), ("x" * 255, "x" * 255)],
)
def test_parse_key(raw: str, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize("raw", ["", '""', "x" * 256, "a\\b", 'a"b', "caf\u00e9", "a\x7fb"])
def test_parse_key_refuses_what_the_draft_forbids(raw: str) -> None:
    with pytest.raises(InvalidOperationError):
        parse_key(raw)


def test_fingerprint_covers_method_url_and_body() -> None:
    base = fingerprint("POST", "https://x/a", b"{}")
    assert base == fingerprint("POST", "https://x/a", b"{}")
    assert base != fingerprint("PATCH", "https://x/a", b"{}")
    assert base != fingerprint("POST", "https://x/b", b"{}")
    assert base != fingerprint("POST", "https://x/a", b"{ }")


@pytest.mark.parametrize(
    ("timeout", "seconds"),
    [
        ({"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}, 50.0),
        ({"connect": 1.0, "read": None, "write": 1.0, "pool": 1.0}, 330.0),
        (None, 330.0),
    ],
)
def test_lease_is_the_request_timeouts_plus_a_margin(
    timeout: dict[str, float | None] | None, seconds: float
) -> None:
    request = httpx.Request("POST", "https://x", extensions={"timeout": timeout} if timeout else {})
    assert lease_seconds(request) == seconds


def test_plan_keeps_secrets_out_of_the_record_but_sends_them() -> None:
    request = httpx.Request(
        "POST",
        "https://user:pw@api.example/charges?x=1",
        content=b"body",
        headers={
            "Authorization": "Bearer t",
            "X-Signature": "sig",
            "Cookie": "c=1",
            "Content-Type": "text/plain",
        },
        extensions={"idempotency_operation": "op-1"},
    )
    p = plan(request, b"body", SETTINGS)
    assert p.record.name == "op-1"
    assert p.record.url == "https://api.example/charges?x=1"
    assert dict(p.record.headers) == {"content-type": "text/plain"}
    assert p.request.headers["Authorization"] == "Bearer t"
    assert p.request.headers["Idempotency-Key"] == p.record.key
    assert p.request.headers["content-length"] == "4"
    # a rerun under the journal's key
    now = datetime.now(timezone.utc)
    known = Operation(
        "op-1", "journal-key", "pending", "POST", p.record.url, 1, now, now, None, None
    )
    again = p.request_with_key(known)
    assert again.headers["Idempotency-Key"] == "journal-key"
    assert again.read() == b"body"


class FakeJournal:
    """Stands in for the journal: the flow only names its methods in `Call` steps."""

    def claim(self, *args: Any) -> Any: ...
    def finish(self, *args: Any) -> Any: ...
    def release(self, *args: Any) -> Any: ...


def test_a_flow_is_a_sequence_of_steps_with_no_io() -> None:
    journal: Any = FakeJournal()
    request = httpx.Request("POST", "https://api.example/charges", content=b"{}")
    the_plan = plan(request, b"{}", SETTINGS)
    flow = keyed_flow(the_plan, journal, RetryPolicy(jitter=False), lambda: 0.0, lambda: 0.0,
                      random.Random(0))  # fmt: skip
    step = next(flow)
    assert isinstance(step, Register)
    assert step.args[0] == the_plan.record
    now = datetime.now(timezone.utc)
    op = Operation(None, the_plan.record.key, "pending", "POST", "https://api.example/charges",
                   1, now, now, None, None)  # fmt: skip
    step = flow.send(Registration(Decision.SEND, op, lease_version=1))
    assert isinstance(step, Emit)
    assert step.event.kind == "registered"
    seen: list[str] = []
    answers = iter([httpx.Response(503), httpx.Response(201, content=b'{"id": 1}')])
    result: Any = None
    while True:
        if isinstance(step, Emit):
            seen.append(step.event.kind)
            result = None
        elif isinstance(step, Send):
            seen.append("send")
            response = next(answers)
            result = Received(response, response.read())
        elif isinstance(step, Sleep):
            seen.append(f"sleep {step.seconds}")
            result = None
        elif isinstance(step, Call):
            seen.append(step.fn.__name__)
            claimed = replace(op, attempts=2)
            result = Registration(Decision.SEND, claimed, 2) if step.fn == journal.claim else None
        try:
            step = flow.send(result)
        except StopIteration as stop:
            final: httpx.Response = stop.value
            break
    assert seen == [
        "registered", "sending", "send", "answered", "retrying", "sleep 0.5", "claim",
        "sending", "send", "answered", "recording", "finish", "completed",
    ]  # fmt: skip
    assert final.status_code == 201
    assert final.extensions["idempotency"]["attempts"] == 2

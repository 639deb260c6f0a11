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
    JOURNAL_STEPS,
    Claim,
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
from idemclient._records import Decision, Operation, Registration

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


def test_a_flow_is_a_sequence_of_steps_with_no_io() -> None:
    journal: Any = object()  # the flow only yields journal steps: it never calls the journal
    request = httpx.Request("POST", "https://api.example/charges", content=b"{}")
    the_plan = plan(request, b"{}", SETTINGS)
    flow = keyed_flow(the_plan, journal, RetryPolicy(jitter=False), lambda: 0.0, lambda: 0.0,
                      random.Random(0))  # fmt: skip
    step = next(flow)
    assert isinstance(step, Register)
    assert step.record == the_plan.record
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
        elif isinstance(step, JOURNAL_STEPS):
            seen.append(type(step).__name__.lower())
            claimed = replace(op, attempts=2)
            result = Registration(Decision.SEND, claimed, 2) if isinstance(step, Claim) else None
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


# -- which names are credentials --------------------------------------------------------------

#: Names that carry credentials under one spelling or another: never journaled.
SECRET_NAMES = [
    "Authorization", "Proxy-Authorization", "Cookie", "X-Api-Key", "api-key", "apikey",
    "X-APIKEY", "PRIVATE-TOKEN", "X-Auth-Token", "X_Auth_Token", "x.auth.token",
    "X-Shopify-Access-Token", "X-Goog-Api-Key", "X-Amz-Security-Token", "x-csrf-token",
    "X-CSRFToken", "X-XSRF-TOKEN", "X-Vault-Token", "Ocp-Apim-Subscription-Key",
    "x-functions-key", "X-Amz-Server-Side-Encryption-Customer-Key", "X-Client-Secret",
    "X-Password", "X-Passwd", "X-Hub-Signature-256", "Stripe-Signature", "X-Session-Id",
    "X-Session-Token", "X-Credentials", "X-JWT-Assertion", "X-Auth-Email", "DPoP",
    "X-BAPI-SIGN", "OK-ACCESS-SIGN", "KC-API-SIGN", "X-WSSE", "X-Api-Keys",
]  # fmt: skip
#: Names that shape the request (a resume must send them again), or an echoed key: journaled.
KEPT_NAMES = [
    "Content-Type", "Accept", "Accept-Language", "User-Agent", "X-Request-Id", "Stripe-Version",
    "Stripe-Account", "OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta",
    "anthropic-version", "anthropic-beta", "X-Amz-Date", "X-Amz-Content-Sha256", "X-Amz-Target",
    "x-stainless-retry-count", "traceparent", "Cache-Control", "X-Forwarded-For",
    "X-Api-Version", "api-version", "X-Idempotency-Key", "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-tokens-remaining", "Retry-After", "Idempotent-Replayed",
]  # fmt: skip


def _journaled_headers(name: str, settings: Settings = SETTINGS) -> list[str]:
    request = httpx.Request("POST", "https://api.example/x", headers={name: "VALUE"})
    return [k for k, _ in plan(request, b"", settings).record.headers]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_header_named_like_a_credential_is_not_journaled_but_sent(name: str) -> None:
    request = httpx.Request("POST", "https://api.example/x", headers={name: "VALUE"})
    p = plan(request, b"", SETTINGS)
    assert p.record.headers == []
    assert p.request.headers[name] == "VALUE"


@pytest.mark.parametrize("name", KEPT_NAMES)
def test_other_headers_are_journaled(name: str) -> None:
    assert _journaled_headers(name) == [name.lower()]


def test_secret_headers_add_names_and_keep_headers_rescue_them() -> None:
    settings = Settings.build(
        retry=None,
        methods=("POST",),
        key_header="X-Request-Key",  # matches the pattern, yet it is the key: sent, not stored
        key_style="bare",
        secret_headers=("X-Trace",),
        keep_headers=("X-Session-Locale", "x-passkey-hint"),
        max_body_size=1024,
    )
    assert _journaled_headers("X-Trace", settings) == []
    assert _journaled_headers("X-Session-Locale", settings) == ["x-session-locale"]
    assert _journaled_headers("X-Passkey-Hint", settings) == ["x-passkey-hint"]
    assert _journaled_headers("X-Session-Id", settings) == []
    request = httpx.Request("POST", "https://api.example/x", headers={"X-Request-Key": "k-1"})
    p = plan(request, b"", settings)
    assert (p.record.key, p.record.key_given, p.record.headers) == ("k-1", True, [])


@pytest.mark.parametrize(
    ("secret", "keep"),
    [((), ("Authorization",)), ((), ("cookie",)), (("X-Trace",), ("x-trace",))],
)
def test_keep_headers_cannot_keep_what_must_go(
    secret: tuple[str, ...], keep: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="keep_headers"):
        Settings.build(
            retry=None, methods=("POST",), key_header="Idempotency-Key", key_style="bare",
            secret_headers=secret, keep_headers=keep, max_body_size=1024,
        )  # fmt: skip


@pytest.mark.parametrize(
    "param",
    [
        "api_key", "apikey", "apiKey", "api-key", "api%5Fkey", "key", "access_token",
        "accessToken", "token", "sig", "signature", "secret", "client_secret", "password",
        "passwd", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
        "X-Goog-Signature", "auth", "session_id", "jwt",
    ],
)  # fmt: skip
def test_a_query_parameter_named_like_a_credential_is_not_journaled_but_sent(
    param: str,
) -> None:
    url = f"https://api.example/x?a=a%2Fb&{param}=VALUE&b=1+2"
    p = plan(httpx.Request("POST", url), b"", SETTINGS)
    assert p.record.url == "https://api.example/x?a=a%2Fb&b=1+2"  # the rest byte for byte
    assert p.record.fingerprint == fingerprint("POST", p.record.url, b"")
    assert str(p.request.url) == url


@pytest.mark.parametrize(
    "param",
    ["X-Amz-Date", "X-Amz-Algorithm", "X-Amz-Expires", "X-Amz-SignedHeaders", "api-version",
     "page", "expand[]", "idempotency_key", "q", "keyword", "tokens"],
)  # fmt: skip
def test_other_query_parameters_are_journaled(param: str) -> None:
    url = f"https://api.example/x?{param}=VALUE"
    assert plan(httpx.Request("POST", url), b"", SETTINGS).record.url == url


def test_the_stored_url_has_no_user_info_fragment_or_secret_and_keeps_its_shape() -> None:
    request = httpx.Request("POST", "https://u:pw@api.example/a%2Fb?token=T#access_token=F")
    assert plan(request, b"", SETTINGS).record.url == "https://api.example/a%2Fb"
    request = httpx.Request("POST", "https://api.example/x?")
    assert plan(request, b"", SETTINGS).record.url == "https://api.example/x?"


def test_names_learned_from_responses_do_not_change_what_a_request_journals() -> None:
    settings = Settings.build(
        retry=None, methods=("POST",), key_header="Idempotency-Key", key_style="bare",
        secret_headers=(), max_body_size=1024,
    )  # fmt: skip
    # a response echoing the key and framing headers: the rule remembers them as harmless
    for name in ("idempotency-key", "content-length", "host"):
        assert settings.secrets(name) is False
    request = httpx.Request(
        "POST", "https://api.example/x", headers={"Idempotency-Key": "k-2"}, content=b"ab"
    )
    p = plan(request, b"ab", settings)
    assert (p.record.key, p.record.key_given) == ("k-2", True)
    assert p.record.headers == []

from __future__ import annotations

import email.utils
import random

import httpx
import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

from idemclient import RetryPolicy
from idemclient._policy import (
    MAX_HINT_SECONDS,
    Exhausted,
    Outcome,
    Verdict,
    classify_error,
    classify_response,
    is_replayed,
    parse_retry_after,
)

NOW = 1_800_000_000.0


def response(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers or {})


@pytest.mark.parametrize(
    ("status", "headers", "body", "keyed", "verdict"),
    [
        (200, {}, b"", True, Verdict.FINAL),
        (201, {}, b"", True, Verdict.FINAL),
        (404, {}, b"", True, Verdict.FINAL),
        (422, {}, b"", True, Verdict.CONFLICT),
        (400, {}, b'{"error": {"type": "idempotency_error"}}', True, Verdict.CONFLICT),
        (400, {}, b'{"error": "bad amount"}', True, Verdict.FINAL),
        (408, {}, b"", True, Verdict.RETRY),
        (409, {}, b"", True, Verdict.RETRY),
        (425, {}, b"", True, Verdict.RETRY),
        (429, {}, b"", True, Verdict.RETRY),
        (500, {}, b"", True, Verdict.RETRY),
        (502, {}, b"", True, Verdict.RETRY),
        (503, {}, b"", True, Verdict.RETRY),
        (504, {}, b"", True, Verdict.RETRY),
        (501, {}, b"", True, Verdict.FINAL),
        # hints override the status, both ways
        (503, {"x-should-retry": "false"}, b"", True, Verdict.FINAL),
        (400, {"x-should-retry": "true"}, b"", True, Verdict.RETRY),
        (500, {"Stripe-Should-Retry": "false"}, b"", True, Verdict.FINAL),
        (200, {"Stripe-Should-Retry": "maybe"}, b"", True, Verdict.FINAL),
        # a conflict is never retried, whatever the hint says
        (422, {"x-should-retry": "true"}, b"", True, Verdict.CONFLICT),
        # without a key, 409 and 422 are ordinary answers
        (409, {}, b"", False, Verdict.FINAL),
        (422, {}, b"", False, Verdict.FINAL),
        (503, {}, b"", False, Verdict.RETRY),
    ],
)
def test_classify_response(
    status: int, headers: dict[str, str], body: bytes, keyed: bool, verdict: Verdict
) -> None:
    outcome = classify_response(
        response(status, headers), body, keyed=keyed, policy=RetryPolicy(), now=NOW
    )
    assert outcome.verdict is verdict


def test_custom_retry_statuses() -> None:
    policy = RetryPolicy(retry_statuses=frozenset({418}))
    assert classify_response(response(418), b"", keyed=True, policy=policy, now=NOW).verdict is (
        Verdict.RETRY
    )
    assert classify_response(response(503), b"", keyed=True, policy=policy, now=NOW).verdict is (
        Verdict.FINAL
    )


request = httpx.Request("POST", "https://x")


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (httpx.ConnectError("refused", request=request), Verdict.RETRY),
        (httpx.ConnectTimeout("slow", request=request), Verdict.RETRY),
        (httpx.PoolTimeout("pool", request=request), Verdict.RETRY),
        (httpx.ReadTimeout("slow", request=request), Verdict.RETRY),
        (httpx.WriteTimeout("slow", request=request), Verdict.RETRY),
        (httpx.ReadError("reset", request=request), Verdict.RETRY),
        (httpx.WriteError("reset", request=request), Verdict.RETRY),
        (httpx.RemoteProtocolError("stale", request=request), Verdict.RETRY),
        (httpx.LocalProtocolError("bad", request=request), Verdict.ERROR),
        (httpx.UnsupportedProtocol("ftp", request=request), Verdict.ERROR),
        (httpx.ProxyError("proxy", request=request), Verdict.ERROR),
    ],
)
def test_classify_error(error: Exception, verdict: Verdict) -> None:
    assert classify_error(error).verdict is verdict


def test_reasons_say_whether_the_server_may_have_acted() -> None:
    assert "never sent" in classify_error(httpx.ConnectError("x", request=request)).reason
    assert "may have" in classify_error(httpx.ReadTimeout("x", request=request)).reason


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": " 0 "}, 0.0),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-3"}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "nan", "Retry-After": "9"}, 9.0),
        ({"Retry-After": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"Retry-After": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),  # past: now
        # malformed dates count as absent (these raised OverflowError)
        ({"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"}, None),
        ({"Retry-After": "Mon, 01 Jan 2024 00:00:00 +99999999999999999999"}, None),
        ({"Retry-After": "Mon, 01 Jan 99999999 00:00:00 GMT"}, None),
        ({"Retry-After": "Mon, 01 Jan 2024 00:00:00 +99999999"}, None),
        # absurd but well-formed waits are capped: finite, and over any max_retry_after
        ({"Retry-After": "9" * 400}, MAX_HINT_SECONDS),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_HINT_SECONDS),
        ({"retry-after-ms": "9" * 400}, MAX_HINT_SECONDS),
        ({"retry-after-ms": "1e400"}, MAX_HINT_SECONDS),
        ({"retry-after-ms": "2.5e3"}, 2.5),
        # not a number: absent, and Retry-After is used instead
        ({"retry-after-ms": "inf", "Retry-After": "9"}, 9.0),
        ({"retry-after-ms": "-1", "Retry-After": "9"}, 9.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(httpx.Headers(headers), NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"\xb2",  # latin-1 "²": str.isdigit() says yes, float() says no (it raised ValueError)
        "\u0661\u0662".encode(),  # Arabic-Indic digits: not delta-seconds (float() read them as 12)
        b"\xff\xfe",
    ],
)
@pytest.mark.parametrize("name", [b"Retry-After", b"retry-after-ms"])
def test_retry_after_that_is_not_ascii_digits_is_absent(name: bytes, value: bytes) -> None:
    assert parse_retry_after(httpx.Headers([(name, value)]), NOW) is None


_NUMBERS = st.integers(min_value=-(10**40), max_value=10**40).map(str)
_DATES = st.builds(
    "{}, {} {} {} {}:{}:{} {}".format,
    st.sampled_from(["Mon", "Fri", "Xyz", ""]),
    _NUMBERS,
    st.sampled_from(["Jan", "Dec", "Foo"]),
    _NUMBERS,
    _NUMBERS,
    _NUMBERS,
    _NUMBERS,
    st.one_of(st.sampled_from(["GMT", "UTC", "EST", "-0000", ""]), _NUMBERS.map("+{}".format)),
)
_VALUES = st.one_of(
    _DATES,
    _NUMBERS,
    st.from_regex(r"\A[0-9]{1,500}(\.[0-9]{0,20})?([eE][+-]?[0-9]{1,5})?\Z"),
    st.text(),
)


@settings(max_examples=300, deadline=None)  # the CI machine is shared and slow
@given(
    value=st.one_of(_VALUES.map(str.encode), st.binary()),
    name=st.sampled_from([b"Retry-After", b"retry-after-ms"]),
    now=st.floats(min_value=0, max_value=2e10),
)
def test_parse_retry_after_never_raises(value: bytes, name: bytes, now: float) -> None:
    """Whatever a server sends, the hint is absent or a wait every sleep accepts."""
    wait = parse_retry_after(httpx.Headers([(name, value)]), now)
    assert wait is None or 0.0 <= wait <= MAX_HINT_SECONDS


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, False),
        ({"Idempotent-Replayed": "true"}, True),
        ({"Idempotency-Replayed": "True"}, True),
        ({"Idempotent-Replayed": "false"}, False),
    ],
)
def test_replay_marker(headers: dict[str, str], expected: bool) -> None:
    assert is_replayed(response(200, headers)) is expected


def test_backoff_doubles_up_to_max_without_jitter() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0, jitter=False)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.backoff(10_000) == 3.0  # no overflow


def test_jitter_stays_within_half_to_full() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=100.0)
    rng = random.Random(7)
    for n in range(1, 8):
        full = min(100.0, 2.0 ** (n - 1))
        for _ in range(50):
            assert full / 2 <= policy.backoff(n, rng) <= full


def test_jitter_never_shortens_retry_after() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=0.2)
    rng = random.Random(1)
    assert all(policy.delay(1, 5.0, rng) == 5.0 for _ in range(20))
    assert policy.delay(1, 0.0, rng) > 0  # Retry-After of 0 still gets the backoff


@pytest.mark.parametrize(
    ("policy", "attempt", "elapsed", "sleep", "retry_after", "stops"),
    [
        (RetryPolicy(max_attempts=3), 1, 0, 1, None, False),
        (RetryPolicy(max_attempts=3), 3, 0, 1, None, True),
        (RetryPolicy(max_attempts=1), 1, 0, 0, None, True),
        (RetryPolicy(max_retry_after=10), 1, 0, 11, 11.0, True),
        (RetryPolicy(max_retry_after=10), 1, 0, 10, 10.0, False),
        (RetryPolicy(deadline=5), 1, 4.0, 0.5, None, False),
        (RetryPolicy(deadline=5), 1, 4.0, 1.5, None, True),
    ],
)
def test_stop_reason(
    policy: RetryPolicy,
    attempt: int,
    elapsed: float,
    sleep: float,
    retry_after: float | None,
    stops: bool,
) -> None:
    assert (policy.stop_reason(attempt, elapsed, sleep, retry_after) is not None) is stops


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"base_delay": -1},
        {"max_delay": -1},
        {"deadline": 0},
        {"max_retry_after": -1},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_a_frozen_shareable_value() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 9  # type: ignore[misc]
    assert policy.replace(max_attempts=9).max_attempts == 9
    assert policy.max_attempts == 5
    assert hash(policy) == hash(RetryPolicy())


def drive(
    policy: RetryPolicy, outcomes: list[Outcome], clock: list[float]
) -> tuple[object, list[float]]:
    """Run the tenacity controller over scripted outcomes, with a fake clock."""
    controller = policy.controller(lambda: clock[0], random.Random(0))
    controller.begin()
    state = tenacity.RetryCallState(controller, fn=None, args=(), kwargs={})
    waits: list[float] = []
    it = iter(outcomes)
    while True:
        do = controller.iter(state)
        if isinstance(do, tenacity.DoAttempt):
            state.set_result(next(it))
        elif isinstance(do, tenacity.DoSleep):
            waits.append(float(do))
            clock[0] += float(do)
            state.prepare_for_next_attempt()
        else:
            return do, waits


RETRY = Outcome(Verdict.RETRY, reason="HTTP 503")
FINAL = Outcome(Verdict.FINAL, reason="HTTP 201")


def test_controller_retries_until_final() -> None:
    result, waits = drive(RetryPolicy(jitter=False), [RETRY, RETRY, FINAL], [0.0])
    assert result is FINAL
    assert waits == [0.5, 1.0]


def test_controller_stops_after_max_attempts() -> None:
    result, waits = drive(RetryPolicy(max_attempts=3, jitter=False), [RETRY] * 5, [0.0])
    assert isinstance(result, Exhausted)
    assert result.last is RETRY
    assert "3 attempts" in result.reason
    assert len(waits) == 2


def test_controller_respects_the_deadline_with_a_fake_clock() -> None:
    policy = RetryPolicy(
        max_attempts=100, base_delay=1.0, max_delay=1.0, jitter=False, deadline=3.5
    )
    result, waits = drive(policy, [RETRY] * 100, [0.0])
    assert isinstance(result, Exhausted)
    assert "deadline" in result.reason
    assert sum(waits) <= 3.5
    assert waits == [1.0, 1.0, 1.0]


def test_controller_uses_retry_after_and_stops_when_too_long() -> None:
    wait_7 = Outcome(Verdict.RETRY, retry_after=7.0, reason="HTTP 429")
    result, waits = drive(RetryPolicy(jitter=False), [wait_7, FINAL], [0.0])
    assert result is FINAL
    assert waits == [7.0]
    too_long = Outcome(Verdict.RETRY, retry_after=500.0, reason="HTTP 429")
    result, waits = drive(RetryPolicy(), [too_long, FINAL], [0.0])
    assert isinstance(result, Exhausted)
    assert "max_retry_after" in result.reason
    assert waits == []

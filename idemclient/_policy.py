"""The retry policy and the classification of outcomes. Pure: no I/O, no sleeping.

What is safe to retry, and why:

* **Never reached the server**: `httpx.ConnectError`, `httpx.ConnectTimeout`,
  `httpx.PoolTimeout`. No byte of the request left this process, so a retry is always safe,
  with or without a key.
* **May have reached the server**: `httpx.ReadTimeout`, `httpx.WriteTimeout`,
  `httpx.ReadError`, `httpx.WriteError`, `httpx.RemoteProtocolError` (often a stale keep-alive
  connection). The server may have acted and the answer was lost. Retrying a POST is safe only
  because the retry carries the same Idempotency-Key, so the server replays its first answer.
  Idempotent methods (GET, PUT, DELETE, ...) are safe to repeat by definition.
* **The server asked for a retry**: 408, 409 (IETF: the first request with this key is still
  in flight), 425, 429, 500, 502, 503, 504, or a hint header (`x-should-retry`,
  `Stripe-Should-Retry`) that says so. A 5xx may have had side effects: again, the key makes
  the retry safe.
* **Never retried**: 422, and a 400 whose body names an `idempotency_error`: the key was used
  with another payload, so the same key can never succeed and a new key could act twice.
* **Not the operation's answer**: 401 and 407 (the server refused before acting: httpx's auth
  flow, or a later rerun or resume with valid credentials, sends it again under the same key)
  and 307/308 (the operation goes on, with the same key, at the new URL). The response goes to
  the caller; the operation stays pending. To a resume (whose client may lack a credential
  the journal did not keep: an API key in the query), 403 too.
"""

from __future__ import annotations

import dataclasses
import email.utils
import enum
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from ._family import error_kind

__all__ = [
    "DEFAULT_MAX_RETRY_AFTER",
    "MAX_HINT_SECONDS",
    "RETRY_EXTENSION",
    "RETRY_STATUS_CODES",
    "UNSETTLED_STATUS_CODES",
    "Exhausted",
    "Outcome",
    "RetryPolicy",
    "Verdict",
    "classify_error",
    "classify_response",
    "parse_retry_after",
]

#: Request extension carrying the `RetryPolicy` of one request (`RetryPolicy.extensions()`).
RETRY_EXTENSION = "idempotency_retry"
#: Statuses that ask for a retry (409: the IETF draft's "request with this key in flight").
RETRY_STATUS_CODES: frozenset[int] = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
#: A Retry-After longer than this ends the attempts (the operation stays pending).
DEFAULT_MAX_RETRY_AFTER = 120.0
#: The longest wait a server hint is read as (a year): any longer one is taken to be this.
MAX_HINT_SECONDS = 365 * 86400.0
#: `retry-after-ms`: a non-negative decimal number, ASCII digits only (no sign, nan, inf, "_").
_DECIMAL = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", re.ASCII)
_HINT_HEADERS = ("x-should-retry", "stripe-should-retry")
_REPLAY_HEADERS = (b"idempotent-replayed", b"idempotency-replayed")


class Verdict(enum.Enum):
    """What one attempt's outcome means for the operation."""

    FINAL = "final"  # a response to hand back (and, for a keyed request, to journal)
    CONFLICT = "conflict"  # 422 or an idempotency_error: hard stop
    RETRY = "retry"  # send again with the same key
    ERROR = "error"  # a transport error not worth retrying: raise it
    # An answer for the caller that does not settle the operation, which stays pending:
    # 401 and 407 (refused before any effect: an auth flow resends with new credentials, as
    # the same operation's next attempt) and 307/308 (the operation goes on at another URL).
    UNSETTLED = "unsettled"


#: Answers to a keyed request that are not the operation's final answer (see `Verdict`).
UNSETTLED_STATUS_CODES: frozenset[int] = frozenset({401, 407, 307, 308})


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result as the core sees it: a response or an error, and its verdict."""

    verdict: Verdict
    response: httpx.Response | None = None
    error: Exception | None = None
    retry_after: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Exhausted:
    """What the policy hands back when it stops retrying: the last outcome and why."""

    last: Outcome
    reason: str


def _truthy(value: str) -> bool | None:
    value = value.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    return None


def parse_retry_after(headers: httpx.Headers, now: float) -> float | None:
    """Seconds the server asked us to wait, from `retry-after-ms` or `Retry-After`.

    `Retry-After` may be delta-seconds or an HTTP date; a date in the past means "now" (0).
    `now` is the current POSIX time, used only for dates. What does not parse counts as
    absent, whatever it is: a server's typo must not fail the request. A well-formed but
    absurd wait (400 digits, the year 9999) is read as `MAX_HINT_SECONDS`, so that it stays a
    number every sleep accepts, and ends the attempts under any sensible `max_retry_after`.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None and _DECIMAL.fullmatch(ms := ms.strip()):
        return min(float(ms) / 1000.0, MAX_HINT_SECONDS)  # float() of many digits is inf
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isascii() and raw.isdigit():  # isdigit() alone takes "²", other scripts' digits
        return min(float(raw), MAX_HINT_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(raw)
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        wait = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        # OverflowError: a year or zone offset too large for a C int (`+99999999999`)
        return None
    return min(max(0.0, wait), MAX_HINT_SECONDS)


def retry_hint(headers: httpx.Headers) -> bool | None:
    """What a server's hint header (`x-should-retry`, `Stripe-Should-Retry`) says of
    retrying this answer; `None` without one that reads as yes or no."""
    for name in _HINT_HEADERS:
        value = headers.get(name)
        if value is not None:
            hint = _truthy(value)
            if hint is not None:
                return hint
    return None


def classify_response(
    response: httpx.Response,
    body: bytes | None,
    *,
    keyed: bool,
    policy: RetryPolicy,
    now: float,
    method: str = "POST",
    resumed: bool = False,
) -> Outcome:
    """Decide what a response means. `body` is the read body of a keyed request, else `None`.

    For a keyed (journaled) request, 422 and a 400 naming `idempotency_error` are conflicts.
    For an unkeyed request, 409 and 422 are ordinary answers (no key was involved).
    On an error status (or one the policy retries), a hint header (`x-should-retry`,
    `Stripe-Should-Retry`) overrides the status, except that a conflict is never retried; a
    success is final whatever its headers say.
    """
    status = response.status_code
    if keyed and resumed and status == 403:
        # The resumer's client lacks the operation's credential (the journal keeps none), or
        # it is not allowed: the operation's answer either way is not this one to record.
        why = "refused to the resumer before any effect: is its credential missing?"
        return Outcome(Verdict.UNSETTLED, response=response, reason=f"HTTP 403 ({why})")
    # httpx follows a 301 with the same method for all but POST (which becomes a GET): for
    # a PATCH it is the same operation at the new URL, as a 308 is.
    if keyed and (status in UNSETTLED_STATUS_CODES or (status == 301 and method != "POST")):
        why = "refused before any effect" if status in (401, 407) else "moved"
        return Outcome(Verdict.UNSETTLED, response=response, reason=f"HTTP {status} ({why})")
    if status < 400 and status not in policy.retry_statuses:
        return Outcome(Verdict.FINAL, response=response, reason=f"HTTP {status}")
    if keyed and (
        status == 422 or (status == 400 and body is not None and b"idempotency_error" in body)
    ):
        return Outcome(Verdict.CONFLICT, response=response, reason=f"HTTP {status}")
    retry_after = parse_retry_after(response.headers, now)
    hint = retry_hint(response.headers)
    if hint is None:
        retryable = status in policy.retry_statuses and (keyed or status != 409)
    else:
        retryable = hint
    verdict = Verdict.RETRY if retryable else Verdict.FINAL
    return Outcome(verdict, response=response, retry_after=retry_after, reason=f"HTTP {status}")


def classify_error(error: Exception) -> Outcome:
    """Decide what a transport error means: retry the two groups above, raise the rest."""
    name = type(error).__name__
    kind = error_kind(error)  # by class, for httpx's and httpx2's errors alike
    if kind == "never_sent":
        return Outcome(Verdict.RETRY, error=error, reason=f"{name} (never sent)")
    if kind == "maybe_received":
        return Outcome(Verdict.RETRY, error=error, reason=f"{name} (may have been received)")
    return Outcome(Verdict.ERROR, error=error, reason=name)


def is_replayed(response: httpx.Response) -> bool:
    """Whether the server marked the response as a replay of an earlier answer."""
    for name, value in response.headers.raw:  # one pass: this runs for every response
        if name.lower() in _REPLAY_HEADERS:
            return _truthy(value.decode("latin-1")) is True
    return False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently one operation is retried. A frozen value: share it freely.

    Args:
        max_attempts: attempts in all, the first one included (1 = never retry).
        base_delay: the first backoff in seconds; each retry doubles it.
        max_delay: the longest backoff in seconds.
        jitter: spread each backoff over [delay/2, delay] so that clients that failed together
            do not retry together. Jitter never shortens a server's Retry-After.
        deadline: seconds the whole operation may take, sleeps included; `None` for no bound.
            A retry whose wait would end past the deadline is not made.
        retry_statuses: statuses that are retried (see the module docs for why each is safe).
        max_retry_after: a `Retry-After` longer than this ends the attempts; the operation
            stays pending and can be resumed later.

    One policy serves a whole transport or client (`retry=`), an `operation(name, retry=...)`
    block, or one request (`extensions=policy.extensions()`); the nearest one applies.

    Example:
        >>> RetryPolicy(max_attempts=3, deadline=30.0)
        RetryPolicy(max_attempts=3, base_delay=0.5, ...)
        >>> client.post("/charges", json=..., extensions=RetryPolicy(deadline=5.0).extensions())
    """

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: bool = True
    deadline: float | None = None
    retry_statuses: frozenset[int] = field(default=RETRY_STATUS_CODES)
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (it counts the first attempt)")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must not be negative")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError("deadline must be positive seconds, or None")
        object.__setattr__(self, "retry_statuses", frozenset(self.retry_statuses))

    def extensions(self) -> dict[str, Any]:
        """The request extensions that give one request this policy, for httpx's
        `extensions=` (`{"idempotency_retry": self}`): it wins over the policy of the
        `operation()` block and of the transport.

        Example:
            >>> once_more = RetryPolicy(max_attempts=2)
            >>> client.post("/refunds", json=..., extensions=once_more.extensions())
        """
        return {RETRY_EXTENSION: self}

    def replace(self, **changes: object) -> RetryPolicy:
        """A copy with some fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def backoff(self, attempt_number: int, rng: random.Random | None = None) -> float:
        """The backoff after attempt `attempt_number` (1-based), jittered if asked."""
        exponent = min(attempt_number - 1, 62)
        delay = min(self.max_delay, self.base_delay * (2.0**exponent))
        if self.jitter and delay > 0:
            delay *= (rng or random).uniform(0.5, 1.0)
        return delay

    def delay(
        self, attempt_number: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float:
        """The wait before the next attempt: the backoff, never shorter than a Retry-After."""
        backoff = self.backoff(attempt_number, rng)
        return backoff if retry_after is None else max(backoff, retry_after)

    def stop_reason(
        self,
        attempt_number: int,
        elapsed: float,
        upcoming_sleep: float,
        retry_after: float | None,
    ) -> str | None:
        """Why no further attempt is made, or `None` to go on."""
        if attempt_number >= self.max_attempts:
            return f"{attempt_number} attempts made (max_attempts={self.max_attempts})"
        if retry_after is not None and retry_after > self.max_retry_after:
            return (
                f"server asked to wait {retry_after:.0f}s, over max_retry_after="
                f"{self.max_retry_after:.0f}s"
            )
        if self.deadline is not None and elapsed + upcoming_sleep > self.deadline:
            return f"deadline of {self.deadline:g}s would pass before the next attempt"
        return None

    def controller(
        self,
        clock: Callable[[], float],
        rng: random.Random | None = None,
        *,
        start: float | None = None,
    ) -> tenacity.Retrying:
        """A tenacity controller deciding on `Outcome` results; the caller drives `iter()`.

        The controller never sleeps and never calls a function: the core sets each attempt's
        `Outcome` as the result and acts on `DoAttempt` / `DoSleep` / the final value (an
        `Outcome`, or `Exhausted` when the policy stops). `clock` measures the deadline from
        `start` (default: now).
        """
        if start is None:
            start = clock()

        def outcome_of(state: tenacity.RetryCallState) -> Outcome:
            assert state.outcome is not None
            result = state.outcome.result()
            assert isinstance(result, Outcome)
            return result

        def wait(state: tenacity.RetryCallState) -> float:
            return self.delay(state.attempt_number, outcome_of(state).retry_after, rng)

        def reason(state: tenacity.RetryCallState) -> str | None:
            return self.stop_reason(
                state.attempt_number,
                clock() - start,
                state.upcoming_sleep,
                outcome_of(state).retry_after,
            )

        return tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda o: o.verdict is Verdict.RETRY),
            wait=wait,
            stop=lambda state: reason(state) is not None,
            retry_error_callback=lambda state: Exhausted(outcome_of(state), reason(state) or ""),
            sleep=lambda seconds: None,
        )

"""OpenTelemetry traces and metrics for journaled operations (extra `idemclient[otel]`).

`OpenTelemetryHook` is a hook (`hooks=[...]`) that turns the `Event`s of each journaled
operation into one span and a few metrics. Retries happen inside the transport, hidden from
httpx's own instrumentation: this is where a tracer sees them.

    pip install 'idemclient[otel]'

Importing `idemclient` never imports OpenTelemetry; importing this module without it raises
an `ImportError` that names the extra.
"""

from __future__ import annotations

import importlib.metadata
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import httpx

try:
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Span, SpanKind, StatusCode
except ImportError as exc:
    raise ImportError(
        "idemclient.otel needs the OpenTelemetry API: pip install 'idemclient[otel]'"
    ) from exc

from ._core import DEFAULT_SECRETS, Event, stored_url

__all__ = ["OpenTelemetryHook"]

try:
    _VERSION = importlib.metadata.version("idemclient")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    _VERSION = ""

Outcome = Literal["completed", "conflict", "gave_up", "replayed", "unfinished"]

#: The events that end an operation's span, and the outcome each stands for.
_FINAL: dict[str, Outcome] = {
    "completed": "completed",
    "conflict": "conflict",
    "gave_up": "gave_up",
}
#: An operation silent for this long has ended without saying so (its span is ended then).
#: Longer than any wait between attempts (`RetryPolicy.max_retry_after` is 120 s by default)
#: and than most streamed answers, which send no event between their start and their end.
DEFAULT_IDLE_TIMEOUT = 900.0
#: At most this many spans are open at once; past it, the least recently active one ends.
DEFAULT_MAX_OPEN_SPANS = 10_000


@dataclass(slots=True)
class _Open:
    """An operation whose span is open: what its end needs to know."""

    span: Span
    labels: dict[str, str | int]  # its metrics' attributes
    began: float  # monotonic seconds at `registered`
    seen: float  # monotonic seconds of its last event
    seen_ns: int  # wall-clock nanoseconds of its last event (where a silent span ends)
    attempt: int
    status: int | None = None
    error: str | None = None


def _where(url: str) -> tuple[str | None, int | None, str | None]:
    """The URL as journaled (no user info, no credential-like query parameter), its host and
    port; `None`s if it does not parse (then nothing of it is put on the span)."""
    try:
        parsed = httpx.URL(url)
        full = stored_url(parsed, DEFAULT_SECRETS)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None, None, None
    port = parsed.port or {"https": 443, "http": 80}.get(parsed.scheme)
    return full, port, parsed.host or None


class OpenTelemetryHook:
    """A hook that makes a span per journaled operation, and metrics, with OpenTelemetry.

    Pass it in `hooks=[...]` of `Client`, `AsyncClient`, `wrap()` or a transport. It is
    thread-safe: one hook may serve many clients, threads and tasks.

    **Spans.** One span (`idemclient POST`, kind INTERNAL, a child of whatever span is current
    where the request is sent) per run of a journaled operation through a transport: it starts
    at `registered` (the operation is durably journaled; the registration's own write is
    before the span) and ends at `completed`, `conflict` or `gave_up`. An operation answered
    from the journal (`replayed`) gets a span of its own, started and ended at once. Each
    attempt adds the span events `sending` and `answered` (status or error type), each retry
    decision `retrying` (with `idemclient.retry.delay` in seconds), a retry the retry budget
    refused `retry_denied` (then the span ends as `gave_up`), and the final answer
    `recording`. Attributes: `http.request.method`, `url.full` (without user info and
    without any query parameter named like a credential, idemclient's own rule),
    `server.address`, `server.port`, `http.response.status_code`, `error.type` (a transport
    error's type, or the status of an error answer), `idemclient.key`,
    `idemclient.operation` (the name, if any), `idemclient.attempts` (attempts claimed so far,
    across reruns), `idemclient.replayed` (answered from the journal, nothing sent) and
    `idemclient.outcome`. Conflicts, give-ups and error answers set the span's status to
    ERROR.

    **Operations that end without a final event** (an answer handed to the caller that is not
    the operation's, such as a 401 or an unfollowed redirect; a transport error that is not
    retried; a stream closed before its end; an exception, a cancellation, a `JournalError`)
    leave the operation pending and say nothing more. Their spans are ended, with outcome
    `unfinished` and the time of their last event as end time, when the same key is
    registered again (the SDK's or the caller's retry), when they have been silent for
    `idle_timeout` seconds (checked at each event), when more than `max_open_spans` are
    open (the least recently active first), and by `close()`.

    **Metrics.** `idemclient.operations` (counter, by `idemclient.outcome`: completed,
    conflict, gave_up, replayed, unfinished), `idemclient.retries` (counter, by status or
    error type), `idemclient.retries.denied` (counter of retries the retry budget refused, by
    status or error type), `idemclient.operation.attempts` (histogram of the attempts an
    operation had claimed when it ended; not for replays, which send nothing) and
    `idemclient.operation.duration` (histogram, seconds from `registered` to the final
    event). Every metric carries `http.request.method` and `server.address`; none carries a
    key, a name or a URL, whose values are unbounded. A final event whose span had already
    been ended as `unfinished` (silent for `idle_timeout`) counts once more, with its outcome.

    **Not measured: journal write time.** The events do not bracket a journal write: the
    first one (`registered`) comes after the durable registration; a retry's claim happens
    between `retrying` and `sending` together with the backoff sleep; and `recording` to
    `completed` is no disk write at all (answers are written in batches, later, by the
    journal's flusher). Rather than a figure that would mostly measure something else, no
    such metric is given.

    Args:
        tracer_provider: where spans go; `None` means the global provider.
        meter_provider: where metrics go; `None` means the global provider.
        idle_timeout: seconds after which a silent open span is ended as `unfinished`.
        max_open_spans: the most spans kept open at once.

    Example:
        >>> from idemclient.otel import OpenTelemetryHook
        >>> client = idemclient.Client(base_url="https://api.example", hooks=[OpenTelemetryHook()])
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_open_spans: int = DEFAULT_MAX_OPEN_SPANS,
    ) -> None:
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        if max_open_spans < 1:
            raise ValueError("max_open_spans must be at least 1")
        self.idle_timeout = idle_timeout
        self.max_open_spans = max_open_spans
        self._tracer = trace.get_tracer("idemclient", _VERSION, tracer_provider)
        meter = metrics.get_meter("idemclient", _VERSION, meter_provider)
        # each: name, unit (UCUM, {annotations} for counts), description
        counter, histogram = meter.create_counter, meter.create_histogram
        self._operations = counter("idemclient.operations", "{operation}",
                                   "Journaled operations by how they ended")  # fmt: skip
        self._retries = counter("idemclient.retries", "{retry}",
                                "Attempts to be sent again, with the same key")  # fmt: skip
        self._denied = counter("idemclient.retries.denied", "{retry}",
                               "Retries not made: the retry budget was spent")  # fmt: skip
        self._attempts = histogram("idemclient.operation.attempts", "{attempt}",
                                   "Attempts an operation had claimed when it ended")  # fmt: skip
        self._duration = histogram("idemclient.operation.duration", "s",
                                   "From an operation's registration to its answer")  # fmt: skip
        self._lock = threading.Lock()
        # the open spans by key, least recently active first
        self._open: OrderedDict[str, _Open] = OrderedDict()

    def __call__(self, event: Event) -> None:
        now, now_ns = time.monotonic(), time.time_ns()
        kind = event.kind
        answer = _answer(event.status, event.error)  # a retry's is its last attempt's
        # Spans are started and given events under the lock (no I/O: the processors' work
        # is in `end()`), and ended outside it, where an exporter may run.
        with self._lock:
            ending = self._expired(now)
            current = self._open.get(event.key)
            if kind in ("registered", "replayed") and current is not None:
                del self._open[event.key]  # the last run of this key said nothing more
                ending.append((current, "unfinished"))
                current = None
            if kind == "registered":
                span, labels = self._start(event, now_ns)
                self._open[event.key] = _Open(span, labels, now, now, now_ns, event.attempt)
                ending.extend(self._overflow())
            elif current is not None:
                current.seen, current.seen_ns, current.attempt = now, now_ns, event.attempt
                if kind in _FINAL:
                    del self._open[event.key]
                    current.status = event.status if event.status is not None else current.status
                else:
                    self._open.move_to_end(event.key)
                    if kind in ("retrying", "retry_denied") and not answer:
                        answer = _last_answer(current)
                    self._event(current, event, answer, now_ns)
        for opened, outcome in ending:
            self._end(opened, outcome)

        if kind == "registered":
            return
        labels = current.labels if current is not None else _metric_labels(event)
        if kind == "replayed":
            span, labels = self._start(event, now_ns, replayed=True)
            replay = _Open(span, labels, now, now, now_ns, event.attempt, event.status)
            self._end(replay, "replayed", measure=False)
        elif kind == "retrying":
            self._retries.add(1, {**labels, **answer})
        elif kind == "retry_denied":
            self._denied.add(1, {**labels, **answer})
        elif kind in _FINAL:
            if current is not None:
                self._end(current, _FINAL[kind])
            else:  # its span was ended already (or never seen): count it all the same
                self._count(_FINAL[kind], event.attempt, labels)

    def close(self) -> None:
        """End every open span, as `unfinished` (at exit, before the providers shut down)."""
        with self._lock:
            ending, self._open = list(self._open.values()), OrderedDict()
        for opened in ending:
            self._end(opened, "unfinished")

    # -- spans ----------------------------------------------------------------------------

    def _start(
        self, event: Event, now_ns: int, *, replayed: bool = False
    ) -> tuple[Span, dict[str, str | int]]:
        """A new span for this event's operation, and the attributes of its metrics."""
        url, port, host = _where(event.url)
        attributes: dict[str, str | int | bool] = {
            "http.request.method": event.method,
            "idemclient.key": event.key,
            "idemclient.replayed": replayed,
        }
        if event.operation is not None:
            attributes["idemclient.operation"] = event.operation
        if url is not None:
            attributes["url.full"] = url
        if host is not None:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        span = self._tracer.start_span(
            f"idemclient {event.method}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=now_ns,
        )
        labels: dict[str, str | int] = {"http.request.method": event.method}
        if host is not None:
            labels["server.address"] = host
        return span, labels

    def _event(
        self, opened: _Open, event: Event, answer: dict[str, str | int], now_ns: int
    ) -> None:
        attributes: dict[str, str | int | float] = {"idemclient.attempt": event.attempt}
        if event.kind in ("answered", "retrying", "retry_denied", "recording"):
            attributes.update(answer)
        if event.kind == "answered":
            opened.status = event.status
            opened.error = type(event.error).__name__ if event.error is not None else None
        if event.kind == "retrying" and event.delay is not None:
            attributes["idemclient.retry.delay"] = event.delay
        opened.span.add_event(event.kind, attributes, timestamp=now_ns)

    def _end(self, opened: _Open, outcome: Outcome, *, measure: bool = True) -> None:
        span = opened.span
        span.set_attribute("idemclient.outcome", outcome)
        span.set_attribute("idemclient.attempts", opened.attempt)
        if opened.status is not None:
            span.set_attribute("http.response.status_code", opened.status)
        error = opened.error or (
            str(opened.status) if opened.status is not None and opened.status >= 400 else None
        )
        if error is not None:
            span.set_attribute("error.type", error)
        if outcome in ("conflict", "gave_up") or error is not None:
            span.set_status(StatusCode.ERROR, f"idemclient: {outcome}")
        span.end(end_time=opened.seen_ns)
        self._count(outcome, opened.attempt if measure else None, opened.labels)
        if measure:
            self._duration.record(max(0.0, opened.seen - opened.began), opened.labels)

    def _count(self, outcome: Outcome, attempts: int | None, labels: dict[str, str | int]) -> None:
        self._operations.add(1, {**labels, "idemclient.outcome": outcome})
        if attempts is not None:
            self._attempts.record(attempts, {**labels, "idemclient.outcome": outcome})

    # -- the bound on open spans (the lock is held) ----------------------------------------

    def _expired(self, now: float) -> list[tuple[_Open, Outcome]]:
        gone: list[tuple[_Open, Outcome]] = []
        while self._open:
            key, oldest = next(iter(self._open.items()))
            if now - oldest.seen <= self.idle_timeout:
                break
            del self._open[key]
            gone.append((oldest, "unfinished"))
        return gone

    def _overflow(self) -> list[tuple[_Open, Outcome]]:
        gone: list[tuple[_Open, Outcome]] = []
        while len(self._open) > self.max_open_spans:
            _, oldest = self._open.popitem(last=False)
            gone.append((oldest, "unfinished"))
        return gone


def _answer(status: int | None, error: BaseException | None) -> dict[str, str | int]:
    """An answer as attributes: its status, or the type of its transport error."""
    if error is not None:
        return {"error.type": type(error).__name__}
    if status is not None:
        return {"http.response.status_code": status}
    return {}


def _last_answer(opened: _Open) -> dict[str, str | int]:
    """The answer of an open operation's last attempt, as attributes."""
    if opened.error is not None:
        return {"error.type": opened.error}
    if opened.status is not None:
        return {"http.response.status_code": opened.status}
    return {}


def _metric_labels(event: Event) -> dict[str, str | int]:
    """Attributes of bounded cardinality: the method and the server, never a key or path."""
    labels: dict[str, str | int] = {"http.request.method": event.method}
    host = _where(event.url)[2]
    if host is not None:
        labels["server.address"] = host
    return labels

"""`idemclient.otel`: spans and metrics of journaled operations, read back from the
OpenTelemetry SDK's in-memory exporters, with a real transport over `httpx.MockTransport`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import idemclient
from idemclient.otel import OpenTelemetryHook
from idemclient.testing import IdempotentApp, set_testing


@dataclass
class Telemetry:
    hook: OpenTelemetryHook
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        """The data points of one metric, across every resource and scope."""
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def count(self, name: str, **attributes: object) -> int:
        """The sum of a counter's points whose attributes include these (`a__b` for `a.b`)."""
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        return sum(
            int(p.value)
            for p in self.points(name)
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        )


def telemetry(**options: Any) -> Telemetry:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    hook = OpenTelemetryHook(tracer_provider, MeterProvider(metric_readers=[reader]), **options)
    return Telemetry(hook, spans, reader)


@pytest.fixture
def otel() -> Telemetry:
    return telemetry()


def client_for(
    app: IdempotentApp, journal: Path, hook: OpenTelemetryHook, **options: Any
) -> idemclient.Client:
    return idemclient.Client(
        journal=journal,
        transport=httpx.MockTransport(app.handler),
        base_url="https://api.example",
        hooks=[hook],
        sleep=lambda seconds: None,
        **options,
    )


def test_a_completed_operation_is_one_span(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    with client_for(app, journal_path, otel.hook) as client, idemclient.operation("charge-1"):
        response = client.post("/charges", json={"amount": 5})
    (span,) = otel.finished()
    attributes = dict(span.attributes or {})
    assert span.name == "idemclient POST"
    assert attributes == {
        "http.request.method": "POST",
        "url.full": "https://api.example/charges",
        "server.address": "api.example",
        "server.port": 443,
        "idemclient.key": response.extensions["idempotency"]["key"],
        "idemclient.operation": "charge-1",
        "idemclient.replayed": False,
        "idemclient.outcome": "completed",
        "idemclient.attempts": 1,
        "http.response.status_code": 201,
    }
    assert [e.name for e in span.events] == ["sending", "answered", "recording"]
    assert span.status.status_code is StatusCode.UNSET
    assert otel.count("idemclient.operations", idemclient__outcome="completed") == 1
    (attempts,) = otel.points("idemclient.operation.attempts")
    assert (attempts.count, attempts.sum) == (1, 1)
    assert attempts.attributes["server.address"] == "api.example"
    (duration,) = otel.points("idemclient.operation.duration")
    assert duration.count == 1
    assert otel.points("idemclient.retries") == []


def test_a_retried_operation_has_an_event_per_attempt_and_retry(
    journal_path: Path, otel: Telemetry
) -> None:
    app = IdempotentApp()
    app.inject("status", status=503, retry_after="2")
    app.inject("drop_after_acting")
    with client_for(app, journal_path, otel.hook) as client:
        client.post("/charges", json={})
    (span,) = otel.finished()
    assert [e.name for e in span.events] == [
        "sending", "answered", "retrying", "sending", "answered", "retrying", "sending",
        "answered", "recording",
    ]  # fmt: skip
    first_retry = span.events[2].attributes or {}
    assert first_retry["http.response.status_code"] == 503
    assert first_retry["idemclient.retry.delay"] >= 2.0  # type: ignore[operator]
    assert (span.events[4].attributes or {})["error.type"] == "ReadError"
    assert [(e.attributes or {})["idemclient.attempt"] for e in span.events[::3]] == [1, 2, 3]
    assert (span.attributes or {})["idemclient.attempts"] == 3
    assert (span.attributes or {})["idemclient.outcome"] == "completed"
    assert otel.count("idemclient.retries") == 2
    assert otel.count("idemclient.retries", http__response__status_code=503) == 1
    assert otel.count("idemclient.retries", error__type="ReadError") == 1
    (attempts,) = otel.points("idemclient.operation.attempts")
    assert attempts.sum == 3
    assert app.effect_count == 1


def test_a_conflict_is_an_error_span(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    app.inject("status", status=422)
    with (
        client_for(app, journal_path, otel.hook) as client,
        pytest.raises(idemclient.ConflictError),
    ):
        client.post("/charges", json={})
    (span,) = otel.finished()
    attributes = span.attributes or {}
    assert attributes["idemclient.outcome"] == "conflict"
    assert attributes["http.response.status_code"] == 422
    assert attributes["error.type"] == "422"
    assert span.status.status_code is StatusCode.ERROR
    assert otel.count("idemclient.operations", idemclient__outcome="conflict") == 1


def test_a_replay_is_a_span_that_sent_nothing(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    with client_for(app, journal_path, otel.hook) as client:
        for _ in range(2):
            with idemclient.operation("charge-1"):
                client.post("/charges", json={})
    first, replay = otel.finished()
    attributes = replay.attributes or {}
    assert attributes["idemclient.replayed"] is True
    assert attributes["idemclient.outcome"] == "replayed"
    assert attributes["http.response.status_code"] == 201
    assert attributes["idemclient.key"] == (first.attributes or {})["idemclient.key"]
    assert replay.events == ()
    assert otel.count("idemclient.operations", idemclient__outcome="replayed") == 1
    assert otel.count("idemclient.operations", idemclient__outcome="completed") == 1
    (attempts,) = otel.points("idemclient.operation.attempts")
    assert attempts.count == 1  # the replay sent nothing
    assert app.effect_count == 1


def test_giving_up_is_an_error_span(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    app.inject("status", status=503, times=2)
    retry = idemclient.RetryPolicy(max_attempts=2)
    with (
        client_for(app, journal_path, otel.hook, retry=retry) as client,
        pytest.raises(idemclient.RetriesExhaustedError),
    ):
        client.post("/charges", json={})
    (span,) = otel.finished()
    attributes = span.attributes or {}
    assert attributes["idemclient.outcome"] == "gave_up"
    assert attributes["idemclient.attempts"] == 2
    assert attributes["http.response.status_code"] == 503
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["sending", "answered", "retrying", "sending",
                                             "answered"]  # fmt: skip
    assert otel.count("idemclient.operations", idemclient__outcome="gave_up") == 1
    assert otel.count("idemclient.retries") == 1


def test_a_retry_the_budget_refused_is_a_span_event_and_a_metric(
    journal_path: Path, otel: Telemetry
) -> None:
    app = IdempotentApp()
    app.inject("status", status=503, times=5)
    budget = idemclient.RetryBudget(0.0, min_per_second=0.1, window=10.0)  # one retry
    with (
        client_for(app, journal_path, otel.hook, retry_budget=budget) as client,
        pytest.raises(idemclient.RetriesExhaustedError, match="retry budget"),
    ):
        client.post("/charges", json={})
    (span,) = otel.finished()
    assert [e.name for e in span.events] == ["sending", "answered", "retrying", "sending",
                                             "answered", "retry_denied"]  # fmt: skip
    assert (span.events[-1].attributes or {})["http.response.status_code"] == 503
    assert (span.attributes or {})["idemclient.outcome"] == "gave_up"
    assert otel.count("idemclient.retries") == 1
    assert otel.count("idemclient.retries.denied", http__response__status_code=503) == 1
    assert otel.count("idemclient.operations", idemclient__outcome="gave_up") == 1


def test_credentials_never_reach_a_span(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    with client_for(app, journal_path, otel.hook) as client:
        client.post(
            "https://alice:hunter2@api.example:8443/charges?api_key=sk_live_1&x=1&sig=s3cr3t",
            json={},
            headers={"Authorization": "Bearer tok_9"},
        )
    (span,) = otel.finished()
    attributes = span.attributes or {}
    assert attributes["url.full"] == "https://api.example:8443/charges?x=1"
    assert attributes["server.address"] == "api.example"
    assert attributes["server.port"] == 8443
    everything = repr(span.to_json()) + repr(otel.reader.get_metrics_data())
    for secret in ("alice", "hunter2", "sk_live_1", "s3cr3t", "tok_9"):
        assert secret not in everything


def test_a_url_given_by_hand_is_cleaned_too(otel: Telemetry) -> None:
    """The hook applies the rule itself: an event built elsewhere carries no credential."""
    url = "https://bob:pw@api.example/x?access_token=t0k&page=2"
    otel.hook(idemclient.Event("registered", None, "k-1", "POST", url, 1))
    otel.hook(idemclient.Event("completed", None, "k-1", "POST", url, 1, status=200))
    (span,) = otel.finished()
    assert (span.attributes or {})["url.full"] == "https://api.example/x?page=2"


def test_operations_without_a_final_event_do_not_leak(journal_path: Path) -> None:
    """A 401 is handed to the caller and the operation stays pending: no final event. Its
    span ends when the key is registered again, when too many are open, or at close()."""
    otel = telemetry(max_open_spans=2)
    app = IdempotentApp()
    app.inject("status", status=401, times=4)
    with client_for(app, journal_path, otel.hook) as client:
        for n in range(3):  # three operations, each left pending by its 401
            assert client.post("/charges", json={"n": n}).status_code == 401
        assert len(otel.finished()) == 1  # over the bound: the least recently active ended
        assert (otel.finished()[0].attributes or {})["idemclient.outcome"] == "unfinished"
        # the caller (an SDK) sends the same request again: the same operation, its key
        assert client.post("/charges", json={"n": 2}).status_code == 401
        assert len(otel.finished()) == 2
        assert client.post("/charges", json={"n": 2}).status_code == 201
    spans = otel.finished()
    assert [(s.attributes or {})["idemclient.outcome"] for s in spans] == [
        "unfinished", "unfinished", "unfinished", "completed"
    ]  # fmt: skip
    assert (spans[1].attributes or {})["error.type"] == "401"
    assert spans[1].status.status_code is StatusCode.ERROR
    assert len({(s.attributes or {})["idemclient.key"] for s in spans[1:]}) == 1
    otel.hook.close()  # the one of n=1 is still open
    assert len(otel.finished()) == 5
    assert otel.count("idemclient.operations", idemclient__outcome="unfinished") == 4


def test_a_silent_span_ends_at_its_last_event(otel: Telemetry) -> None:
    quiet = telemetry(idle_timeout=0.2)
    url = "https://api.example/x"
    quiet.hook(idemclient.Event("registered", "a", "k-a", "POST", url, 1))
    quiet.hook(idemclient.Event("sending", "a", "k-a", "POST", url, 1))
    assert quiet.finished() == []
    time.sleep(0.3)
    quiet.hook(idemclient.Event("registered", "b", "k-b", "POST", url, 1))  # sweeps "a"
    (span,) = quiet.finished()
    assert (span.attributes or {})["idemclient.operation"] == "a"
    assert span.end_time == span.events[-1].timestamp
    quiet.hook(idemclient.Event("completed", "a", "k-a", "POST", url, 1, status=201))
    assert quiet.count("idemclient.operations", idemclient__outcome="completed") == 1


def test_a_stream_closed_early_is_ended_as_unfinished(journal_path: Path) -> None:
    otel = telemetry()

    def handler(request: httpx.Request) -> httpx.Response:
        chunks = (b"data: %d\n\n" % n for n in range(100_000))
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, stream=_Chunks(chunks))

    with idemclient.Client(
        journal=journal_path, transport=httpx.MockTransport(handler), hooks=[otel.hook]
    ) as client:
        with client.stream("POST", "https://api.example/chat", json={}) as response:
            next(response.iter_bytes())
        assert otel.finished() == []
    otel.hook.close()
    (span,) = otel.finished()
    assert (span.attributes or {})["idemclient.outcome"] == "unfinished"
    assert [e.name for e in span.events] == ["sending", "answered"]


class _Chunks(httpx.SyncByteStream):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks


def test_many_threads_share_one_hook(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    app.inject("status", status=503, times=10)  # however they fall, no operation gives up
    retry = idemclient.RetryPolicy(max_attempts=11)
    with client_for(app, journal_path, otel.hook, retry=retry) as client:

        def work(n: int) -> None:
            for i in range(10):
                client.post("/charges", json={"thread": n, "i": i})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    spans = otel.finished()
    assert len(spans) == 80
    assert {(s.attributes or {})["idemclient.outcome"] for s in spans} == {"completed"}
    assert len({(s.attributes or {})["idemclient.key"] for s in spans}) == 80
    assert otel.count("idemclient.operations") == 80
    assert otel.count("idemclient.retries") == 10
    assert otel.hook._open == {}


@pytest.mark.anyio
async def test_async_operations(journal_path: Path, otel: Telemetry) -> None:
    app = IdempotentApp()
    app.inject("status", status=429)
    transport = httpx.MockTransport(app.async_handler)
    with set_testing(True):  # no backoff sleeps
        async with idemclient.AsyncClient(journal=journal_path, transport=transport,
                                          hooks=[otel.hook]) as client:  # fmt: skip
            await client.post("https://api.example/a", json={})
    (span,) = otel.finished()
    assert (span.attributes or {})["idemclient.attempts"] == 2
    assert otel.count("idemclient.retries", http__response__status_code=429) == 1


def test_the_span_is_a_child_of_the_callers_span(journal_path: Path, otel: Telemetry) -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(otel.spans))
    app = IdempotentApp()
    with (
        client_for(app, journal_path, otel.hook) as client,
        tracer_provider.get_tracer("app").start_as_current_span("checkout") as parent,
    ):
        client.post("/charges", json={})
    ours = next(s for s in otel.finished() if s.name == "idemclient POST")
    assert ours.parent is not None
    assert ours.parent.span_id == parent.get_span_context().span_id


def test_importing_idemclient_does_not_import_opentelemetry() -> None:
    code = "import sys, idemclient; assert 'opentelemetry' not in sys.modules, 'imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_without_the_extra_the_import_error_names_it() -> None:
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "try:\n    import idemclient.otel\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pip install 'idemclient[otel]'" in result.stdout


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_open_spans"):
        OpenTelemetryHook(max_open_spans=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        OpenTelemetryHook(idle_timeout=-1)

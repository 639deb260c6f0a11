"""resume_pending(concurrency=N): up to N operations at once (threads, or tasks), each sent
once; several resumers on one journal split the backlog; an error that is not an
operation's own outcome stops the resume and is raised as itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import idemclient
from idemclient import RetriesExhaustedError, RetryPolicy
from idemclient.testing import IdempotentApp

BACKLOG = 12


def backlog(journal: Path, count: int = BACKLOG, prefix: str = "op") -> None:
    """`count` named operations, pending: their first sends never connected."""

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=request)

    with idemclient.Client(journal=journal, transport=httpx.MockTransport(down),
                           retry=RetryPolicy(max_attempts=1)) as client:  # fmt: skip
        for i in range(count):
            with idemclient.operation(f"{prefix}-{i}"), pytest.raises(RetriesExhaustedError):
                client.post(f"https://api.example/orders/{i}", json={"n": i})


class Crowd:
    """Answers once `width` requests are in flight together (or after 5 s): the most seen
    at once tells how many the resumer sent in parallel."""

    def __init__(self, width: int) -> None:
        self.width, self.inflight, self.most = width, 0, 0
        self.lock = threading.Condition()

    def handler(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.inflight += 1
            self.most = max(self.most, self.inflight)
            self.lock.notify_all()
            self.lock.wait_for(lambda: self.most >= self.width, timeout=5)
            self.inflight -= 1
        return httpx.Response(201, json={"ok": True})


def test_concurrency_sends_that_many_at_once_and_each_once(journal_path: Path) -> None:
    backlog(journal_path)
    crowd = Crowd(width=4)
    done: list[str] = []
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(crowd.handler)
                           ) as client:  # fmt: skip
        report = client.resume_pending(concurrency=4, on_result=lambda r: done.append(r.outcome))
    assert crowd.most == 4  # four at once, never more
    assert [r.outcome for r in report] == done == ["completed"] * BACKLOG
    assert len({r.operation.key for r in report}) == BACKLOG
    with idemclient.Journal(journal_path) as journal:
        assert journal.pending() == []


def test_two_resumers_split_one_backlog_and_act_once_each(journal_path: Path) -> None:
    backlog(journal_path)
    app = IdempotentApp(act_seconds=0.01)
    reports: list[idemclient.ResumeReport] = []

    def resumer() -> None:
        with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(app.handler)
                               ) as client:  # fmt: skip
            reports.append(client.resume_pending(concurrency=3))

    threads = [threading.Thread(target=resumer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(reports) == 2
    assert app.effect_count == BACKLOG
    assert app.duplicates() == 0
    outcomes = [r.outcome for report in reports for r in report]
    assert set(outcomes) <= {"completed", "in_progress"}
    with idemclient.Journal(journal_path) as journal:
        assert {op.state for op in journal.operations()} == {"completed"}


def test_an_error_that_is_not_an_outcome_stops_the_resume_as_itself(journal_path: Path) -> None:
    backlog(journal_path)
    sent: list[str] = []

    def broken(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        raise RuntimeError("a bug in a transport")

    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(broken)) as client:
        with pytest.raises(RuntimeError, match="a bug in a transport"):
            client.resume_pending(concurrency=3)
        assert len(sent) <= 3  # nothing more started after it
        with pytest.raises(ValueError, match="at least 1"):
            client.resume_pending(concurrency=0)


def test_an_on_result_that_raises_stops_the_resume_once_what_is_sent_finishes(
    journal_path: Path,
) -> None:
    """A progress callback that raises: nothing more starts, the operations being sent
    finish (their answers recorded), and the callback's exception comes out; no resume
    thread is left running."""
    backlog(journal_path)
    app = IdempotentApp(act_seconds=0.01)
    raised = threading.Event()
    answered = 0
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        # Past the first two, answers wait until the callback has raised (and a moment more,
        # for the resume to stop): the workers, which report through this thread, cannot
        # run through the backlog meanwhile, however late this thread gets to report.
        nonlocal answered
        with lock:
            answered += 1
            gated = answered > 2
        if gated:
            assert raised.wait(10)
            time.sleep(0.1)
        return app.handler(request)

    reported: list[idemclient.ResumeResult] = []

    def stop_at_the_second(result: idemclient.ResumeResult) -> None:
        reported.append(result)
        if len(reported) == 2:
            raised.set()
            raise KeyError("the progress bar broke")

    client = idemclient.Client(journal=journal_path, transport=httpx.MockTransport(handler))
    with client, pytest.raises(KeyError, match="the progress bar broke"):
        client.resume_pending(concurrency=3, on_result=stop_at_the_second)
    assert not [t for t in threading.enumerate() if t.name.startswith("idemclient-resume")]
    assert 2 <= app.effect_count < BACKLOG  # the two reported, those in flight, no more
    assert app.duplicates() == 0
    with idemclient.Journal(journal_path) as journal:
        states = [op.state for op in journal.operations()]
    assert states.count("completed") == app.effect_count  # none sent is left unrecorded
    assert states.count("pending") == BACKLOG - app.effect_count


@pytest.mark.anyio
async def test_async_concurrency_runs_tasks_and_raises_an_error_as_itself(
    journal_path: Path,
) -> None:
    backlog(journal_path)
    inflight, most = 0, 0
    crowded = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal inflight, most
        inflight += 1
        most = max(most, inflight)
        if most >= 4:
            crowded.set()
        with anyio.move_on_after(5):
            await crowded.wait()
        inflight -= 1
        return httpx.Response(201, json={})

    crowd = httpx.MockTransport(handler)
    async with idemclient.AsyncClient(journal=journal_path, transport=crowd) as client:
        report = await client.aresume_pending(concurrency=4)
    assert most == 4
    assert [r.outcome for r in report] == ["completed"] * BACKLOG

    backlog(journal_path, 3, prefix="more")

    async def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in a transport")

    failing = httpx.MockTransport(broken)
    async with idemclient.AsyncClient(journal=journal_path, transport=failing) as client:
        with pytest.raises(RuntimeError, match="a bug in a transport"):
            await client.aresume_pending(concurrency=3)


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 3])
@pytest.mark.parametrize("use_async", [False, True])
async def test_an_answer_the_journal_cannot_read_back_is_reported_and_the_resume_goes_on(
    journal_path: Path, concurrency: int, use_async: bool
) -> None:
    """The send of a resumed operation is over, and reading its record back fails
    (`JournalError`): it is reported, `failed` with that error and the server's answer, not
    lost from the report, and the other operations are resumed; the answer was recorded.
    (Sends over at the same moment are read back together: a read that fails reports each
    of them so.)"""
    backlog(journal_path, 4)
    journal = idemclient.Journal(journal_path)
    real_by_keys = journal.by_keys
    keys = {op.key: op.name for op in journal.operations()}
    failed_once: list[str] = []

    def by_keys(wanted: Iterable[str]) -> Any:
        wanted = list(wanted)
        if any(keys[k] == "op-2" for k in wanted) and not failed_once:
            failed_once.extend(wanted)
            raise idemclient.JournalError("the journal could not be read", path=str(journal_path))
        return real_by_keys(wanted)

    journal.by_keys = by_keys  # type: ignore[method-assign,assignment]

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"ok": True})

    if use_async:
        async with idemclient.AsyncClient(journal=journal, transport=httpx.MockTransport(server)
                                          ) as async_client:  # fmt: skip
            report = await async_client.resume_pending(concurrency=concurrency)
    else:
        with idemclient.Client(journal=journal, transport=httpx.MockTransport(server)) as client:
            report = client.resume_pending(concurrency=concurrency)
    outcomes = {r.operation.name: r.outcome for r in report}
    unread_names = {keys[k] for k in failed_once}
    assert "op-2" in unread_names
    assert outcomes == {
        f"op-{i}": "failed" if f"op-{i}" in unread_names else "completed" for i in range(4)
    }
    for unread in [r for r in report if r.outcome == "failed"]:
        assert isinstance(unread.error, idemclient.JournalError)
        assert "could not be read back" in str(unread.error)
        assert unread.response is not None
        assert unread.response.status_code == 201
    journal.by_keys = real_by_keys  # type: ignore[method-assign]
    assert {op.name: op.state for op in journal.operations()} == {
        f"op-{i}": "completed" for i in range(4)
    }
    journal.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "credentials",
    [
        {"headers": {"Authorization": "Bearer sk-one-api"}},
        {"headers": {"X-Api-Key": "one-api"}},
        {"auth": ("user", "secret")},
        {"params": {"api_key": "one-api"}},
        {"cookies": {"session": "one-api"}},
    ],
    ids=["authorization", "api-key", "auth", "query", "cookie"],
)
async def test_a_client_with_credentials_but_no_base_url_resumes_nothing(
    journal_path: Path, credentials: dict[str, Any]
) -> None:
    """A client without a base URL resumes every API's operations in the journal: carrying
    credentials of its own, it would send one API's key to all the others. It is refused
    (nothing sent, all still pending); with its API's base URL, it resumes that API's."""
    backlog(journal_path, 2)  # at https://api.example

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=request)

    with (
        idemclient.Client(journal=journal_path, transport=httpx.MockTransport(down),
                          retry=RetryPolicy(max_attempts=1)) as other,
        idemclient.operation("elsewhere"),
        pytest.raises(RetriesExhaustedError),
    ):  # fmt: skip
        other.post("https://other.example/v1", json={})  # another API's, pending
    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={})

    with (
        idemclient.Client(journal=journal_path, transport=httpx.MockTransport(server),
                          **credentials) as client,
        pytest.raises(ValueError, match="no base_url"),
    ):  # fmt: skip
        client.resume_pending()
    async with idemclient.AsyncClient(journal=journal_path, transport=httpx.MockTransport(server),
                                      **credentials) as async_client:  # fmt: skip
        with pytest.raises(ValueError, match="no base_url"):
            await async_client.resume_pending()
    assert sent == []
    with idemclient.Journal(journal_path) as journal:
        assert {op.state for op in journal.operations()} == {"pending"}
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(server),
                           base_url="https://api.example", **credentials) as client:  # fmt: skip
        report = client.resume_pending()
    assert [r.outcome for r in report] == ["completed", "completed"]
    assert {r.url.host for r in sent} == {"api.example"}
    assert [op.name for op in report.skipped] == ["elsewhere"]

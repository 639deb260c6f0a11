"""Client, AsyncClient, wrap() and resume_pending()."""

from __future__ import annotations

import logging
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import idemclient
from idemclient import Journal, JournalError, RetriesExhaustedError, RetryPolicy


class Recorder:
    """A MockTransport handler that records requests and answers from a status list."""

    def __init__(self, *statuses: int | Exception) -> None:
        self.statuses = list(statuses) or [201]
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, json={"n": len(self.requests)})


def test_wrap_keeps_the_clients_settings(journal_path: Path) -> None:
    main, other = Recorder(), Recorder()
    original = httpx.Client(
        transport=httpx.MockTransport(main),
        mounts={"https://other.example": httpx.MockTransport(other)},
        base_url="https://api.example/v1/",
        headers={"X-Tenant": "t1"},
        auth=("user", "secret"),
        cookies={"session": "s1"},
        timeout=3.0,
    )
    client = idemclient.wrap(original, journal=journal_path)
    assert client is original
    client.post("charges", json={"amount": 1})
    sent = main.requests[0]
    assert str(sent.url) == "https://api.example/v1/charges"
    assert sent.headers["X-Tenant"] == "t1"
    assert sent.headers["Authorization"].startswith("Basic ")
    assert sent.headers["Cookie"] == "session=s1"
    assert sent.headers["Idempotency-Key"]
    assert sent.extensions["timeout"]["read"] == 3.0
    client.post("https://other.example/hooks", json={})
    assert other.requests[0].headers["Idempotency-Key"]
    client.close()
    with Journal(journal_path) as journal:
        assert {op.url for op in journal.operations()} == {
            "https://api.example/v1/charges",
            "https://other.example/hooks",
        }


@pytest.mark.anyio
@pytest.mark.parametrize("use_async", [False, True])
async def test_a_wrapped_client_with_mounts_writes_the_journal_once_at_close(
    journal_path: Path, use_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Closing a wrapped client with mounted transports writes their shared journal once,
    by the client's own transport: a journal that cannot be written is one error (logged,
    under an exception on its way out), not one per transport, each waiting again."""
    journal = Journal(journal_path)
    flushes: list[int] = []

    def failing_flush() -> None:
        flushes.append(1)
        raise idemclient.JournalError("the journal's disk is gone", path=str(journal_path))

    journal.flush = failing_flush  # type: ignore[method-assign]
    mounts = {"https://other.example": httpx.MockTransport(Recorder())}

    async def leave_with_an_error() -> None:
        if use_async:
            async with idemclient.wrap(
                httpx.AsyncClient(transport=httpx.MockTransport(Recorder()), mounts=mounts),
                journal=journal,
            ):
                raise KeyError("the caller's own error")
        with idemclient.wrap(
            httpx.Client(transport=httpx.MockTransport(Recorder()), mounts=mounts),
            journal=journal,
        ):
            raise KeyError("the caller's own error")

    with caplog.at_level(logging.ERROR, logger="idemclient"), pytest.raises(KeyError):
        await leave_with_an_error()
    assert flushes == [1]
    assert len([r for r in caplog.records if "disk is gone" in r.getMessage()]) == 1
    journal.close()


def test_wrap_shares_one_journal_and_refuses_to_wrap_twice(journal_path: Path) -> None:
    client = idemclient.wrap(
        httpx.Client(
            transport=httpx.MockTransport(Recorder()),
            mounts={"https://other.example": httpx.MockTransport(Recorder())},
        ),
        journal=journal_path,
    )
    client.post("https://api.example/a", json={})
    client.post("https://other.example/b", json={})
    with Journal(journal_path) as journal:
        assert len(journal.operations()) == 2
    with pytest.raises(ValueError, match="already wrapped"):
        idemclient.wrap(client)
    with pytest.raises(TypeError, match=r"httpx or httpx2 Client"):
        idemclient.wrap("not a client")
    client.close()


def test_client_is_an_httpx_client_with_a_journal(journal_path: Path) -> None:
    recorder = Recorder()
    with idemclient.Client(
        journal=journal_path, transport=httpx.MockTransport(recorder), base_url="https://x"
    ) as client:
        assert isinstance(client, httpx.Client)
        assert isinstance(client.journal, idemclient.Journal)
        assert client.journal.path == journal_path
        client.post("/a", json={})
        assert recorder.requests[0].headers["Idempotency-Key"]
        journal = client.journal
    with pytest.raises(JournalError, match="closed"):
        journal.operations()


def test_resume_pending_finishes_with_the_same_key_and_current_auth(journal_path: Path) -> None:
    down = Recorder(httpx.ConnectError("refused"))
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(down),
        base_url="https://api.example",
        headers={"Authorization": "Bearer old-token"},
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        with idemclient.operation("charge-1"), pytest.raises(RetriesExhaustedError):
            client.post("/charges", json={"amount": 5}, headers={"X-Trace": "t"})
        with pytest.raises(RetriesExhaustedError):
            client.post("/refunds", content=b"raw-bytes", headers={"Content-Type": "text/plain"})
    key = down.requests[0].headers["Idempotency-Key"]

    up = Recorder()
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(up),
        base_url="https://api.example",
        headers={"Authorization": "Bearer new-token"},
    ) as client:
        results = client.resume_pending()
        assert [r.outcome for r in results] == ["completed", "completed"]
        assert [r.operation.state for r in results] == ["completed", "completed"]
        assert results[0].response is not None
        assert results[0].response.json() == {"n": 1}
        first, second = up.requests
        assert first.headers["Idempotency-Key"] == key
        assert first.headers["Authorization"] == "Bearer new-token"
        assert first.headers["X-Trace"] == "t"
        assert first.content == b'{"amount":5}'
        assert second.content == b"raw-bytes"
        assert second.headers["Content-Type"] == "text/plain"
        assert client.resume_pending() == []
        # the named operation is answered from the journal now
        with idemclient.operation("charge-1"):
            replay = client.post("/charges", json={"amount": 5}, headers={"X-Trace": "t"})
        assert replay.extensions["idempotency"]["replayed"] is True
        assert len(up.requests) == 2


def _interrupt(journal: Path | Journal, url: str, name: str | None = None, **options: Any) -> None:
    """Leave a pending operation for `url` in the journal (its first send never connected)."""
    with idemclient.Client(
        journal=journal,
        transport=httpx.MockTransport(Recorder(httpx.ConnectError("down"))),
        retry=RetryPolicy(max_attempts=1),
        **options,
    ) as client:
        extensions = {"idempotency_operation": name} if name else None
        with pytest.raises(RetriesExhaustedError):
            client.post(url, json={"to": url}, extensions=extensions)


def test_resume_sends_each_operation_to_its_own_origin(journal_path: Path) -> None:
    """The default journal is shared by clients of several APIs: the payments client's resume
    must not send the mail API's operation to the payments host (a 404 recorded as its answer
    would lose it)."""
    _interrupt(journal_path, "https://pay.example/charges", "charge-1")
    _interrupt(journal_path, "https://mail.example/messages", "mail-1")
    _interrupt(journal_path, "http://pay.example/charges", "plain-http")  # another origin
    pay_requests = Recorder()
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(pay_requests),
        base_url="https://pay.example:443/v1",
    ) as pay:
        report = pay.resume_pending()
        assert [(r.operation.name, r.outcome) for r in report] == [("charge-1", "completed")]
        assert sorted(op.name or "" for op in report.skipped) == ["mail-1", "plain-http"]
        assert [str(r.url) for r in pay_requests.requests] == ["https://pay.example/charges"]
        mail = pay.journal.get("mail-1")
        assert mail is not None
        assert (mail.state, mail.attempts) == ("pending", 1)  # untouched
    # A client without a base URL sends each to where it was sent.
    everywhere = Recorder()
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(everywhere)) as c:
        report = c.resume_pending()
    assert sorted(str(r.url) for r in everywhere.requests) == [
        "http://pay.example/charges",
        "https://mail.example/messages",
    ]
    assert report.skipped == ()


def test_resume_moves_operations_to_a_new_host_only_when_asked(journal_path: Path) -> None:
    _interrupt(journal_path, "http://old.example:8080/api/charges?x=1", "moved")
    up = Recorder(httpx.ConnectError("still down"))
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(up),
        base_url="https://new.example",
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        assert len(client.resume_pending()) == 0  # not without rebase
        assert up.requests == []
        for bad in ("old.example", "http://old.example/api", "ftp://old.example"):
            with pytest.raises(ValueError, match="origin"):
                client.resume_pending(rebase={bad: "https://new.example"})
        report = client.resume_pending(rebase={"http://old.example:8080": "https://new.example"})
        assert [r.outcome for r in report] == ["failed"]
    assert str(up.requests[0].url) == "https://new.example/api/charges?x=1"
    # The move is recorded: the next resume sends it to the new host without being told.
    up = Recorder()
    with idemclient.Client(
        journal=journal_path, transport=httpx.MockTransport(up), base_url="https://new.example"
    ) as client:
        assert [r.outcome for r in client.resume_pending()] == ["completed"]
    assert str(up.requests[0].url) == "https://new.example/api/charges?x=1"
    # A rerun of the script at the new host is the same operation (replayed); one still at
    # the old host is refused, not sent where the operation no longer lives.
    body = {"to": "http://old.example:8080/api/charges?x=1"}
    with idemclient.Client(
        journal=journal_path, transport=httpx.MockTransport(up), base_url="https://new.example"
    ) as client:
        again = client.post("/api/charges?x=1", json=body,
                            extensions={"idempotency_operation": "moved"})  # fmt: skip
        assert again.extensions["idempotency"]["replayed"] is True
    with (
        idemclient.Client(journal=journal_path, transport=httpx.MockTransport(up),
                          base_url="http://old.example:8080") as client,
        pytest.raises(idemclient.OperationMismatchError, match=r"new\.example"),
    ):  # fmt: skip
        client.post("/api/charges?x=1", json=body, extensions={"idempotency_operation": "moved"})
    assert len(up.requests) == 1


def test_resume_of_one_origin_leaves_the_others_stale_operations_alone(journal_path: Path) -> None:
    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=1))
    _interrupt(journal, "https://b.example/b", "b-op")
    now[0] += 7200  # past the retention
    with idemclient.Client(
        journal=journal, transport=httpx.MockTransport(Recorder()), base_url="https://a.example"
    ) as client:
        report = client.resume_pending()
    assert list(report) == []
    assert [op.name for op in report.skipped] == ["b-op"]
    op = journal.get("b-op")
    assert op is not None
    assert op.state == "pending"  # for the client of its own API to expire, and say so
    journal.close()


def test_resume_sends_the_key_in_the_operations_own_header_and_style(journal_path: Path) -> None:
    """An operation made with key_header="X-Request-Key" goes out under that header again,
    quoted if it was, whatever the resuming client's settings (the CLI's are the defaults)."""
    _interrupt(
        journal_path, "https://api.example/a", "custom", key_header="X-Request-Key",
        key_style="structured",
    )  # fmt: skip
    with Journal(journal_path) as journal:
        op = journal.get("custom")
    assert op is not None
    assert (op.key_header, op.key_style) == ("X-Request-Key", "structured")
    up = Recorder()
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(up)) as client:
        assert [r.outcome for r in client.resume_pending()] == ["completed"]
    sent = up.requests[0]
    assert sent.headers["X-Request-Key"] == f'"{op.key}"'
    assert "Idempotency-Key" not in sent.headers
    # A rerun of the named operation by a client with default settings replays it.
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(up)) as client:
        again = client.post(
            "https://api.example/a", json={"to": "https://api.example/a"},
            extensions={"idempotency_operation": "custom"},
        )  # fmt: skip
    assert again.extensions["idempotency"]["replayed"] is True
    assert len(up.requests) == 1


def test_resume_sends_the_clients_current_query_credential_and_the_stored_params(
    journal_path: Path,
) -> None:
    down = Recorder(httpx.ConnectError("refused"))
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(down),
        base_url="https://api.example",
        params={"api_key": "OLD-KEY"},
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        with pytest.raises(RetriesExhaustedError):
            client.post("/charges", params={"page": "2"}, json={"amount": 5})
        assert down.requests[0].url.params["api_key"] == "OLD-KEY"
        (op,) = client.journal.operations()
        assert op.url == "https://api.example/charges?page=2"
        with pytest.raises(RetriesExhaustedError):
            client.post("/refunds", params={"page": "3"}, json={"amount": 5})
    with sqlite3.connect(journal_path) as db:  # as a journal from before kept it
        db.execute(
            "UPDATE operations SET url = ? WHERE url LIKE '%refunds%'",
            ("https://api.example/refunds?api_key=OLD-KEY&page=3",),
        )
    up = Recorder()
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(up),
        base_url="https://api.example",
        params={"api_key": "NEW-KEY"},
    ) as client:
        assert [r.outcome for r in client.resume_pending()] == ["completed", "completed"]
    assert [str(r.url) for r in up.requests] == [
        "https://api.example/charges?api_key=NEW-KEY&page=2",
        "https://api.example/refunds?api_key=NEW-KEY&page=3",
    ]
    assert up.requests[0].headers["Idempotency-Key"] == op.key


@pytest.mark.anyio
async def test_keep_headers_on_clients_and_wrap(journal_path: Path) -> None:
    headers = {"X-Session-Locale": "fr", "X-Session-Id": "s-1"}
    with idemclient.Client(
        journal=journal_path,
        transport=httpx.MockTransport(Recorder()),
        keep_headers=("X-Session-Locale",),
    ) as client:
        client.post("https://api.example/a", json={}, headers=headers)
    async with idemclient.AsyncClient(
        journal=journal_path,
        transport=httpx.MockTransport(Recorder()),
        keep_headers=("X-Session-Locale",),
    ) as aclient:
        await aclient.post("https://api.example/b", json={}, headers=headers)
    with idemclient.wrap(
        httpx.Client(transport=httpx.MockTransport(Recorder())),
        journal=journal_path,
        keep_headers=("x-session-locale",),
    ) as wrapped:
        wrapped.post("https://api.example/c", json={}, headers=headers)
    with Journal(journal_path) as journal:
        ops = journal.operations()
        assert len(ops) == 3
        for op in ops:
            stored = dict(journal.request_of(op.key)[2])
            assert stored["x-session-locale"] == "fr"
            assert "x-session-id" not in stored


def test_resume_reports_conflicts_failures_and_expired(journal_path: Path) -> None:
    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=1))
    with idemclient.Client(
        journal=journal,
        transport=httpx.MockTransport(Recorder(httpx.ReadTimeout("lost"))),
        base_url="https://x",
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        for name in ("old", "conflicting", "failing"):
            with idemclient.operation(name), pytest.raises(RetriesExhaustedError):
                client.post(f"/{name}", json={})
            now[0] += 1
    with sqlite3.connect(journal_path) as db:
        db.execute("UPDATE operations SET first_sent_at = first_sent_at - 7200 WHERE name = 'old'")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422 if request.url.path == "/conflicting" else 503)

    with idemclient.Client(
        journal=journal,
        transport=httpx.MockTransport(handler),
        base_url="https://x",
        retry=RetryPolicy(max_attempts=2),
        sleep=lambda s: None,
    ) as client:
        results = {r.operation.name: r for r in client.resume_pending()}
    assert results["old"].outcome == "expired"
    assert results["old"].operation.state == "expired"
    assert results["conflicting"].outcome == "conflict"
    assert results["conflicting"].operation.state == "conflict"
    assert results["failing"].outcome == "failed"
    assert isinstance(results["failing"].error, RetriesExhaustedError)
    assert results["failing"].operation.state == "pending"
    journal.close()


def test_resume_skips_an_operation_held_by_a_live_process(journal_path: Path) -> None:
    with (
        idemclient.Client(
            journal=journal_path,
            transport=httpx.MockTransport(Recorder(httpx.ConnectError("down"))),
            retry=RetryPolicy(max_attempts=1),
        ) as client,
        pytest.raises(RetriesExhaustedError),
    ):
        client.post("https://x/a", json={})
    with sqlite3.connect(journal_path) as db:
        db.execute(
            "UPDATE operations SET lease_owner = 'elsewhere.example:1:1', lease_expires = 9e9"
        )
    up = Recorder()
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(up)) as client:
        assert [r.outcome for r in client.resume_pending()] == ["in_progress"]
    assert up.requests == []


def test_resume_needs_an_idemclient_client() -> None:
    with httpx.Client() as plain, pytest.raises(TypeError, match="no idemclient transport"):
        idemclient.resume_pending(plain)


@pytest.mark.anyio
async def test_async_client_wrap_and_resume(journal_path: Path) -> None:
    down = Recorder(httpx.ConnectError("refused"))
    async with idemclient.AsyncClient(
        journal=journal_path,
        transport=httpx.MockTransport(down),
        base_url="https://api.example",
        retry=RetryPolicy(max_attempts=1),
    ) as client:
        assert isinstance(client, httpx.AsyncClient)
        with pytest.raises(RetriesExhaustedError):
            await client.post("/orders", json={"cart": "c1"})
    up = Recorder()
    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(up), base_url="https://api.example"
    ) as client:
        results = await client.aresume_pending()
        assert [r.outcome for r in results] == ["completed"]
        assert await idemclient.aresume_pending(client) == []
    assert up.requests[0].headers["Idempotency-Key"] == down.requests[0].headers["Idempotency-Key"]

    wrapped = idemclient.wrap(
        httpx.AsyncClient(transport=httpx.MockTransport(Recorder())), journal=journal_path
    )
    response = await wrapped.post("https://api.example/x", json={})
    assert response.extensions["idempotency"]["attempts"] == 1
    await wrapped.aclose()


def test_resume_sends_non_ascii_request_headers_as_they_first_went(journal_path: Path) -> None:
    """A latin-1 and a UTF-8 header value: resume used to fail with UnicodeEncodeError."""
    sent = {b"X-Note": "café".encode("latin-1"), b"X-Name": "résumé".encode()}
    with (
        idemclient.Client(
            journal=journal_path, transport=httpx.MockTransport(Recorder(httpx.ConnectError("x"))),
            retry=RetryPolicy(max_attempts=1),
        ) as client,
        pytest.raises(RetriesExhaustedError),
    ):  # fmt: skip
        client.post("https://api.example/x", json={}, headers=sent)
    up = Recorder()
    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(up)) as client:
        assert [r.outcome for r in client.resume_pending()] == ["completed"]
    raw = {k.lower(): v for k, v in up.requests[0].headers.raw}
    assert (raw[b"x-note"], raw[b"x-name"]) == (sent[b"X-Note"], sent[b"X-Name"])

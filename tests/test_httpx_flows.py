"""httpx's own resends (auth flows on 401, redirects on 307/308) continue the same operation;
multipart uploads are the same request whatever boundary httpx draws."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import idemclient
from idemclient import Journal, RetriesExhaustedError, RetryPolicy


class TokenAuth(httpx.Auth):
    """The httpx docs' token-refresh pattern: on a 401, refresh and resend."""

    def __init__(self) -> None:
        self.token = "expired"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        response = yield request
        if response.status_code == 401:
            self.token = "fresh"
            request.headers["Authorization"] = f"Bearer {self.token}"
            yield request


class Server:
    """Acts once per key; 401 without the fresh token; records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.effects: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        if request.headers.get("Authorization") not in ("Bearer fresh", None) and (
            not request.headers.get("Authorization", "").startswith("Digest ")
        ):
            return httpx.Response(401)
        key = request.headers.get("Idempotency-Key", "")
        self.effects[key] = self.effects.get(key, 0) + 1
        return httpx.Response(201, json={"path": request.url.path})


def client(
    journal: Path | Journal, handler: httpx.MockTransport | Server, **kw: Any
) -> idemclient.Client:
    if not isinstance(handler, httpx.MockTransport):
        handler = httpx.MockTransport(handler)
    return idemclient.Client(
        journal=journal, transport=handler, base_url="https://api.example", sleep=lambda s: None,
        **kw,
    )  # fmt: skip


def down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("down")


@pytest.mark.parametrize("named", [False, True])
def test_an_auth_flows_resend_after_401_is_the_same_operation(
    journal_path: Path, named: bool
) -> None:
    server = Server()
    with client(journal_path, server, auth=TokenAuth()) as c:
        if named:
            with idemclient.operation("charge-1"):
                response = c.post("/charges", json={"amount": 5})
        else:
            response = c.post("/charges", json={"amount": 5})
        assert response.status_code == 201  # as plain httpx
        assert len(server.requests) == 2
        first, second = server.requests
        assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
        ops = c.journal.operations()
    assert [(op.name, op.state, op.attempts, op.response_status) for op in ops] == [
        ("charge-1" if named else None, "completed", 2, 201)
    ]


def test_digest_auth_continues_the_operation(journal_path: Path) -> None:
    def digest_server(request: httpx.Request) -> httpx.Response:
        request.read()
        if not request.headers.get("Authorization", "").startswith("Digest "):
            challenge = 'Digest realm="api", nonce="abc", qop="auth", algorithm=MD5'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(201)

    with client(journal_path, httpx.MockTransport(digest_server),
                auth=httpx.DigestAuth("user", "pass")) as c:  # fmt: skip
        with idemclient.operation("upload-1"):
            assert c.post("/things", json={"a": 1}).status_code == 201
        op = c.journal.get("upload-1")
    assert op is not None
    assert (op.state, op.attempts) == ("completed", 2)


def test_a_401_is_never_the_operations_answer(journal_path: Path) -> None:
    """A named operation answered 401 (an expired token) is not stuck: it stays pending, a
    rerun with valid credentials sends it under the same key, and a person may abandon it."""
    server = Server()
    with client(journal_path, server, headers={"Authorization": "Bearer expired"}) as c:
        with idemclient.operation("charge-1"):
            assert c.post("/charges", json={"amount": 5}).status_code == 401
        op = c.journal.get("charge-1")
        assert op is not None
        assert (op.state, op.attempts) == ("pending", 1)
        assert op.last_error == "HTTP 401 (refused before any effect)"
    with (
        client(journal_path, server, headers={"Authorization": "Bearer fresh"}) as c,
        idemclient.operation("charge-1"),
    ):
        assert c.post("/charges", json={"amount": 5}).status_code == 201
    assert [r.headers["Idempotency-Key"] for r in server.requests] == [op.key, op.key]
    with client(journal_path, server, headers={"Authorization": "Bearer expired"}) as c:
        with idemclient.operation("charge-2"):
            assert c.post("/charges", json={"amount": 6}).status_code == 401
        assert c.journal.abandon("charge-2").state == "abandoned"


def test_a_307_is_followed_as_the_same_operation_at_its_new_url(journal_path: Path) -> None:
    seen: list[httpx.Request] = []

    def moved(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        if request.url.path == "/old":
            return httpx.Response(307, headers={"Location": "/new?v=2"})
        return httpx.Response(201, json={"at": request.url.path})

    with client(journal_path, httpx.MockTransport(moved), follow_redirects=True) as c:
        with idemclient.operation("charge-1"):
            response = c.post("/old", json={"amount": 5})
        assert response.status_code == 201  # as plain httpx
        op = c.journal.get("charge-1")
    assert op is not None
    assert (op.state, op.attempts, op.url) == ("completed", 2, "https://api.example/new?v=2")
    assert seen[0].headers["Idempotency-Key"] == seen[1].headers["Idempotency-Key"] == op.key
    assert seen[1].content == seen[0].content


def test_a_redirected_operation_resumes_at_its_new_url(journal_path: Path) -> None:
    def moved_then_down(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old":
            return httpx.Response(308, headers={"Location": "https://api.example/new"})
        raise httpx.ConnectError("down")

    with (
        client(journal_path, httpx.MockTransport(moved_then_down), follow_redirects=True,
               retry=RetryPolicy(max_attempts=1)) as c,
        pytest.raises(RetriesExhaustedError),
    ):  # fmt: skip
        c.post("/old", json={"amount": 5})
    seen: list[str] = []

    def up(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(201)

    with client(journal_path, httpx.MockTransport(up)) as c:
        assert [r.outcome for r in c.resume_pending()] == ["completed"]
    assert seen == ["https://api.example/new"]


def test_a_303_is_the_posts_final_answer(journal_path: Path) -> None:
    def see_other(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(303, headers={"Location": "/receipts/1"})
        return httpx.Response(200, json={"receipt": 1})

    with client(journal_path, httpx.MockTransport(see_other), follow_redirects=True) as c:
        with idemclient.operation("charge-1"):
            assert c.post("/charges", json={}).json() == {"receipt": 1}
        op = c.journal.get("charge-1")
    assert op is not None
    assert (op.state, op.response_status) == ("completed", 303)


def test_a_redirect_not_followed_leaves_the_operation_pending(journal_path: Path) -> None:
    def moved(request: httpx.Request) -> httpx.Response:
        return httpx.Response(308, headers={"Location": "/new"})

    with client(journal_path, httpx.MockTransport(moved)) as c:
        with idemclient.operation("charge-1"):
            assert c.post("/old", json={}).status_code == 308
        op = c.journal.get("charge-1")
    assert op is not None
    assert op.state == "pending"


def test_a_multipart_upload_is_the_same_request_whatever_its_boundary(journal_path: Path) -> None:
    files = {"file": ("report.csv", b"a,b\n1,2\n", "text/csv")}
    with (
        client(journal_path, httpx.MockTransport(down), retry=RetryPolicy(max_attempts=1)) as c,
        idemclient.operation("upload-1"),
        pytest.raises(RetriesExhaustedError),
    ):
        c.post("/uploads", files=files, data={"note": "q3"})
    with Journal(journal_path) as journal:
        pending = journal.get("upload-1")
        assert pending is not None
        _, _, headers, first_body = journal.request_of(pending.key)
    first_type = dict(headers)["content-type"]
    seen: list[httpx.Request] = []

    def up(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(201)

    with client(journal_path, httpx.MockTransport(up)) as c:
        for _ in range(2):  # a rerun sends the first bytes; the next one is replayed
            with idemclient.operation("upload-1"):
                assert c.post("/uploads", files=files, data={"note": "q3"}).status_code == 201
    assert len(seen) == 1
    assert seen[0].content == first_body  # byte for byte, the first boundary included
    assert seen[0].headers["content-type"] == first_type
    assert seen[0].headers["content-length"] == str(len(first_body))
    with (
        client(journal_path, httpx.MockTransport(up)) as c,
        idemclient.operation("upload-1"),
        pytest.raises(idemclient.OperationMismatchError),
    ):
        c.post("/uploads", files={"file": ("report.csv", b"other", "text/csv")})


def test_a_patch_answered_301_is_followed_as_the_same_operation(journal_path: Path) -> None:
    """httpx keeps a PATCH a PATCH on a 301 (only a POST becomes a GET): the same operation
    at the new URL, as on a 308."""
    seen: list[tuple[str, str]] = []

    def moved(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        if request.url.path == "/old":
            return httpx.Response(301, headers={"Location": "/new"})
        return httpx.Response(200, json={"patched": True})

    with client(journal_path, httpx.MockTransport(moved), follow_redirects=True,
                methods=("POST", "PATCH")) as c:  # fmt: skip
        with idemclient.operation("patch-1"):
            assert c.patch("/old", json={"a": 1}).json() == {"patched": True}
        op = c.journal.get("patch-1")
    assert seen == [("PATCH", "/old"), ("PATCH", "/new")]
    assert op is not None
    assert (op.state, op.response_status, op.url) == ("completed", 200, "https://api.example/new")


@pytest.mark.parametrize("status", [401, 403])
def test_resume_reports_an_answer_that_settles_nothing_as_failed(
    journal_path: Path, status: int
) -> None:
    """401, and to a resume 403 too: a resumer's client that lacks the credential the
    journal did not keep (an API key in the query) is refused; that is not the operation's
    answer to record (it was, and a rerun then replayed the refusal), and it stays pending."""
    with (
        client(journal_path, httpx.MockTransport(down), retry=RetryPolicy(max_attempts=1)) as c,
        pytest.raises(RetriesExhaustedError),
    ):
        c.post("/charges", json={})
    with client(journal_path, httpx.MockTransport(lambda r: httpx.Response(status))) as c:
        (result,) = c.resume_pending()
    assert result.outcome == "failed"
    assert result.response is not None
    assert result.response.status_code == status
    assert result.operation.state == "pending"


def test_a_403_to_a_call_of_the_caller_is_its_answer(journal_path: Path) -> None:
    """Outside a resume a 403 is the operation's answer, recorded (the caller's own
    credentials were refused the action), and a rerun replays it."""
    with client(journal_path, httpx.MockTransport(lambda r: httpx.Response(403))) as c:
        with idemclient.operation("charge-1"):
            assert c.post("/charges", json={}).status_code == 403
        op = c.journal.get("charge-1")
        assert op is not None
        assert (op.state, op.response_status) == ("completed", 403)


def _sent_by_a_resume(journal: Journal) -> int:
    """Resume `journal`'s operations against an API that is up: each completes; the
    requests sent. Closes the journal."""
    seen: list[httpx.Request] = []

    def up(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201)

    with client(journal, httpx.MockTransport(up)) as c:
        assert {r.outcome for r in c.resume_pending()} == {"completed"}
    journal.close()
    return len(seen)


def test_attempts_that_never_connected_leave_it_provably_never_sent(journal_path: Path) -> None:
    """Refused connections: nothing reached the server, so no retention may expire it."""
    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=1))
    with (
        client(journal, httpx.MockTransport(down), retry=RetryPolicy(max_attempts=2)) as c,
        idemclient.operation("charge-1"),
        pytest.raises(RetriesExhaustedError),
    ):
        c.post("/charges", json={})
    now[0] += 7200
    assert _sent_by_a_resume(journal) == 1


@pytest.mark.parametrize("again", ["a resend in the same context", "a resume"])
def test_attempts_that_never_connected_stay_never_sent_across_calls(
    journal_path: Path, again: str
) -> None:
    """The same holds across calls: an SDK's own retry (the same request again, right after)
    or a resume at start-up, while the API is still unreachable, claims the operation again;
    none of its attempts reached the server, so it stays provably never sent (it expired
    past the retention, and a person had to decide about a request that never left)."""
    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=1))
    with client(journal, httpx.MockTransport(down), retry=RetryPolicy(max_attempts=2)) as c:
        with pytest.raises(RetriesExhaustedError):
            c.post("/charges", json={"amount": 1})
        if again == "a resume":
            assert [r.outcome for r in c.resume_pending()] == ["failed"]
        else:
            with pytest.raises(RetriesExhaustedError):
                c.post("/charges", json={"amount": 1})
    (op,) = journal.operations()
    assert op.attempts == 4
    now[0] += 7200
    assert _sent_by_a_resume(journal) == 1


def test_a_resend_cancelled_before_its_send_leaves_it_never_sent(journal_path: Path) -> None:
    """The resend of a never-sent operation, cancelled while its claim was being committed
    (the claim is given back unsent): it stays provably never sent, and a resume past the
    retention sends it (it counted as sent once its attempts passed one, and expired)."""
    import asyncio
    import sqlite3
    import threading

    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=1))

    async def main() -> None:
        async with idemclient.AsyncClient(
            journal=journal, transport=httpx.MockTransport(down), base_url="https://api.example",
            retry=RetryPolicy(max_attempts=1),
        ) as c:  # fmt: skip
            other = sqlite3.connect(journal_path, isolation_level=None, check_same_thread=False)
            resending = asyncio.Event()

            async def job() -> None:  # (one task: its resend continues its operation)
                with pytest.raises(RetriesExhaustedError):
                    await c.post("/charges", json={"amount": 1})
                other.execute("BEGIN IMMEDIATE")  # another process writes a moment
                threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
                resending.set()
                await c.post("/charges", json={"amount": 1})

            task = asyncio.ensure_future(job())
            await resending.wait()
            await asyncio.sleep(0.1)  # its claim waits for the write lock
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            other.close()

    asyncio.run(main())
    (op,) = journal.operations()
    assert (op.attempts, op.last_error) == (1, "cancelled before it was sent")
    now[0] += 7200
    assert _sent_by_a_resume(journal) == 1


@pytest.mark.parametrize("in_block", [False, True])
def test_an_identical_post_after_a_redirected_one_completed_is_a_new_operation(
    journal_path: Path, in_block: bool
) -> None:
    """A POST answered through a 307 (a trailing slash added) completes at the new URL: the
    same request again is a new operation (`batch#2` in a block), not the first one's
    replay (the first one's remembered request, at the old URL, was left behind)."""
    import contextlib

    acted: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/"):
            return httpx.Response(307, headers={"Location": request.url.path + "/"})
        acted.append(request.headers["Idempotency-Key"])
        return httpx.Response(201, json={"order": len(acted)})

    block = idemclient.operation("batch") if in_block else contextlib.nullcontext()
    with client(journal_path, httpx.MockTransport(handler), follow_redirects=True) as c, block:
        first = c.post("/orders", json={"sku": "A"})
        second = c.post("/orders", json={"sku": "A"})
    assert (first.json(), second.json()) == ({"order": 1}, {"order": 2})
    assert second.extensions["idempotency"]["replayed"] is False
    assert len(set(acted)) == 2
    if in_block:
        assert second.extensions["idempotency"]["operation"] == "batch#2"


def test_many_calls_of_one_block_each_keep_their_retry(journal_path: Path) -> None:
    """More concurrent calls in one block than a context once remembered: each SDK-style
    retry (the answer lost after the server acted) still continues its own operation."""
    import asyncio

    acted: dict[str, int] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        acted[key] = acted.get(key, 0) + 1
        if acted[key] == 1:
            raise httpx.ReadError("the answer was lost after the server acted")
        return httpx.Response(201)

    async def main() -> None:
        async with idemclient.AsyncClient(
            journal=journal_path, transport=httpx.MockTransport(handler),
            base_url="https://api.example", retry=RetryPolicy(max_attempts=1),
        ) as c:  # fmt: skip

            async def call(i: int) -> None:
                with pytest.raises(RetriesExhaustedError):
                    await c.post("/charges", json={"i": i})
                await asyncio.sleep(0.01)  # the SDK backs off; the others go on
                assert (await c.post("/charges", json={"i": i})).status_code == 201

            with idemclient.operation("batch"):
                await asyncio.gather(*(call(i) for i in range(100)))

    asyncio.run(main())
    assert len(acted) == 100  # one key each, acted on once and replayed (here: acted)
    with Journal(journal_path) as journal:
        assert {op.state for op in journal.operations()} == {"completed"}
        assert len(journal.operations()) == 100


def test_interrupted_in_its_backoff_after_refused_connections_it_stays_never_sent(
    journal_path: Path,
) -> None:
    """Ctrl-C (or a cancellation) while waiting to retry, every attempt so far refused: the
    operation is given back as never sent (it counted as sent, and expired past the
    retention without being sent)."""

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    now = [1_800_000_000.0]
    journal = Journal(journal_path, clock=lambda: now[0], retention=timedelta(hours=1))
    with (
        idemclient.Client(journal=journal, transport=httpx.MockTransport(down),
                          base_url="https://api.example", sleep=interrupted) as c,
        pytest.raises(KeyboardInterrupt),
    ):  # fmt: skip
        c.post("/charges", json={})
    now[0] += 7200
    assert _sent_by_a_resume(journal) == 1


def test_a_restored_journal_with_a_hot_rollback_journal_opens(journal_path: Path) -> None:
    """A journal in rollback mode (as a restore may leave it) whose last writer died in a
    transaction (its `-journal` file is hot): opening it rolls that back, as before the
    read-only look at databases not in WAL mode (which cannot)."""
    import sqlite3

    with Journal(journal_path) as journal:
        journal.operations()
    with sqlite3.connect(journal_path) as db:
        db.execute("PRAGMA journal_mode = DELETE")
    db.close()
    hot = journal_path.with_name(journal_path.name + "-journal")
    writer = sqlite3.connect(journal_path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = DELETE")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM settings")
    writer.execute("PRAGMA cache_spill = 1")
    writer.execute("CREATE TABLE filler (x BLOB)")
    writer.execute("INSERT INTO filler VALUES (zeroblob(4000000))")  # (spilled: hot journal)
    assert hot.exists()
    saved = journal_path.read_bytes(), hot.read_bytes()
    writer.close()  # (rolled back: put the crash's files back)
    journal_path.write_bytes(saved[0])
    hot.write_bytes(saved[1])
    with Journal(journal_path) as journal:
        assert journal.operations() == []


def test_a_call_in_a_thread_of_its_own_keeps_its_retry_in_a_block(journal_path: Path) -> None:
    """Each call of a block in a thread of its own (a worker thread per call): X's answer is
    lost after the server acted, and its thread ends; Y runs in a new thread, which gets the
    ended thread's ident at once. Y is another place: X's retry, from a third thread, still
    continues X (it was a new operation, acted on twice)."""
    import contextvars
    import threading

    acted: dict[str, list[str]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read().decode()
        acted.setdefault(body, []).append(request.headers["Idempotency-Key"])
        if body.startswith('"X') and len(acted[body]) == 1:
            raise httpx.ReadError("the answer was lost after the server acted")
        return httpx.Response(201)

    with client(journal_path, httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=1)) as c:

        def in_a_thread(value: str) -> None:
            def run() -> None:
                with contextlib.suppress(RetriesExhaustedError):
                    c.post("/charges", json=value)

            thread = threading.Thread(target=contextvars.copy_context().run, args=(run,))
            thread.start()
            thread.join(10)

        with idemclient.operation("job"):
            for k in range(3):
                in_a_thread(f"X{k}")
                in_a_thread(f"Y{k}")
                in_a_thread(f"X{k}")
    assert all(len(set(keys)) == 1 for keys in acted.values()), acted


@pytest.mark.parametrize("in_block", [False, True])
def test_a_redirected_post_whose_answer_is_lost_is_resent_under_its_key(
    journal_path: Path, in_block: bool
) -> None:
    """A POST goes on through a 307; the answer at the new URL is lost after the server
    acted. The caller's resend of its request (to the first URL) right after continues the
    operation, under its key (the redirect's request had left it behind: a new key)."""
    acted: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/"):
            return httpx.Response(307, headers={"Location": request.url.path + "/"})
        acted.append(request.headers["Idempotency-Key"])
        if len(acted) == 1:
            raise httpx.ReadError("the answer was lost after the server acted")
        return httpx.Response(201)

    block = idemclient.operation("order") if in_block else contextlib.nullcontext()
    with (
        client(
            journal_path,
            httpx.MockTransport(handler),
            follow_redirects=True,
            retry=RetryPolicy(max_attempts=1),
        ) as c,
        block,
    ):
        with pytest.raises(RetriesExhaustedError):
            c.post("/orders", json={"sku": "A"})
        assert c.post("/orders", json={"sku": "A"}).status_code == 201
    assert len(acted) == 2
    assert len(set(acted)) == 1


@pytest.mark.anyio
async def test_a_stream_read_to_its_end_by_another_task_finishes_its_operation(
    journal_path: Path,
) -> None:
    """A task opens a stream, another task reads it to its end (recorded): the same request
    sent again by the first task is a new operation, not the first one's replay (its mark
    was left in the first task's context)."""
    import asyncio

    sent: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["Idempotency-Key"])

        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"

        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=chunks())  # fmt: skip

    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(handler)
    ) as c:
        request = c.build_request("POST", "https://api.example/v1", json={})
        response = await c.send(request, stream=True)

        async def read() -> None:
            await response.aread()
            await response.aclose()

        await asyncio.create_task(read())
        again = await c.post("https://api.example/v1", json={})
        assert again.extensions["idempotency"]["replayed"] is False
    assert len(set(sent)) == 2


def test_an_operation_a_resume_completed_is_done_for_its_caller_too(journal_path: Path) -> None:
    """A call gives up (pending); a resume in another thread completes it; the same request
    sent again by the caller is a new operation, not the first one's replay (its mark in the
    caller's context did not know)."""
    import threading

    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        return httpx.Response(503 if len(keys) == 1 else 201)  # (the first: refused)

    with client(journal_path, httpx.MockTransport(handler), retry=RetryPolicy(max_attempts=1)) as c:
        with pytest.raises(RetriesExhaustedError):
            c.post("/notify", json={"user": 5})
        resumer = threading.Thread(target=c.resume_pending)
        resumer.start()
        resumer.join(10)
        again = c.post("/notify", json={"user": 5})
        assert again.extensions["idempotency"]["replayed"] is False
    assert len(keys) == 3  # refused, resumed (acted), and the new one (acted)
    assert len(set(keys)) == 2


@pytest.mark.anyio
async def test_async_an_auth_refresh_through_the_client_and_a_failed_303_get_keep_the_key(
    journal_path: Path,
) -> None:
    """The async client: an auth flow that refreshes its token through the same client and
    yields a new request resends the 401'd operation under its key; a POST whose 303 is
    followed by a GET that times out is answered from the journal when the caller retries."""
    charges: list[str] = []
    gets = 0

    async def api(request: httpx.Request) -> httpx.Response:
        nonlocal gets
        await request.aread()
        if request.url.path == "/refresh":
            return httpx.Response(200, json={"token": "new"})
        if request.method == "GET":
            gets += 1
            if gets == 1:
                raise httpx.ReadTimeout("lost", request=request)
            return httpx.Response(200, json={"id": 1})
        charges.append(request.headers["idempotency-key"])
        if request.headers.get("authorization") != "Bearer new":
            return httpx.Response(401)
        return httpx.Response(303, headers={"location": "/charges/1"})

    class Refreshing(httpx.Auth):
        token = "old"

        async def async_auth_flow(
            self, request: httpx.Request
        ) -> AsyncGenerator[httpx.Request, httpx.Response]:
            request.headers["Authorization"] = f"Bearer {self.token}"
            response = yield request
            if response.status_code == 401:
                self.token = (await c.post("/refresh")).json()["token"]
                yield httpx.Request(
                    request.method, request.url, content=request.content,
                    headers={"Authorization": f"Bearer {self.token}"},
                )  # fmt: skip

    async with idemclient.AsyncClient(
        journal=journal_path, transport=httpx.MockTransport(api), base_url="https://api.example",
        auth=Refreshing(), follow_redirects=True, retry=RetryPolicy(max_attempts=1),
    ) as c:  # fmt: skip
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/charges", json={"amount": 5})
        again = await c.post("/charges", json={"amount": 5})
        assert again.json() == {"id": 1}
    assert len(charges) == 2  # the 401, then its resend: one key
    assert len(set(charges)) == 1

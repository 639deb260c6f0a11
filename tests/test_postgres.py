"""The PostgreSQL journal as users reach it: a `postgresql://` URL wherever a journal path
goes, and bad input (no driver, no server, no rights, a newer schema, the server stopped
mid-batch), each a clear `JournalError` with nothing sent and nothing lost."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

import idemclient
from idemclient import JournalError, PostgresJournal, RetryPolicy, open_journal
from idemclient._cli import EXIT_JOURNAL, EXIT_OK
from idemclient._records import Decision
from idemclient.journal._owner import current_owner
from idemclient.journal._postgres import scrubbed
from idemclient.testing import IdempotentServer

from .pgserver import PostgresServer
from .test_cli import cli
from .test_journal import record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_url_opens_it_wherever_a_journal_path_goes(
    pg_dsn: str, server: IdempotentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`journal=URL` of a client: a lost answer is one effect, a rerun of a named operation
    replays from PostgreSQL; `$IDEMCLIENT_JOURNAL` and the CLI read the same rows."""
    server.inject("drop_after_acting", times=1)
    with idemclient.Client(base_url=server.url, journal=pg_dsn) as client:
        assert isinstance(client.journal, PostgresJournal)
        with idemclient.operation("charge-1"):
            first = client.post("/charges", json={"amount": 5})
        with idemclient.operation("charge-1"):
            again = client.post("/charges", json={"amount": 5})
    assert again.extensions["idempotency"]["replayed"] is True
    assert again.json() == first.json()
    assert (server.effect_count, server.request_count) == (1, 2)
    monkeypatch.setenv("IDEMCLIENT_JOURNAL", pg_dsn)
    with open_journal() as journal:
        assert [(op.name, op.state) for op in journal.operations()] == [("charge-1", "completed")]
    code, out, err = cli("list", "--json")
    assert code == 0, err
    assert [op["name"] for op in json.loads(out)] == ["charge-1"]
    code, out, err = cli("stats", "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["states"]["completed"] == 1
    assert stats["size_bytes"] > 0


@pytest.mark.anyio
async def test_the_async_client_on_postgres(pg_dsn: str, server: IdempotentServer) -> None:
    server.inject("status", status=503, times=2)
    async with idemclient.AsyncClient(
        base_url=server.url, journal=pg_dsn, retry=RetryPolicy(base_delay=0.01)
    ) as client:
        response = await client.post("/orders", json={"n": 1})
    assert response.extensions["idempotency"]["attempts"] == 3
    assert server.effect_count == 1


@pytest.mark.anyio
async def test_the_async_transport_writes_to_postgres_on_the_event_loop(
    pg_dsn: str, server: IdempotentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under asyncio, registrations, claims and releases go through psycopg's async
    connections: no worker thread (neither the loop's executor nor anyio's) is asked for."""
    import anyio.to_thread

    def no_thread(*args: object, **kwargs: object) -> object:
        raise AssertionError("a journal call went to a worker thread")

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "run_in_executor", no_thread)
    monkeypatch.setattr(anyio.to_thread, "run_sync", no_thread)
    journal = PostgresJournal(pg_dsn)
    transport = idemclient.AsyncIdempotentTransport(
        journal=journal, retry=RetryPolicy(base_delay=0.0, max_attempts=2)
    )
    client = httpx.AsyncClient(base_url=server.url, transport=transport)
    try:
        server.inject("status", status=503, times=1)
        with idemclient.operation("charge-1"):  # register, then claim a retry
            first = await client.post("/charges", json={"amount": 5})
        with idemclient.operation("charge-1"):  # a known operation: replayed
            again = await client.post("/charges", json={"amount": 5})
        server.inject("status", status=503, times=2)
        with idemclient.operation("charge-2"), pytest.raises(idemclient.RetriesExhaustedError):
            await client.post("/charges", json={"amount": 6})  # released, pending
        orders = [client.post("/orders", json={"n": i}) for i in range(8)]
        answers = await asyncio.gather(*orders)  # registrations at once, each its own
    finally:
        monkeypatch.undo()  # closing hands the journal's close to a thread
        await client.aclose()
        await anyio.to_thread.run_sync(journal.close)
    assert first.extensions["idempotency"]["attempts"] == 2
    assert again.extensions["idempotency"]["replayed"] is True
    assert [a.status_code for a in answers] == [201] * 8
    with PostgresJournal(pg_dsn) as check:
        charge_2 = check.get("charge-2")
        assert charge_2 is not None
        assert (charge_2.state, charge_2.attempts) == ("pending", 2)
        assert check.stats().states["completed"] == 9
    assert server.effect_count == 9  # charge-2 only ever got 503s


def written_state(dsn: str, name: str) -> str:
    """The state the row of operation `name` says: what another process would read."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state FROM idemclient.operations WHERE name = %s", (name,))
        found = row.fetchone()
    assert found is not None
    return str(found[0])


@pytest.mark.anyio
async def test_a_later_write_carries_the_answers_held_before_it(pg_dsn: str) -> None:
    """An answer is held in memory for the flusher; the next transaction of the journal (here
    a retry's claim) writes it too, so that a process killed moments later does not lose it
    (a rerun would otherwise take that operation for a recovery from a crash, and a crash
    loop would park operations that had their answers). Sync and async."""
    answers = iter([httpx.Response(201), httpx.Response(503), httpx.Response(201)] * 2)

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers)

    retry = RetryPolicy(base_delay=0.0)
    # no flusher in time, and no upkeep thread whose purge would carry the answers meanwhile
    with PostgresJournal(pg_dsn, flush_delay=3600.0, auto_purge=None) as journal:
        transport = idemclient.IdempotentTransport(
            httpx.MockTransport(handler), journal=journal, retry=retry
        )
        with httpx.Client(transport=transport, base_url="https://api.example") as client:
            with idemclient.operation("first"):
                client.post("/a", json={})
            assert written_state(pg_dsn, "first") == "pending"  # held
            with idemclient.operation("second"):
                client.post("/b", json={})  # registered, 503, claimed again: carries "first"
            assert written_state(pg_dsn, "first") == "completed"
            assert written_state(pg_dsn, "second") == "pending"  # held in its turn
        # (closing the client wrote "second": a caller's journal is flushed, not closed)

        async_transport = idemclient.AsyncIdempotentTransport(
            httpx.MockTransport(handler), journal=journal, retry=retry
        )
        async with httpx.AsyncClient(
            transport=async_transport, base_url="https://api.example"
        ) as async_client:
            with idemclient.operation("third"):
                await async_client.post("/c", json={})  # its registration: an INSERT
            assert written_state(pg_dsn, "third") == "pending"
            with idemclient.operation("fourth"):
                await async_client.post("/d", json={})  # its retry's claim carries "third"
            assert written_state(pg_dsn, "third") == "completed"


FORK_CHILD = """
import os, signal, sys, threading, time
import httpx
import idemclient

signal.alarm(30)  # a hang fails the test instead of stalling it
transport = httpx.MockTransport(lambda request: httpx.Response(201))
client = idemclient.Client(journal=sys.argv[1], transport=transport, base_url="https://x")
client.post("/warm-up", json={})  # a pooled connection, the flusher thread
journal = client.journal
# At the fork a thread of the parent writes answers (holding the lock), and an answer of
# the parent's is held in memory.
held = threading.Event()

def holder():
    with journal._writing:
        held.set()
        time.sleep(0.3)

threading.Thread(target=holder, daemon=True).start()
held.wait()
with idemclient.operation("parent-1"):
    client.post("/parent", json={})
pid = os.fork()
if pid == 0:
    try:
        with idemclient.operation("child-op"):
            response = client.post("/child", json={"child": True})
        client.journal.flush()
        print("child", response.status_code, flush=True)
        client.close()  # closes the child's journal: not the parent's connections
        os._exit(0)
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
print("parent", os.waitstatus_to_exitcode(status), flush=True)
with idemclient.operation("parent-2"):  # the parent's connections still work
    client.post("/parent-2", json={})
print(*(f"{op.name} {op.state}" for op in journal.operations()), sep=chr(10), flush=True)
client.close()
"""


def test_a_forked_child_uses_connections_of_its_own(pg_dsn: str, tmp_path: Path) -> None:
    """gunicorn --preload and multiprocessing's fork start method fork a process whose
    journal is open: the child must not use (nor close) the parent's connections, hang on a
    lock held at the fork, or write the parent's answers."""
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), pg_dsn], capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["child 201", "parent 0"]
    states = sorted(result.stdout.split("\n")[2:-1])
    assert states == [
        "None completed", "child-op completed", "parent-1 completed", "parent-2 completed",
    ]  # fmt: skip


def test_the_cli_resumes_a_postgres_journal_with_concurrency(
    pg_dsn: str, server: IdempotentServer
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with idemclient.Client(base_url=down, journal=pg_dsn, retry=RetryPolicy(max_attempts=1)) as c:
        for i in range(6):
            with idemclient.operation(f"op-{i}"), pytest.raises(idemclient.RetriesExhaustedError):
                c.post(f"/ops/{i}", json={"i": i})
    code, out, err = cli(
        "--journal", pg_dsn, "resume", "--rebase", f"{down}={server.url}", "--concurrency", "3"
    )
    assert code == 0, err
    assert "resumed 6 operations: 6 completed" in out
    assert server.effect_count == 6
    with pytest.raises(SystemExit) as usage:
        cli("--journal", pg_dsn, "resume", "--concurrency", "0")
    assert usage.value.code == 2


def test_an_unreachable_server_fails_closed(server: IdempotentServer) -> None:
    dsn = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(JournalError) as caught:
        idemclient.Client(base_url=server.url, journal=PostgresJournal(dsn, connect_timeout=2))
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)
    assert server.request_count == 0


def test_a_wrong_dsn_says_what_is_wrong(pg_dsn: str) -> None:
    """A database that does not exist, a role that does not exist, an invalid option: the
    server's or libpq's own words, at once (not a pool's timeout), and never a password."""
    base = pg_dsn.rsplit("/", 1)[0]
    with pytest.raises(JournalError, match='database "nosuchdb" does not exist'):
        PostgresJournal(f"{base}/nosuchdb", connect_timeout=30)
    with pytest.raises(JournalError, match='role "nobody" does not exist') as caught:
        PostgresJournal(pg_dsn.replace("postgres@", "nobody:s3cret@"), connect_timeout=30)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(JournalError, match="sslmode") as caught:
        PostgresJournal(f"{pg_dsn}?sslmode=bogus&password=s3cret")
    assert "s3cret" not in str(caught.value)
    with PostgresJournal("POSTGRESQL" + pg_dsn[len("postgresql") :]) as journal:  # any case
        assert journal.operations() == []


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 password=S3cr\\ 3tTail dbname=x",  # an escaped space, unquoted
        "postgresql://app:S3cr#3tTail@127.0.0.1:1/db",  # "#" (libpq takes it)
        "postgresql://app:S3cr/3tTail@127.0.0.1:1/db",  # "/" (libpq: part of the host)
        "postgresql://app:S3cr@3tTail@127.0.0.1:1/db",  # "@"
        "host=127.0.0.1 password=S3cr 3tTail dbname=x",  # a space, unquoted (malformed)
    ],
)
def test_odd_passwords_are_never_shown(dsn: str) -> None:
    """Passwords written as libpq or urlsplit cut them: neither `shown` nor an error of
    the driver quoting either reading shows any of it."""
    from idemclient.journal._postgres import shown

    assert "S3cr" not in shown(dsn)
    assert "3tTail" not in shown(dsn)
    quoted = f'could not translate host name "3tTail@127.0.0.1" ({dsn}; S3cr 3tTail)'
    assert "S3cr" not in scrubbed(quoted, dsn)
    assert "3tTail" not in scrubbed(quoted, dsn)


def test_passwords_are_never_shown() -> None:
    from idemclient.journal._postgres import shown

    assert shown("postgresql://app:s3cret@db/orders") == "postgresql://app:***@db/orders"
    assert (
        shown("postgresql://app@db/orders?sslmode=require&password=s3cret")
        == "postgresql://app@db/orders?sslmode=require&password=***"
    )
    assert shown("host=db user=app password=s3cret dbname=orders") == (
        "host=db user=app password=*** dbname=orders"
    )
    assert (
        shown("host=db password='a b\\' c' dbname=orders") == "host=db password=*** dbname=orders"
    )


def test_the_dsns_own_options_are_kept(pg_dsn: str) -> None:
    """`options` in the DSN apply to the journal's connections (sync and async), after its
    command timeout and before `synchronous_commit=on`, which always holds."""
    options = "-c work_mem=1234kB -c statement_timeout=4321 -c synchronous_commit=off"
    dsn = f"{pg_dsn}?options={options.replace(' ', '%20').replace('=', '%3D')}"
    with PostgresJournal(dsn) as journal:
        with journal._connection("look") as conn:
            shown = [conn.execute(f"SHOW {name}").fetchone() for name in
                     ("work_mem", "statement_timeout", "synchronous_commit")]  # fmt: skip
        assert shown == [("1234kB",), ("4321ms",), ("on",)]

        async def look() -> list[object]:
            conn = await journal._aconnect()
            try:
                return [(await (await conn.execute(f"SHOW {name}")).fetchone()) for name in
                        ("work_mem", "statement_timeout", "synchronous_commit")]  # fmt: skip
            finally:
                await conn.close()

        assert asyncio.run(look()) == [("1234kB",), ("4321ms",), ("on",)]
    with PostgresJournal(pg_dsn, command_timeout=2.5) as journal, journal._connection("x") as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2500ms",)


def _frozen_server(dsn: str) -> list[int]:
    """The server processes to stop for the server to go silent: the sessions on this
    test's database, and the postmaster (no new session starts either)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
        mine = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert mine is not None
        # (read while this session lives: its process, and its /proc entry, end with it)
        stat = Path(f"/proc/{mine[0]}/stat").read_text()
    assert rows
    postmaster = int(stat.rsplit(")", 1)[1].split()[1])
    return [int(row[0]) for row in rows] + [postmaster]


@pytest.mark.anyio
async def test_a_server_that_stops_answering_ends_the_call(pg_dsn: str) -> None:
    """The server's processes for the journal are frozen (SIGSTOP: as a frozen host, a
    network that drops everything, a proxy that stops forwarding; no statement timeout
    fires, for the server never sees the statement): a registration ends with a
    `JournalError` after `command_timeout`, nothing is sent, and closing the journal with an
    answer held returns too. Once the server answers again, the next request goes through."""
    import os
    import signal

    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(201)

    journal = PostgresJournal(
        pg_dsn, command_timeout=1.0, connect_timeout=1.0, auto_purge=None, flush_delay=3600
    )
    transport = idemclient.IdempotentTransport(httpx.MockTransport(handler), journal=journal)
    async_transport = idemclient.AsyncIdempotentTransport(
        httpx.MockTransport(handler), journal=journal
    )
    client = httpx.Client(transport=transport, base_url="https://api.example")
    async_client = httpx.AsyncClient(transport=async_transport, base_url="https://api.example")
    client.post("/warm", json={})  # connections open, an answer held
    await async_client.post("/warm-async", json={})
    in_progress: list[idemclient.OperationInProgressError] = []
    async_failed, thawed = asyncio.Event(), asyncio.Event()

    async def async_side() -> None:  # a task: a context of its own, as a caller's task has
        with pytest.raises(JournalError, match=r"no answer from the server within 1 s"):
            await async_client.post("/frozen-async", json={})
        async_failed.set()
        await thawed.wait()
        try:  # the same request right after, in the same task: the same key
            await async_client.post("/frozen-async", json={})
        except idemclient.OperationInProgressError as exc:  # registered, the lease still ours
            in_progress.append(exc)

    frozen = _frozen_server(pg_dsn)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(JournalError, match=r"no answer from the server within 1 s"):
            client.post("/frozen", json={})
        task = asyncio.create_task(async_side())
        await async_failed.wait()
        with pytest.raises(JournalError, match="could not record responses"):
            journal.flush()  # what close() and the exit do: on a new connection, or none
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert sent == ["/warm", "/warm-async"]
    # The server, awake, may commit the registrations it was sent before it froze: then they
    # are pending, never sent. A resend of the same request right after, in the same context,
    # takes the same key: it continues that operation (once its lease ends), never a second.
    try:
        client.post("/frozen", json={})
    except idemclient.OperationInProgressError as exc:
        in_progress.append(exc)
    thawed.set()
    await task
    client.post("/after", json={})
    await async_client.post("/after-async", json={})
    await async_client.aclose()
    client.close()
    journal.close()
    with PostgresJournal(pg_dsn) as check:
        rows = [(op.url.rsplit("/", 1)[1], op.state) for op in check.operations()]
    for path in ("frozen", "frozen-async"):
        # one operation each: sent once by its resend, or pending, never sent
        assert [state for p, state in rows if p == path] == [
            "completed" if f"/{path}" in sent else "pending"
        ]
    assert sorted(p for p, state in rows if state == "completed") == sorted(
        path[1:] for path in sent
    )
    assert len(sent) == len(set(sent)) == 4 + 2 - len(in_progress)


def test_threads_waiting_behind_an_unreachable_server_fail_with_it(pg_dsn: str) -> None:
    """The server goes silent while one batch of registrations is under way and eight more
    threads line up behind it: when it fails (`command_timeout`), they fail with it, not
    tried again (each would wait another command timeout). Nothing is sent; a registration
    made after the server is back goes through."""
    import os
    import signal

    from idemclient._records import RequestRecord

    def record(name: str) -> RequestRecord:
        return RequestRecord(name=name, key=f"key-{name}", key_given=False, method="POST",
                             url="https://api.example/x", headers=[], body=b"{}",
                             fingerprint=f"fp-{name}")  # fmt: skip

    journal = PostgresJournal(pg_dsn, command_timeout=1.0, connect_timeout=1.0, auto_purge=None)
    tried: list[int] = []
    real = journal._register_batch

    def counted(requests: Any) -> Any:
        tried.append(len(requests))
        return real(requests)

    journal._register_batch = counted  # type: ignore[method-assign]
    journal.register(record("warm"), "this-host:1:1", 60.0)
    tried.clear()
    errors: dict[str, BaseException] = {}

    def one(name: str) -> None:
        try:
            journal.register(record(name), "this-host:1:1", 60.0)
        except JournalError as exc:
            errors[name] = exc

    frozen = _frozen_server(pg_dsn)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        first = threading.Thread(target=one, args=("first",))
        first.start()
        deadline = time.monotonic() + 10
        while not tried:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        waiting = [threading.Thread(target=one, args=(f"op-{i}",)) for i in range(8)]
        for thread in waiting:
            thread.start()
        for thread in [first, *waiting]:
            thread.join(30)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert tried == [1]  # the eight were never tried
    assert sorted(errors) == sorted(["first", *(f"op-{i}" for i in range(8))])
    assert "no answer from the server within 1 s" in str(errors["first"])
    assert all("not tried again" in str(errors[f"op-{i}"]) for i in range(8))
    later = threading.Thread(target=one, args=("later",))
    later.start()
    later.join(30)
    assert "later" not in errors
    journal.close()


@pytest.mark.anyio
@pytest.mark.parametrize("via", ["loop", "thread"])
async def test_tasks_waiting_behind_an_unreachable_server_fail_with_it(
    pg_dsn: str, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async twin: the server goes silent while one task's registration is under way,
    on the loop (or in a worker thread, as under trio), and eight more tasks line up behind
    it. When it fails (`command_timeout`), they fail with it, not tried again; nothing is
    sent; after the server is back, the next request goes through."""
    import os
    import signal

    import idemclient._transport

    sent: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(201)

    journal = PostgresJournal(pg_dsn, command_timeout=1.0, connect_timeout=1.0, auto_purge=None)
    tried: list[int] = []
    if via == "loop":
        real = journal._aregister_batch

        async def counted(requests: Any) -> Any:
            tried.append(len(requests))
            return await real(requests)

        journal._aregister_batch = counted  # type: ignore[method-assign]
    else:  # the path of a loop that is not asyncio's: psycopg's sync connections, in a thread
        monkeypatch.setattr(idemclient._transport, "_on_asyncio", lambda: False)
        real_sync = journal._register_batch

        def counted_sync(requests: Any) -> Any:
            tried.append(len(requests))
            return real_sync(requests)

        journal._register_batch = counted_sync  # type: ignore[method-assign]
    async with idemclient.AsyncClient(
        journal=journal, transport=httpx.MockTransport(server), base_url="https://x",
        retry=RetryPolicy(max_attempts=1),
    ) as client:  # fmt: skip
        await client.post("/warm", json={})
        tried.clear()
        frozen = _frozen_server(pg_dsn)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            first = asyncio.ensure_future(client.post("/first", json={}))
            deadline = time.monotonic() + 10
            while not tried:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            waiting = [asyncio.ensure_future(client.post(f"/op-{i}", json={})) for i in range(8)]
            outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert tried == [1]  # the eight were never tried
        assert all(isinstance(outcome, JournalError) for outcome in outcomes), outcomes
        assert "no answer from the server within 1 s" in str(outcomes[0])
        assert all("not tried again" in str(outcome) for outcome in outcomes[1:])
        assert sent == ["/warm"]
        later = await client.post("/later", json={})
        assert later.status_code == 201
    assert sent == ["/warm", "/later"]


def test_a_lock_held_elsewhere_ends_the_call_after_the_command_timeout(pg_dsn: str) -> None:
    """Another session holds the operations table locked: a registration waits
    `command_timeout` at most (the server cancels it), and nothing is sent."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(201)

    with PostgresJournal(pg_dsn, command_timeout=1.0, auto_purge=None) as journal:
        transport = idemclient.IdempotentTransport(httpx.MockTransport(handler), journal=journal)
        with httpx.Client(transport=transport, base_url="https://api.example") as client:
            with psycopg.connect(pg_dsn) as locker:
                locker.execute("LOCK TABLE idemclient.operations IN ACCESS EXCLUSIVE MODE")
                with pytest.raises(JournalError, match=r"statement timeout|within 1 s"):
                    client.post("/locked", json={})
                locker.rollback()
            assert sent == []
            client.post("/free", json={})
    assert sent == ["/free"]


def test_without_the_driver_idemclient_imports_and_a_url_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.modules['psycopg_pool'] = None\n"
        "import idemclient\n"
        "try:\n"
        "    idemclient.open_journal('postgresql://127.0.0.1/x')\n"
        "except idemclient.JournalError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'idemclient[postgres]'" in out.stdout


def test_a_schema_from_a_newer_idemclient_is_refused(pg_dsn: str) -> None:
    PostgresJournal(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE idemclient.settings SET value = '99' WHERE name = 'schema_version'")
    with pytest.raises(JournalError, match="newer idemclient"):
        PostgresJournal(pg_dsn)


def test_a_version_1_schema_is_brought_forward(pg_dsn: str) -> None:
    """A journal made by the idemclient of the first PostgreSQL release (schema 1, no
    decisions table) is upgraded by the next process that opens it, its rows kept."""
    with PostgresJournal(pg_dsn) as journal, idemclient.operation("kept"):
        transport = httpx.MockTransport(lambda request: httpx.Response(201))
        with idemclient.Client(journal=journal, transport=transport) as client:
            client.post("https://x/charges", json={})
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE idemclient.decisions")
        conn.execute("DROP TABLE idemclient.retired_keys")
        conn.execute("UPDATE idemclient.settings SET value = '1' WHERE name = 'schema_version'")
    with PostgresJournal(pg_dsn) as journal:
        assert [(op.name, op.state) for op in journal.operations()] == [("kept", "completed")]
        assert journal.decisions("kept") == []
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        version = conn.execute(
            "SELECT value FROM idemclient.settings WHERE name = 'schema_version'"
        ).fetchone()
    assert version == ("3",)


def test_a_version_2_schema_keeps_the_keys_its_reissued_operations_gave_up(pg_dsn: str) -> None:
    """Reissued before version 3 kept given-up keys: the upgrade finds them by their
    `previous_key`, and a request that still carries one is refused, not a new operation."""
    with PostgresJournal(pg_dsn, auto_purge=None) as journal:
        owner = current_owner()
        reg = journal.register(record(name=None, key_given=True), owner, 60.0)
        journal.release("key-1", reg.lease_version, "lost")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # sent two days ago, then reissued
        conn.execute(
            "UPDATE idemclient.operations SET state = 'pending', previous_key = key, "
            "key = 'key-2' WHERE key = 'key-1'"
        )
        conn.execute("DROP TABLE idemclient.retired_keys")
        conn.execute("UPDATE idemclient.settings SET value = '2' WHERE name = 'schema_version'")
    with PostgresJournal(pg_dsn, read_only=True) as reader:  # read as it is: no upgrade needed
        assert [op.key for op in reader.operations()] == ["key-2"]
    with PostgresJournal(pg_dsn, auto_purge=None) as journal:
        old = journal.register(record(name=None, key_given=True), current_owner(), 60.0)
        assert (old.decision, old.operation.key) == (Decision.MISMATCH, "key-2")
        assert [op.key for op in journal.operations()] == ["key-2"]


def test_a_user_without_rights_gets_a_journal_error(pg_dsn: str) -> None:
    PostgresJournal(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS reader")
        conn.execute("CREATE ROLE reader LOGIN")
    reader = pg_dsn.replace("postgres@", "reader@")
    try:
        with pytest.raises(JournalError, match="permission denied"):
            PostgresJournal(reader)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DROP OWNED BY reader")
            conn.execute("DROP ROLE reader")


def test_many_processes_creating_the_schema_at_once(pg_dsn: str) -> None:
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            PostgresJournal(pg_dsn).close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_the_server_stopped_mid_batch_sends_nothing_unrecorded(
    own_postgres: PostgresServer, server: IdempotentServer
) -> None:
    """pg_ctl stop in the middle of a batch: every request the server saw has its row; the
    next operation fails with JournalError, unsent; after a restart the batch finishes."""
    dsn = own_postgres.create_database()
    journal = PostgresJournal(dsn, connect_timeout=2)
    with idemclient.Client(base_url=server.url, journal=journal) as client:
        for i in range(3):
            with idemclient.operation(f"op-{i}"):
                client.post(f"/ops/{i}", json={"i": i})
        client.journal.flush()
        own_postgres.stop("immediate")  # as a crash: completions not yet on disk are lost
        with idemclient.operation("op-3"), pytest.raises(JournalError):
            client.post("/ops/3", json={"i": 3})
        assert server.request_count == 3  # nothing went out without its committed row
    journal.close()  # its pool would go on trying to reach the stopped server
    own_postgres.start()
    # A completion is written without waiting for its WAL flush: the crash may have lost the
    # last ones, which then look held by this (live) process until their leases end. An
    # hour later they have: the rerun resends those under their keys, and the server replays.
    later = PostgresJournal(dsn, clock=lambda: time.time() + 3600)
    with idemclient.Client(base_url=server.url, journal=later) as client:
        for i in range(5):  # the script, run again: the first three replay
            with idemclient.operation(f"op-{i}"):
                client.post(f"/ops/{i}", json={"i": i})
        states = {op.name: op.state for op in client.journal.operations()}
    later.close()
    assert states == {f"op-{i}": "completed" for i in range(5)}
    assert server.effect_count == 5
    assert server.duplicates() == 0


SKEWED_HOST = """
import sys, time
real = time.time
time.time = lambda: real() + 120.0  # this host's clock runs two minutes ahead
import idemclient
from idemclient._records import RequestRecord

record = RequestRecord(
    name="skewed", key="key-skewed", key_given=False, method="POST",
    url="https://api.example/charges", headers=[], body=b"{}", fingerprint="fp",
)
with idemclient.PostgresJournal(sys.argv[1], auto_purge=None) as journal:
    print(journal.register(record, "this-host:2:2", 60.0).decision.value)
    print(abs(journal._clock() - real()) < 5.0)
"""


def test_hosts_whose_clocks_disagree_agree_on_when_a_lease_ends(pg_dsn: str) -> None:
    """A holder on another host has a lease of 60 s; a host whose clock runs two minutes
    ahead would take it for ended and send the operation again at once. The journal's times
    are the database server's (this host's clock plus the offset measured at open), so that
    host sees the lease as the holder does, and leaves the operation to it."""
    from idemclient._records import Decision, RequestRecord

    record = RequestRecord(
        name="skewed", key="key-skewed", key_given=False, method="POST",
        url="https://api.example/charges", headers=[], body=b"{}", fingerprint="fp",
    )  # fmt: skip
    with PostgresJournal(pg_dsn, auto_purge=None) as holder:
        assert holder.register(record, "other-host:1:1", 60.0).decision is Decision.SEND
    ahead = subprocess.run(
        [sys.executable, "-c", SKEWED_HOST, pg_dsn], capture_output=True, text=True, timeout=60
    )
    assert ahead.returncode == 0, ahead.stderr
    assert ahead.stdout.split() == ["in_progress", "True"]


def _locked_for(dsn: str, seconds: float) -> threading.Thread:
    """Another session holds the operations table locked for `seconds`, from now."""
    ready = threading.Event()

    def hold() -> None:
        with psycopg.connect(dsn) as locker:
            locker.execute("LOCK TABLE idemclient.operations IN ACCESS EXCLUSIVE MODE")
            ready.set()
            time.sleep(seconds)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    ready.wait(10)
    return thread


@pytest.mark.anyio
async def test_a_batch_that_times_out_fails_as_one(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registrations that wait together, the server not answering in time: the batch's
    error is every registration's, not a reason to try each alone and wait as long again
    for each (ten tasks would otherwise wait eleven command timeouts). Sync and async."""
    from .test_journal import record

    with PostgresJournal(pg_dsn, command_timeout=1.0, auto_purge=None) as journal:
        calls: list[str] = []
        run, arun = journal._run, journal._arun

        def counted_run(action: str, flow: object) -> object:
            calls.append(action)
            return run(action, flow)  # type: ignore[arg-type]

        monkeypatch.setattr(journal, "_run", counted_run)

        async def counted(action: str, flow: object) -> object:
            calls.append(action)
            return await arun(action, flow)  # type: ignore[arg-type]

        monkeypatch.setattr(journal, "_arun", counted)
        requests = [(record(f"op-{i}", f"key-{i}"), "host:1:1", 60.0) for i in range(4)]
        locker = _locked_for(pg_dsn, 3.0)
        results = journal.register_many(requests)
        assert calls == ["register the operations"]
        assert all(isinstance(r, JournalError) for r in results)
        calls.clear()
        results = await journal.aregister_many(requests)
        assert calls == ["register the operations"]
        assert all(isinstance(r, JournalError) for r in results)
        locker.join()
        calls.clear()
        assert all(not isinstance(r, JournalError) for r in journal.register_many(requests))


def test_a_backlog_read_may_take_longer_than_a_command(pg_dsn: str) -> None:
    """A resume's backlog (the pending requests with their bodies) may take ten command
    timeouts to arrive: it waits (here, for a lock held longer than one timeout). Any other
    read, `stats()` or `operations()`, is cut short after one, with a `JournalError`."""
    from .test_journal import record

    with PostgresJournal(pg_dsn, command_timeout=1.0, auto_purge=None) as journal:
        journal.register(record(), "host:1:1", 60.0)
        locker = _locked_for(pg_dsn, 2.5)
        with pytest.raises(JournalError, match=r"statement timeout|within 1 s \(command"):
            journal.operations()
        assert [op.name for op, _ in journal.pending_requests()] == ["op-1"]
        locker.join()


@pytest.mark.anyio
async def test_leases_taken_on_the_loop_are_tied_to_it(pg_dsn: str) -> None:
    """A registration or claim made with psycopg's async connections holds its lease for a
    task of the running loop (closing the loop under the task ends its renewal); a sync
    call made on the loop's thread (a sync client used there) does not."""
    from idemclient._records import RequestRecord

    def record(name: str) -> RequestRecord:
        return RequestRecord(name=name, key=f"key-{name}", key_given=False, method="POST",
                             url="https://api.example/x", headers=[], body=b"{}",
                             fingerprint=f"fp-{name}")  # fmt: skip

    loop = asyncio.get_running_loop()
    with PostgresJournal(pg_dsn, auto_purge=None) as journal:
        (registered,) = await journal.aregister_many([(record("a"), "this-host:1:1", 60.0)])
        assert not isinstance(registered, JournalError)
        assert _loop_of(journal._holds._held["key-a"]) is loop
        claimed = await journal.aclaim("key-a", registered.lease_version, "this-host:1:1", 60.0,
                                       "503")  # fmt: skip
        journal.register(record("b"), "this-host:1:1", 60.0)
        held = journal._holds._held
        assert held["key-a"].version == claimed.lease_version
        assert _loop_of(held["key-a"]) is loop
        assert held["key-b"].loop is None


def _loop_of(hold: Any) -> Any:
    return hold.loop() if hold.loop is not None else None


def test_a_version_1_schema_is_not_read_by_a_read_only_look(pg_dsn: str) -> None:
    """A read-only look (the CLI's `list`, `show`) at a schema no writer has upgraded yet
    says so, instead of failing on a table the old schema lacks."""
    PostgresJournal(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE idemclient.decisions")
        conn.execute("DROP TABLE idemclient.retired_keys")
        conn.execute("UPDATE idemclient.settings SET value = '1' WHERE name = 'schema_version'")
    with pytest.raises(JournalError, match="must be upgraded to 3 first"):
        PostgresJournal(pg_dsn, read_only=True)
    code, _, err = cli("--journal", pg_dsn, "show", "op-1")
    assert code == EXIT_JOURNAL
    assert "must be upgraded" in err


def test_a_schema_made_beforehand_serves_a_role_that_may_not_create_schemas(
    pg_dsn: str,
) -> None:
    """A DBA makes the journal's schema for the application's role, which may not create
    schemas in the database: the journal makes its tables there and works."""
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"CREATE SCHEMA idemclient AUTHORIZATION {role}")
    app = pg_dsn.replace("postgres@", f"{role}@")
    try:
        with psycopg.connect(app, autocommit=True) as conn, pytest.raises(psycopg.Error):
            conn.execute("CREATE SCHEMA elsewhere")  # it may not
        transport = httpx.MockTransport(lambda request: httpx.Response(201))
        with PostgresJournal(app) as journal, idemclient.operation("first"):
            with idemclient.Client(journal=journal, transport=transport) as client:
                client.post("https://x/charges", json={})
            assert [op.state for op in journal.operations()] == ["completed"]
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_libpq_connection_string_is_a_postgres_journal_not_a_file(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`host=... dbname=...` (what PostgresJournal takes) given where a journal location
    goes opens the PostgreSQL journal: never an SQLite file named after it (with its
    password) in the working directory, where a fleet's worker would lose it."""
    parts = urlsplit(pg_dsn)
    dsn = (f"host={parts.hostname} port={parts.port} dbname={parts.path[1:]} user=postgres "
           "password=s3cretPW")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with open_journal(dsn) as journal:
        assert isinstance(journal, PostgresJournal)
        assert "s3cretPW" not in journal.path
    monkeypatch.setenv("IDEMCLIENT_JOURNAL", dsn)
    transport = httpx.MockTransport(lambda request: httpx.Response(201))
    with idemclient.Client(transport=transport) as client, idemclient.operation("kv"):
        client.post("https://x/charges", json={})
    code, out, err = cli("list")
    assert code == EXIT_OK, err
    assert "kv" in out
    assert "s3cretPW" not in out + err
    assert list(tmp_path.iterdir()) == []


def test_an_upper_case_scheme_works_on_the_command_line(pg_dsn: str) -> None:
    PostgresJournal(pg_dsn).close()
    upper = pg_dsn.replace("postgresql://", "POSTGRESQL://")
    code, out, err = cli("--journal", upper, "stats")
    assert code == EXIT_OK, err
    assert "(its tables on the server)" in out
    assert "WAL" not in out  # an SQLite file's


def test_passwords_are_scrubbed_from_what_the_driver_says() -> None:
    url = "POSTGRESQL://app:s3cret@db.internal/app"
    assert scrubbed(f'missing "=" after "{url}"', url) == (
        'missing "=" after "POSTGRESQL://app:***@db.internal/app"'
    )
    assert "pw1" not in scrubbed("bad: host=h password=pw1 x", "host=h password=pw1")
    assert "pw2" not in scrubbed("bad: pw2", "postgresql://h/db?sslpassword=pw2")
    assert scrubbed("nothing to hide", "postgresql://h/db") == "nothing to hide"


def test_a_schema_named_in_the_url_is_used_everywhere(pg_dsn: str) -> None:
    """`?schema=billing` in the URL (idemclient's parameter, not libpq's) names the schema
    wherever a URL goes: `PostgresJournal`, `journal=`, the command line, which otherwise
    could not reach a journal kept outside the default schema."""
    from .test_journal import record as make_record

    with PostgresJournal(pg_dsn, schema="billing") as journal:
        journal.register(make_record("in-billing", "key-b"), "other-host:1:1", 60.0)
    url = f"{pg_dsn}?schema=billing"
    with open_journal(url) as journal:
        assert isinstance(journal, PostgresJournal)
        assert journal.schema == "billing"
        assert [op.name for op in journal.operations()] == ["in-billing"]
        assert "schema=billing" in journal.path
    code, out, err = cli("--journal", url, "list")
    assert code == EXIT_OK, err
    assert "in-billing" in out
    code, out, err = cli("--journal", pg_dsn, "list")  # the default schema: no journal there
    assert "in-billing" not in out
    with pytest.raises(ValueError, match="names schema 'billing'"):
        PostgresJournal(url, schema="other")


@pytest.mark.parametrize(
    ("location", "postgres"),
    [
        ("host=db.internal user=app", True),
        ("host=db.internal port=5432 user=app password=s3cret", True),
        ("dbname=orders", True),
        ("service=billing", True),
        ("host=db.internal dbname=orders user=app sslmode=require", True),
        ("host=db password='two words'", True),
        ("host=db dbname=app sslnegotiation=direct", True),  # a keyword newer than ours
        ("host=db password=a\\'b", True),  # an escaped quote, unquoted
        ("a=b c=d", False),
        ("POSTGRES://db/orders", True),
        ("journal.sqlite3", False),
        ("/var/lib/app/a=b/journal.sqlite3", False),
        ("a=b", False),  # not a libpq keyword
        ("host=db dbname=orders journal", True),  # a stray word: for the driver to refuse
        ("host=db dbname=orders password='s3cret", True),  # a quote left open: the same
        ("host=db journal", False),  # one keyword and a stray word: a file name
        ("host=web1/journal (copy).sqlite3", False),  # a folder named like a pair: a path
        ("/tmp/x dbname=y user=z.sqlite3", False),  # an absolute path
        ("/var/lib/host=db/journal.sqlite3", False),  # a keyword, but not where libpq's go
        ("my journal a=b", False),  # no libpq keyword
        ("", False),
    ],
)
def test_what_names_a_postgres_journal(location: str, postgres: bool) -> None:
    """A URL, or nothing but libpq `keyword=value` pairs (any keyword, the first among
    them): never a file name."""
    from idemclient.journal._postgres import is_postgres_location

    assert is_postgres_location(location) is postgres


@pytest.mark.parametrize(
    "location",
    [
        "host=127.0.0.1 dbname=orders user=app password='s3cretPW",  # a quote left open
        "host=127.0.0.1 dbname=orders user=app password=s3cretPW extra",  # a stray word
        "postgresql://app:pa%zzs3cretPW@127.0.0.1:1/orders",  # a bad percent-escape
        "postgresql://app:s3cretPW@[::1/orders",  # an IPv6 host left open
        "postgresql://app:s3cretPW@127.0.0.1:1/orders?schema=my-schema",  # no identifier
    ],
)
def test_a_malformed_postgres_location_is_refused_by_name_and_never_a_file(
    location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL location with a typo is a `JournalError` that shows no password (nor
    chains the driver's error, which may quote it), wherever a location goes: it was an
    SQLite file named after it (password included) in the working directory, where no other
    host looks, and the request was sent; or a traceback and exit 1 from the CLI."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JournalError) as caught:
        open_journal(location).close()
    error = caught.value
    assert "s3cretPW" not in str(error)
    assert "s3cretPW" not in str(error.path)
    assert error.__cause__ is None or "s3cretPW" not in str(error.__cause__)
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201)

    transport = httpx.MockTransport(handler)
    monkeypatch.setenv("IDEMCLIENT_JOURNAL", location)
    with pytest.raises(JournalError), idemclient.Client(transport=transport) as client:
        client.post("https://x/charges", json={})
    assert sent == []
    for command in (["list"], ["stats"], ["resume", "--dry-run"]):
        code, out, err = cli(*command)
        assert code == EXIT_JOURNAL, (command, out, err)
        assert "Traceback" not in err
        assert "s3cretPW" not in out + err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_password_hides_nothing_else() -> None:
    """An empty password is no password to hide (hiding "" put *** between every character
    of every message)."""
    from idemclient.journal._postgres import shown

    for dsn in ("postgresql://app:@h/db", "postgresql://app@h/db?password=", "host=h password=''"):
        assert "h" in shown(dsn)
        assert scrubbed("connection refused", dsn) == "connection refused"


def test_a_driver_error_that_quotes_part_of_a_password_is_scrubbed() -> None:
    """libpq takes a password's tail after an "@" for the host, and says so when it cannot
    be resolved: the JournalError shows none of it, nor chains the driver's error."""
    import traceback

    with pytest.raises(JournalError) as caught:
        PostgresJournal(
            "postgresql://app:Zq9@xYwk3@127.0.0.1:1/db?connect_timeout=2", auto_purge=None
        ).close()
    shown_all = "".join(traceback.format_exception(caught.value))
    assert "xYwk3" not in shown_all
    assert "Zq9" not in shown_all

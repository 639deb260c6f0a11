"""The `idemclient` command line."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

import idemclient
from idemclient._cli import EXIT_INCOMPLETE, EXIT_JOURNAL, EXIT_OK, EXIT_USAGE, Progress, main
from idemclient.testing import IdempotentServer


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def down_url() -> str:
    """A loopback URL where nothing listens."""
    server = IdempotentServer()
    url = server.url
    server.stop()
    return url


@pytest.fixture
def populated(journal_path: Path, server: IdempotentServer) -> Path:
    """A journal with one completed, one conflict and one pending operation."""
    with idemclient.Client(base_url=server.url, journal=journal_path) as client:
        with idemclient.operation("charge-done"):
            client.post("/charges", json={"n": 1})
        server.inject("status", status=422)
        with idemclient.operation("charge-refused"), pytest.raises(idemclient.ConflictError):
            client.post("/charges", json={"n": 2})
    with (
        idemclient.Client(
            base_url=down_url(), journal=journal_path, retry=idemclient.RetryPolicy(max_attempts=1)
        ) as client,
        idemclient.operation("charge-pending"),
        pytest.raises(idemclient.RetriesExhaustedError),
    ):
        client.post("/charges", json={"n": 3}, headers={"X-Trace": "t-3"})
    return journal_path


def test_where(journal_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = cli("--journal", str(journal_path), "where")
    assert (code, out.strip()) == (EXIT_OK, str(journal_path))
    assert "does not exist yet" in err
    monkeypatch.setenv("IDEMCLIENT_JOURNAL", str(journal_path))
    assert cli("where")[1].strip() == str(journal_path)


def test_list_without_a_journal_creates_nothing(journal_path: Path) -> None:
    code, _, err = cli("--journal", str(journal_path), "list")
    assert code == EXIT_OK
    assert "no journal at" in err
    assert cli("--journal", str(journal_path), "list", "--json")[1].strip() == "[]"
    assert not journal_path.exists()


def test_list_table_and_json(populated: Path) -> None:
    code, out, _ = cli("--journal", str(populated), "list")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KEY", "STATE", "METHOD", "URL", "ATTEMPTS", "AGE", "LAST"]
    body = "\n".join(lines[1:])
    for name, state in [("charge-done", "completed"), ("charge-refused", "conflict"),
                        ("charge-pending", "pending")]:  # fmt: skip
        assert any(name in line and state in line for line in lines[1:]), body
    assert "ConnectError" in body
    code, out, _ = cli("list", "--state", "pending", "--json", "--journal", str(populated))
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["charge-pending"]
    assert rows[0]["attempts"] == 1
    assert cli("--journal", str(populated), "list", "--state", "abandoned")[1].startswith(
        "no operations"
    )


def test_show(populated: Path) -> None:
    code, out, _ = cli("--journal", str(populated), "show", "charge-done")
    assert code == EXIT_OK
    assert "state:        completed" in out
    assert "HTTP 201" in out
    code, out, _ = cli("--journal", str(populated), "show", "charge-done", "--json")
    data = json.loads(out)
    assert data["response"]["status"] == 201
    assert data["response"]["body_kept"] is True
    assert cli("--journal", str(populated), "show", "nope")[0] == EXIT_INCOMPLETE


def test_stats_table_and_json(populated: Path) -> None:
    code, out, _ = cli("--journal", str(populated), "stats")
    assert code == EXIT_OK
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["pending"].split() == ["pending", "1"]
    assert lines["completed"].split() == ["completed", "1"]
    assert lines["parked"].split() == ["parked", "0"]
    assert lines["total"].split() == ["total", "3"]
    assert "charge-pending (key " in lines["oldest"]
    assert str(populated) in lines["journal"]
    code, out, _ = cli("--journal", str(populated), "stats", "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    assert data["states"] == {"pending": 1, "completed": 1, "conflict": 1, "expired": 0,
                              "parked": 0, "abandoned": 0}  # fmt: skip
    assert data["total"] == 3
    with idemclient.Journal(populated) as journal:
        pending = journal.get("charge-pending")
    assert pending is not None
    oldest = data["oldest_pending"]
    assert (oldest["name"], oldest["key"]) == ("charge-pending", pending.key)
    assert oldest["created_at"] == pending.created_at.isoformat()
    assert 0 <= oldest["age_seconds"] < 600
    wal = populated.with_name(populated.name + "-wal")
    assert data["file_bytes"] == populated.stat().st_size > 0
    assert data["wal_bytes"] == (wal.stat().st_size if wal.exists() else 0)
    assert data["size_bytes"] == data["file_bytes"] + data["wal_bytes"]


def test_stats_names_the_oldest_pending_by_age_not_by_insertion(journal_path: Path) -> None:
    retry = idemclient.RetryPolicy(max_attempts=1)
    with idemclient.Client(base_url=down_url(), journal=journal_path, retry=retry) as client:
        for n in range(3):
            with pytest.raises(idemclient.RetriesExhaustedError):
                client.post("/charges", json={"n": n})  # unnamed: the key identifies it
        client.journal.abandon(client.journal.pending()[0].key)
        newest = client.journal.pending()[-1]
        assert isinstance(client.journal, idemclient.Journal)
        client.journal._connection().execute(
            "UPDATE operations SET created_at = created_at - 7200 WHERE key = ?", (newest.key,)
        )
    data = json.loads(cli("--journal", str(journal_path), "stats", "--json")[1])
    assert data["states"]["pending"] == 2
    assert data["states"]["abandoned"] == 1
    assert data["oldest_pending"]["name"] is None
    assert data["oldest_pending"]["key"] == newest.key
    assert data["oldest_pending"]["age_seconds"] >= 7200
    out = cli("--journal", str(journal_path), "stats")[1]
    assert f"oldest pending  {newest.key}, 2h old" in out


def test_stats_without_a_journal_is_all_zeros_and_creates_nothing(journal_path: Path) -> None:
    code, out, err = cli("--journal", str(journal_path), "stats", "--json")
    assert code == EXIT_OK
    assert "no journal at" in err
    data = json.loads(out)
    assert data["total"] == 0
    assert data["oldest_pending"] is None
    assert data["size_bytes"] == 0
    assert not journal_path.exists()
    with idemclient.Journal(journal_path) as journal:
        assert journal.stats() == idemclient.Journal.Stats(dict.fromkeys(
            ["pending", "completed", "conflict", "expired", "parked", "abandoned"], 0))  # fmt: skip


def test_resume_dry_run_sends_nothing(populated: Path, server: IdempotentServer) -> None:
    before = server.effect_count
    code, out, _ = cli("--journal", str(populated), "resume", "--dry-run")
    assert code == EXIT_OK
    assert "would send: charge-pending POST" in out
    assert "1 to send, 0 to expire" in out
    assert server.effect_count == before


def test_resume_finishes_with_headers_from_the_environment(
    populated: Path, server: IdempotentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_AUTH", "Bearer from-env")
    before = server.effect_count
    with idemclient.Journal(populated) as journal:
        pending = journal.get("charge-pending")
        assert pending is not None
    old_origin = str(httpx.URL(pending.url).copy_with(path="/"))[:-1]
    argv = ["--journal", str(populated), "resume", "--rebase", f"{old_origin}={server.url}",
            "--header-from-env", "Authorization=API_AUTH", "-H", "X-Operator: alice"]  # fmt: skip
    # the credential is for one API: without its --base-url it would go to all of them
    code, out, err = cli(*argv)
    assert code == EXIT_USAGE
    assert "Authorization" in err
    assert "--base-url" in err
    assert server.effect_count == before
    code, out, err = cli(*argv, "--base-url", server.url)
    assert code == EXIT_OK, err
    assert "resumed 1 operations: 1 completed" in out
    assert "[1/1] charge-pending: completed (HTTP 201)" in err
    assert server.effect_count == before + 1
    effect = server.effects[-1]
    assert effect.headers["authorization"] == "Bearer from-env"
    assert effect.headers["x-operator"] == "alice"
    assert effect.headers["x-trace"] == "t-3"
    with idemclient.Journal(populated) as journal:
        op = journal.get("charge-pending")
        assert op is not None
        assert op.state == "completed"
        assert effect.key == op.key
    # nothing left
    assert cli("--journal", str(populated), "resume")[1].strip() == "resumed 0 operations"


def test_resume_sends_query_credentials_from_the_environment(
    populated: Path, server: IdempotentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API key sent in the query is not journaled: `--param-from-env` gives it back to
    the operations of one API (`--base-url` required, as for credential headers)."""
    monkeypatch.setenv("API_KEY", "from-env")
    with idemclient.Journal(populated) as journal:
        pending = journal.get("charge-pending")
        assert pending is not None
    old_origin = str(httpx.URL(pending.url).copy_with(path="/"))[:-1]
    argv = ["--journal", str(populated), "resume", "--rebase", f"{old_origin}={server.url}",
            "--param-from-env", "key=API_KEY"]  # fmt: skip
    code, _, err = cli(*argv)
    assert code == EXIT_USAGE
    assert "?key" in err
    assert "--base-url" in err
    code, _, err = cli(*argv, "--base-url", server.url)
    assert code == EXIT_OK, err
    assert "key=from-env" in server.effects[-1].path
    code, _, err = cli(*argv[:-1], "key=MISSING_VAR", "--base-url", server.url)
    assert code == EXIT_USAGE
    assert "MISSING_VAR" in err


def test_resume_that_fails_exits_1(populated: Path) -> None:
    code, out, err = cli("--journal", str(populated), "resume", "--attempts", "1")
    assert code == EXIT_INCOMPLETE
    assert "1 failed" in out
    assert "charge-pending: failed" in err


def test_resume_header_arguments(populated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISSING_VAR", raising=False)
    code, _, err = cli("--journal", str(populated), "resume", "--header-from-env", "X=MISSING_VAR")
    assert code == EXIT_USAGE
    assert "MISSING_VAR" in err
    assert cli("--journal", str(populated), "resume", "-H", "no-colon")[0] == EXIT_USAGE
    code, _, err = cli(
        "--journal", str(populated), "resume", "--dry-run", "-H", "Authorization: Bearer x"
    )
    assert code == EXIT_OK
    assert "prefer --header-from-env" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["resume", "--timeout", "-1"], "--timeout: must be a positive number of seconds"),
        (["resume", "--timeout=0"], "--timeout: must be a positive number of seconds"),
        (["resume", "--timeout", "nan"], "--timeout: must be a positive number of seconds"),
        (["resume", "--timeout", "inf"], "--timeout: must be a positive number of seconds"),
        (["resume", "--timeout", "1e10"], "--timeout: must be at most 86400 seconds"),
        (["resume", "--timeout", "soon"], "--timeout: invalid number of seconds 'soon'"),
        (["resume", "--attempts", "0"], "--attempts: must be at least 1"),
        (["resume", "--attempts", "-3"], "--attempts: must be at least 1"),
        (["resume", "--attempts", "1.5"], "--attempts: invalid number of attempts '1.5'"),
        (["purge", "--older-than", "99999999999w"], "--older-than: duration '99999999999w' is"),
    ],
)
def test_bad_numbers_exit_2_with_a_message_and_touch_nothing(
    populated: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with idemclient.Journal(populated) as journal:
        before = journal.operations()
    with pytest.raises(SystemExit) as info:
        cli("--journal", str(populated), *argv)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"idemclient {argv[0]}: error: argument {message}" in err
    assert "Traceback" not in err
    with idemclient.Journal(populated) as journal:
        assert journal.operations() == before


@pytest.mark.parametrize(
    ("header", "warned"),
    [
        ("PRIVATE-TOKEN: glpat-x", True),
        ("X-Shopify-Access-Token: shpat", True),
        ("api-key: k", True),
        ("X-Operator: alice", False),
        ("Stripe-Version: 2024-06-20", False),
    ],
)
def test_resume_warns_about_any_credential_on_the_command_line(
    populated: Path, header: str, warned: bool
) -> None:
    code, _, err = cli("--journal", str(populated), "resume", "--dry-run", "-H", header)
    assert code == EXIT_OK
    assert ("prefer --header-from-env" in err) is warned


def test_abandon(populated: Path) -> None:
    code, out, _ = cli("--journal", str(populated), "abandon", "charge-pending")
    assert code == EXIT_OK
    assert "never be sent again" in out
    code, _, err = cli("--journal", str(populated), "abandon", "charge-pending")
    assert code == EXIT_INCOMPLETE
    assert "is abandoned" in err
    assert cli("--journal", str(populated), "abandon", "nope")[0] == EXIT_INCOMPLETE


def test_purge(populated: Path) -> None:
    code, _, err = cli("--journal", str(populated), "purge", "--older-than", "1h")
    assert code == EXIT_USAGE
    assert "retention" in err
    code, out, _ = cli("--journal", str(populated), "purge")
    assert code == EXIT_OK
    assert out.startswith("purged 0 operations")
    with pytest.raises(SystemExit) as info:
        cli("--journal", str(populated), "purge", "--older-than", "soon")
    assert info.value.code == EXIT_USAGE


def test_corrupt_journal_exits_3_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(b"not a database at all" * 20)
    for command in ("list", "stats"):
        code, _, err = cli("--journal", str(path), command)
        assert code == EXIT_JOURNAL
        assert str(path) in err
    assert path.read_bytes() == b"not a database at all" * 20


def test_python_dash_m_and_console_script(journal_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "idemclient", "--journal", str(journal_path), "where"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout.strip() == str(journal_path)
    script = Path(sys.executable).with_name("idemclient")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "exit status" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        cli()
    assert info.value.code == EXIT_USAGE


def test_resume_with_a_bad_base_url(populated: Path) -> None:
    code, _, err = cli("--journal", str(populated), "resume", "--base-url", "http://[::1")
    assert code == EXIT_USAGE
    assert "error" in err


def test_unpark_and_reissue(populated: Path) -> None:
    code, _, err = cli("--journal", str(populated), "unpark", "charge-pending")
    assert code == EXIT_INCOMPLETE
    assert "only parked" in err
    code, _, err = cli("--journal", str(populated), "reissue", "charge-pending")
    assert code == EXIT_INCOMPLETE
    assert "only expired" in err
    with idemclient.Journal(populated) as journal:
        journal._connection().execute(
            "UPDATE operations SET state = 'expired' WHERE name = 'charge-pending'"
        )
        old = journal.get("charge-pending")
    assert old is not None
    code, out, _ = cli("--journal", str(populated), "reissue", "charge-pending")
    assert code == EXIT_OK
    assert f"(old key {old.key})" in out
    data = json.loads(cli("--journal", str(populated), "show", "charge-pending", "--json")[1])
    assert data["previous_key"] == old.key
    assert data["state"] == "pending"


def test_resume_takes_only_the_given_origin_and_moves_only_when_asked(
    journal_path: Path, server: IdempotentServer
) -> None:
    other = IdempotentServer()
    try:
        for url in (down_url(), down_url()):
            with (
                idemclient.Client(base_url=url, journal=journal_path,
                                  retry=idemclient.RetryPolicy(max_attempts=1)) as client,
                pytest.raises(idemclient.RetriesExhaustedError),
            ):  # fmt: skip
                client.post("/charges", json={"to": url})
        first, second = (op.url for op in idemclient.Journal(journal_path).pending())
        first_origin = first.rsplit("/", 1)[0]
        code, out, err = cli(
            "--journal", str(journal_path), "resume", "--base-url", server.url,
            "--rebase", f"{first_origin}={server.url}",
        )  # fmt: skip
        assert code == EXIT_OK, err
        assert "resumed 1 operations: 1 completed" in out
        assert "left 1 pending operations of other origins untouched" in out
        assert [e.path for e in server.effects] == ["/charges"]
        assert other.effect_count == 0
        with idemclient.Journal(journal_path) as journal:
            assert [op.url for op in journal.pending()] == [second]
    finally:
        other.stop()


def test_resume_arguments_that_name_no_origin_are_usage_errors(populated: Path) -> None:
    for args in (
        ("--base-url", "api.example"),
        ("--base-url", "https://api.example/v1"),
        ("--rebase", "http://a.example"),
        ("--rebase", "a.example=https://b.example"),
    ):
        code, _, err = cli("--journal", str(populated), "resume", *args)
        assert code == EXIT_USAGE, args
        assert "origin" in err


def test_resume_sends_the_key_as_the_application_did(journal_path: Path) -> None:
    """An operation made with key_header="X-Request-Key" (a server that honours its own
    header) is resent by `idemclient resume` under that header: one effect, not two."""
    with IdempotentServer(key_header="X-Request-Key") as server:
        server.inject("drop_after_acting")  # it acted; the answer was lost
        with (
            idemclient.Client(base_url=server.url, journal=journal_path, key_header="X-Request-Key",
                              retry=idemclient.RetryPolicy(max_attempts=1)) as client,
            pytest.raises(idemclient.RetriesExhaustedError),
        ):  # fmt: skip
            client.post("/charges", json={"n": 1})
        code, _, err = cli("--journal", str(journal_path), "resume")
        assert code == EXIT_OK, err
        assert "replayed by the server" in err
        assert server.effect_count == 1


def test_resume_respects_the_retention_the_application_set(
    journal_path: Path, server: IdempotentServer
) -> None:
    with idemclient.Journal(journal_path, retention=timedelta(hours=1)) as journal:
        with (
            idemclient.Client(base_url=down_url(), journal=journal,
                              retry=idemclient.RetryPolicy(max_attempts=1)) as client,
            idemclient.operation("old"),
            pytest.raises(idemclient.RetriesExhaustedError),
        ):  # fmt: skip
            client.post("/charges", json={})
        journal._connection().execute("UPDATE operations SET first_sent_at = created_at - 7200")
    code, out, _ = cli("--journal", str(journal_path), "resume")
    assert "1 expired" in out
    assert server.effect_count == 0
    assert cli("--journal", str(journal_path), "retention")[1].strip() == "1:00:00"
    code, out, _ = cli("--journal", str(journal_path), "retention", "--set", "2h")
    assert code == EXIT_OK
    code, _, err = cli("--journal", str(journal_path), "retention", "--set", "0s")
    assert code == EXIT_USAGE
    assert "retention must be positive" in err
    assert cli("--journal", str(journal_path), "retention")[1].strip() == "2:00:00"


LOOK_AS_NOBODY = """
import os, sys
from idemclient._cli import main  # imported while root may still read the interpreter's files
os.setgid(65534)
os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become a user without write access")
def test_list_and_show_need_only_read_access(populated: Path) -> None:
    """A user who may read the journal but not write it can inspect it."""
    # pytest's own temporary directories are root's alone: look from one others can enter
    shared = Path(tempfile.mkdtemp(prefix="idemclient-ro-"))
    try:
        shared.chmod(0o755)
        journal = shared / populated.name
        for path in populated.parent.iterdir():
            copy = shared / path.name
            copy.write_bytes(path.read_bytes())
            copy.chmod(0o644)
        before = {p.name: p.read_bytes() for p in shared.iterdir()}
        for args in (["list"], ["show", "charge-pending"], ["list", "--json"],
                     ["resume", "--dry-run"], ["retention"], ["stats"]):  # fmt: skip
            result = subprocess.run(
                [sys.executable, "-c", LOOK_AS_NOBODY, "--journal", str(journal), *args],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == EXIT_OK, (args, result.stderr)
            assert "charge-pending" in result.stdout or args == ["retention"]
        assert {p.name: p.read_bytes() for p in shared.iterdir()} == before
    finally:
        shutil.rmtree(shared)


def test_show_keeps_repeated_response_headers(journal_path: Path) -> None:
    sent = [(b"X-Dup", b"a"), (b"Content-Type", b"text/plain"), (b"X-Dup", b"b")]
    transport = httpx.MockTransport(lambda request: httpx.Response(201, headers=sent))
    with idemclient.Client(transport=transport, journal=journal_path) as client:
        client.post("https://api.example/charges", json={}, extensions={
            "idempotency_operation": "charge-dup"})  # fmt: skip
    code, out, _ = cli("--journal", str(journal_path), "show", "charge-dup", "--json")
    assert code == EXIT_OK
    headers = json.loads(out)["response"]["headers"]
    assert [h for h in headers if h[0].lower() != "content-length"] == [
        ["X-Dup", "a"], ["Content-Type", "text/plain"], ["X-Dup", "b"],
    ]  # fmt: skip
    code, out, _ = cli("--journal", str(journal_path), "show", "charge-dup")
    assert code == EXIT_OK
    assert [line.split() for line in out.splitlines() if "X-Dup" in line] == [
        ["X-Dup:", "a"], ["X-Dup:", "b"],
    ]  # fmt: skip


def pending_at(server: IdempotentServer, journal_path: Path, count: int) -> list[str]:
    """`count` named operations left pending at `server` (each answered 503 once, and given
    up after one attempt); their names."""
    server.inject("status", status=503, times=count)
    retry = idemclient.RetryPolicy(max_attempts=1)
    names = [f"charge-{n:03d}" for n in range(count)]
    with idemclient.Client(base_url=server.url, journal=journal_path, retry=retry) as client:
        for name in names:
            with idemclient.operation(name), pytest.raises(idemclient.RetriesExhaustedError):
                client.post("/charges", json={"name": name})
    return names


def test_resume_progress_is_plain_lines_when_not_a_terminal(
    journal_path: Path, server: IdempotentServer
) -> None:
    names = pending_at(server, journal_path, 5)
    code, out, err = cli("--journal", str(journal_path), "resume")
    assert code == EXIT_OK, err
    assert err.splitlines() == [
        f"[{n + 1}/5] {name}: completed (HTTP 201)" for n, name in enumerate(names)
    ]
    assert "\r" not in err
    assert "\x1b" not in err
    assert out.strip() == "resumed 5 operations: 5 completed"


def test_resume_json_reports_each_operation(journal_path: Path, server: IdempotentServer) -> None:
    names = pending_at(server, journal_path, 2)
    code, out, _ = cli("--journal", str(journal_path), "resume", "--dry-run", "--json")
    assert code == EXIT_OK
    would = json.loads(out)
    assert [op["name"] for op in would["send"]] == names
    assert would["expire"] == []
    assert would["other_origins"] == 0
    server.inject("status", status=422, path="/charges", times=1)
    code, out, err = cli("--journal", str(journal_path), "resume", "--json")
    assert code == EXIT_INCOMPLETE
    report = json.loads(out)
    assert [(r["name"], r["outcome"], r["status"]) for r in report["results"]] == [
        (names[0], "conflict", 422), (names[1], "completed", 201),
    ]  # fmt: skip
    assert report["counts"] == {"conflict": 1, "completed": 1}
    assert report["skipped"] == []
    assert len(err.splitlines()) == 2  # plain progress lines, also on a terminal


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def result(name: str, outcome: Any = "completed") -> idemclient.ResumeResult:
    now = datetime.now(timezone.utc)
    op = idemclient.Operation(name, f"k-{name}", "pending", "POST", "https://x/", 1, now, now,
                              response_status=None, last_error=None)  # fmt: skip
    return idemclient.ResumeResult(op, outcome)


def test_progress_on_a_terminal_is_one_line_redrawn_and_throttled() -> None:
    err, clock = io.StringIO(), FakeClock()
    progress = Progress(4, err, live=True, interval=0.5, clock=clock).__enter__()
    assert err.getvalue() == "\rresuming: 0/4 (0%)\x1b[K"
    clock.now += 1.0
    progress(result("a"))  # 1 done in 1 s: 3 left at 1/s
    assert err.getvalue().endswith("\rresuming: 1/4 (25%), 1 ops/s, about 3s left\x1b[K")
    before = err.getvalue()
    clock.now += 0.1
    progress(result("b"))  # within the interval: not redrawn
    assert err.getvalue() == before
    clock.now += 0.1
    progress(result("c", "failed"))  # kept above the line, then the line again
    assert err.getvalue()[len(before) :].startswith("\r\x1b[K[3/4] c: failed\n\rresuming: 3/4")
    clock.now += 0.1
    progress(result("d"))  # the last: always drawn
    progress.__exit__(None, None, None)
    assert "resuming: 4/4 (100%)" in err.getvalue().rsplit("\r", 2)[-2]
    assert err.getvalue().endswith("\x1b[K\n")
    assert "[1/4]" not in err.getvalue()  # completed ones are counted, not listed


def test_progress_time_left_reads_in_minutes_and_hours() -> None:
    err, clock = io.StringIO(), FakeClock()
    progress = Progress(100_000, err, live=True, clock=clock)
    clock.now += 10.0
    progress(result("a"))
    assert progress.line() == "resuming: 1/100000 (0%), 0.1 ops/s, about 277h46m left"
    progress.done, clock.now = 99_900, 100.0 + 99_900  # 1 a second: 100 s left
    assert progress.line() == "resuming: 99900/100000 (99%), 1 ops/s, about 1m40s left"
    progress.done = 200_000  # 20 a second
    assert progress.line().startswith("resuming: 200000/100000 (200%), 2 ops/s")


def read_all(fd: int) -> bytes:
    """What a pseudo-terminal's other end wrote, up to its close."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:  # Linux: EIO once the last writer has closed its end
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_resume_progress_on_a_real_terminal(journal_path: Path, server: IdempotentServer) -> None:
    names = pending_at(server, journal_path, 30)
    server.inject("status", status=422, path="/charges", times=1)  # the first is refused
    primary, secondary = os.openpty()
    try:
        fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = {**os.environ, "TERM": "xterm"}
        process = subprocess.Popen(
            [sys.executable, "-m", "idemclient", "--journal", str(journal_path), "resume"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary, env=env,
        )  # fmt: skip
        os.close(secondary)
        secondary = -1
        screen = read_all(primary).decode()
        out = process.stdout.read().decode() if process.stdout else ""
        assert process.wait(timeout=60) == EXIT_INCOMPLETE
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
        if process.stdout:
            process.stdout.close()
    draws = [d for d in screen.split("\r") if d.startswith("resuming:")]
    assert draws[0] == "resuming: 0/30 (0%)\x1b[K"
    assert draws[-1].startswith("resuming: 30/30 (100%), ")
    assert "ops/s" in draws[-1]
    assert all(len(d) < 100 for d in draws)
    # what did not complete, and idemclient's warnings, have lines of their own above it
    assert f"\r\x1b[K[1/30] {names[0]}: conflict: operation {names[0]!r} (key " in screen
    assert f"\r\x1b[Kidemclient: operation {names[0]!r} (key " in screen
    assert not any(f"{name}: completed" in screen for name in names)  # counted, not listed
    assert screen.endswith("\x1b[K\r\n")  # the line is ended; the terminal adds \r to \n
    assert "resumed 30 operations: 29 completed, 1 conflict" in out
    assert server.effect_count == 29  # the refused one had none


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`idemclient list --json | head`: the pipe closes early; no traceback, exit 0."""
    path = tmp_path / "journal.sqlite3"
    transport = httpx.MockTransport(lambda request: httpx.Response(201))
    with idemclient.Client(journal=path, transport=transport, base_url="https://x") as client:
        for i in range(2000):
            client.post("/a", json={"i": i})
    command = [sys.executable, "-m", "idemclient", "--journal", str(path), "list", "--json"]
    lister = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert lister.stdout is not None
    assert lister.stderr is not None
    lister.stdout.read(100)
    lister.stdout.close()  # as `head` does
    with lister.stderr:
        errors = lister.stderr.read()
    assert lister.wait(timeout=60) == 0
    assert errors == b""


def test_a_failed_resume_names_its_error_also_when_an_answer_came() -> None:
    """The journal died after the send: the line says why it failed, not only the status."""
    from datetime import datetime, timezone

    from idemclient._cli import _describe
    from idemclient._client import ResumeResult
    from idemclient._records import Operation

    now = datetime.now(timezone.utc)
    op = Operation("pay-1", "k-1", "pending", "POST", "https://x/pay", 1, now, now, None, None)
    failed = ResumeResult(op, "failed", httpx.Response(201), idemclient.JournalError("gone"))
    assert _describe(failed) == "pay-1: failed (HTTP 201): gone"
    assert _describe(ResumeResult(op, "completed", httpx.Response(201), None)) == (
        "pay-1: completed (HTTP 201)"
    )

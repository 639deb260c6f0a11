"""The benchmark runs (tiny), so it does not rot. Speed is never asserted here."""

from __future__ import annotations

import pytest

from benchmarks import bench


def test_quick_benchmark_prints_every_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "scenario" in out
    assert "idemclient full" in out
    assert "fsyncs per operation" in out
    assert "pending()" in out
    assert "resident memory" in out
    assert "where the time goes" in out
    assert "durable write" in out
    assert "against the floors" in out
    assert "floor full" in out
    assert "async sequential" in out
    assert "register (the durable write)" in out


def test_a_delayed_server_and_a_choice_of_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--server-delay", "2", "--scenarios", "sequential"]) == 0
    out = capsys.readouterr().out
    assert "answers 2 ms after each request" in out
    assert "sequential" in out
    assert not any(line.startswith(("4 threads", "4 tasks")) for line in out.splitlines())
    # the server kept its word: a bare round trip takes at least the delay
    rows = [line.split() for line in out.splitlines() if line.startswith("sequential")]
    bare = next(row for row in rows if row[1] == "httpx")
    assert float(bare[3]) >= 2.0  # p50 ms


def test_the_profile_names_idemclients_functions(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--profile", "--scenarios", "sequential"]) == 0
    out = capsys.readouterr().out
    table = out.split("where idemclient's CPU goes", 1)[1]
    assert "(all, beyond bare httpx)" in table
    assert "idemclient/_core.py" in table  # its own code is there, by file and line


def test_unknown_scenarios_are_refused() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--scenarios", "sequential,fibers"])


def test_the_postgres_benchmark_runs(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import postgres

    assert postgres.main(["--quick", "--dsn", pg_dsn]) == 0
    out = capsys.readouterr().out
    assert "idemclient postgres" in out
    assert "WAL flushes per operation" in out
    assert "of the ideal" in out

"""The throwaway PostgreSQL server the fleet tests run on: it starts, listens on 127.0.0.1
only, keeps what is committed across a restart, and is gone when stopped."""

from __future__ import annotations

import psycopg
import pytest

from .pgserver import PostgresServer


def test_a_database_per_test_on_the_session_server(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        conn.execute("CREATE TABLE t (x int)")


def test_what_is_committed_survives_an_immediate_stop(own_postgres: PostgresServer) -> None:
    dsn = own_postgres.create_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    own_postgres.stop("immediate")  # as a crash: no checkpoint
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    own_postgres.start()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]

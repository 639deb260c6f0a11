from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from idemclient.testing import IdempotentServer

from . import pgserver


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def sleeps() -> list[float]:
    """Records the waits a transport asked for, instead of sleeping."""
    return []


@pytest.fixture
def server() -> Iterator[IdempotentServer]:
    with IdempotentServer() as srv:
        yield srv


@pytest.fixture
def server_url_and_journal(server: IdempotentServer, journal_path: Path) -> tuple[str, Path]:
    return server.url, journal_path


def _postgres_or_skip() -> None:
    reason = pgserver.unavailable()
    if reason is None:
        return
    if os.environ.get(pgserver.REQUIRE) == "1":
        pytest.fail(f"PostgreSQL tests required ({pgserver.REQUIRE}=1), but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[pgserver.PostgresServer]:
    """One throwaway PostgreSQL server for the session (see tests/pgserver.py)."""
    _postgres_or_skip()
    with pgserver.postgres_server() as server:
        yield server


@pytest.fixture
def pg_dsn(postgres: pgserver.PostgresServer) -> Iterator[str]:
    """A new, empty database on the session's server, dropped afterwards."""
    dsn = postgres.create_database()
    yield dsn
    postgres.drop_database(dsn)


@pytest.fixture
def own_postgres() -> Iterator[pgserver.PostgresServer]:
    """A server of this test's own, for tests that stop and restart it."""
    _postgres_or_skip()
    with pgserver.postgres_server() as server:
        yield server

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from idemclient.testing import IdempotentServer


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

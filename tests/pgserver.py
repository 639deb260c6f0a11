"""A throwaway PostgreSQL server for the tests: `initdb` and `pg_ctl` in a temporary
directory, listening on a free port of 127.0.0.1 only (no Unix socket), trust authentication,
`fsync` on (the journal's durability is what is tested). Run as the `postgres` user when the
tests run as root, since `initdb` refuses root.

Where no server binaries are found, `unavailable()` says why and how to get them; the tests
skip with that message, unless `IDEMCLIENT_REQUIRE_POSTGRES=1` (set by `.ci/run`) turns the
skip into a failure, so that CI always runs them.

`python -m tests.pgserver` starts one and prints its DSN until interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REQUIRE = "IDEMCLIENT_REQUIRE_POSTGRES"
HOW_TO_GET = (
    "install the PostgreSQL server binaries (Debian/Ubuntu: apt install postgresql, then put "
    "/usr/lib/postgresql/<version>/bin on PATH; macOS: brew install postgresql) and the "
    "driver (pip install 'idemclient[postgres]')"
)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def unavailable() -> str | None:
    """Why no throwaway server can be started here, or `None` if one can."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if _binary(name) is None]
    if missing:
        return f"no PostgreSQL server binaries ({', '.join(missing)} not found): {HOW_TO_GET}"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return f"the psycopg driver is not installed: {HOW_TO_GET}"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser` to start PostgreSQL as another user"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, started and stopped by its data dir."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="idemclient-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_root = os.geteuid() == 0
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}): {result.stderr}{log[-2000:]}"
            )

    def init(self) -> None:
        if self._as_root:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
        initdb = _binary("initdb")
        assert initdb is not None
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")  # fmt: skip

    def start(self) -> None:
        pg_ctl = _binary("pg_ctl")
        assert pg_ctl is not None
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=on -c max_connections=200"
        )
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop it (`mode` as pg_ctl's `-m`: smart, fast, immediate)."""
        if not self.running:
            return
        pg_ctl = _binary("pg_ctl")
        assert pg_ctl is not None
        self._run(pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def create_database(self) -> str:
        """A new, empty database; its DSN."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def drop_database(self, dsn: str) -> None:
        import psycopg

        name = dsn.rsplit("/", 1)[1]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


def main() -> None:
    reason = unavailable()
    if reason:
        sys.exit(reason)
    with postgres_server() as server:
        print(server.dsn, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server.running:
                time.sleep(1)


if __name__ == "__main__":
    main()

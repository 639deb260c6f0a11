"""The `idemclient` command: look into a journal, finish or abandon what a crash left behind."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO, cast

import httpx

from ._client import (
    Client,
    ResumeResult,
    destination,
    parse_origin,
    rebase_map,
    reconcile_expired,
)
from ._core import DEFAULT_SECRETS
from ._errors import JournalError
from ._policy import RetryPolicy
from ._records import STATES, Operation
from .journal import Journal, JournalBackend, PostgresJournal, default_journal_path
from .journal._postgres import is_postgres_location, postgres_journal_exists, shown

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # resume left operations unfinished; an operation was not found
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_JOURNAL = 3  # the journal could not be opened, read or written
EXIT_INTERRUPTED = 130


def _default_sqlite() -> str:
    try:
        return str(default_journal_path())
    except Exception:  # IDEMCLIENT_JOURNAL is a PostgreSQL URL
        return "the default file in the user state directory"


EPILOG = f"""\
The journal is --journal PATH (or a postgresql:// URL), else $IDEMCLIENT_JOURNAL, else
{_default_sqlite()}.

exit status:
  {EXIT_OK}    done
  {EXIT_INCOMPLETE}    resume left operations unfinished, or no such operation
  {EXIT_USAGE}    bad arguments
  {EXIT_JOURNAL}    the journal could not be opened, read or written (the message names it)
  {EXIT_INTERRUPTED}  interrupted

examples:
  idemclient list --state pending
  idemclient show charge-inv-042
  idemclient stats --json
  idemclient resume --base-url https://api.example --header-from-env 'Authorization=API_AUTH'
  idemclient abandon charge-inv-042
  idemclient unpark charge-inv-042
  idemclient purge --older-than 30d
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(Exception):
    """A bad argument found after parsing: reported like argparse's own errors."""


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `12h`, `7d`, `2w` as a timedelta."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 7d"
        )
    try:
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:  # argparse reports TypeError and ValueError only: not a traceback
        raise argparse.ArgumentTypeError(f"duration {text!r} is too long") from None


def parse_seconds(text: str) -> float:
    """A timeout: a positive, finite number of seconds. httpx takes any float, and the
    socket refuses a negative, NaN or infinite one only when the request is sent."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not 0 < value < math.inf:  # NaN is neither
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    if value > _MAX_TIMEOUT:  # the socket refuses what its clock cannot hold
        raise argparse.ArgumentTypeError(
            f"must be at most {_MAX_TIMEOUT:.0f} seconds (a day), not {text!r}"
        )
    return value


_MAX_TIMEOUT = 86400.0


def parse_concurrency(text: str) -> int:
    """How many operations a resume sends at once: 1 to 256."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid concurrency {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be between 1 and 256, not {value}")
    return value


def parse_attempts(text: str) -> int:
    """A count of attempts: at least 1, the first attempt included."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of attempts {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1 (the first attempt counts), not {value}"
        )
    return value


def _age(when: datetime, now: datetime) -> str:
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _as_json(op: Operation) -> dict[str, Any]:
    return {
        "name": op.name,
        "key": op.key,
        "state": op.state,
        "method": op.method,
        "url": op.url,
        "attempts": op.attempts,
        "created_at": op.created_at.isoformat(),
        "updated_at": op.updated_at.isoformat(),
        "response_status": op.response_status,
        "last_error": op.last_error,
        "recoveries": op.recoveries,
        "previous_key": op.previous_key,
    }


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _location(args: argparse.Namespace) -> str | Path:
    """Where the journal is: --journal, else $IDEMCLIENT_JOURNAL, else the default file; a
    PostgreSQL URL as given, a path expanded."""
    given = args.journal or os.environ.get("IDEMCLIENT_JOURNAL") or None
    if is_postgres_location(given):
        return str(given)
    return Path(given).expanduser() if given else default_journal_path()


def _open(args: argparse.Namespace, *, read_only: bool = False) -> JournalBackend | None:
    """The journal, or `None` if there is none yet (a command never creates one). Looking
    (`list`, `show`, a dry run) opens it read-only: a user who may read it but not write it
    can inspect it, and nothing is changed by looking."""
    location = _location(args)
    if isinstance(location, str):
        if not postgres_journal_exists(location):
            return None
        return PostgresJournal(location, read_only=read_only)
    if not location.exists():
        return None
    return Journal(location, read_only=read_only)


def _shown_location(args: argparse.Namespace) -> str:
    where = _location(args)
    return shown(where) if isinstance(where, str) else str(where)


def _missing(args: argparse.Namespace, err: TextIO) -> None:
    where = _shown_location(args)
    print(f"idemclient: no journal at {where} (nothing has been journaled there yet)", file=err)


# -- commands ---------------------------------------------------------------------------


def cmd_where(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path = _location(args)
    if isinstance(path, str):
        print(shown(path), file=out)
        return EXIT_OK
    print(path, file=out)
    if not path.exists():
        print("idemclient: (the file does not exist yet)", file=err)
    return EXIT_OK


def cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    journal = _open(args, read_only=True)
    if journal is None:
        if args.json:
            print("[]", file=out)
        else:
            _missing(args, err)
        return EXIT_OK
    with journal:
        ops = journal.operations(args.state)
    if args.json:
        print(json.dumps([_as_json(op) for op in ops], indent=2), file=out)
        return EXIT_OK
    if not ops:
        print("no operations" + (f" in state {args.state}" if args.state else ""), file=out)
        return EXIT_OK
    now = datetime.now(timezone.utc)
    rows = [["NAME", "KEY", "STATE", "METHOD", "URL", "ATTEMPTS", "AGE", "LAST"]]
    for op in ops:
        last = str(op.response_status) if op.response_status is not None else op.last_error or ""
        rows.append(
            [
                _short(op.name or "-", 32),
                op.key,
                op.state,
                op.method,
                _short(op.url, 48),
                str(op.attempts),
                _age(op.created_at, now),
                _short(last, 40),
            ]
        )
    _table(rows, out)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    journal = _open(args, read_only=True)
    if journal is None:
        _missing(args, err)
        return EXIT_INCOMPLETE
    with journal:
        op = journal.get(args.operation)
        stored = journal.stored_response(args.operation) if op is not None else None
        decided = journal.decisions(args.operation) if op is not None else []
    if op is None:
        print(f"idemclient: no operation named or keyed {args.operation!r}", file=err)
        return EXIT_INCOMPLETE
    data = _as_json(op)
    if stored is not None:
        data["response"] = {
            "status": stored.status,
            # pairs, not an object: a header may come more than once (Link, Vary, X-Dup)
            "headers": [[name, value] for name, value in stored.headers],
            "body_bytes": len(stored.body),
            "body_kept": stored.body_kept,
        }
    data["decisions"] = [
        {"verdict": v.verdict, "decided_by": v.decided_by, "decided_at": v.decided_at.isoformat(),
         "detail": v.detail, "key": v.key}
        for v in decided
    ]  # fmt: skip
    if args.json:
        print(json.dumps(data, indent=2), file=out)
        return EXIT_OK
    for field in ("name", "key", "state", "method", "url", "attempts", "recoveries",
                  "previous_key", "created_at", "updated_at", "last_error"):  # fmt: skip
        print(f"{field + ':':<14}{data[field] if data[field] is not None else '-'}", file=out)
    if stored is not None:
        kept = "" if stored.body_kept else " (too large: not kept, a replay has an empty body)"
        print(
            f"{'response:':<14}HTTP {stored.status}, {len(stored.body)} body bytes{kept}", file=out
        )
        for name, value in stored.headers:
            print(f"{'':<14}{name}: {value}", file=out)
    for v in decided:
        detail = f": {v.detail}" if v.detail else ""
        print(f"{'decided:':<14}{v.decided_at:%Y-%m-%d %H:%M:%S} {v.verdict.replace('_', ' ')} by "
              f"{v.decided_by} (key {v.key}){detail}", file=out)  # fmt: skip
    return EXIT_OK


def _size(path: Path) -> int:
    """A file's size in bytes; 0 if it is not there (a WAL file comes and goes)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def cmd_stats(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Counts by state, the oldest pending operation and the file's size, for monitoring."""
    journal = _open(args, read_only=True)
    location = _location(args)
    file_bytes = wal_bytes = 0
    if journal is None:  # nothing journaled yet: all zeros, as a monitoring script expects
        _missing(args, err)
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        oldest_name, oldest_key, oldest_at = None, None, None
    else:
        with journal:
            stats = journal.stats()
            if isinstance(journal, PostgresJournal):  # its tables' size on the server
                file_bytes = journal.size_bytes()
        counts = stats.states
        oldest_name, oldest_key = stats.oldest_pending_name, stats.oldest_pending_key
        oldest_at = stats.oldest_pending_created_at
    if isinstance(location, Path):
        file_bytes = _size(location)
        wal_bytes = _size(location.with_name(location.name + "-wal"))
    path = shown(location) if isinstance(location, str) else location
    now = datetime.now(timezone.utc)
    if args.json:
        oldest = None
        if oldest_key is not None and oldest_at is not None:
            oldest = {
                "name": oldest_name,
                "key": oldest_key,
                "created_at": oldest_at.isoformat(),
                "age_seconds": round((now - oldest_at).total_seconds(), 3),
            }
        data = {
            "journal": str(path),
            "states": counts,
            "total": sum(counts.values()),
            "oldest_pending": oldest,
            "file_bytes": file_bytes,
            "wal_bytes": wal_bytes,
            "size_bytes": file_bytes + wal_bytes,
        }
        print(json.dumps(data, indent=2), file=out)
        return EXIT_OK
    rows = [[state, str(count)] for state, count in counts.items()]
    rows.append(["total", str(sum(counts.values()))])
    if oldest_key is not None and oldest_at is not None:
        label = f"{oldest_name} (key {oldest_key})" if oldest_name else oldest_key
        rows.append(["oldest pending", f"{label}, {_age(oldest_at, now)} old"])
    if isinstance(location, str):  # PostgreSQL: its tables on the server
        size = f"{_bytes(file_bytes)} (its tables on the server)"
    else:
        size = f"{_bytes(file_bytes + wal_bytes)} ({_bytes(file_bytes)} + {_bytes(wal_bytes)} WAL)"
    rows.append(["journal", f"{path}, {size}"])
    _table(rows, out)
    return EXIT_OK


def _headers(args: argparse.Namespace, err: TextIO) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"-H takes 'Name: value', not {item!r}")
        if DEFAULT_SECRETS(name.strip().lower()):
            print(
                f"idemclient: warning: {name.strip()} on the command line is visible to other "
                "users (ps, shell history); prefer --header-from-env",
                file=err,
            )
        headers[name.strip()] = value.strip()
    headers.update(_from_env(args.header_from_env, "--header-from-env", "Name"))
    return headers


def _params(args: argparse.Namespace) -> dict[str, str]:
    """Query parameters whose values are in the environment (`--param-from-env`): an API's
    key sent in the query, which the journal does not keep (it is a credential by name)."""
    return _from_env(args.param_from_env, "--param-from-env", "name")


def _from_env(items: list[str], option: str, name_is: str) -> dict[str, str]:
    """`option`'s `name=ENVVAR` items: each name with its variable's value."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, var = item.partition("=")
        if not sep or not name.strip() or not var.strip():
            raise UsageError(f"{option} takes '{name_is}=ENVVAR', not {item!r}")
        value = os.environ.get(var.strip())
        if value is None:
            raise UsageError(f"environment variable {var.strip()} (for {name.strip()}) is not set")
        found[name.strip()] = value
    return found


def _describe(result: ResumeResult) -> str:
    op = result.operation
    label = op.name or op.key
    reason = f": {result.error}" if result.error is not None else ""
    if result.response is not None:
        replayed = result.response.extensions.get("idempotency", {}).get("replayed")
        how = ", replayed by the server" if replayed else ""
        return f"{label}: {result.outcome} (HTTP {result.response.status_code}{how}){reason}"
    return f"{label}: {result.outcome}{reason}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """How far a resume has got, on stderr. On a terminal: one line redrawn in place (`\r`),
    with done/total, the rate and the time left, at most every `interval` seconds, and a
    line of its own for each operation that did not complete. Elsewhere (a pipe, a log file,
    `--json`): a plain line per operation, nothing redrawn."""

    def __init__(
        self,
        total: int,
        err: TextIO,
        *,
        live: bool,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.err, self.live = total, err, live
        self.interval, self.clock = interval, clock
        self.done = 0
        self.started = self.drawn = clock()
        self._handler: logging.Handler | None = None
        # a warning may come from the journal's flusher thread while a line is drawn
        self._lock = threading.RLock()

    def __enter__(self) -> Progress:
        """Draw the line; until `__exit__`, idemclient's log warnings (which would go to
        stderr as Python's last resort) are written above it instead of through it."""
        if self.live and self.total:
            self._draw()
            self._handler = _AboveTheLine(self)
            logging.getLogger("idemclient").addHandler(self._handler)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handler is not None:
            logging.getLogger("idemclient").removeHandler(self._handler)
            self._handler = None
        self.finish()

    def above(self, text: str) -> None:
        """Write a line of its own above the progress line, and draw the progress again."""
        with self._lock:
            self.err.write(f"\r\x1b[K{text}\n")
            self._draw()

    def __call__(self, result: ResumeResult) -> None:
        self.done += 1
        self.total = max(self.total, self.done)  # another process may have added one
        line = f"[{self.done}/{self.total}] {_describe(result)}"
        if not self.live:
            print(line, file=self.err, flush=True)
        elif result.outcome != "completed":  # kept on screen, above the progress line
            self.above(line)
        elif self.done == self.total or self.clock() - self.drawn >= self.interval:
            self._draw()

    def finish(self) -> None:
        """End the progress line (on a terminal): the summary goes below it."""
        if self.live and self.total:
            self._draw()
            self.err.write("\n")
            self.err.flush()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        text = f"resuming: {self.done}/{self.total}"
        if self.total:
            text += f" ({100 * self.done // self.total}%)"
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            text += f", {rate:.0f} ops/s" if rate >= 10 else f", {rate:.2g} ops/s"
            if self.done < self.total:
                text += f", about {_duration((self.total - self.done) / rate)} left"
        return text

    def _draw(self) -> None:
        with self._lock:
            self._redraw()

    def _redraw(self) -> None:
        self.drawn = self.clock()
        try:
            width = os.get_terminal_size(self.err.fileno()).columns or 80  # 0: not set
        except (OSError, ValueError, AttributeError):
            width = 80
        # never wider than the terminal: a wrapped line cannot be redrawn in place
        self.err.write(f"\r{_short(self.line(), max(width - 1, 10))}\x1b[K")
        self.err.flush()


class _AboveTheLine(logging.Handler):
    """idemclient's warnings, written above a progress line rather than through it."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress
        self.setFormatter(logging.Formatter("idemclient: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.above(self.format(record))
        except Exception:
            self.handleError(record)


def _live(err: TextIO) -> bool:
    """Whether `err` is a terminal a person watches (not a pipe, a file, or TERM=dumb)."""
    try:
        return err.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _result_json(result: ResumeResult) -> dict[str, Any]:
    # a conflict's answer comes with its error (ConflictError.response)
    response = result.response or getattr(result.error, "response", None)
    return {
        "name": result.operation.name,
        "key": result.operation.key,
        "outcome": result.outcome,
        "status": response.status_code if response is not None else None,
        "replayed": bool(response.extensions.get("idempotency", {}).get("replayed"))
        if response is not None
        else False,
        "error": str(result.error) if result.error is not None else None,
    }


def cmd_resume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    headers, params = _headers(args, err), _params(args)
    credentials = sorted(name for name in headers if DEFAULT_SECRETS(name.lower()))
    credentials += sorted(f"?{name}" for name in params)  # (from the environment: secrets)
    if credentials and not args.base_url and not args.dry_run:
        raise UsageError(
            f"{', '.join(credentials)} would go to every API with operations in this journal: "
            "say which API it is for with --base-url"
        )
    if args.base_url:
        try:
            parse_origin(args.base_url, "--base-url")
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    rebase = _rebase(args.rebase)
    journal = _open(args, read_only=args.dry_run)
    if journal is None:
        _missing(args, err)
        print("nothing to resume", file=out)
        return EXIT_OK
    base_url, moves = httpx.URL(args.base_url or ""), rebase_map(rebase)
    if args.dry_run:
        with journal:
            sendable = {op.key for op in journal.pending()}
            pending = journal.operations("pending")
        to_expire, others, sends = [], 0, []
        for op in pending:
            target = destination(op.url, base_url, moves)
            if target is None:
                others += 1
            elif op.key not in sendable:  # sent once, past the retention
                to_expire.append(op)
            else:
                sends.append((op, target))
        if args.json:
            would = {
                "send": [{"name": op.name, "key": op.key, "method": op.method, "url": str(url)}
                         for op, url in sends],
                "expire": [{"name": op.name, "key": op.key} for op in to_expire],
                "other_origins": others,
            }  # fmt: skip
            print(json.dumps(would, indent=2), file=out)
            return EXIT_OK
        for op, target in sends:
            label = f"{op.name} " if op.name else ""
            print(f"would send: {label}{op.method} {target} (key {op.key})", file=out)
        for op in to_expire:
            print(f"would expire (past retention, not sent): {op.name or op.key}", file=out)
        untouched = f", {others} of other origins left untouched" if others else ""
        print(f"{len(sends)} to send, {len(to_expire)} to expire{untouched}", file=out)
        return EXIT_OK
    # every pending operation of ours: the ones to send, and those past the retention
    # (reported as expired, not sent)
    pending = journal.operations("pending")
    total = sum(destination(op.url, base_url, moves) is not None for op in pending)
    progress = Progress(total, err, live=_live(err) and not args.json)
    client = Client(
        journal=journal,
        base_url=args.base_url or "",
        headers=headers,
        params=params,
        timeout=args.timeout,
        retry=RetryPolicy(max_attempts=args.attempts),
        follow_redirects=True,  # a 307/308 continues the operation at its new URL
    )
    with progress, client, journal:
        results = client.resume_pending(
            on_result=progress, rebase=rebase, concurrency=args.concurrency
        )
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    code = EXIT_OK if all(r.outcome == "completed" for r in results) else EXIT_INCOMPLETE
    if args.json:
        report = {
            "results": [_result_json(r) for r in results],
            "counts": counts,
            "skipped": [{"name": op.name, "key": op.key, "url": op.url}
                        for op in results.skipped],
        }  # fmt: skip
        print(json.dumps(report, indent=2), file=out)
        return code
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    print(f"resumed {len(results)} operations" + (f": {summary}" if results else ""), file=out)
    if results.skipped:
        origins = sorted({str(httpx.URL(op.url).copy_with(path="/", query=None))
                          for op in results.skipped})  # fmt: skip
        print(
            f"left {len(results.skipped)} pending operations of other origins untouched "
            f"({', '.join(origins)}): resume them with --base-url of their own API, or move "
            "them with --rebase OLD=NEW",
            file=out,
        )
    return code


def _function(text: str) -> Callable[..., Any]:
    """`module:function` (dots after the colon reach attributes), imported; `UsageError`
    naming what is wrong otherwise."""
    module_name, colon, attribute = text.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"--with takes module:function, not {text!r}")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--with: cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"--with: {module_name!r} has no {attribute!r}") from None
    if not callable(found):
        raise UsageError(f"--with: {text} is not a function")
    return cast("Callable[..., Any]", found)


def cmd_reconcile(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Ask a function about each expired operation; act on and journal its answers."""
    function = _function(args.with_)
    headers = _headers(args, err)
    params = _params(args)
    journal = _open(args)
    if journal is None:
        _missing(args, err)
        return EXIT_OK
    client = Client(journal=journal, base_url=args.base_url or "", headers=headers, params=params,
                    timeout=args.timeout)  # fmt: skip
    said = {"reconciled": "completed", "reissued": "reissued with a new key, pending: the "
            "next resume sends it", "expired": "still expired"}  # fmt: skip
    with client, journal:
        results = reconcile_expired(client, function)
        for result in results:
            op = result.operation
            last = journal.decisions(op.key)[-1]
            detail = f" {last.detail}" if last.detail else ""
            print(f"{op.name or op.key}: {last.verdict.replace('_', ' ')} ({last.decided_by})"
                  f"{detail}: {said[result.outcome]}", file=out)  # fmt: skip
    print(f"reconciled {len(results)} expired operations", file=out)
    return EXIT_OK if all(r.outcome != "expired" for r in results) else EXIT_INCOMPLETE


def _rebase(items: list[str]) -> dict[str, str]:
    """`--rebase OLD=NEW` arguments as a mapping of origins (checked)."""
    moves: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep:
            raise UsageError(f"--rebase takes OLD=NEW origins, not {item!r}")
        moves[old.strip()] = new.strip()
    try:
        rebase_map(moves)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return moves


def cmd_retention(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Show the journal's retention, or change it for every user of the file."""
    journal = _open(args, read_only=args.set is None)
    if journal is None:
        _missing(args, err)
        return EXIT_INCOMPLETE
    with journal:
        if args.set is not None:
            try:
                journal.set_retention(args.set)
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
            print(f"retention of {_shown_location(args)} is now {args.set}", file=out)
        else:
            print(journal.retention, file=out)
    return EXIT_OK


_DECISIONS = {
    "abandon": "abandoned {label}: it will never be sent again",
    "unpark": "unparked {label}: the next run or resume sends it again with key {key}",
    "reissue": "reissued {label} with the new key {key} (old key {previous}): the next run or "
    "resume sends it",
}


def cmd_decide(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """abandon, unpark, reissue: a person's decision about one operation."""
    journal = _open(args)
    if journal is None:
        _missing(args, err)
        return EXIT_INCOMPLETE
    with journal:
        try:
            op = getattr(journal, args.command)(args.operation)
        except KeyError:
            print(f"idemclient: no operation named or keyed {args.operation!r}", file=err)
            return EXIT_INCOMPLETE
        except ValueError as exc:
            print(f"idemclient: {exc}", file=err)
            return EXIT_INCOMPLETE
    message = _DECISIONS[args.command]
    if args.command == "abandon":  # the message names no key of its own
        label = f"{op.name} (key {op.key})" if op.name else f"the operation with key {op.key}"
    else:
        label = op.name or "the operation"
    print(message.format(label=label, key=op.key, previous=op.previous_key), file=out)
    return EXIT_OK


def cmd_purge(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    journal = _open(args)
    if journal is None:
        _missing(args, err)
        print("purged 0 operations", file=out)
        return EXIT_OK
    states = tuple(args.state) if args.state else ("completed", "conflict", "abandoned")
    with journal:
        try:
            count = journal.purge(older_than=args.older_than, states=states)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    print(f"purged {count} operations ({', '.join(states)}) older than {args.older_than}", file=out)
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idemclient",
        description="Inspect an idemclient journal, and finish or abandon the operations a "
        "crash left pending.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--journal", metavar="PATH", help="the journal to use: a file, or a postgresql:// URL"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--journal", metavar="PATH", default=argparse.SUPPRESS,
                         help="the journal to use: a file, or a postgresql:// URL")  # fmt: skip
        return sub

    command("where", "print the path of the journal in use").set_defaults(run=cmd_where)

    sub = command("list", "list operations: name, key, state, method, URL, attempts, age, last")
    sub.add_argument("--state", choices=STATES, help="only operations in this state")
    sub.add_argument("--json", action="store_true", help="print JSON, for scripts")
    sub.set_defaults(run=cmd_list)

    sub = command("show", "show one operation and its stored response")
    sub.add_argument("operation", metavar="NAME_OR_KEY")
    sub.add_argument("--json", action="store_true", help="print JSON, for scripts")
    sub.set_defaults(run=cmd_show)

    sub = command("stats", "count operations by state; the oldest pending one; the file's "
                  "size (for monitoring)")  # fmt: skip
    sub.add_argument("--json", action="store_true", help="print JSON, for scripts")
    sub.set_defaults(run=cmd_stats)

    sub = command(
        "resume",
        "resend every pending operation with its own key (the server replays what it did)",
    )
    sub.add_argument("--base-url", metavar="URL",
                     help="resume only the operations sent to this scheme://host[:port] "
                     "(default: all, each to where it was sent)")  # fmt: skip
    sub.add_argument("--rebase", action="append", default=[], metavar="OLD=NEW",
                     help="send the operations of origin OLD to origin NEW instead, and record "
                     "that they moved (repeatable)")  # fmt: skip
    sub.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'",
                     help="add a header (not for secrets: see --header-from-env)")  # fmt: skip
    sub.add_argument("--header-from-env", action="append", default=[], metavar="Name=ENVVAR",
                     help="add a header whose value is in an environment variable")  # fmt: skip
    sub.add_argument("--param-from-env", action="append", default=[], metavar="name=ENVVAR",
                     help="add a query parameter whose value is in an environment variable "
                     "(an API key sent in the query: the journal does not keep it)")  # fmt: skip
    sub.add_argument("--timeout", type=parse_seconds, default=30.0, metavar="SECONDS",
                     help="timeout of each request (default: 30)")  # fmt: skip
    sub.add_argument("--attempts", type=parse_attempts, default=5, metavar="N",
                     help="attempts per operation, the first included (default: 5)")  # fmt: skip
    sub.add_argument("--concurrency", type=parse_concurrency, default=1, metavar="N",
                     help="operations sent at once (default: 1); resumers on several hosts "
                     "may share one journal")  # fmt: skip
    sub.add_argument("--dry-run", action="store_true", help="say what would be sent; send nothing")
    sub.add_argument("--json", action="store_true",
                     help="print the results as JSON, for scripts (progress on stderr stays "
                     "plain lines)")  # fmt: skip
    sub.set_defaults(run=cmd_resume)

    sub = command(
        "reconcile",
        "ask a function of yours whether the API acted on each expired operation: completed, "
        "reissued for the next resume, or left expired; each decision is journaled",
    )
    sub.add_argument("--with", dest="with_", required=True, metavar="MODULE:FUNCTION",
                     help="function(operation, client) returning 'happened' (or the response "
                     "to record), 'not_happened' or 'unknown'")  # fmt: skip
    sub.add_argument("--base-url", metavar="URL",
                     help="only the operations sent to this scheme://host[:port]")  # fmt: skip
    sub.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'",
                     help="add a header to the client the function gets")  # fmt: skip
    sub.add_argument("--header-from-env", action="append", default=[], metavar="Name=ENVVAR",
                     help="add a header whose value is in an environment variable")  # fmt: skip
    sub.add_argument("--param-from-env", action="append", default=[], metavar="name=ENVVAR",
                     help="add a query parameter whose value is in an environment variable "
                     "(an API key sent in the query: the journal does not keep it)")  # fmt: skip
    sub.add_argument("--timeout", type=parse_seconds, default=30.0, metavar="SECONDS",
                     help="timeout of each request of the function (default: 30)")  # fmt: skip
    sub.set_defaults(run=cmd_reconcile)

    for name, text in [
        ("abandon", "mark a pending, expired or parked operation abandoned: never sent again"),
        ("unpark", "make a parked operation pending again, with its key"),
        ("reissue", "give an expired operation a new key (only once you know the server did "
         "not perform it: the new key cannot protect against a duplicate)"),
    ]:  # fmt: skip
        sub = command(name, text)
        sub.add_argument("operation", metavar="NAME_OR_KEY")
        sub.set_defaults(run=cmd_decide)

    sub = command(
        "retention",
        "show how long the server keeps keys (a property of the journal file), or change it",
    )
    sub.add_argument("--set", type=parse_duration, metavar="DURATION",
                     help="the new retention for every user of the file, e.g. 1h, 24h")  # fmt: skip
    sub.set_defaults(run=cmd_retention)

    sub = command("purge", "delete finished operations (never pending or expired ones)")
    sub.add_argument("--older-than", type=parse_duration, default=timedelta(days=30),
                     metavar="DURATION", help="e.g. 30d, 12h (default: 30d; never below "
                     "the retention)")  # fmt: skip
    sub.add_argument("--state", action="append", choices=("completed", "conflict", "abandoned"),
                     help="only this state (repeatable; default: all three)")  # fmt: skip
    sub.set_defaults(run=cmd_purge)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    # psycopg's pool warns on stderr of each try to reach a server that is down: the
    # JournalError that ends the command says it once
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    try:
        code: int = args.run(args, out, err)
    except UsageError as exc:
        print(f"idemclient {args.command}: error: {exc}", file=err)
        return EXIT_USAGE
    except JournalError as exc:
        print(f"idemclient: error: {exc}", file=err)
        return EXIT_JOURNAL
    except httpx.InvalidURL as exc:
        print(f"idemclient {args.command}: error: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("idemclient: interrupted", file=err)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `idemclient list | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # (and Python's own flush at exit stays quiet)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())

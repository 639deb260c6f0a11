"""Ready-made clients, `wrap()` for clients that exist, and resuming interrupted operations."""

from __future__ import annotations

import functools
import inspect
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx

from ._budget import OWN_BUDGET, BudgetOption, own_budget
from ._core import OPERATION_EXTENSION, RESUME_EXTENSION, Event, _label, stored_url
from ._errors import (
    ConflictError,
    JournalError,
    OperationAbandonedError,
    OperationExpiredError,
    OperationInProgressError,
    OperationParkedError,
    RetriesExhaustedError,
)
from ._family import error_kind, family, is_family_object
from ._policy import RetryPolicy
from ._records import Operation, StoredResponse, VerdictKind
from ._transport import (
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_METHODS,
    AsyncIdempotentTransport,
    IdempotentTransport,
    JournalLike,
    open_journal_like,
)
from .journal import JournalBackend

__all__ = [
    "AsyncClient",
    "Client",
    "ResumeReport",
    "ResumeResult",
    "aresume_pending",
    "resume_pending",
    "wrap",
]

Outcome = Literal[
    "completed", "conflict", "expired", "in_progress", "parked", "failed", "reconciled", "reissued"
]
#: a reconcile function's answer: what it found out about an expired operation
Found = Literal["happened", "not_happened", "unknown"] | httpx.Response
Reconcile = Callable[[Operation, Any], Any]
AnyClient = TypeVar("AnyClient")
if TYPE_CHECKING:
    import httpx2

    #: a client of either family (subclasses such as the SDKs' `DefaultHttpxClient` included)
    SyncHttpClient = httpx.Client | httpx2.Client
    AsyncHttpClient = httpx.AsyncClient | httpx2.AsyncClient
    AnyHttpClient = SyncHttpClient | AsyncHttpClient
_Idempotent = IdempotentTransport | AsyncIdempotentTransport


def _wrap_transports(client: AnyHttpClient, options: dict[str, Any]) -> None:
    """Wrap the client's transport and every mounted one, all on one journal."""
    current = client._transport
    if isinstance(current, (IdempotentTransport, AsyncIdempotentTransport)):
        raise ValueError("this client is already wrapped by idemclient")
    journal, opened = open_journal_like(options.pop("journal", None))
    # one budget for the client's transports, mounted ones included
    options["retry_budget"] = own_budget(
        options.pop("retry_budget", OWN_BUDGET), options.get("clock")
    )
    sync_kind, async_kind = _transport_classes(client)
    kind: Callable[..., _Idempotent] = async_kind if _is_async(client) else sync_kind
    main = kind(current, journal=journal, **options)
    # The journal belongs to the client when wrap() opened it: closing the client closes it.
    main._owns_journal = opened
    client._transport = main
    client._mounts = {  # type: ignore[assignment]
        pattern: None if mounted is None else _mounted(kind(mounted, journal=journal, **options))
        for pattern, mounted in client._mounts.items()
    }


def _mounted(transport: _Idempotent) -> _Idempotent:
    """A mounted transport of a wrapped client: the client's own transport, which httpx
    closes first, writes the journal they share for all of them."""
    transport._closes_journal = False
    return transport


def _transport_classes(
    client: object,
) -> tuple[type[IdempotentTransport], type[AsyncIdempotentTransport]]:
    """The transports for the client's family: an httpx2 client gets transports that are
    `httpx2.BaseTransport`s too (`idemclient.httpx2`, imported only then)."""
    if family(client).__name__ == "httpx2":
        from . import httpx2 as twins

        return twins.IdempotentTransport, twins.AsyncIdempotentTransport
    return IdempotentTransport, AsyncIdempotentTransport


def _is_async(client: object) -> bool:
    """Whether `client` is an AsyncClient of httpx or httpx2 (`TypeError` if neither
    client)."""
    fam = family(client) if is_family_object(client) else None
    if fam is not None and isinstance(client, fam.AsyncClient):
        return True
    if fam is not None and isinstance(client, fam.Client):
        return False
    raise TypeError(
        "wrap() takes an httpx or httpx2 Client or AsyncClient (subclasses such as "
        f"openai.DefaultHttpxClient included), not {client!r}"
    )


def wrap(client: AnyClient, **options: Any) -> AnyClient:
    """Make an existing client idempotent; the same object back.

    Takes an `httpx.Client` or `httpx.AsyncClient`, an `httpx2.Client` or
    `httpx2.AsyncClient`, and their subclasses (`openai.DefaultHttpxClient`,
    `anthropic.DefaultHttpxClient`, ...), and stripe-python's `stripe.HTTPXClient` (its sync
    and async clients are wrapped, on one journal; pass it as `StripeClient(http_client=...)`).
    Its transport and mounted transports are wrapped in place, so base URL, headers, auth,
    cookies, timeouts, proxies and event hooks keep working, and requests, responses and errors
    stay in the client's own family. `options` are those of `IdempotentTransport` (`journal`,
    `retry`, `methods`, `key_header`, `hand_back`, `retry_budget`, ...); `hand_back` is on by
    default for the SDKs' own clients (openai, anthropic, stripe), so that they raise their
    own error types. The client's transports share one journal and one retry budget.

    Example:
        >>> client = idemclient.wrap(httpx.Client(base_url=..., headers={"Authorization": ...}))
    """
    options = dict(options)
    if "hand_back" not in options and _under_an_sdk(client):
        options["hand_back"] = True  # the SDK raises the error types its users catch
    inner = _stripe_clients(client)
    if inner:  # stripe.HTTPXClient: its own sync and async httpx clients, on one journal
        journal, _ = open_journal_like(options.pop("journal", None))
        budget = own_budget(options.pop("retry_budget", OWN_BUDGET), options.get("clock"))
        for http_client in inner:
            _wrap_transports(http_client, {**options, "journal": journal, "retry_budget": budget})
        return client
    _is_async(client)  # a client of either family, or TypeError
    _wrap_transports(client, options)  # type: ignore[arg-type]
    return client


def _stripe_clients(client: object) -> list[Any]:
    """The httpx clients inside a `stripe.HTTPXClient` (none for anything else)."""
    if not _under_an_sdk(client) or is_family_object(client):
        return []
    found = [getattr(client, name, None) for name in ("_client", "_client_async")]
    return [c for c in found if c is not None and is_family_object(c)]


#: SDKs whose own client classes `wrap()` recognises: their retries and error types rely on
#: getting answers and transport errors as plain httpx gives them (`hand_back`).
_SDKS = frozenset({"openai", "anthropic", "stripe"})


def _under_an_sdk(client: object) -> bool:
    return any(k.__module__.partition(".")[0] in _SDKS for k in type(client).__mro__)


def _idempotent_transport(client: AnyHttpClient) -> _Idempotent:
    transport = client._transport
    if not isinstance(transport, (IdempotentTransport, AsyncIdempotentTransport)):
        raise TypeError(
            "this client has no idemclient transport: use idemclient.Client, idemclient.wrap()"
            " or a transport=IdempotentTransport(...)"
        )
    return transport


class _SyncClientMixin:
    """What `Client` adds to the client class of its family (httpx, or httpx2)."""

    def __init__(
        self,
        *,
        journal: JournalLike = None,
        retry: RetryPolicy | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        key_header: str = "Idempotency-Key",
        key_style: Literal["bare", "structured"] = "bare",
        secret_headers: Sequence[str] = (),
        keep_headers: Sequence[str] = (),
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        sleep: Callable[[float], None] | None = None,
        hooks: Sequence[Callable[[Event], object]] = (),
        empty_replays: bool = False,
        hand_back: bool = False,
        retry_budget: BudgetOption = OWN_BUDGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _wrap_transports(self, dict(  # type: ignore[arg-type]
            journal=journal, retry=retry, methods=methods, key_header=key_header,
            key_style=key_style, secret_headers=secret_headers, keep_headers=keep_headers,
            max_body_size=max_body_size, sleep=sleep, hooks=hooks, empty_replays=empty_replays,
            hand_back=hand_back, retry_budget=retry_budget,
        ))  # fmt: skip

    @property
    def journal(self) -> JournalBackend:
        """The journal of this client's operations."""
        return _idempotent_transport(self).journal  # type: ignore[arg-type]

    def resume_pending(
        self,
        *,
        on_result: Callable[[ResumeResult], object] | None = None,
        rebase: Mapping[str, str] | None = None,
        concurrency: int = 1,
        reconcile: Callable[[Operation, Any], Found] | None = None,
    ) -> ResumeReport:
        """Finish the interrupted operations addressed to this client's API (see
        `idemclient.resume_pending`)."""
        return resume_pending(
            self,  # type: ignore[arg-type]
            on_result=on_result, rebase=rebase, concurrency=concurrency, reconcile=reconcile,
        )  # fmt: skip


class _AsyncClientMixin:
    """What `AsyncClient` adds to the async client class of its family."""

    def __init__(
        self,
        *,
        journal: JournalLike = None,
        retry: RetryPolicy | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        key_header: str = "Idempotency-Key",
        key_style: Literal["bare", "structured"] = "bare",
        secret_headers: Sequence[str] = (),
        keep_headers: Sequence[str] = (),
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        hooks: Sequence[Callable[[Event], object]] = (),
        empty_replays: bool = False,
        hand_back: bool = False,
        retry_budget: BudgetOption = OWN_BUDGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _wrap_transports(self, dict(  # type: ignore[arg-type]
            journal=journal, retry=retry, methods=methods, key_header=key_header,
            key_style=key_style, secret_headers=secret_headers, keep_headers=keep_headers,
            max_body_size=max_body_size, sleep=sleep, hooks=hooks, empty_replays=empty_replays,
            hand_back=hand_back, retry_budget=retry_budget,
        ))  # fmt: skip

    @property
    def journal(self) -> JournalBackend:
        """The journal of this client's operations."""
        return _idempotent_transport(self).journal  # type: ignore[arg-type]

    async def aresume_pending(
        self,
        *,
        on_result: Callable[[ResumeResult], object] | None = None,
        rebase: Mapping[str, str] | None = None,
        concurrency: int = 1,
        reconcile: Callable[[Operation, Any], Found | Awaitable[Found]] | None = None,
    ) -> ResumeReport:
        """Finish the interrupted operations addressed to this client's API (see
        `idemclient.resume_pending`)."""
        return await aresume_pending(
            self,  # type: ignore[arg-type]
            on_result=on_result, rebase=rebase, concurrency=concurrency, reconcile=reconcile,
        )  # fmt: skip

    async def resume_pending(
        self,
        *,
        on_result: Callable[[ResumeResult], object] | None = None,
        rebase: Mapping[str, str] | None = None,
        concurrency: int = 1,
        reconcile: Callable[[Operation, Any], Found | Awaitable[Found]] | None = None,
    ) -> ResumeReport:
        """The same as `aresume_pending()`, under the sync client's name."""
        return await self.aresume_pending(
            on_result=on_result, rebase=rebase, concurrency=concurrency, reconcile=reconcile
        )


class Client(_SyncClientMixin, httpx.Client):
    """An `httpx.Client` whose POST and PATCH are journaled, keyed and retried.

    Takes every `httpx.Client` argument, plus `journal`, `retry`, `methods` and the other
    options of `IdempotentTransport`. (`idemclient.httpx2.Client` is the same on httpx2.)

    Example:
        >>> with idemclient.Client(base_url="https://api.example", journal="billing.sqlite3") as c:
        ...     c.resume_pending()          # finish what a crash interrupted
        ...     with idemclient.operation("charge-42"):
        ...         c.post("/charges", json={"amount": 500})
    """


class AsyncClient(_AsyncClientMixin, httpx.AsyncClient):
    """An `httpx.AsyncClient` whose POST and PATCH are journaled, keyed and retried.

    Example:
        >>> async with idemclient.AsyncClient(base_url="https://api.example") as c:
        ...     await c.aresume_pending()
        ...     await c.post("/orders", json={"cart": "c1"})
    """


# -- resume -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResumeResult:
    """What `resume_pending` did with one operation.

    `outcome` is `completed` (the server answered; `response` holds it), `conflict` (422),
    `expired` (sent once and past the retention: not resent, a person or a reconcile
    function decides), `reconciled` (expired, and the reconcile function found that it
    happened: completed without a send), `reissued` (expired, and found not to have
    happened: a new key, and sent by this resume, whose own result follows),
    `in_progress` (another live process holds it), `parked` (its sends kept ending with the
    process gone: a person decides), or `failed` (retries ran out, a transport error, or an
    answer that is not the operation's: a 401, a redirect not followed; it stays pending).
    `operation` is the journal's record after the attempt (if that cannot be read, the
    record before it, reported as `failed` with the `JournalError` that says so).
    """

    operation: Operation
    outcome: Outcome
    response: httpx.Response | None = None
    error: Exception | None = None


class ResumeReport(list[ResumeResult]):
    """The results of `resume_pending`, one per operation it took up (a list), and `skipped`:
    the pending operations addressed to other origins, left pending and untouched for the
    client of their own API (or for `rebase=`)."""

    def __init__(
        self, results: Iterable[ResumeResult] = (), skipped: Sequence[Operation] = ()
    ) -> None:
        super().__init__(results)
        self.skipped: tuple[Operation, ...] = tuple(skipped)


_Origin = tuple[str, str, int | None]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> _Origin:
    """scheme, host and port (the scheme's default port written out) of a URL."""
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def parse_origin(text: str | httpx.URL, what: str) -> httpx.URL:
    url = httpx.URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} must be an origin such as https://api.example, not {text!r}")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"{what} must be an origin (scheme://host[:port]) only, not {text!r}")
    return url


def rebase_map(rebase: Mapping[str, str] | None) -> dict[_Origin, httpx.URL]:
    moves: dict[_Origin, httpx.URL] = {}
    for old, new in (rebase or {}).items():
        moves[_origin(parse_origin(old, "a rebase source"))] = parse_origin(new, "a rebase target")
    return moves


def destination(
    url: str, base_url: httpx.URL, moves: Mapping[_Origin, httpx.URL]
) -> httpx.URL | None:
    """Where a resume through a client with `base_url` sends an operation stored at `url`,
    after the moves of `rebase`; `None` if it is another origin's (not this client's)."""
    target = httpx.URL(url)
    move = moves.get(_origin(target))
    if move is not None:
        target = target.copy_with(scheme=move.scheme, host=move.host, port=move.port)
    if base_url.host and _origin(target) != _origin(base_url):
        return None
    return target


def _resume_requests(
    client: Any,
    rebase: Mapping[str, str] | None,
    reconcile: Reconcile | None = None,
    settle: Callable[[Any], Any] = lambda found: found,
    *,
    send: bool = True,
) -> tuple[JournalBackend, ResumeReport, list[tuple[Operation, Callable[[], httpx.Request]]]]:
    """The pending operations this client resumes, each with what makes its request (built
    when it is sent: a large backlog starts going out at once); the expired ones.

    An operation goes back where it was sent: only those whose stored origin is the client's
    (its base URL's; any, for a client without a base URL) are taken, others are skipped.
    `rebase` moves operations from one origin to another, explicitly.
    """
    transport = _idempotent_transport(client)
    moves = rebase_map(rebase)
    journal: JournalBackend = transport.journal
    base_url = client.base_url
    if (
        send
        and not base_url.host
        and (carried := credentials_of(client, transport.settings.secrets))
    ):
        raise ValueError(
            f"this client has no base_url, so a resume through it would send the pending "
            f"operations of every API in the journal, each with the client's own "
            f"{' and '.join(carried)}: give the client the base_url of the API these are for "
            "(one client per API), or resume through a client that carries no credentials"
        )
    targets: dict[str, httpx.URL | None] = {}  # a backlog's operations share few URLs

    def target_of(url: str) -> httpx.URL | None:
        if url not in targets:
            targets[url] = destination(url, base_url, moves)
        return targets[url]

    def mine(op: Operation) -> bool:
        return target_of(op.url) is not None

    expired = journal.expire_stale(mine)
    if reconcile is None:
        report = ResumeReport([ResumeResult(op, "expired") for op in expired])
    else:  # every expired one of this client's, this run's and earlier ones
        ours = [op for op in journal.operations("expired") if mine(op)]
        report = ResumeReport(_reconciled(journal, ours, reconcile, client, settle, transport))
    if not send:
        return journal, report, []
    todo: list[tuple[Operation, Callable[[], httpx.Request]]] = []
    skipped = []
    # ours past the retention were expired just now; one read for all of them
    for op, stored in journal.pending_requests():
        target = target_of(stored[1])
        if target is None:
            skipped.append(op)
        else:
            todo.append(
                (op, functools.partial(_resume_request, client, transport, op, stored, target))
            )
    report.skipped = tuple(skipped)
    return journal, report, todo


def credentials_of(client: Any, secret: Callable[[str], bool]) -> list[str]:
    """What a client adds to every request that may prove who is asking: its `auth`, the
    default headers and query parameters whose names are credentials' (`secret`), and
    cookies set for every domain (whatever their names: a session cookie's name says
    nothing). Sent to an API they are not for, they leak."""
    found = []
    if getattr(client, "auth", None) is not None:
        found.append("auth")
    headers = sorted({k for k in client.headers if secret(k.lower())})
    if headers:
        found.append(f"header{'s' if len(headers) > 1 else ''} {', '.join(headers)}")
    params = sorted({k for k in client.params if secret(k.lower())})
    if params:
        found.append(f"query parameter{'s' if len(params) > 1 else ''} {', '.join(params)}")
    if any(not cookie.domain for cookie in client.cookies.jar):
        found.append("cookies")
    return found


def _resume_request(
    client: Any,
    transport: _Idempotent,
    op: Operation,
    stored: tuple[str, str, list[tuple[str, str]], bytes, str],
    target: httpx.URL,
) -> httpx.Request:
    """The request that resends a pending operation to `target`, through `client`."""
    method, _, texts, body, encoding = stored
    # as bytes: a header value that is not ASCII goes out as it first did
    headers = [(k.encode(encoding), v.encode(encoding)) for k, v in texts]
    # The key goes out as it first did: in the operation's own header and style.
    key_header = op.key_header or transport.key_header
    key_style = op.key_style or transport.settings.key_style
    extensions: dict[str, Any] = {
        RESUME_EXTENSION: {"key_header": key_header, "key_style": key_style}
    }
    if op.name is not None:
        extensions[OPERATION_EXTENSION] = op.name
    params: tuple[tuple[str, str], ...] | None = None
    if client.params and target.query:
        # The client's params (its current query credential) join the stored ones, which
        # httpx 0.28 would drop; a credential that an older journal kept gives way.
        target = httpx.URL(stored_url(target, transport.settings.secrets))
        target, params = target.copy_with(query=None), tuple(target.params.multi_items())
    # as text: the client may be of the other family (httpx2), whose URL class differs
    request: httpx.Request = client.build_request(
        method, str(target), params=params, headers=headers, content=body,
        extensions=extensions,
    )  # fmt: skip
    request.headers[key_header] = f'"{op.key}"' if key_style == "structured" else op.key
    return request


def _reconciled(
    journal: JournalBackend,
    expired: Sequence[Operation],
    reconcile: Reconcile,
    client: Any,
    settle: Callable[[Any], Any],
    transport: Any,
) -> list[ResumeResult]:
    """Ask `reconcile` about each expired operation, and act on and journal each answer."""
    decided_by = _name_of(reconcile)
    results = []
    for op in expired:
        response: StoredResponse | None = None
        detail: str | None = None
        error: Exception | None = None
        verdict: VerdictKind
        try:
            found = settle(reconcile(op, client))
            if hasattr(found, "status_code") and hasattr(found, "headers"):
                response, verdict = _answer(found, transport.settings.secrets), "happened"
            elif found in ("happened", "not_happened", "unknown"):
                verdict = found
            else:
                raise TypeError(
                    f"{decided_by} returned {found!r}: a reconcile function returns "
                    '"happened" (or the response to record), "not_happened" or "unknown"'
                )
        except Exception as exc:  # the check failed: it stays expired, said so
            error, verdict, detail = exc, "error", f"{type(exc).__name__}: {exc}"
        after = journal.reconcile(op.key, verdict, decided_by, response=response, detail=detail)
        outcome: Outcome = {"happened": "reconciled", "not_happened": "reissued"}.get(
            verdict, "expired"
        )  # type: ignore[assignment]
        results.append(ResumeResult(after, outcome, None, error))
    return results


def _name_of(fn: Callable[..., Any]) -> str:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(fn)


def _answer(response: Any, secret: Callable[[str], bool]) -> StoredResponse:
    """A response a reconcile function found, as journaled: its body as read (decoded), so
    without the headers that described the encoded one, and without credentials."""
    body: bytes = response.content  # raises if the body was not read
    encoding = response.headers.encoding
    dropped = ("content-encoding", "content-length", "transfer-encoding")
    headers = [
        (name, v.decode(encoding))
        for k, v in response.headers.raw
        if (name := k.decode(encoding)).lower() not in dropped and not secret(name.lower())
    ]
    return StoredResponse(response.status_code, headers, body, encoding=encoding)


#: a resume with `concurrency` above 1 reads back the sends over within this many seconds
#: of each other (up to `READ_BACK_AT_MOST` of them) at once, in one read of the journal
READ_BACK_EVERY = 0.01
READ_BACK_AT_MOST = 200
#: one resumed operation's send: the operation as it was, the answer or the error
_Sent = tuple[Operation, httpx.Response | None, Exception | None]


def _results(journal: JournalBackend, sent: Sequence[_Sent]) -> list[ResumeResult]:
    """The results of resumed operations' sends, each with its record as the journal has it
    now: one read for all of them. If the records cannot be read, the sends are still
    reported: `failed`, with the `JournalError` that says so, the answer, and the record as
    it was before the send (an answer that came was recorded all the same; the resume goes
    on, and a journal that cannot be written stops it at the next registration)."""
    try:
        now = journal.by_keys([op.key for op, _, _ in sent])
    except JournalError as exc:
        return [_unread(op, response, error, exc) for op, response, error in sent]
    return [_result(now.get(op.key, op), response, error) for op, response, error in sent]


def _unread(
    op: Operation, response: httpx.Response | None, error: Exception | None, exc: JournalError
) -> ResumeResult:
    if error is not None:  # the send's own error says how it ended
        return _result(op, response, error)
    unread = JournalError(
        f"operation {_label(op)}: its send is over, but its record could not be read back: {exc}",
        path=exc.path,
    )
    unread.__cause__ = exc
    return ResumeResult(op, "failed", response, unread)


def _result(
    now: Operation, response: httpx.Response | None, error: Exception | None
) -> ResumeResult:
    """The result of one resumed operation's send, `now` its record after it."""
    outcome: Outcome
    if error is None:
        # An answer that settles nothing (a 401, a redirect not followed) leaves it pending.
        outcome = now.state if now.state in ("completed", "conflict") else "failed"
    elif isinstance(error, ConflictError):
        outcome = "conflict"
    elif isinstance(error, (OperationExpiredError, OperationAbandonedError)):
        outcome = "expired"
    elif isinstance(error, OperationInProgressError):
        outcome = "in_progress"
    elif isinstance(error, OperationParkedError):
        outcome = "parked"
    else:
        outcome = "failed"
    return ResumeResult(now, outcome, response, error)


_RESUMABLE_ERRORS = (
    ConflictError,
    OperationExpiredError,
    OperationAbandonedError,
    OperationInProgressError,
    OperationParkedError,
    RetriesExhaustedError,
)


def _resumable(error: Exception) -> bool:
    """An outcome for the report (the operation's own), not a reason to stop the resume: our
    decisions, and transport errors of either family."""
    return isinstance(error, _RESUMABLE_ERRORS) or error_kind(error) is not None


def resume_pending(
    client: SyncHttpClient,
    *,
    on_result: Callable[[ResumeResult], object] | None = None,
    rebase: Mapping[str, str] | None = None,
    concurrency: int = 1,
    reconcile: Callable[[Operation, Any], Found] | None = None,
) -> ResumeReport:
    """Resend the pending operations addressed to this client's API, through the client.

    An operation is resent to the URL it was sent to: the client takes those whose origin
    (scheme, host, port) is its base URL's, or all of them if it has no base URL; the
    others (another API's, in a shared journal) stay pending, untouched, listed in the
    report's `skipped`. `rebase={"https://old.example": "https://new.example"}` moves the
    operations of one origin to another, explicitly (and for good: the journal records the
    new URL).

    The client's auth and headers apply (a token refreshed since the crash works); each
    operation goes out with its stored key, in the header and style it first went out with,
    and its exact body bytes, so a server that acted before the crash replays its answer
    instead of acting twice. Operations sent once and older than the journal's retention
    become `expired` and are not sent.

    `concurrency` operations are sent at once (threads; httpx clients may be shared between
    threads). Several resumers (threads, processes, hosts) may work on one journal together:
    each operation is claimed by one of them; one held by a live holder is reported as
    `in_progress` and left to it.

    `on_result` is called with each `ResumeResult` as soon as it is known (for progress);
    the report lists them in that order.

    `reconcile(operation, client)` is asked about each expired operation of this client's
    API (one the server may have forgotten: a resend could act twice), before anything is
    sent. It asks the API whether the operation happened (by its key, a reference, its
    metadata) and returns `"happened"` (or the `httpx.Response` to record as its answer):
    it becomes `completed` without a send; `"not_happened"`: it is reissued with a new key
    and sent by this resume; `"unknown"`: it stays expired. An exception (or any other
    answer) leaves it expired too. Each decision is journaled with the function's name and
    the time (`journal.decisions(name)`, `idemclient show`).

    Raises:
        JournalError: the journal cannot be read or written (stops: what is being sent
            finishes, nothing more is started).
        TypeError: the client has no idemclient transport.
        ValueError: a `rebase` entry is not an origin (`scheme://host[:port]`),
            `concurrency` is below 1, or the client has no base URL but credentials of its
            own (`auth`, default headers or query parameters named like credentials,
            or cookies set for every domain): it would send every API's operations,
            each with them.
    """
    _check_concurrency(concurrency)
    journal, results, requests = _resume_requests(client, rebase, reconcile)
    sender: Any = client  # either family's client; its requests are its own
    _report(results, on_result)

    def one(op: Operation, make: Callable[[], httpx.Request]) -> _Sent:
        request = make()
        try:
            response = sender.send(request)
            response.read()
        except Exception as exc:
            if not _resumable(exc):
                raise
            return op, None, exc
        return op, response, None

    if concurrency == 1:
        for op, make in requests:
            results.extend(_results(journal, [one(op, make)]))
            _report(results[-1:], on_result)
        return results
    _in_threads(
        requests, one, concurrency, lambda sent: _results(journal, sent), results, on_result
    )
    return results


def _in_threads(
    requests: Sequence[tuple[Operation, Callable[[], httpx.Request]]],
    one: Callable[[Operation, Callable[[], httpx.Request]], _Sent],
    concurrency: int,
    read_back: Callable[[Sequence[_Sent]], list[ResumeResult]],
    results: list[ResumeResult],
    on_result: Callable[[ResumeResult], object] | None,
) -> None:
    """`one` for each request on `concurrency` threads, each taking the next request when
    it is done; this thread reads the sends back, all those over since its last read at
    once (`read_back`), and reports their results as they come. An exception (a `one` that
    raised, `on_result` that raised, Ctrl-C) stops the rest from starting: what is being
    sent finishes first, then it is raised."""
    todo = iter(requests)
    taking = threading.Lock()
    stop = threading.Event()
    done: queue.SimpleQueue[_Sent | BaseException | None] = queue.SimpleQueue()

    def work() -> None:
        try:
            while not stop.is_set():
                with taking:
                    item = next(todo, None)
                if item is None:
                    break
                done.put(one(*item))
        except BaseException as exc:  # a non-resumable error: the others stop too
            stop.set()
            done.put(exc)
        finally:
            done.put(None)  # this worker ended

    workers = [
        threading.Thread(target=work, name=f"idemclient-resume-{i}")
        for i in range(min(concurrency, len(requests)))
    ]
    failure: BaseException | None = None
    started: list[threading.Thread] = []
    try:
        for worker in workers:
            worker.start()
            started.append(worker)
        ended = 0
        while ended < len(started):
            sent: list[_Sent] = []
            item = done.get()
            # then what comes within READ_BACK_EVERY: many sends, one read
            until = time.monotonic() + READ_BACK_EVERY
            while True:
                if item is None:
                    ended += 1
                elif isinstance(item, BaseException):
                    failure = failure or item
                else:
                    sent.append(item)
                left = until - time.monotonic()
                if ended == len(started) or len(sent) >= READ_BACK_AT_MOST or left <= 0:
                    break
                try:
                    item = done.get(timeout=left)
                except queue.Empty:
                    break
            if sent:
                read = read_back(sent)
                results.extend(read)
                _report(read, on_result)
    finally:
        stop.set()
        for worker in started:
            worker.join()
    if failure is not None:
        raise failure


def reconcile_expired(
    client: SyncHttpClient,
    reconcile: Callable[[Operation, Any], Found],
    *,
    rebase: Mapping[str, str] | None = None,
) -> ResumeReport:
    """Only the first step of `resume_pending(client, reconcile=...)`: expire what is past
    the retention, and ask `reconcile` about every expired operation of this client's API.
    Nothing is sent: an operation found not to have happened is reissued, pending, for the
    next resume. What the command line's `idemclient reconcile --with` runs."""
    return _resume_requests(client, rebase, reconcile, send=False)[1]


def _on_the_loop(found: Any) -> Any:
    """In the worker thread of `aresume_pending`: an awaitable answer, awaited on the loop."""
    if not inspect.isawaitable(found):
        return found

    async def wait() -> Any:
        return await found

    return anyio.from_thread.run(wait)


class _Over:
    """The sends of `aresume_pending` that are over and not read back yet, on one loop."""

    def __init__(self) -> None:
        self._sent: list[_Sent] = []
        self._closed = False
        self._more = anyio.Event()

    def put(self, sent: _Sent) -> None:
        self._sent.append(sent)
        self._more.set()

    def close(self) -> None:
        """No more sends will come."""
        self._closed = True
        self._more.set()

    async def take(self) -> list[_Sent] | None:
        """Every send over since the last call, waiting for one; `None` once closed and all
        taken."""
        while not self._sent:
            if self._closed:
                return None
            await self._more.wait()
            self._more = anyio.Event()
        sent, self._sent = self._sent, []
        return sent


def _check_concurrency(concurrency: int) -> None:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a whole number of at least 1, not {concurrency!r}")


def _report(
    results: Sequence[ResumeResult], on_result: Callable[[ResumeResult], object] | None
) -> None:
    if on_result is not None:
        for result in results:
            on_result(result)


async def aresume_pending(
    client: AsyncHttpClient,
    *,
    on_result: Callable[[ResumeResult], object] | None = None,
    rebase: Mapping[str, str] | None = None,
    concurrency: int = 1,
    reconcile: Callable[[Operation, Any], Found | Awaitable[Found]] | None = None,
) -> ResumeReport:
    """The async twin of `resume_pending`: up to `concurrency` operations at once, as tasks;
    journal reads run in a worker thread. `reconcile` may be an async function (it gets the
    async client), and runs on the event loop."""
    _check_concurrency(concurrency)
    journal, results, requests = await anyio.to_thread.run_sync(
        _resume_requests, client, rebase, reconcile, _on_the_loop
    )
    sender: Any = client  # either family's client; its requests are its own
    _report(results, on_result)

    async def one(op: Operation, make: Callable[[], httpx.Request]) -> _Sent:
        request = make()
        try:
            response = await sender.send(request)
            await response.aread()
        except Exception as exc:
            if not _resumable(exc):
                raise
            return op, None, exc
        return op, response, None

    async def read_back(sent: list[_Sent]) -> None:
        read = await anyio.to_thread.run_sync(_results, journal, sent)
        results.extend(read)
        _report(read, on_result)

    if concurrency == 1:
        for op, make in requests:
            await read_back([await one(op, make)])
        return results

    over = _Over()

    async def holding(
        permits: anyio.Semaphore, op: Operation, make: Callable[[], httpx.Request]
    ) -> None:
        try:
            over.put(await one(op, make))
        finally:
            permits.release()

    async def reading() -> None:  # the sends over since the last read, read back at once
        while (sent := await over.take()) is not None:
            await read_back(sent)

    permits = anyio.Semaphore(concurrency)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(reading)
            for op, make in requests:
                await permits.acquire()  # no more than `concurrency` started and unfinished
                tasks.start_soon(holding, permits, op, make)
            for _ in range(concurrency):
                await permits.acquire()  # every send is over
            over.close()
    except Exception as exc:  # an exception group of non-resumable errors (JournalError):
        # the first, as itself (those beside it come from the same cause, in other tasks)
        inner: Sequence[BaseException] = getattr(exc, "exceptions", ())
        if inner and all(isinstance(e, Exception) for e in inner):
            raise inner[0] from None
        raise
    return results

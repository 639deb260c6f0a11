"""One operation as a sequence of decisions, with no I/O (the shape of httpx's `auth_flow`).

`keyed_flow` and `plain_flow` are generators. They yield *steps* (journal steps such as
`Register`, `Claim`, `Finish`; `Send` a request; `Sleep`) and receive each step's result; the
sync and async transports in `_transport.py` are the two loops that carry the steps out (the
journal steps on any `JournalBackend`, through `perform`). Retry decisions come from a
tenacity controller (`RetryPolicy.controller`), driven one `iter()` at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import random
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal
from urllib.parse import unquote_plus

import anyio
import anyio.to_thread
import httpx
import tenacity

from ._budget import RetryBudget
from ._errors import (
    ConflictError,
    IdempotencyError,
    InvalidOperationError,
    OperationAbandonedError,
    OperationExpiredError,
    OperationInProgressError,
    OperationMismatchError,
    OperationParkedError,
    ResponseNotKeptError,
    RetriesExhaustedError,
)
from ._family import error_kind, family
from ._policy import (
    RETRY_EXTENSION,
    Exhausted,
    Outcome,
    RetryPolicy,
    Verdict,
    classify_error,
    classify_response,
    retry_hint,
)
from ._policy import is_replayed as server_replayed
from ._records import Decision, Operation, Registration, RequestRecord, StoredResponse
from .journal import AsyncJournalSteps, JournalBackend
from .journal._owner import DEFAULT_LEASE_MARGIN, current_owner

logger = logging.getLogger("idemclient")

#: Request extension naming the operation (a stable name that survives reruns).
OPERATION_EXTENSION = "idempotency_operation"
#: Request extension set by `resume_pending`: the stored request, found by its key. Its value
#: is a mapping with the operation's stored `key_header` and `key_style`.
RESUME_EXTENSION = "idempotency_resume"
#: Response extension describing the operation.
RESPONSE_EXTENSION = "idempotency"
#: Request extension that sends a request unjournaled, once, on purpose (`unjournaled()`).
UNJOURNALED_EXTENSION = "idempotency_unjournaled"

#: Never journaled, whatever `keep_headers` says: the names that always carry credentials.
#: Every other credential is recognised by its name (`looks_secret`).
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
#: Never journaled: headers that httpx derives from the body and URL on every send.
_DERIVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_MAX_NAME_LENGTH = 200
_MAX_KEY_LENGTH = 255
_DEFAULT_LEASE = 300.0


# -- credentials, by name --------------------------------------------------------------------

#: Header and query parameter names are read as words split at these separators.
_WORD_BREAK = re.compile(r"[-_.\s]+")
#: A word containing one of these names a credential: `authorization`, `oauth`, `x-auth-email`,
#: `client_secret`, `password`, `x-amz-credential`, `stripe-signature`, `sessionid`, `cookie`.
_SECRET_PARTS = (
    "auth", "secret", "passw", "passphrase", "credential", "signature", "session", "sessid",
    "cookie", "jwt",
)  # fmt: skip
#: A word ending in one of these does: `key`, `apikey`, `x-api-key`, `private-token`,
#: `accesstoken`, `csrftoken`. Only at the end, so that `x-ratelimit-remaining-tokens` and
#: `keyword` stay (a key *is* the last word of a name that holds one).
_SECRET_ENDINGS = ("key", "keys", "token")
#: Whole words that are credentials on their own: Azure's `sig`, `pwd`, `pass`, `dpop`, the
#: exchanges' HMAC `sign` (`X-BAPI-SIGN`, `OK-ACCESS-SIGN`), WSSE's password digest.
_SECRET_WORDS = frozenset({"sig", "sign", "pwd", "pass", "dpop", "wsse"})
_CACHED_NAMES = 4096


def looks_secret(name: str) -> bool:
    """Whether a header or query parameter name (lower case) names a credential.

    A name is read as words (split at `-`, `_`, `.`): it names a credential if a word contains
    auth, secret, passw(ord), passphrase, credential, signature, session, sessid, cookie or
    jwt; ends with key or token; or is sig, pwd, pass or dpop. `Idempotency-Key` (and
    `X-Idempotency-Key`, `idempotency_key`) is the one key that is no secret: servers echo it.

    A pattern rather than a list, because every API spells its credential its own way
    (`PRIVATE-TOKEN`, `X-Shopify-Access-Token`, `api-key`, `X-Goog-Api-Key`, ...) and one
    missed name is a credential on disk. `SecretNames` caches the answers.
    """
    words = [w for w in _WORD_BREAK.split(name) if w]
    for i, word in enumerate(words):
        if word == "idempotencykey" or (word == "key" and i and words[i - 1] == "idempotency"):
            continue
        if (
            word in _SECRET_WORDS
            or word.endswith(_SECRET_ENDINGS)
            or any(part in word for part in _SECRET_PARTS)
        ):
            return True
    return False


@dataclass(frozen=True, slots=True)
class SecretNames:
    """Which names (headers, query parameters) are kept out of the journal and the logs.

    `extra` (`secret_headers=`, and `SECRET_HEADERS`) always goes; `keep` (`keep_headers=`)
    rescues a name that only the pattern (`looks_secret`) would drop. Names in lower case.

    Every journaled request asks about each of its header names, and a service sends the
    same few names again and again: the answers are remembered (up to `_CACHED_NAMES` names),
    and `harmless` holds the names found to be no credential, for a set lookup in `plan()`.
    """

    extra: frozenset[str] = SECRET_HEADERS
    keep: frozenset[str] = frozenset()
    harmless: set[str] = field(default_factory=set, compare=False, repr=False)
    _secret: set[str] = field(default_factory=set, compare=False, repr=False)

    def __call__(self, name: str) -> bool:
        if name in self.harmless:
            return False
        if name in self._secret:
            return True
        verdict = name in self.extra or (name not in self.keep and looks_secret(name))
        if len(self.harmless) + len(self._secret) < _CACHED_NAMES:  # should names never repeat
            (self._secret if verdict else self.harmless).add(name)
        return verdict


#: The rule with no `secret_headers=` or `keep_headers=` (the CLI's warning uses it too).
DEFAULT_SECRETS = SecretNames()


# -- settings and names ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    """A transport's options, checked once."""

    policy: RetryPolicy
    methods: frozenset[str]
    key_header: str
    key_style: Literal["bare", "structured"]
    secret_headers: frozenset[str]
    max_body_size: int
    #: never journaled: the named secrets, headers httpx derives, the key itself (lower case)
    skip_headers: frozenset[str]
    key_lower: str
    #: the rule for every other name: request and response headers, query parameters
    secrets: SecretNames = DEFAULT_SECRETS

    @classmethod
    def build(
        cls,
        *,
        retry: RetryPolicy | None,
        methods: Iterable[str],
        key_header: str,
        key_style: Literal["bare", "structured"],
        secret_headers: Iterable[str],
        max_body_size: int,
        keep_headers: Iterable[str] = (),
    ) -> Settings:
        if key_style not in ("bare", "structured"):
            raise ValueError(f"key_style must be 'bare' or 'structured', not {key_style!r}")
        if max_body_size < 0:
            raise ValueError("max_body_size must not be negative")
        if not key_header or any(c in key_header for c in " :\r\n"):
            raise ValueError(f"invalid key_header {key_header!r}")
        secrets = SECRET_HEADERS | {h.lower() for h in secret_headers}
        keep = frozenset(h.lower() for h in keep_headers)
        if refused := sorted(keep & secrets):
            raise ValueError(
                f"keep_headers cannot keep {', '.join(refused)}: "
                "named as secret (secret_headers=, or a name that always carries credentials)"
            )
        return cls(
            policy=retry if retry is not None else RetryPolicy(),
            methods=frozenset(m.upper() for m in methods),
            key_header=key_header,
            key_style=key_style,
            secret_headers=secrets,
            max_body_size=max_body_size,
            skip_headers=secrets | _DERIVED_HEADERS | {key_header.lower()},
            key_lower=key_header.lower(),
            secrets=SecretNames(secrets, keep),
        )


def check_name(name: object) -> str:
    """Validate an operation name: 1 to 200 printable characters."""
    if not isinstance(name, str) or not name:
        raise InvalidOperationError(f"an operation name must be a non-empty string, not {name!r}")
    if len(name) > _MAX_NAME_LENGTH:
        raise InvalidOperationError(
            f"operation name is {len(name)} characters long; the limit is {_MAX_NAME_LENGTH}"
        )
    if not name.isprintable():
        raise InvalidOperationError(f"operation name {name!r} contains control characters")
    return name


def parse_key(value: str) -> str:
    """The key from a caller's header, bare or as a Structured Field string (`"..."`)."""
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > _MAX_KEY_LENGTH:
        raise InvalidOperationError(
            f"an Idempotency-Key must be 1 to {_MAX_KEY_LENGTH} characters, got {len(key)}"
        )
    if any(not (0x20 <= ord(c) <= 0x7E) or c in '"\\' for c in key):
        raise InvalidOperationError(
            "an Idempotency-Key may hold only printable ASCII without '\"' or '\\'"
        )
    return key


class _Scope:
    """The names handed out inside one `operation()` block: name, name#2, name#3, ...; and
    the block's retry policy, if it has one (its own, or an enclosing block's)."""

    def __init__(self, name: str, policy: RetryPolicy | None = None) -> None:
        self.name = name
        self.policy = policy
        # next() on a count is atomic under the GIL, and holds no lock that a fork() could
        # leave held in the child
        self._counter = itertools.count(1)
        # The last operation that did not finish of each thread or task of the block (held
        # here, not in a context variable, which a child task sets only for itself: a
        # resend continues it from anywhere in the block, as `asyncio.wait_for` sends in a
        # task of its own on Python < 3.12), and where each request's is, by fingerprint.
        # Concurrent calls of the block (an SDK's calls gathered) each keep their own.
        self.unfinished: dict[object, _Unfinished] = {}
        self.by_fingerprint: dict[str, object] = {}
        # each place's operation refused before any effect (401, 407) that another request
        # followed (an auth flow's token refresh): a resend of it later is it (`_Unfinished`)
        self.aside: dict[object, _Unfinished] = {}

    def set_aside(self, mark: _Unfinished) -> None:
        self.aside.pop(mark.place, None)  # (to the end: the oldest are forgotten first)
        self.aside[mark.place] = mark
        while len(self.aside) > _BLOCK_MARKS_KEPT:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del self.aside[next(iter(self.aside))]

    def mark(self, mark: _Unfinished) -> None:
        """`mark` is the last unfinished operation of its thread or task."""
        self.clear(mark.place)  # (to the end: the oldest are forgotten first)
        self.unfinished[mark.place] = mark
        for fingerprint in mark.fingerprints:
            self.by_fingerprint[fingerprint] = mark.place
        while len(self.unfinished) > _BLOCK_MARKS_KEPT:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                self.clear(next(iter(self.unfinished)))

    def clear(self, place: object, key: str | None = None) -> None:
        """Forget the unfinished operation of `place` (only if it is `key`'s, if given)."""
        mark = self.unfinished.get(place)
        if mark is None or (key is not None and mark.key != key):
            return
        self.unfinished.pop(place, None)
        for fingerprint in mark.fingerprints:
            if self.by_fingerprint.get(fingerprint) == place:
                self.by_fingerprint.pop(fingerprint, None)

    def find(self, fingerprint: str, place: object) -> _Unfinished | None:
        """The unfinished operation of this request in the block: `place`'s own first."""
        mine = self.unfinished.get(place)
        if mine is not None and fingerprint in mine.fingerprints:
            return mine
        other = self.by_fingerprint.get(fingerprint)
        found = self.unfinished.get(other) if other is not None else None
        return found if found is not None and fingerprint in found.fingerprints else None

    def next_name(self) -> str:
        count = next(self._counter)
        return self.name if count == 1 else f"{self.name}#{count}"


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "idemclient_operation", default=None
)


class _Unfinished:
    """A journaled operation of this context (thread or task, and `operation()` block) that
    did not finish: what a resend of the same request continues. `fingerprints`: its
    request's, and those of the requests that went on under its key right after it (a
    redirect's, at the new URL): a resend of any of them is it again. `done` once it
    finished, wherever (a stream read to its end by another task, a resume)."""

    __slots__ = (
        "aside_until", "fingerprints", "key", "name", "outcome", "place", "refused", "scope",
    )  # fmt: skip

    def __init__(
        self,
        scope: _Scope | None,
        fingerprints: frozenset[str],
        key: str,
        name: str | None,
        place: object,  # the thread or task: a task inherits its parent's context, not its
    ) -> None:  # failure
        self.scope, self.fingerprints, self.key, self.name = scope, fingerprints, key, name
        self.place = place
        # one for every mark of this key, wherever it is remembered (the caller's, a
        # resumer's): its completion anywhere marks them all done. A new mark of a key
        # that finished (its call failed after: `FollowUp`; it is sent again) starts anew.
        outcome = _outcomes.get(key)
        if outcome is None or outcome.done:
            outcome = _outcomes[key] = _Outcome()
        self.outcome: _Outcome = outcome
        # Refused before any effect (401, 407): never performed, so a resend of it after other
        # requests (an auth flow that refreshes its token through the same client, then sends
        # a new request) is still it, never a new operation beside it (which a resume of
        # this one would make two). Set aside, not forgotten, by the next other request.
        self.refused = False
        self.aside_until = 0.0  # (monotonic) set aside: a resend is it until then

    @property
    def done(self) -> bool:
        return self.outcome.done


class _Outcome:
    """Whether an operation finished: shared by every mark of its key."""

    __slots__ = ("__weakref__", "done")

    def __init__(self) -> None:
        self.done = False


#: the outcome of each key some mark remembers (gone with the last of them)
_outcomes: weakref.WeakValueDictionary[str, _Outcome] = weakref.WeakValueDictionary()


#: how many threads and tasks of one block have their unfinished operation remembered (the
#: oldest is forgotten first: a block that lives on through more failed calls than this)
_BLOCK_MARKS_KEPT = 100_000

#: outside a block, the last unfinished operation of this thread or task
_unfinished: contextvars.ContextVar[_Unfinished | None] = contextvars.ContextVar(
    "idemclient_unfinished", default=None
)
#: how long an operation refused before any effect stays set aside (an auth flow's token
#: refresh takes a request or two; a device-code sign-in, minutes): a resend later is a new
#: operation, as after any other (the refused one stays pending: see the README's limits)
_ASIDE_SECONDS = 900.0

#: outside a block, this thread's or task's last operation refused before any effect that
#: another request followed (`_Unfinished.refused`)
_aside: contextvars.ContextVar[_Unfinished | None] = contextvars.ContextVar(
    "idemclient_aside", default=None
)


class operation:
    """Name the operations sent inside this block, so that a rerun finds them.

    The first journaled request in the block is named `name`, the second `name#2`, and so on,
    in the order they are sent: keep that order stable across reruns. A completed operation is
    answered from the journal without sending; an interrupted one is resent with its key.
    Works with `with` and `async with`, in threads and tasks (a context variable).

    `retry` is the `RetryPolicy` of the requests sent in the block (journaled or not; nested
    blocks without one of their own keep it), in place of the transport's: the way to give
    one call of an SDK, which passes no extensions, a policy of its own. A request's own
    policy (`extensions=RetryPolicy(...).extensions()`) wins over it.

    Example:
        >>> with idemclient.operation(f"charge-{invoice.id}"):
        ...     r = client.post("/charges", json={"amount": 500})
        >>> with idemclient.operation("refund-7", retry=RetryPolicy(max_attempts=2)):
        ...     stripe.refunds.create(...)
    """

    def __init__(self, name: str, *, retry: RetryPolicy | None = None) -> None:
        self.name = check_name(name)
        self.retry = check_policy(retry, "operation(retry=...)")
        self._tokens: list[contextvars.Token[_Scope | None]] = []

    def __enter__(self) -> operation:
        policy = self.retry
        if policy is None and (outer := _scope.get()) is not None:
            policy = outer.policy
        self._tokens.append(_scope.set(_Scope(self.name, policy)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        _scope.reset(self._tokens.pop())

    async def __aenter__(self) -> operation:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()

    def __repr__(self) -> str:
        retry = f", retry={self.retry!r}" if self.retry is not None else ""
        return f"operation({self.name!r}{retry})"


def check_policy(policy: object, where: str) -> RetryPolicy | None:
    """`policy` if it is a `RetryPolicy` (or `None`), else a `TypeError` that says where."""
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(
            f"{where} takes an idemclient.RetryPolicy, not {type(policy).__name__} "
            f"({policy!r}); nothing was sent"
        )
    return policy


def unjournaled() -> dict[str, Any]:
    """The request extensions that send one request **unjournaled, once**, on purpose.

    Such a request gets no Idempotency-Key, no journal row and no retry, whatever its method:
    if its answer is lost, nothing can tell whether the server acted, and nothing resends it.
    For requests that must not be keyed (an endpoint that refuses the header, a call whose
    repetition is harmless and whose journaling is not wanted). It takes no name of an
    `operation()` block.

    Example:
        >>> client.post("/telemetry", json=..., extensions=idemclient.unjournaled())
    """
    return {UNJOURNALED_EXTENSION: True}


def is_unjournaled(request: httpx.Request) -> bool:
    """Whether the request was marked `unjournaled()`. Raises `TypeError` for a mark that is
    not `True`, `InvalidOperationError` for one beside an operation name or a retry policy."""
    mark = request.extensions.get(UNJOURNALED_EXTENSION)
    if mark is None or mark is False:
        return False
    if mark is not True:
        raise TypeError(
            f"the request extension {UNJOURNALED_EXTENSION!r} takes True "
            f"(extensions=idemclient.unjournaled()), not {mark!r}; nothing was sent"
        )
    for other in (OPERATION_EXTENSION, RETRY_EXTENSION):
        if request.extensions.get(other) is not None:
            raise InvalidOperationError(
                f"an unjournaled request is sent once, unnamed: it cannot also have "
                f"{other!r}; nothing was sent"
            )
    return True


def request_policy(request: httpx.Request, default: RetryPolicy) -> RetryPolicy:
    """The policy for this request: its own (the request extension), else its
    `operation()` block's, else `default` (the transport's). Raises `TypeError` for an
    extension that is not a `RetryPolicy`, before anything is sent."""
    own = check_policy(
        request.extensions.get(RETRY_EXTENSION), f"the request extension {RETRY_EXTENSION!r}"
    )
    if own is not None:
        return own
    scope = _scope.get()
    if scope is not None and scope.policy is not None:
        return scope.policy
    return default


# -- what to send and what to journal -------------------------------------------------------


def stored_url(url: httpx.URL, secret: Callable[[str], bool] = DEFAULT_SECRETS) -> str:
    """The URL as journaled, fingerprinted, logged and put in errors: without user info, the
    fragment (never sent) and every query parameter whose name is `secret`.

    The rest of the query stays byte for byte (a resume sends this URL), and the fingerprint
    is taken over it, so a rerun with a rotated credential in the query is the same operation.
    On resume the client's own `params=` put its current credential back.
    """
    text = str(url)
    if "@" in text and url.userinfo:
        text = str(url.copy_with(userinfo=b""))
    # httpx's URL text is percent-encoded: the first "#" starts the fragment, the first "?"
    # before it the query; slicing the text keeps what stays exactly as it was.
    text = text.partition("#")[0]
    base, _, query = text.partition("?")
    if query:
        parts = query.split("&")
        kept = [part for part in parts if not secret(_param_name(part))]
        if len(kept) != len(parts):
            return f"{base}?{'&'.join(kept)}" if kept else base
    return text


def _param_name(part: str) -> str:
    """The decoded, lower-case name of one raw `name=value` part of a query string."""
    name = part.partition("=")[0]
    return (unquote_plus(name) if "%" in name or "+" in name else name).lower()


def _pairs(headers: httpx.Headers) -> list[tuple[str, str]]:
    """Every header as a lower-case name and its value, repeated names kept: what
    `Headers.multi_items()` gives, with the headers' encoding looked up once, not per header."""
    encoding = headers.encoding
    return [(k.lower().decode(encoding), v.decode(encoding)) for k, v in headers.raw]


def fingerprint(method: str, url: str, body: bytes, boundary: bytes | None = None) -> str:
    """sha256 of method, URL and body: what makes two requests the same operation.

    A multipart body's `boundary` is random per call (httpx draws one for every `files=`
    request): it is left out, so that two uploads of the same parts are the same request.
    """
    digest = hashlib.sha256()
    digest.update(method.encode() + b"\n" + url.encode() + b"\n")
    digest.update(body.replace(b"--" + boundary, b"--") if boundary else body)
    return digest.hexdigest()


def multipart_boundary(body: bytes, content_type: str | None) -> bytes | None:
    """The boundary of a multipart body (which starts with `--boundary`), else `None`."""
    if body[:2] != b"--" or not content_type:
        return None
    media, _, params = content_type.partition(";")
    if not media.strip().lower().startswith("multipart/"):
        return None
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1") or None
    return None


def redirect_url(request: httpx.Request, response: httpx.Response) -> httpx.URL | None:
    """Where httpx follows a 307/308 (its `_redirect_url` rules), or `None` without a
    Location."""
    location = response.headers.get("location")
    if location is None:
        return None
    try:
        url = type(request.url)(location)
        if url.scheme and not url.host:
            url = url.copy_with(host=request.url.host)
        if url.is_relative_url:
            url = request.url.join(url)
        if request.url.fragment and not url.fragment:
            url = url.copy_with(fragment=request.url.fragment)
    except family(request).InvalidURL:
        return None
    return url


def lease_seconds(request: httpx.Request) -> float:
    """How long a claim holds: the request's timeouts summed, plus a margin."""
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict):
        values = [v for v in timeout.values() if isinstance(v, (int, float))]
        if len(values) == len(timeout) and values:
            return float(sum(values)) + DEFAULT_LEASE_MARGIN
    return _DEFAULT_LEASE + DEFAULT_LEASE_MARGIN


_owner_cache: tuple[int, str] | None = None


def owner() -> str:
    """This process's lease owner string, recomputed after a fork."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:
        _owner_cache = (pid, current_owner())
    return _owner_cache[1]


@dataclass(frozen=True, slots=True)
class Plan:
    """A journaled request: what is stored, and what is sent on every attempt."""

    record: RequestRecord
    request: httpx.Request
    lease_seconds: float
    key_header: str
    key_style: Literal["bare", "structured"]
    #: which response headers stay out of the journal (those that name credentials)
    secret: Callable[[str], bool] = DEFAULT_SECRETS
    boundary: bytes | None = None
    #: the `operation()` block it was planned in, if any, and the thread or task
    scope: _Scope | None = None
    place: object = None
    #: the fingerprints of the requests of this operation right before it, in this place
    #: (a redirect goes on at another URL under the same key): a resend of either is it
    carried: frozenset[str] = frozenset()

    def unfinished(self, op: Operation | RequestRecord) -> None:
        """Remember that `op` is the last operation of this thread or task (in this block, if
        in one) and has not finished: a resend of the same request right after is that
        operation again. The record, when its registration failed: it may have reached the
        journal all the same."""
        fingerprints = self.carried | {self.record.fingerprint}
        mark = _Unfinished(self.scope, fingerprints, op.key, op.name, self.place)
        if self.scope is not None:  # the block's, seen from every thread and task in it
            self.scope.mark(mark)
        else:
            _unfinished.set(mark)

    def unfailed(self, op: Operation) -> None:
        """`op` failed now (a stream cut or closed before its end), after its registration:
        it is its thread's or task's last unfinished operation again, unless that one has
        another since (which it would otherwise displace: the failed call an SDK retries).
        Closed by another thread or task (a consumer), it never displaces that one's own: at
        most it lands where nothing is remembered, under the opener's place, which no request
        of that thread or task matches."""
        if self.scope is not None:
            current = self.scope.unfinished.get(self.place)
            if current is None or current.done or current.key == op.key:
                self.unfinished(op)
            return
        current = _unfinished.get()
        if current is None or (
            current.place == self.place and (current.done or current.key == op.key)
        ):
            self.unfinished(op)

    def refused(self, key: str) -> None:
        """The operation with `key`, this place's last unfinished one, was refused before any
        effect (401, 407): never forgotten for another request (`_Unfinished.refused`)."""
        scope = self.scope
        mark = scope.unfinished.get(self.place) if scope is not None else _unfinished.get()
        if mark is not None and mark.key == key and mark.place == self.place:
            mark.refused = True

    def finished(self, key: str) -> None:
        """The operation with `key` finished: the same request again is a new operation (an
        intended repeat). Another operation remembered meanwhile (a stream read to its end
        after another request was sent) stays."""
        outcome = _outcomes.get(key)
        if outcome is not None:  # (every mark of it: a stream read elsewhere, a resume)
            outcome.done = True
        if self.scope is not None:
            self.scope.clear(self.place, key)
            return
        mark = _unfinished.get()
        if mark is not None and mark.key == key:
            _unfinished.set(None)

    def fingerprint_at(self, url: httpx.URL) -> str:
        """The fingerprint of this request moved to `url` (where a 307/308 sends it)."""
        record = self.record
        return fingerprint(record.method, stored_url(url, self.secret), record.body, self.boundary)

    def send_stored_body(self, body: bytes, content_type: str | None) -> None:
        """Send the journaled body (and its content type) instead of this call's: a rerun of
        a multipart upload sends the bytes of the first attempt, boundary included, since a
        server compares a retried key's body byte for byte."""
        headers = self.request.headers
        headers["content-length"] = str(len(body))
        if content_type is not None:
            headers["content-type"] = content_type
        self.request.stream = family(self.request).ByteStream(body)

    def request_with_key(self, op: Operation) -> httpx.Request:
        """The request to send under the journal's key, in the header and style stored with
        the operation (a rerun reuses the first key, as it first went out)."""
        header = op.key_header or self.key_header
        style = op.key_style if op.key_style in ("bare", "structured") else self.key_style
        if header.lower() != self.key_header.lower():
            del self.request.headers[self.key_header]
        if op.key != self.record.key or header != self.key_header or style != self.key_style:
            self.request.headers[header] = _key_value(op.key, style)  # type: ignore[arg-type]
        return self.request


def _same_key(given: str, key: str) -> bool:
    """Whether a key header's value (bare or quoted) is `key`."""
    try:
        return parse_key(given) == key
    except InvalidOperationError:
        return False


def _key_value(key: str, style: Literal["bare", "structured"]) -> str:
    return f'"{key}"' if style == "structured" else key


def plan(request: httpx.Request, body: bytes, settings: Settings, place: object = None) -> Plan:
    """Turn a request and its fully read body into a `Plan`. Raises `InvalidOperationError`.

    `place` is the thread or task sending it (a resend continues a failed operation only in
    the same place)."""
    explicit = request.extensions.get(OPERATION_EXTENSION)
    if explicit is not None:
        explicit = check_name(explicit)
    # A resume sends the key as the operation first did: in its stored header and style.
    key_header, key_style = settings.key_header, settings.key_style
    skip, key_name = settings.skip_headers, settings.key_lower
    resume = request.extensions.get(RESUME_EXTENSION)
    if isinstance(resume, Mapping):
        key_header = str(resume.get("key_header") or key_header)
        key_style = "structured" if resume.get("key_style") == "structured" else "bare"
        key_name = key_header.lower()
        skip = skip | {key_name}
    # One pass over the headers: what is journaled, the caller's key, and what the sent
    # request's framing headers say now.
    secret = settings.secrets
    harmless = secret.harmless
    stored: list[tuple[str, str]] = []
    given_values: list[str] = []
    length: str | None = None
    content_type: str | None = None
    chunked = False
    encoding = request.headers.encoding
    for k, v in _pairs(request.headers):
        if k == "content-type" and content_type is None:
            content_type = v
        if k not in skip:
            if k in harmless or not secret(k):  # credentials by name never reach the journal
                stored.append((k, v))
        elif k == key_name:
            given_values.append(v)
        elif k == "content-length":
            length = v
        elif k == "transfer-encoding":
            chunked = True
    given = in_header = ", ".join(given_values) if given_values else None
    if in_header is not None and not isinstance(resume, Mapping):
        # The caller's key goes out as the caller wrote it, on every later send too (a
        # resume, a rerun): a server may compare the header's value as written.
        key_style = "structured" if in_header.lstrip().startswith('"') else "bare"
    url = stored_url(request.url, secret)
    boundary = multipart_boundary(body, content_type)
    the_fingerprint = fingerprint(request.method, url, body, boundary)
    scope = _scope.get()
    # The same request again, in the same context, right after its operation failed (an
    # SDK's own retry, a caller's loop): that operation again, under its name and key.
    # Outside a block, only where it failed (a task inherits its parent's context, not its
    # failure); inside one, anywhere in the block (each thread or task keeps its own).
    last = scope.find(the_fingerprint, place) if scope is not None else _unfinished.get()
    again = (
        last is not None
        and not last.done
        and the_fingerprint in last.fingerprints
        and last.scope is scope
        and (scope is not None or last.place == place)
        and explicit in (None, last.name)
        and not resume
    )
    if not again and not resume:  # an operation refused before any effect, resent later
        aside = scope.aside.get(place) if scope is not None else _aside.get()
        if (
            aside is not None
            and not aside.done
            and time.monotonic() < aside.aside_until
            and the_fingerprint in aside.fingerprints
            and aside.scope is scope
            and aside.place == place
            and explicit in (None, aside.name)
        ):
            last, again = aside, True
            if scope is not None:
                scope.aside.pop(place, None)
            else:
                _aside.set(None)
    # The same operation going on under its key (a redirect's request at the new URL, an auth
    # flow's resend): a resend of the first request right after is that operation too.
    carried: frozenset[str] = frozenset()
    own = scope.unfinished.get(place) if scope is not None else _unfinished.get()
    if (
        not again
        and own is not None
        and own.place == place
        and not own.done
        and given is not None
        and _same_key(given, own.key)
    ):
        carried = own.fingerprints
    if scope is not None:
        if again:
            assert last is not None
            if last.place != place:  # continued here: no longer the other one's to resend
                scope.clear(last.place, last.key)
        elif not carried:  # another request: this place's last one is not "right before"
            _another_request(scope, place, own)
    elif last is not None and not again and not carried:
        _another_request(None, place, last)
    name: str | None = explicit
    if again:
        assert last is not None
        name = last.name
        # Its key, also over another in the header: an SDK that draws a key per call
        # (stripe-python) sends its caller's retry under a new one, which the server would
        # take for a second operation (and a resume then sends this one too).
        if given is None or not _same_key(given, last.key):
            given = _key_value(last.key, key_style)
    elif explicit is None and scope is not None:
        name = scope.next_name()
    if name is not None and explicit is None:
        # httpx sends this very request again after a 401 (auth flows) and copies its
        # extensions into a redirect: both are the same operation, under the same name.
        request.extensions[OPERATION_EXTENSION] = name
    key = parse_key(given) if given is not None else str(uuid.uuid4())
    record = RequestRecord(
        name=name,
        key=key,
        key_given=given is not None,
        method=request.method,
        url=url,
        headers=stored,
        body=body,
        fingerprint=the_fingerprint,
        resume=bool(resume),
        key_header=key_header,
        key_style=key_style,
        headers_encoding=encoding,
    )
    # The request itself is what is sent, as auth flows do it: its body becomes the journaled
    # bytes (sendable again), and it carries the key, so `response.request` shows the key.
    headers = request.headers
    if chunked:
        del headers["transfer-encoding"]
    if length != (size := str(len(body))):
        headers["content-length"] = size
    # The caller's own key goes out as the caller wrote it (quoted or not); ours in our style.
    if in_header is None or parse_key(in_header) != key:
        headers[key_header] = _key_value(key, key_style)
    request.stream = family(request).ByteStream(body)
    return Plan(
        record, request, lease_seconds(request), key_header, key_style, secret, boundary, scope,
        place, carried,
    )  # fmt: skip


# -- steps ----------------------------------------------------------------------------------


# Journal steps: what the flow asks of the journal, carried out by the shells on any backend
# (`perform`). All but `Finish` write to the journal's store: the async shell runs them in a
# worker thread and sees each through to its end, whatever cancels the caller meanwhile.


@dataclass(frozen=True, slots=True)
class Register:
    """Register and claim an operation (`JournalBackend.register`): the one durable commit
    before the send; answered with a `Registration`. The async shell registers the
    operations of concurrent tasks together."""

    record: RequestRecord
    owner: str
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class Claim:
    """Claim the next attempt for the holder at `version` (`JournalBackend.claim`): a durable
    commit before a retry; answered with a `Registration`."""

    key: str
    version: int
    owner: str
    lease_seconds: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Release:
    """Give the lease back, the operation left pending (`JournalBackend.release`): it gave
    up, failed, was handed to the caller unsettled (`moved_fingerprint`: where a 307/308 sent
    it on), or was interrupted. `never_sent`: no attempt reached the server."""

    key: str
    version: int
    reason: str | None
    never_sent: bool = False
    moved_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """Record the final response (`JournalBackend.finish`). It only hands the answer to the
    journal in memory (written batched, later): the async shell runs it on the event loop."""

    key: str
    version: int
    state: Literal["completed", "conflict"]
    response: StoredResponse


@dataclass(frozen=True, slots=True)
class Unclaim:
    """Undo a claim whose request was provably never sent (`JournalBackend.unclaim`); `fresh`:
    the operation was inserted by that claim's registration, and goes with it."""

    key: str
    version: int
    fresh: bool
    #: no attempt before this one reached the server either: it stays provably never sent
    never_sent: bool = False


JournalStep = Register | Claim | Release | Finish | Unclaim
#: for `isinstance`: the steps that `perform` carries out
JOURNAL_STEPS = (Register, Claim, Release, Finish, Unclaim)


def perform(step: JournalStep, journal: JournalBackend) -> Any:
    """Carry a journal step out on `journal`: its result, for the flow (the one place where
    steps become journal calls, for both shells)."""
    if isinstance(step, Register):
        return journal.register(step.record, step.owner, step.lease_seconds)
    if isinstance(step, Claim):
        return journal.claim(
            step.key, step.version, step.owner, step.lease_seconds, step.last_error
        )
    if isinstance(step, Release):
        return journal.release(
            step.key, step.version, step.reason, moved_fingerprint=step.moved_fingerprint,
            never_sent=step.never_sent,
        )  # fmt: skip
    if isinstance(step, Finish):
        return journal.finish(step.key, step.version, step.state, step.response)
    return journal.unclaim(step.key, step.version, fresh=step.fresh, never_sent=step.never_sent)


async def aperform(step: JournalStep, journal: AsyncJournalSteps) -> Any:
    """`perform` for a backend with native async I/O (no `Finish`: that one is in memory)."""
    if isinstance(step, Register):
        (result,) = await journal.aregister_many([(step.record, step.owner, step.lease_seconds)])
        if isinstance(result, BaseException):
            raise result
        return result
    if isinstance(step, Claim):
        return await journal.aclaim(
            step.key, step.version, step.owner, step.lease_seconds, step.last_error
        )
    if isinstance(step, Release):
        return await journal.arelease(
            step.key, step.version, step.reason, moved_fingerprint=step.moved_fingerprint,
            never_sent=step.never_sent,
        )  # fmt: skip
    if isinstance(step, Unclaim):
        return await journal.aunclaim(
            step.key, step.version, fresh=step.fresh, never_sent=step.never_sent
        )
    raise TypeError(f"not an async journal step: {step!r}")


@dataclass(frozen=True, slots=True)
class Send:
    """Send through the wrapped transport. With `read`, answer with the whole raw body read
    (a `Received` whose response streams those bytes); else the live response."""

    request: httpx.Request
    read: bool


@dataclass(frozen=True, slots=True)
class Read:
    """Read a live response's whole raw body (answered with a `Received`): an answer that is
    not a success is looked into (a 400 may name an `idempotency_error`) and journaled."""

    response: httpx.Response


@dataclass(frozen=True, slots=True)
class Close:
    """Close a live response unread (an answer given up for a retry): the shell closes it as
    its stream wants, sync or async (answered with `None`)."""

    response: httpx.Response


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


EventKind = Literal[
    "registered",
    "sending",
    "answered",
    "retrying",
    "retry_denied",
    "recording",
    "completed",
    "conflict",
    "gave_up",
    "replayed",
]


@dataclass(frozen=True, slots=True)
class Event:
    """One moment in a journaled operation's life, handed to the `hooks` of a transport.

    `kind` is one of:

    * `registered`: the operation is durably in the journal (claimed); nothing sent yet.
    * `sending`: an attempt is durably claimed and is about to be sent.
    * `answered`: the attempt got a response (`status`) or a transport error (`error`).
    * `retrying`: a retry will be sent with the same key after `delay` seconds.
    * `retry_denied`: a retry was due (after the answer `status` or `error`), but the
      transport's `RetryBudget` was spent: it is not made, and `gave_up` follows.
    * `recording`: the final response (`status`) is about to be written to the journal.
    * `completed` / `conflict`: the final response is recorded (`conflict`: a 422-like
      refusal); the write is batched, within the journal's `flush_delay` (see
      `Journal.finish`).
    * `gave_up`: the attempts ran out; the operation stays pending.
    * `replayed`: the operation had completed before: answered from the journal, not sent.

    `attempt` counts the attempts claimed so far (across reruns). Hooks are plain callables,
    called in order, in the thread (or event loop) that sends the request; an exception from a
    hook is logged and does not disturb the operation.

    Example:
        >>> def count(event: idemclient.Event) -> None:
        ...     if event.kind == "retrying":
        ...         metrics.increment("http.retries", tags={"operation": event.operation})
        >>> client = idemclient.Client(hooks=[count])
    """

    kind: EventKind
    operation: str | None
    key: str
    method: str
    url: str
    attempt: int
    status: int | None = None
    error: BaseException | None = None
    delay: float | None = None


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand an `Event` to the transport's hooks."""

    event: Event


Step = JournalStep | Send | Read | Close | Sleep | Emit


@dataclass(frozen=True, slots=True)
class Received:
    response: httpx.Response
    raw: bytes | None  # the raw (undecoded) body, when the step asked to read it


def _decoded(response: httpx.Response, raw: bytes) -> bytes:
    """The body with its content-encoding removed, for looking inside it."""
    fam = family(response)
    try:
        decoded: bytes = fam.Response(
            response.status_code, headers=response.headers, content=raw
        ).read()
    except fam.DecodingError:
        return raw
    return decoded


def _extension(op: Operation, attempts: int, replayed: bool) -> dict[str, Any]:
    return {"key": op.key, "operation": op.name, "attempts": attempts, "replayed": replayed}


def streams_to_caller(response: httpx.Response, policy: RetryPolicy) -> bool:
    """A stream of server-sent events (`text/event-stream`: what the SDKs' `stream=True`
    reads) in a success whose body is still on the wire: it reaches the caller as it
    streams. Other answers are read whole here, so that a read error mid-body is retried
    under the same key; one already in memory (a mock transport's) is simply read."""
    status = response.status_code
    if not 200 <= status < 300 or status in policy.retry_statuses:
        return False
    media = response.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "text/event-stream":
        return False
    fam = family(response)
    try:
        response.content  # noqa: B018 - read already (in memory)?
    except fam.ResponseNotRead:
        return not isinstance(response.stream, fam.ByteStream)
    return False


class _Recorder:
    """Journals an answer as the caller streams it: the body (up to the journal's
    `max_stream_body`) is recorded when the stream has been read to its end; if it is closed
    before, the lease is given back and the operation stays pending (a rerun or resume gets
    the server's replay). Memory stays bounded by that limit whatever the stream's size."""

    def __init__(
        self,
        journal: JournalBackend,
        op: Operation,
        version: int,
        the_plan: Plan,
        attempts: int,
        emit: Callable[[Event], object] | None,
    ) -> None:
        self.journal, self.op, self.version, self.plan = journal, op, version, the_plan
        self.attempts, self.emit = attempts, emit
        self.parts: list[bytes] = []
        self.size = 0
        self.done = False
        self.tail = b""  # the last bytes seen, kept or not: where the stream stands

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.tail = (self.tail + chunk)[-_TAIL:]
        if self.size <= self.journal.max_stream_body:
            self.parts.append(chunk)
        elif self.parts:
            self.parts = []  # too large to keep: its status and headers only

    def at_last_event(self) -> bool:
        """Whether what was read ends with an event that ends the stream (`data: [DONE]`,
        `event: message_stop`, ...): only its body's end can be still unread."""
        if not self.tail.rstrip(b" \t").endswith((b"\n\n", b"\r\n\r\n", b"\r\r")):
            return False  # in the middle of an event
        events = re.split(rb"\r\n\r\n|\n\n|\r\r", self.tail.strip())
        last = events[-1] if events else b""
        return any(marker.search(last) for marker in _LAST_EVENTS)

    def end(self, response: httpx.Response) -> None:
        """The stream was read to its end: record the answer (in memory, batched)."""
        if self.done:
            return
        stored = _stored(response, b"".join(self.parts), self.plan.secret)
        if self.size > self.journal.max_stream_body:
            stored = dataclasses.replace(stored, body=b"", body_kept=False)
        self._event("recording", response.status_code)
        # If this raises (JournalError), the stream's close gives the lease back: pending.
        self.journal.finish(self.op.key, self.version, "completed", stored, streamed=True)
        self.done = True
        self.plan.finished(self.op.key)  # done: the same request again is a new operation
        self._event("completed", response.status_code)

    def abort(self) -> Callable[[], object] | None:
        """Closed before its end: the journal write that gives the lease back, to run. Its
        operation failed now: a resend of its request right after continues it, whatever
        this thread or task sent while the stream was open."""
        if self.done:
            return None
        self.done = True
        self.plan.unfailed(self.op)
        return functools.partial(
            self.journal.release, self.op.key, self.version, "the answer's stream was closed "
            "before its end",
        )  # fmt: skip

    def _event(self, kind: EventKind, status: int) -> None:
        if self.emit is not None:
            record, op = self.plan.record, self.op
            self.emit(Event(kind, op.name, op.key, record.method, record.url, self.attempts,
                            status=status))  # fmt: skip


class _RecordingStream:
    """The caller's view of a streamed answer: the transport's chunks, as they come, each
    handed to a `_Recorder` on the way. Made a byte stream of the response's family (sync and
    async) by `recording_stream`.

    Closed after its last event (an SDK stops reading at `data: [DONE]`, before the body's
    terminating chunk), it is recorded as read, at once: the rest of the body is not waited
    for (a server or proxy may hold it back for long). Closed before its last event (the
    caller stopped it), or after a read failed (a lost connection, a read timeout), it is
    never recorded: the lease is given back at once and the operation stays pending (a
    rerun or resume gets the server's whole replay).
    """

    def __init__(self, inner: Any, recorder: _Recorder, response: httpx.Response) -> None:
        self._inner, self._recorder, self._response = inner, recorder, response
        # Dropped unread and unclosed (the caller let go of the response): nobody records
        # the answer nor gives the lease back, so it is no longer renewed (else a resume
        # elsewhere waited up to `RENEW_FOR`, an hour); it ends on its own, one lease later.
        weakref.finalize(self, _dropped, recorder).atexit = False
        # the transport's own iterator, once started: read on from it when closed early
        # (our generator may be closed by then, with the caller's)
        self._chunks: Iterator[bytes] | None = None
        self._achunks: AsyncIterator[bytes] | None = None
        self._broken = False  # reading it failed

    def __iter__(self) -> Iterator[bytes]:
        self._chunks = iter(self._inner)
        try:
            for chunk in self._chunks:
                self._recorder.add(chunk)
                yield chunk
        except Exception:
            self._broken = True  # cut, stalled past its timeout: never an answer to record
            raise
        self._recorder.end(self._response)

    def _record_if_over(self, started: bool) -> None:
        """Closed early, but after the stream's last event (an SDK stops reading there, before
        the body's terminating chunk): the answer is whole, recorded as read. Closed
        mid-stream (the caller stopped it), or after a read failed: it stays pending."""
        try:
            recorder = self._recorder
            if started and not self._broken and not recorder.done and recorder.at_last_event():
                recorder.end(self._response)
        except Exception:  # the journal closed meanwhile: pending, the lease given back
            logger.debug("recording a stream closed after its last event failed", exc_info=True)

    def close(self) -> None:
        try:
            self._record_if_over(self._chunks is not None)
        finally:
            try:
                if hasattr(self._inner, "close"):
                    self._inner.close()
            finally:
                release = self._recorder.abort()
                if release is not None:
                    release()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._achunks = self._inner.__aiter__()
        try:
            async for chunk in self._achunks:
                self._recorder.add(chunk)
                yield chunk
        except Exception:
            self._broken = True
            raise
        self._recorder.end(self._response)

    async def aclose(self) -> None:
        try:
            self._record_if_over(self._achunks is not None)
        finally:
            try:
                if hasattr(self._inner, "aclose"):
                    await self._inner.aclose()
            finally:
                release = self._recorder.abort()
                if release is not None:  # a journal write: not on the event loop
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(release)


def _dropped(recorder: _Recorder) -> None:
    """A recording stream collected: if its answer was neither recorded nor given back, its
    lease is let go of without a journal write (the garbage collector may run this in any
    thread, one that holds the journal's locks included)."""
    if not recorder.done:
        recorder.done = True
        stop_renewing = getattr(recorder.journal, "_let_go_later", None)
        if stop_renewing is not None:
            stop_renewing(recorder.op.key, recorder.version)


#: the bytes of a stream kept to tell whether it stands after its last event
_TAIL = 4096
#: events that end a stream of server-sent events, by convention: OpenAI's `[DONE]`,
#: Anthropic's `message_stop`, the Responses API's `response.completed` (or failed/incomplete)
_LAST_EVENTS = (
    re.compile(rb"^data:\s*\[DONE\]\s*$", re.MULTILINE),
    re.compile(rb"^event:\s*(message_stop|response\.(completed|failed|incomplete)|done)\s*$",
               re.MULTILINE),
    re.compile(rb'"type"\s*:\s*"(message_stop|response\.(completed|failed|incomplete))"'),
)  # fmt: skip


@functools.cache
def _recording_class(fam: ModuleType) -> type[_RecordingStream]:
    bases = (_RecordingStream, fam.SyncByteStream, fam.AsyncByteStream)
    return type("RecordingStream", bases, {})


def recording_stream(response: httpx.Response, recorder: _Recorder) -> Any:
    """`response`'s stream, journaled by `recorder` as the caller reads it."""
    return _recording_class(family(response))(response.stream, recorder, response)


def replay_response(reg: Registration, request: httpx.Request) -> httpx.Response:
    """The journaled final response of a finished operation, as a fresh httpx.Response.

    Its headers are given as bytes, encoded as they were decoded: httpx would encode text
    as ASCII, and fail on any other character; the bytes are what the server sent.
    """
    stored = reg.response
    assert stored is not None
    encoding = stored.encoding
    headers = [(k.encode(encoding), v.encode(encoding)) for k, v in stored.headers]
    ext = _extension(reg.operation, reg.operation.attempts, replayed=True)
    if not stored.body_kept:  # the body was too large to keep: say so, and send none
        drop = {b"content-length", b"content-encoding", b"transfer-encoding"}
        headers = [(k, v) for k, v in headers if k.lower() not in drop]
        ext["body_kept"] = False
    fam = family(request)  # the caller's: an httpx2 client gets an httpx2 response
    response: httpx.Response = fam.Response(
        stored.status,
        headers=headers,
        stream=fam.ByteStream(stored.body),
        request=request,
        extensions={RESPONSE_EXTENSION: ext},
    )
    return response


def _label(op: Operation) -> str:
    """How messages name an operation: `'charge-7' (key K)`, or `with key K` unnamed."""
    return f"{op.name!r} (key {op.key})" if op.name is not None else f"with key {op.key}"


def _refuse(
    reg: Registration, request: httpx.Request, *, during_retry: bool = False
) -> IdempotencyError:
    """The error for a registration (or, `during_retry`, a claim) that sends nothing."""
    op = reg.operation
    label = _label(op)
    if during_retry and reg.decision in (Decision.COMPLETED, Decision.IN_PROGRESS):
        return OperationInProgressError(
            f"operation {label} was taken over by another process ({reg.detail or op.state}) "
            "while this one waited to retry; not resent",
            operation=op,
        )
    if reg.decision is Decision.CONFLICT:
        response = replay_response(reg, request) if reg.response is not None else None
        if response is not None:
            response.read()  # in memory, as when it was first raised
        status = response.status_code if response is not None else "?"
        return ConflictError(
            f"operation {label} was refused by the server earlier (HTTP {status}); "
            "it is not sent again",
            operation=op,
            response=response,
        )
    if reg.decision is Decision.MISMATCH:
        return OperationMismatchError(
            f"operation {label}: {reg.detail}; nothing was sent", operation=op
        )
    if reg.decision is Decision.IN_PROGRESS:
        holder = "another process"
        if reg.detail and f"by {owner()} " in reg.detail:
            # (another thread or task of it, or an earlier call whose registration was
            # committed but its answer lost: the journal cannot tell them apart)
            holder = (
                "this process (another call, or an earlier one that gave up after its "
                "registration was written but not confirmed)"
            )
        return OperationInProgressError(
            f"operation {label} is being sent by {holder} ({reg.detail}); nothing was sent",
            operation=op,
        )
    if reg.decision is Decision.EXPIRED:
        when = " while it waited to retry" if during_retry else ""
        return OperationExpiredError(
            f"operation {label} was sent before and became older than the journal's retention"
            f"{when}: the server may have forgotten its key, so it is not resent automatically "
            "(abandon it, or decide by hand)",
            operation=op,
        )
    if reg.decision is Decision.PARKED:
        return OperationParkedError(
            f"operation {label}: {reg.detail or op.last_error}; nothing was sent", operation=op
        )
    when = " by a person while this process waited to retry it" if during_retry else ""
    return OperationAbandonedError(
        f"operation {label} was abandoned{when}; nothing was sent", operation=op
    )


def _stored(
    response: httpx.Response, raw: bytes, secret: Callable[[str], bool] = DEFAULT_SECRETS
) -> StoredResponse:
    """The response as journaled, without the headers that name credentials. Names keep the
    server's case and the text keeps the encoding it was decoded with, so that a replay's
    `headers.raw` is what the server sent."""
    encoding = response.headers.encoding
    headers = [
        (name, v.decode(encoding))
        for k, v in response.headers.raw
        if not secret((name := k.decode(encoding)).lower())
    ]
    return StoredResponse(response.status_code, headers, raw, encoding=encoding)


def _retry_loop(
    policy: RetryPolicy,
    clock: Callable[[], float],
    rng: random.Random | None,
    attempt: Callable[[], Generator[Step, Any, Outcome]],
    on_sleep: Callable[[Outcome, float], Generator[Step, Any, None]],
    budget: RetryBudget | None = None,
    on_denied: Callable[[Outcome, str], Generator[Step, Any, None]] | None = None,
) -> Generator[Step, Any, Outcome | Exhausted]:
    """Attempt; if that asks for a retry, drive a tenacity controller until it hands back a
    value. Most operations succeed at once, and build no controller at all.

    With a `budget`, the first attempt is deposited in it and each retry the policy decides
    on is withdrawn from it before its backoff; a retry the budget refuses is not made (nor
    waited for): `on_denied` is told, and the loop ends `Exhausted`."""
    start = clock()
    if budget is not None:
        budget.deposit()
    last: Outcome = yield from attempt()
    if last.verdict is not Verdict.RETRY:
        return last
    controller = policy.controller(clock, rng, start=start)
    controller.begin()
    state = tenacity.RetryCallState(controller, fn=None, args=(), kwargs={})
    state.set_result(last)
    while True:
        do = controller.iter(state)
        if isinstance(do, tenacity.DoAttempt):
            last = yield from attempt()
            state.set_result(last)
        elif isinstance(do, tenacity.DoSleep):
            if budget is not None and not budget.try_withdraw():
                reason = (
                    f"the retry budget was spent (retries are limited to {budget.ratio:.0%} of "
                    f"first attempts plus {budget.min_per_second:g} a second, over "
                    f"{budget.window:g}s)"
                )
                if on_denied is not None:
                    yield from on_denied(last, reason)
                return Exhausted(last, reason)
            yield from on_sleep(last, float(do))
            state.prepare_for_next_attempt()
            yield Sleep(float(do))
        else:
            assert isinstance(do, (Outcome, Exhausted))
            return do


def _close_response(outcome: Outcome) -> None:
    if outcome.response is not None:
        outcome.response.close()


class Unsent(BaseException):
    """Thrown into a flow by a shell in place of carrying out a `Send`: the request was not
    sent (its task was cancelled while a journal call was seen through). The flow gives its
    claim back (`Unclaim`) and raises `reason`."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason


def keyed_flow(
    the_plan: Plan,
    journal: JournalBackend,
    policy: RetryPolicy,
    clock: Callable[[], float],
    wall_clock: Callable[[], float],
    rng: random.Random | None = None,
    *,
    observed: bool = True,
    hand_back: bool = False,
    empty_replays: bool = False,
    emit: Callable[[Event], object] | None = None,
    budget: RetryBudget | None = None,
) -> Generator[Step, Any, httpx.Response]:
    """A journaled operation: register and claim, send, retry with the same key, record.

    With `observed`, an `Emit` step hands an `Event` to the hooks at each moment that
    matters; without hooks there is nobody to tell, and no event is made. With `hand_back`
    (under an SDK), an answer that would raise `RetriesExhaustedError` or `ConflictError` is
    returned (or its transport error raised) as plain httpx would, for the SDK to raise its
    own error types; the operation's state is the same.
    """
    record, request = the_plan.record, the_plan.request
    me = owner()
    try:
        reg: Registration = yield Register(record, me, the_plan.lease_seconds)
    except BaseException:
        # Nothing was sent. The registration may have been written all the same (a server
        # that went silent may commit it when it wakes; Ctrl-C, or a signal handler's
        # exception, raised as the commit returned): a resend of this request in this
        # context takes the same key, so that it cannot become a second operation. (Its
        # lease, if committed, is this process's until it ends: the resend is refused as in
        # progress until then, and a resume sends it once, under that key.)
        the_plan.unfinished(record)
        raise
    op = reg.operation
    label = _label(op)
    version, attempts = reg.lease_version, op.attempts
    # Unfinished until it completes: a resend of this request in this context (an SDK's
    # own retry after idemclient gave up) continues this operation, under this key.
    the_plan.unfinished(op)
    # Whether the claim in force was made by the registration that inserted the operation:
    # undoing it then removes the operation, as if it had never been registered.
    fresh = reg.fresh

    def event(kind: EventKind, **details: Any) -> tuple[Step, ...]:
        if not observed:
            return ()
        return (Emit(Event(kind, op.name, op.key, record.method, record.url, attempts, **details)),)

    # From here on the request carries the operation's key, not the one drawn for it before
    # the journal was asked: what is sent, and what a replay's `response.request` shows.
    request = the_plan.request_with_key(op)
    if reg.decision is Decision.COMPLETED:
        stored = reg.response
        if stored is None:  # reconciled: it happened, and no answer was given to keep
            raise ResponseNotKeptError(
                f"operation {label} completed before, but no answer of it was "
                f"kept ({op.last_error or 'recorded without one'}): nothing was sent",
                operation=op,
            )
        if not stored.body_kept and not empty_replays:
            size = dict((k.lower(), v) for k, v in stored.headers).get("content-length")
            body = f"the {size} bytes of its answer were" if size else "its answer was"
            raise ResponseNotKeptError(
                f"operation {label} completed before (HTTP {stored.status}), "
                f"but {body} over the journal's limit (max_response_body, max_stream_body "
                "for a stream) and not kept: nothing was sent, and it cannot be replayed (pass "
                "empty_replays=True to get its status and headers with an empty body)",
                operation=op,
                response=replay_response(reg, request),
            )
        logger.info("operation %s already completed: replaying", label)
        yield from event("replayed", status=reg.response.status if reg.response else None)
        the_plan.finished(op.key)
        replayed = replay_response(reg, request)
        if "location" in replayed.headers:
            follow_ups(the_plan, op, request, replayed.status_code)
        return replayed
    if hand_back and reg.decision is Decision.CONFLICT and reg.response is not None:
        return replay_response(reg, request)  # the stored 422, for the SDK to raise on
    if reg.decision is not Decision.SEND:
        raise _refuse(reg, request)
    if reg.body is not None:  # a rerun: the first attempt's bytes go out again
        the_plan.send_stored_body(reg.body, reg.content_type)
    yield from event("registered")

    first = True
    last_raw = b""
    last_error: str | None = None
    streaming = False  # the last answer is a success the caller streams (not read here)
    # Whether any byte of it may have reached the server: not if no attempt before this
    # claim may have (the journal says so) and every attempt of this call fails before a
    # connection is made (then the journal keeps it as provably never sent, which no
    # retention expires: an SDK's retries, or a resume, while the API is unreachable).
    reached = reg.sent_before
    sending = False  # an attempt is under way: its bytes may be reaching the server

    def attempt() -> Generator[Step, Any, Outcome]:
        nonlocal version, attempts, first, last_raw, fresh, reached, sending, streaming
        if not first:
            claimed: Registration = yield Claim(
                op.key, version, me, the_plan.lease_seconds, last_error
            )
            if claimed.decision is not Decision.SEND:
                # Not this holder's to send any more: taken over, finished by another holder,
                # abandoned by a person, or past the retention after a long sleep.
                raise _refuse(claimed, request, during_retry=True)
            version, attempts, fresh = claimed.lease_version, claimed.operation.attempts, False
        first = False
        yield from event("sending")
        sending = True  # from here until its outcome is known, it may reach the server
        try:
            received: Received = yield Send(request, read=False)
            reached = True
            # A success reaches the caller chunk by chunk, journaled as it goes (recorded when
            # the stream ends); any other answer is read whole, looked into and journaled.
            streaming = streams_to_caller(received.response, policy)
            if not streaming:
                received = yield Read(received.response)
        except Exception as exc:
            kind = error_kind(exc)
            if kind is None:  # not a transport error of httpx or httpx2
                raise
            if kind != "never_sent" and type(exc).__name__ != "UnsupportedProtocol":
                reached = True
            outcome = classify_error(exc)
        else:
            answer = received.response
            if streaming:
                reason = f"HTTP {answer.status_code}"
                outcome = Outcome(Verdict.FINAL, response=answer, reason=reason)
            else:
                raw = last_raw = received.raw or b""
                body = _decoded(answer, raw) if answer.status_code == 400 else raw
                outcome = classify_response(
                    answer, body, keyed=True, policy=policy, now=wall_clock(),
                    method=record.method, resumed=record.resume,
                )  # fmt: skip
        sending = False  # (whether it reached the server is in `reached` now)
        logger.debug(
            "%s %s operation=%s key=%s attempt=%d: %s -> %s",
            record.method, record.url, op.name, op.key, attempts, outcome.reason,
            outcome.verdict.value,
        )  # fmt: skip
        status = outcome.response.status_code if outcome.response is not None else None
        yield from event("answered", status=status, error=outcome.error)
        return outcome

    def on_sleep(outcome: Outcome, seconds: float) -> Generator[Step, Any, None]:
        nonlocal last_error
        last_error = outcome.reason
        _close_response(outcome)
        logger.info(
            "operation %s: %s, retrying in %.2fs with the same key",
            label, outcome.reason, seconds,
        )  # fmt: skip
        yield from event("retrying", delay=seconds, error=outcome.error)

    def on_denied(outcome: Outcome, reason: str) -> Generator[Step, Any, None]:
        logger.warning("operation %s: %s, not retried: %s", label, outcome.reason, reason)
        status = outcome.response.status_code if outcome.response is not None else None
        yield from event("retry_denied", status=status, error=outcome.error)

    settled = False
    try:
        result = yield from _retry_loop(policy, clock, rng, attempt, on_sleep, budget, on_denied)
        if isinstance(result, Exhausted):
            last = result.last
            if last.response is not None:
                # raised, not returned: httpx sets `request` only on what a transport returns
                last.response.request = request
                last.response.read()  # in memory: readable by the caller, and closed
            reason = f"{last.reason}; gave up: {result.reason}"
            yield Release(op.key, version, reason, never_sent=not reached)
            settled = True
            logger.warning("operation %s: %s; it stays pending", label, reason)
            yield from event("gave_up", error=last.error)
            if hand_back:  # as plain httpx: the last answer, or the last error
                if last.response is not None:
                    ext = _extension(op, attempts, replayed=False)
                    last.response.extensions = {**last.response.extensions, RESPONSE_EXTENSION: ext}
                    return last.response
                assert last.error is not None
                raise last.error
            raise RetriesExhaustedError(
                f"operation {label} gave up: {result.reason}; last outcome: "
                f"{last.reason}. It stays pending: resume it to finish with the same key",
                operation=op,
                response=last.response,
                attempts=attempts,
            ) from last.error
        if result.verdict is Verdict.ERROR:
            yield Release(op.key, version, result.reason, never_sent=not reached)
            settled = True
            assert result.error is not None
            raise result.error
        response = result.response
        assert response is not None
        if hand_back and result.verdict is Verdict.FINAL and response.status_code >= 500:
            # Under an SDK a server error (Anthropic's 529 "overloaded", a 501) is not the
            # operation's answer: the SDK retries it, under the same key, or raises its own
            # error. It settles nothing, and the operation stays pending.
            result = dataclasses.replace(result, verdict=Verdict.UNSETTLED)
        if result.verdict is Verdict.UNSETTLED:
            # Not the operation's answer: the caller (httpx's auth flow or redirect handling,
            # or the user) gets it, and the operation stays pending under its key. A redirect
            # tells where its next attempt may go: the journal accepts it there.
            redirect = response.status_code in (301, 307, 308)
            moved = redirect_url(request, response) if redirect else None
            moved_fingerprint = the_plan.fingerprint_at(moved) if moved is not None else None
            yield Release(op.key, version, result.reason, moved_fingerprint=moved_fingerprint)
            settled = True
            if response.status_code in (401, 407):
                the_plan.refused(op.key)
            logger.info(
                "operation %s: %s; handed to the caller, it stays pending",
                label, result.reason,
            )  # fmt: skip
            response.extensions = {
                **response.extensions,
                RESPONSE_EXTENSION: _extension(op, attempts, replayed=False),
            }
            return response
        state: Literal["completed", "conflict"] = (
            "conflict" if result.verdict is Verdict.CONFLICT else "completed"
        )
        if streaming:
            # Recorded when the caller has read the stream to its end; left pending (the
            # lease given back) if it stops before: a rerun or resume gets the server's replay.
            response.stream = recording_stream(
                response, _Recorder(journal, op, version, the_plan, attempts, emit)
            )
            settled = True
        else:
            yield from event("recording", status=response.status_code)
            # `finish` holds the completion in memory for the next batched write: no I/O here.
            # (If another holder took the operation over meanwhile, that write is fenced out.)
            yield Finish(op.key, version, state, _stored(response, last_raw, the_plan.secret))
            settled = True
    except GeneratorExit:
        # Closed mid-way, its driver gone (an async task destroyed without being cancelled,
        # its loop closed): no journal step can be taken now. Its lease is no longer renewed,
        # so that it ends on its own, and a resume takes the operation over then.
        if not settled:
            # (a backend that renews leases; the garbage collector may be running this in a
            # thread that holds the holds' lock: `_let_go_later` takes none)
            stop_renewing = getattr(journal, "_let_go_later", None)
            if stop_renewing is not None:
                stop_renewing(op.key, version)
        raise
    except Unsent as unsent:
        # Cancelled before this attempt's first byte: give the claim back, so that a retry
        # in this same process may send it at once (and a fresh operation leaves no trace).
        if not settled:
            try:
                yield Unclaim(op.key, version, fresh=fresh, never_sent=not reached)
            except Exception:
                logger.debug("could not give back operation %s", label, exc_info=True)
        raise unsent.reason from None
    except BaseException:
        if not settled:
            # Cancelled, interrupted, or the journal failed mid-way: give the lease back so
            # that a resume in this same process need not wait for it to expire.
            try:
                # (never sent if no attempt may have reached the server, this one included:
                # interrupted in a backoff after refused connections, not mid-send)
                never_sent = not (reached or sending)
                yield Release(op.key, version, "interrupted", never_sent=never_sent)
            except Exception:
                logger.debug("could not release operation %s", label, exc_info=True)
        raise

    ext = _extension(op, attempts, server_replayed(response))
    response.extensions = {**response.extensions, RESPONSE_EXTENSION: ext}
    if not streaming:  # a stream says so when it ends
        yield from event(state, status=response.status_code)
    if state == "conflict" and not hand_back:
        response.request = request  # raised, not returned: httpx will not set it
        response.read()  # in memory: the caller can read the server's reason
        logger.warning("operation %s: %s, not retried", label, result.reason)
        raise ConflictError(
            f"operation {label} was refused by the server ({result.reason}): "
            "the key was used with another request, or the server cannot process it; "
            "not retried",
            operation=op,
            response=response,
        )
    logger.info(
        "operation %s %s: HTTP %d after %d attempt(s)",
        label, state, response.status_code, attempts,
    )  # fmt: skip
    if state == "completed" and not streaming:  # a stream is done when it ends
        the_plan.finished(op.key)  # done: the same request again is a new operation
        if "location" in response.headers:
            follow_ups(the_plan, op, request, response.status_code)
    return response


#: set on the request of an operation completed with a redirect that httpx follows with a
#: GET (a 303 after a POST): the requests of those hops carry it (httpx hands a request's
#: extensions on to its redirect)
FOLLOW_UP_EXTENSION = "idemclient_follow_up"


class FollowUp:
    """An operation completed with a redirect (POST, then 303: GET the result), whose call
    goes on with the hops httpx follows. If one of them fails (a transport error, a server
    error), the call fails after its operation was performed: the same request again right
    after is that operation (answered from the journal, the redirect followed again), not a
    new one under a new key, which the server would perform a second time."""

    __slots__ = ("op", "plan")

    def __init__(self, the_plan: Plan, op: Operation) -> None:
        self.plan, self.op = the_plan, op

    def watching(
        self, flow: Generator[Step, Any, httpx.Response], retry_statuses: frozenset[int]
    ) -> Generator[Step, Any, httpx.Response]:
        """`flow`, a hop of the call: its failure (an error, or an answer a caller or an SDK
        retries: a server error, 408, 409, 429, ...) is the operation's call's."""
        try:
            response = yield from flow
        except BaseException:
            self.failed()
            raise
        status = response.status_code
        hint = retry_hint(response.headers)
        if status >= 400 and (
            hint or (hint is None and (status >= 500 or status in retry_statuses))
        ):
            self.failed()  # an answer a caller or an SDK retries (a success is final)
        else:  # its body is read after: a read that fails is the call's too
            encoded = "content-encoding" in response.headers
            stream: Any = _hop_class(family(response))(response.stream, self, encoded)
            response.stream = stream
        return response

    def failed(self) -> None:
        self.plan.unfailed(self.op)


class _HopStream:
    """The body of a redirect's hop (`FollowUp`) as httpx reads it: a read that fails (the
    connection lost mid-body, a read timeout) fails the operation's call; so does a close
    before its end of a content-encoded body that was being read (its decoding failed,
    above this stream). A close before the end otherwise is a caller that had enough (it
    streams the answer), not a failure."""

    def __init__(self, inner: Any, follow_up: FollowUp, encoded: bool) -> None:
        self._inner, self._follow_up = inner, follow_up
        self._encoded = encoded
        self._started = False
        self._ended = False

    def __iter__(self) -> Iterator[bytes]:
        self._started = True
        try:
            yield from self._inner
        except Exception:
            self._fail()
            raise
        self._ended = True

    def _fail(self) -> None:
        if not self._ended:
            self._ended = True
            self._follow_up.failed()

    def _closed_early(self) -> None:
        if self._encoded and self._started:
            self._fail()

    def close(self) -> None:
        self._closed_early()
        if hasattr(self._inner, "close"):
            self._inner.close()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._started = True
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception:
            self._fail()
            raise
        self._ended = True

    async def aclose(self) -> None:
        self._closed_early()
        if hasattr(self._inner, "aclose"):
            await self._inner.aclose()


@functools.cache
def _hop_class(fam: ModuleType) -> type[_HopStream]:
    return type("HopStream", (_HopStream, fam.SyncByteStream, fam.AsyncByteStream), {})


def follow_ups(the_plan: Plan, op: Operation, request: httpx.Request, status: int) -> None:
    """If a completed operation's answer (sent or replayed) is a redirect that httpx follows
    with a GET, watch its hops (`FollowUp`)."""
    if status in (301, 302, 303):
        request.extensions[FOLLOW_UP_EXTENSION] = FollowUp(the_plan, op)


def _another_request(scope: _Scope | None, place: object, mark: _Unfinished | None) -> None:
    """Another request of `place` than its last unfinished operation's (`mark`): that one is
    no longer "right before", and a resend of it is a new operation; set aside, if it was
    refused before any effect (`_Unfinished.refused`)."""
    if mark is not None and mark.refused and not mark.done and mark.place == place:
        mark.aside_until = time.monotonic() + _ASIDE_SECONDS
        if scope is not None:
            scope.set_aside(mark)
        else:
            _aside.set(mark)
    if scope is not None:
        scope.clear(place)
    else:
        _unfinished.set(None)


def plain_flow(
    request: httpx.Request,
    policy: RetryPolicy,
    clock: Callable[[], float],
    wall_clock: Callable[[], float],
    rng: random.Random | None = None,
    secret: Callable[[str], bool] = DEFAULT_SECRETS,
    budget: RetryBudget | None = None,
) -> Generator[Step, Any, httpx.Response]:
    """An unjournaled request (GET, PUT, DELETE, ...): retried on transient failures only.

    A body that cannot be sent twice (a generator) gets a single attempt. When the attempts
    run out on a retryable status, the last response is returned, as plain httpx would.
    """
    if not isinstance(request.stream, family(request).ByteStream):
        policy = policy.replace(max_attempts=1)

    def attempt() -> Generator[Step, Any, Outcome]:
        try:
            received: Received = yield Send(request, read=False)
        except Exception as exc:
            if error_kind(exc) is None:
                raise
            return classify_error(exc)
        return classify_response(
            received.response, None, keyed=False, policy=policy, now=wall_clock()
        )

    def on_sleep(outcome: Outcome, seconds: float) -> Generator[Step, Any, None]:
        if outcome.response is not None:
            # closed by the shell (an async transport's stream has no sync close: it raised
            # RuntimeError instead of retrying), unread: its body may be long, or endless
            yield Close(outcome.response)
        url = stored_url(request.url, secret)  # for logs: never a credential
        logger.info("%s %s: %s, retrying in %.2fs", request.method, url, outcome.reason, seconds)

    def on_denied(outcome: Outcome, reason: str) -> Generator[Step, Any, None]:
        url = stored_url(request.url, secret)
        logger.warning("%s %s: %s, not retried: %s", request.method, url, outcome.reason, reason)
        yield from ()

    result = yield from _retry_loop(policy, clock, rng, attempt, on_sleep, budget, on_denied)
    last = result.last if isinstance(result, Exhausted) else result
    if last.response is not None:
        return last.response
    assert last.error is not None
    raise last.error

"""`IdempotentTransport` and `AsyncIdempotentTransport`: thin loops over `_core`'s steps.

The two classes differ only in how a step is carried out: the sync one carries journal steps
out directly (`perform`), and calls the wrapped transport and `time.sleep`; the async one
performs journal steps in a worker thread (so an fsync never blocks the event loop) and awaits
the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import random
import sys
import threading
import time
import weakref
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Sequence,
)
from typing import Any, Literal, TypeVar, cast

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx

from ._budget import OWN_BUDGET, BudgetOption, own_budget
from ._config import testing_mode
from ._core import (
    FOLLOW_UP_EXTENSION,
    JOURNAL_STEPS,
    Close,
    Emit,
    Event,
    Finish,
    FollowUp,
    Read,
    Received,
    Register,
    Send,
    Settings,
    Sleep,
    Step,
    Unsent,
    aperform,
    is_unjournaled,
    keyed_flow,
    logger,
    perform,
    plain_flow,
    plan,
    request_policy,
)
from ._errors import InvalidOperationError, JournalError
from ._family import AsyncTransport, SyncTransport, family
from ._policy import RetryPolicy
from ._records import Decision, Registration
from .journal import AsyncJournalSteps, JournalBackend, open_journal

__all__ = ["AsyncIdempotentTransport", "IdempotentTransport"]

DEFAULT_METHODS = ("POST", "PATCH")
DEFAULT_MAX_BODY_SIZE = 10 * 1024 * 1024

#: a journal, or where one is: a path, a `postgresql://` URL, `None` (`$IDEMCLIENT_JOURNAL`,
#: else the default SQLite file)
JournalLike = JournalBackend | str | os.PathLike[str] | None


def _too_large(limit: int) -> InvalidOperationError:
    return InvalidOperationError(
        f"request body is larger than max_body_size ({limit} bytes): it cannot be journaled "
        "for replay; nothing was sent"
    )


def _consumed() -> InvalidOperationError:
    return InvalidOperationError(
        "request body was already consumed and cannot be replayed; nothing was sent"
    )


class _Body:
    """A request body gathered chunk by chunk, refused as soon as it passes the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise _too_large(self.limit)
        self.parts.append(chunk)


def read_body(request: httpx.Request, limit: int) -> bytes:
    """The whole request body, read once (a generator body can be read only once)."""
    if not isinstance(request.stream, Iterable):
        raise InvalidOperationError("an async request body cannot be sent by a sync transport")
    body = _Body(limit)
    fam = family(request)
    try:
        for chunk in request.stream:
            body.add(chunk)
    except (fam.StreamConsumed, fam.StreamClosed) as exc:
        raise _consumed() from exc
    return b"".join(body.parts)


async def aread_body(request: httpx.Request, limit: int) -> bytes:
    """The whole request body, read once, from an async or in-memory stream."""
    stream = request.stream
    if not isinstance(stream, AsyncIterable):
        return read_body(request, limit)
    body = _Body(limit)
    fam = family(request)
    try:
        async for chunk in stream:
            body.add(chunk)
    except (fam.StreamConsumed, fam.StreamClosed) as exc:
        raise _consumed() from exc
    return b"".join(body.parts)


def _read_whole(response: httpx.Response) -> Received:
    """Read the body as the wire carried it (still content-encoded): that is what is journaled.

    Reads the transport's stream itself, as `iter_raw()` would (also when a transport, such
    as `httpx.MockTransport`, hands back a response already read in memory), gives the
    connection back, and lets the response stream those bytes to the client.
    """
    stream = response.stream
    if not isinstance(stream, Iterable):
        raise TypeError("a sync transport returned an async response stream")
    fam = family(response)
    try:
        raw = b"".join(stream)
    finally:
        if isinstance(stream, fam.SyncByteStream):
            stream.close()
    response.stream = fam.ByteStream(raw)
    return Received(response, raw)


async def _aread_whole(response: httpx.Response) -> Received:
    stream = response.stream
    if not isinstance(stream, AsyncIterable):
        return _read_whole(response)
    fam = family(response)
    try:
        raw = b"".join([chunk async for chunk in stream])
    finally:
        if isinstance(stream, fam.AsyncByteStream):
            await stream.aclose()
    response.stream = fam.ByteStream(raw)
    return Received(response, raw)


def open_journal_like(journal: JournalLike) -> tuple[JournalBackend, bool]:
    """The journal to write to, and whether it was opened here (then it is the transport's
    or client's to close) rather than given."""
    if journal is None or isinstance(journal, (str, os.PathLike)):
        return open_journal(journal), True
    return journal, False


class _Base:
    """What both shells share: options, the journal, and the choice of flow."""

    def __init__(
        self,
        *,
        journal: JournalLike,
        retry: RetryPolicy | None,
        methods: Sequence[str],
        key_header: str,
        key_style: Literal["bare", "structured"],
        secret_headers: Sequence[str],
        keep_headers: Sequence[str],
        max_body_size: int,
        clock: Callable[[], float] | None,
        rng: random.Random | None,
        hooks: Sequence[Callable[[Event], object]],
        hand_back: bool,
        empty_replays: bool,
        retry_budget: BudgetOption,
    ) -> None:
        _shells.add(self)
        self._hooks = tuple(hooks)
        self.hand_back = hand_back
        self.empty_replays = empty_replays
        self.settings = Settings.build(
            retry=retry,
            methods=methods,
            key_header=key_header,
            key_style=key_style,
            secret_headers=secret_headers,
            keep_headers=keep_headers,
            max_body_size=max_body_size,
        )
        self._journal, self._owns_journal = open_journal_like(journal)
        #: whether closing this transport writes (or closes) the journal; not for the
        #: mounted transports `wrap()` makes: the client's own transport, closed first,
        #: does it for all of them (once: one failure, one wait, one error)
        self._closes_journal = True
        self._clock = clock or time.monotonic
        self._wall_clock = time.time
        self._rng = rng
        self.retry_budget = own_budget(retry_budget, self._clock)

    @property
    def journal(self) -> JournalBackend:
        """The journal this transport writes to."""
        return self._journal

    @property
    def key_header(self) -> str:
        return self.settings.key_header

    def _close_journal(self) -> None:
        """A closed client leaves nothing unwritten, whoever owns the journal: its answers
        are written now (a caller's journal stays open for the caller)."""
        if not self._closes_journal:
            return
        if self._owns_journal:
            self._journal.close()
        elif not self._journal.closed:
            self._journal.flush()

    def _emit(self, event: Event) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                logger.exception("idemclient hook %r failed on %s", hook, event.kind)

    def _keyed(self, request: httpx.Request) -> RetryPolicy | None:
        """The policy of a journaled request (its method is, and it is not `unjournaled()`),
        else `None`. Checks the request's extensions (`TypeError`) before anything is read or
        sent."""
        if is_unjournaled(request):
            return None
        policy = request_policy(request, self.settings.policy)  # a wrong type fails here
        if request.method.upper() not in self.settings.methods:
            return None
        return testing_mode().apply(policy)

    def _keyed_flow(
        self, request: httpx.Request, body: bytes, place: object, policy: RetryPolicy
    ) -> Generator[Step, Any, httpx.Response]:
        return keyed_flow(
            plan(request, body, self.settings, place),
            self._journal,
            policy,
            self._clock,
            self._wall_clock,
            self._rng,
            observed=bool(self._hooks),
            hand_back=self.hand_back,
            empty_replays=self.empty_replays,
            emit=self._emit if self._hooks else None,
            budget=self.retry_budget,
        )

    def _plain_flow(self, request: httpx.Request) -> Generator[Step, Any, httpx.Response]:
        if is_unjournaled(request):  # sent once, on purpose: no retry rules apply
            policy = self.settings.policy.replace(max_attempts=1)
        else:
            policy = testing_mode().apply(request_policy(request, self.settings.policy))
        flow = plain_flow(
            request, policy, self._clock, self._wall_clock, self._rng, self.settings.secrets,
            self.retry_budget,
        )  # fmt: skip
        follow_up = request.extensions.get(FOLLOW_UP_EXTENSION)
        if isinstance(follow_up, FollowUp):  # a hop of a completed operation's redirect
            return follow_up.watching(flow, policy.retry_statuses)
        return flow


T = TypeVar("T")


class _JournalThread:
    """The thread that makes one journal's blocking calls for the async transports: each call
    is queued with the future of its loop, made in order, and its outcome handed back on
    the loop. Cheaper than a trip through the loop's executor (no pool bookkeeping, no
    wrapping of one future in another), and the journal's connection stays warm on it. A
    journal without native async I/O writes one transaction at a time anyway (SQLite: one
    writer per file), so one thread loses nothing to a pool of them.

    The thread is started by the first call, and ends after `IDLE_SECONDS` without one (the
    next call starts another); in a child process after a fork, the first call starts the
    child's own. It is a daemon: a process that exits in the middle of a journal call is a
    crash like any other, which the journal is built to survive.
    """

    IDLE_SECONDS = 10.0

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """No thread, nothing queued: new, and in a child process after a fork (the parent's
        queued calls are the parent's, served by its thread)."""
        # each call: [fn (None once withdrawn), its loop, its future]
        self._calls: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False  # a thread takes calls

    def submit(
        self,
        fn: Callable[[], T],
        tie: Callable[[T, asyncio.AbstractEventLoop], object] | None = None,
    ) -> asyncio.Future[T]:
        """Queue `fn`; the future of the running loop that gets its result or exception.
        `tie(result, loop)` is called in the thread before the result is handed back: a
        lease the call took is tied to the loop of the task that asked (`Holds.tie`), so
        that a loop closed before its task takes the result (or stopped, then closed) takes
        the lease with it, instead of leaving it renewed for nobody."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        call: list[Any] = [fn, loop, future, tie]
        self._calls.put(call)  # first: a thread ending now sees it (`_serve`)
        with self._lock:
            if not self._running:
                thread = threading.Thread(
                    target=self._serve, name="idemclient-journal-async", daemon=True
                )
                try:
                    thread.start()  # (RuntimeError when no thread can be started)
                except BaseException:
                    call[0] = None  # withdrawn: never made; the caller gets the error
                    raise
                self._running = True
        return future

    def _serve(self) -> None:
        calls = self._calls
        while True:
            try:
                fn, loop, future, tie = calls.get(timeout=self.IDLE_SECONDS)
                if fn is None:  # withdrawn
                    continue
            except queue.Empty:
                with self._lock:  # a call queued from now on starts the next thread
                    if calls.empty():
                        self._running = False
                        return
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, whatever it was
                outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
            else:
                outcome = (future.set_result, result)
                if tie is not None:
                    try:
                        tie(result, loop)
                    except Exception:
                        logger.exception("idemclient: could not tie a lease to its loop")
            del fn, tie
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                loop.call_soon_threadsafe(_settle, future, *outcome)
            del loop, future, outcome


def _settle(future: asyncio.Future[Any], how: Callable[[Any], None], value: Any) -> None:
    if not future.done():
        how(value)


#: the thread of each journal in use by an async transport (a journal dropped: its entry goes)
_journal_threads: weakref.WeakKeyDictionary[object, _JournalThread] = weakref.WeakKeyDictionary()
_journal_threads_lock = threading.Lock()


#: every idemclient transport of this process (a forked child drops their connections)
_shells: weakref.WeakSet[_Base] = weakref.WeakSet()
#: the parent's connections a forked child dropped: kept, never closed nor collected (closing
#: one could end the parent's connection: an HTTP/2 goodbye, an async transport's loop)
_inherited_connections: list[object] = []


def _after_fork_in_child() -> None:
    global _journal_threads_lock
    _journal_threads_lock = threading.Lock()
    for thread in list(_journal_threads.values()):
        thread._reset()
    for shell in list(_shells):
        _forget_connections(getattr(shell, "_transport", None))


def _forget_connections(transport: object) -> None:
    """In a forked child: the pooled connections of an HTTP transport (httpx's or httpx2's
    `HTTPTransport`, sync or async) are the parent's sockets. Were both to use one, their
    requests' bytes would interleave and one would read the other's answer: journaled as its
    own, and replayed from then on. The child drops them and opens its own; the pool's lock,
    which a thread of the parent may have held at the fork, is a new one."""
    pool: Any = getattr(transport, "_pool", None)
    connections = getattr(pool, "_connections", None)
    if not isinstance(connections, list) or not isinstance(getattr(pool, "_requests", None), list):
        return  # not a pool of httpcore's shape: nothing known to drop
    _inherited_connections.extend(connections)
    pool._connections = []
    pool._requests = []
    lock = getattr(pool, "_optional_thread_lock", None)
    if lock is not None:
        pool._optional_thread_lock = type(lock)()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _journal_thread(journal: object) -> _JournalThread:
    """The journal's thread: one per journal object, or, for one that cannot be hashed or
    weakly referenced (a caller's own backend may be neither), one for each caller."""
    try:
        with _journal_threads_lock:
            found = _journal_threads.get(journal)
            if found is None:
                found = _journal_threads[journal] = _JournalThread()
            return found
    except TypeError:
        return _JournalThread()


async def _see_through(
    fn: Callable[[], T],
    thread: _JournalThread | None = None,
    tie: Callable[[T, asyncio.AbstractEventLoop], object] | None = None,
) -> tuple[T, BaseException | None]:
    """Run a blocking journal call in a worker thread to its end, whatever cancels the caller
    meanwhile: its result, and the cancellation that arrived (for the caller to raise once
    the journal is in a known state). A journal write, once begun, is seen through.

    anyio's shield stops anyio's and trio's cancel scopes, but not asyncio's own
    `task.cancel()` (`asyncio.wait_for`, `asyncio.timeout`): under asyncio the call runs on
    the journal's `thread` (else in the loop's executor) and is awaited through
    `asyncio.shield`, again after each cancellation. Raises what `fn` raised.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): anyio's shield is enough
        with anyio.CancelScope(shield=True):
            return await anyio.to_thread.run_sync(fn), None
    if thread is not None:
        return await _shielded(thread.submit(fn, tie))
    return await _shielded(loop.run_in_executor(None, fn))


async def _see_through_async(
    call: Callable[[], Coroutine[Any, Any, T]],
) -> tuple[T, BaseException | None]:
    """`_see_through` for a journal call of a backend with native async I/O, on asyncio: it
    runs as a task of its own, which a cancellation of the caller does not reach."""
    return await _shielded(asyncio.get_running_loop().create_task(call()))


async def _shielded(future: asyncio.Future[T]) -> tuple[T, BaseException | None]:
    """Await `future` to its end through every cancellation of the caller: its result, and
    the first cancellation that arrived."""
    cancelled: BaseException | None = None
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError as exc:
                if future.cancelled():  # the call itself was cancelled (executor shut down)
                    raise
                cancelled = cancelled or exc
            else:
                return result, cancelled
    raise AssertionError("unreachable")  # for mypy: the loop above returns or raises


def _task_place() -> object:
    """Where an async request is sent: a weak reference to its asyncio task (equal to
    another only while that task lives: a task started after it ended, which may get its
    `id()`, is another place), else anyio's id of the task (trio)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio (its tasks, too, are told apart by weak reference)
        trio = sys.modules.get("trio")
        with contextlib.suppress(Exception):
            return weakref.ref(trio.lowlevel.current_task())  # type: ignore[union-attr]
        return anyio.get_current_task().id
    return weakref.ref(task) if task is not None else anyio.get_current_task().id


def _thread_place() -> object:
    """Where a sync request is sent: a weak reference to its thread (a thread started after
    it ended may get its ident: another place)."""
    return weakref.ref(threading.current_thread())


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _tie_to(journal: object, result: object, loop: asyncio.AbstractEventLoop) -> None:
    """Tie the lease that `result`, a registration or claim for a task of `loop`, took (if
    it took one) to that loop (`_JournalThread.submit`)."""
    if isinstance(result, Registration) and result.decision is Decision.SEND:
        tie = getattr(journal, "_tie_to_loop", None)  # (a backend that renews leases)
        if tie is not None:
            tie(result.operation.key, result.lease_version, loop)


def _tie_all(journal: object, results: list[Any], loop: asyncio.AbstractEventLoop) -> None:
    for result in results:
        _tie_to(journal, result, loop)


class _Slot:
    """A task's registration waiting for its batch: its step, then its result."""

    __slots__ = ("arrived", "step", "value", "wake")

    def __init__(self, step: Register) -> None:
        self.step = step
        self.arrived = time.monotonic()
        self.value: Registration | BaseException | None = None
        self.wake = anyio.Event()


class _Line:
    """The registrations of one event loop's tasks waiting for their batch, and whether one
    of them is leading a batch."""

    __slots__ = ("busy", "waiting")

    def __init__(self) -> None:
        self.waiting: list[_Slot] = []
        self.busy = False


class _AsyncRegistrar:
    """Registrations of concurrent tasks go to the journal together: one trip to a worker
    thread (or, on PostgreSQL, one statement on the loop) and one commit for all that are
    waiting, instead of one each.

    A task's cancellation affects that task only: the batch it leads is committed and
    answered all the same, and the next waiting task takes the lead. A task cancelled while
    its registration is being committed waits for it (milliseconds) and gets it, with the
    cancellation, so that it can give the claim back before raising.

    Each event loop has its own line: a batch holds the tasks of one loop (its leases are
    tied to that loop, its tasks woken on it), and a loop closed or dropped in the middle of
    a batch leaves the transport's next loop (the next `asyncio.run()`) a line of its own.
    """

    def __init__(self, journal: JournalBackend) -> None:
        self._journal = journal
        #: with native async I/O (`AsyncJournalSteps`: a slow check, made once)
        self.native = isinstance(journal, AsyncJournalSteps)
        #: where its blocking calls are made otherwise
        self.thread = _journal_thread(journal)
        self._lines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Line] = (
            weakref.WeakKeyDictionary()
        )
        self._other = _Line()  # not asyncio (trio), or a loop that takes no weak reference

    def _line(self) -> _Line:
        """The line of the running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._other
        try:
            line = self._lines.get(loop)
            if line is None:
                line = self._lines[loop] = _Line()
        except TypeError:
            return self._other
        return line

    async def register(self, step: Register) -> tuple[Registration, BaseException | None]:
        """The registration, and the cancellation that arrived meanwhile (or `None`)."""
        line = self._line()
        slot = _Slot(step)
        line.waiting.append(slot)
        cancelled: BaseException | None = None
        while slot.value is None:
            if not line.busy:
                cancelled = await self._lead(line) or cancelled
                continue
            slot.wake = anyio.Event()
            try:
                with anyio.CancelScope(shield=True):
                    await slot.wake.wait()
            except asyncio.CancelledError as exc:
                if slot in line.waiting:  # not in a batch yet: nothing was registered
                    line.waiting.remove(slot)
                    _hand_over(line)
                    raise
                cancelled = cancelled or exc  # being committed: see it through
        if isinstance(slot.value, BaseException):
            raise slot.value
        return slot.value, cancelled

    async def _lead(self, line: _Line) -> BaseException | None:
        """Commit the waiting registrations, batch after batch, until none waits (or this task
        is cancelled: then the next waiting task leads). The cancellation, if any."""
        line.busy = True
        cancelled: BaseException | None = None
        try:
            while line.waiting and cancelled is None:
                batch, line.waiting = line.waiting, []
                try:
                    results, cancelled = await self._commit(batch)
                except BaseException as exc:  # register_many itself failed: tell everyone
                    for waiting in batch:
                        waiting.value = exc
                        waiting.wake.set()
                    continue
                for waiting, result in zip(batch, results, strict=True):
                    waiting.value = result
                    waiting.wake.set()
        finally:
            line.busy = False
            _hand_over(line)
        return cancelled

    async def _commit(
        self, batch: list[_Slot]
    ) -> tuple[list[Registration | JournalError], BaseException | None]:
        """One batch (each request with the moment its task asked), seen through: on the
        loop for a journal with native async I/O under asyncio, else in a worker thread
        (whose results are tied to this loop: `_JournalThread.submit`)."""
        journal = self._journal
        requests = [(s.step.record, s.step.owner, s.step.lease_seconds) for s in batch]
        arrived = [s.arrived for s in batch]
        if self.native:
            native = cast(AsyncJournalSteps, journal)
            if _on_asyncio():
                together = functools.partial(native.aregister_many, requests, arrived=arrived)
                return await _see_through_async(together)
            call = functools.partial(native.register_many, requests, arrived=arrived)
        else:
            call = functools.partial(journal.register_many, requests)
        return await _see_through(call, self.thread, functools.partial(_tie_all, journal))


def _hand_over(line: _Line) -> None:
    """Wake a waiting task to lead, if nobody leads."""
    if not line.busy and line.waiting:
        line.waiting[0].wake.set()


class IdempotentTransport(_Base, httpx.BaseTransport):
    """An httpx transport that makes POST and PATCH safe to retry, across crashes.

    Each journaled request gets an Idempotency-Key (a UUIDv4, or the caller's own header), is
    written to the journal with a durable commit *before* it is sent, and is retried with the
    same key and the same body bytes. Other methods are retried on transient failures only.

    Args:
        transport: the transport to wrap; `None` means the `HTTPTransport()` of the family of
            the requests it gets (`httpx`, or `httpx2` under an httpx2 client).
        journal: a `Journal`, a path, or `None` for the default journal.
        retry: the `RetryPolicy`; `None` means `RetryPolicy()`.
        methods: the methods that are journaled and get a key.
        key_header: the header carrying the key.
        key_style: `"bare"` sends the key as is; `"structured"` quotes it as a Structured Field
            string (`"..."`), the IETF draft's form, for strict servers.
        secret_headers: more header (and query parameter) names never to write to the
            journal. Without them, every name that names a credential is left out: one with a
            word containing auth, secret, password, credential, signature, session, cookie or
            jwt, or ending in key or token (`Authorization`, `PRIVATE-TOKEN`, `api-key`,
            `X-Amz-Security-Token`, `?api_key=`, ...), in requests, URLs and responses.
        keep_headers: names to journal although the pattern above would leave them out
            (`("X-Session-Locale",)`); not Authorization, Proxy-Authorization, Cookie,
            Set-Cookie, X-Api-Key, nor a name in `secret_headers`.
        max_body_size: the largest request body that is journaled; a larger one is refused
            with `InvalidOperationError` before anything is sent.
        sleep: called with the seconds to wait between attempts (tests pass a recorder).
        clock: monotonic seconds, for the policy's deadline and the transport's own budget.
        hooks: callables given each `Event` of a journaled operation (registered, sending,
            answered, retrying, retry_denied, recording, completed, conflict, gave_up,
            replayed): the place to count retries or trace attempts, since retries inside a
            transport are hidden from httpx's own event hooks.
        hand_back: under an SDK (set by `wrap()` for the openai, anthropic and stripe
            clients), answer as plain httpx would instead of raising idemclient's errors, so
            that the SDK raises the types its users catch: when the attempts run out, the
            last response (a 5xx, a 429) is returned and the last transport error raised as
            itself; a 422 is returned (recorded as `conflict`, and replayed to a rerun). The
            operation stays pending under its key either way, and the SDK's own retry of
            the same request continues it.
        empty_replays: replay an operation whose answer was too large to keep
            (`Journal(max_response_body=...)`) with its status and headers and an empty body,
            instead of raising `ResponseNotKeptError`.
        retry_budget: a `RetryBudget` bounding the retries of this transport (share one
            between transports to bound them together); left out, the transport has one of
            its own (retries up to 20% of first attempts, plus 10 a second, over 10 s, on
            `clock`); `None` for no budget. A retry the budget refuses is not made.

    Example:
        >>> client = httpx.Client(transport=IdempotentTransport(journal="billing.sqlite3"))
        >>> client.post("https://api.example/charges", json={"amount": 500})
    """

    def __init__(
        self,
        transport: SyncTransport | None = None,
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
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        hooks: Sequence[Callable[[Event], object]] = (),
        hand_back: bool = False,
        empty_replays: bool = False,
        retry_budget: BudgetOption = OWN_BUDGET,
    ) -> None:
        super().__init__(
            journal=journal,
            retry=retry,
            methods=methods,
            key_header=key_header,
            key_style=key_style,
            secret_headers=secret_headers,
            keep_headers=keep_headers,
            max_body_size=max_body_size,
            clock=clock,
            rng=rng,
            hooks=hooks,
            hand_back=hand_back,
            empty_replays=empty_replays,
            retry_budget=retry_budget,
        )
        # None: made at the first request, in its family (httpx or httpx2's HTTPTransport)
        self._transport = transport
        self._transport_lock = threading.Lock()
        self._sleep = sleep or time.sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if (policy := self._keyed(request)) is not None:
            body = read_body(request, self.settings.max_body_size)
            return self._drive(self._keyed_flow(request, body, _thread_place(), policy))
        return self._drive(self._plain_flow(request))

    def _do(self, step: Step) -> Any:
        if isinstance(step, Emit):
            return self._emit(step.event)
        if isinstance(step, JOURNAL_STEPS):
            return perform(step, self._journal)
        if isinstance(step, Send):
            response = self._inner(step.request).handle_request(step.request)
            if not step.read:
                return Received(response, None)
            return _read_whole(response)
        if isinstance(step, Read):
            return _read_whole(step.response)
        if isinstance(step, Close):
            step.response.close()
            return None
        if not testing_mode().on:
            self._sleep(step.seconds)
        return None

    def _drive(self, flow: Generator[Step, Any, httpx.Response]) -> httpx.Response:
        try:
            step = next(flow)
            while True:
                try:
                    result = self._do(step)
                except BaseException as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            response: httpx.Response = stop.value
            return response
        finally:
            flow.close()

    def _inner(self, request: httpx.Request) -> SyncTransport:
        transport = self._transport
        if transport is None:
            with self._transport_lock:
                if self._transport is None:
                    self._transport = family(request).HTTPTransport()
                transport = self._transport
        return transport

    def close(self) -> None:
        """Close the wrapped transport; write what the journal holds for this transport's
        operations, and close the journal if this transport opened it.

        Raises:
            JournalError: the journal could not write them (those operations stay pending:
                a resume gets the server's replay). Closed while an exception is on its
                way out (the end of a `with` block that raised, a `finally`, an SDK's own
                `close()` there), the error is logged instead, not raised over that one."""
        leaving = sys.exc_info()[1]
        try:
            if self._transport is not None:
                self._transport.close()
            self._close_journal()
        except JournalError as error:
            if leaving is None:
                raise
            _closing_failed(error, leaving)


class AsyncIdempotentTransport(_Base, httpx.AsyncBaseTransport):
    """The async twin of `IdempotentTransport`, over an `httpx.AsyncBaseTransport`.

    Journal calls run on the journal's own thread (under trio, in `anyio.to_thread`'s), or,
    for a journal with native async I/O (`PostgresJournal`) under asyncio, on the event loop
    in a task of their own; either way shielded from cancellation so that a journal write is
    never left half done, and never on the event loop's thread for a journal without.
    Same arguments as `IdempotentTransport`, with `transport=None` meaning the requests'
    family's `AsyncHTTPTransport()` and an async `sleep`.

    Example:
        >>> client = httpx.AsyncClient(transport=AsyncIdempotentTransport())
        >>> await client.post("https://api.example/orders", json={"cart": "c1"})
    """

    def __init__(
        self,
        transport: AsyncTransport | None = None,
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
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        hooks: Sequence[Callable[[Event], object]] = (),
        hand_back: bool = False,
        empty_replays: bool = False,
        retry_budget: BudgetOption = OWN_BUDGET,
    ) -> None:
        super().__init__(
            journal=journal,
            retry=retry,
            methods=methods,
            key_header=key_header,
            key_style=key_style,
            secret_headers=secret_headers,
            keep_headers=keep_headers,
            max_body_size=max_body_size,
            clock=clock,
            rng=rng,
            hooks=hooks,
            hand_back=hand_back,
            empty_replays=empty_replays,
            retry_budget=retry_budget,
        )
        # None: made at the first request, in its family (httpx or httpx2's transport)
        self._transport = transport
        self._sleep = sleep or anyio.sleep
        self._registrar = _AsyncRegistrar(self._journal)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (policy := self._keyed(request)) is not None:
            body = await aread_body(request, self.settings.max_body_size)
            return await self._drive(self._keyed_flow(request, body, _task_place(), policy))
        return await self._drive(self._plain_flow(request))

    async def _do(self, step: Step) -> tuple[Any, BaseException | None]:
        """Carry out a step: its result, and a cancellation that arrived while a journal call
        was seen through (the drive raises it at the next send or sleep)."""
        if isinstance(step, Emit):
            self._emit(step.event)
            return None, None
        if isinstance(step, Finish):  # in memory, no I/O: on the event loop
            return perform(step, self._journal), None
        if isinstance(step, Register):
            return await self._registrar.register(step)
        if isinstance(step, JOURNAL_STEPS):  # the journal's store: seen through
            journal = self._journal
            if self._registrar.native and _on_asyncio():  # on the loop
                native = cast(AsyncJournalSteps, journal)
                return await _see_through_async(functools.partial(aperform, step, native))
            call = functools.partial(perform, step, journal)
            tie = functools.partial(_tie_to, journal)
            return await _see_through(call, self._registrar.thread, tie)  # off it
        if isinstance(step, Send):
            if self._transport is None:
                self._transport = family(step.request).AsyncHTTPTransport()
            response = await self._transport.handle_async_request(step.request)
            if not step.read:
                return Received(response, None), None
            return await _aread_whole(response), None
        if isinstance(step, Read):
            return await _aread_whole(step.response), None
        if isinstance(step, Close):
            await step.response.aclose()
            return None, None
        if not testing_mode().on:
            await self._sleep(step.seconds)
        return None, None

    async def _drive(self, flow: Generator[Step, Any, httpx.Response]) -> httpx.Response:
        # A cancellation that arrived during a journal call: the call was seen through, and
        # the cancellation is raised at the next send (as `Unsent`: nothing went out, so the
        # flow gives its claim back) or sleep, and at the end in any case.
        cancelled: BaseException | None = None
        try:
            step = next(flow)
            while True:
                try:
                    if cancelled is not None and isinstance(step, Send):
                        raise Unsent(cancelled)
                    if isinstance(step, Send):
                        # A cancel scope of anyio or trio that fired while a journal call was
                        # shielded is delivered at the next checkpoint: here, before a byte is
                        # sent (not inside the send, where it would look "maybe sent").
                        try:
                            await anyio.lowlevel.checkpoint_if_cancelled()
                        except BaseException as exc:
                            raise Unsent(exc) from None
                    if cancelled is not None and isinstance(step, Sleep):
                        raise cancelled
                    result, arrived = await self._do(step)
                    cancelled = cancelled or arrived
                except BaseException as exc:
                    step = flow.throw(exc)
                else:
                    step = flow.send(result)
        except StopIteration as stop:
            response: httpx.Response = stop.value
            if cancelled is not None:
                await response.aclose()
                raise cancelled from None
            return response
        except BaseException as exc:
            if cancelled is not None and exc is not cancelled:
                raise cancelled from exc
            raise
        finally:
            flow.close()

    async def aclose(self) -> None:
        """`IdempotentTransport.close()`, awaited (the journal written off the loop)."""
        leaving = sys.exc_info()[1]
        try:
            if self._transport is not None:
                await self._transport.aclose()
            await anyio.to_thread.run_sync(self._close_journal)
        except JournalError as error:
            if leaving is None:
                raise
            _closing_failed(error, leaving)


def _closing_failed(error: JournalError, leaving: BaseException) -> None:
    """A client closed as `leaving` goes out of its block could not write its journal: that
    exception says what went wrong first, and goes on; this is logged. The operations whose
    answers were not written stay pending: a resume resends their keys, and the server
    replays."""
    logger.error(
        "%s (while the client closed on %s, which is raised; the operations concerned stay "
        "pending: a resume gets the server's replay)",
        error, type(leaving).__name__,
    )  # fmt: skip

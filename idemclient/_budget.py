"""`RetryBudget`: retries bounded to a share of first attempts, against retry storms.

When a server is down, every client that retries five times sends it five times its usual
load, just when it can least take it. A budget bounds the retries of all the operations that
share it (a transport, a client, or several, given one `RetryBudget`) to a share of their
first attempts over a sliding window, plus a small floor so that a quiet client can still
retry. The model is Finagle's `RetryBudget` (`ttl`, `minRetriesPerSec`, `percentCanRetry`);
botocore's retry quota and gRPC's retry throttling bound retries for the same reason.

Pure accounting with the standard library: no I/O, no sleeping. A lock held for a few
arithmetic operations makes it safe to share between threads, and between event loops
without blocking them.
"""

from __future__ import annotations

import enum
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Literal

__all__ = [
    "DEFAULT_BUDGET_RATIO",
    "DEFAULT_BUDGET_WINDOW",
    "DEFAULT_MIN_RETRIES_PER_SECOND",
    "RetryBudget",
]

#: Retries may add this share to the first attempts (Finagle's `percentCanRetry`, 20%).
DEFAULT_BUDGET_RATIO = 0.2
#: Retries always allowed, whatever the first attempts (Finagle's `minRetriesPerSec`).
DEFAULT_MIN_RETRIES_PER_SECOND = 10.0
#: Seconds over which first attempts and retries are counted (Finagle's `ttl`).
DEFAULT_BUDGET_WINDOW = 10.0
#: The window is kept as this many slices: a count leaves it one slice at a time.
_SLICES = 10


class RetryBudget:
    """A budget of retries shared by every operation that uses it, against retry storms.

    Each first attempt deposits `ratio` of a retry; each retry withdraws one. Over the last
    `window` seconds, retries may number at most `ratio` times the first attempts, plus
    `min_per_second * window` (the floor, which lets a client that sends little still
    retry). When the budget is spent, the retry is not made: a journaled operation stays
    pending (`RetriesExhaustedError`; a resume finishes it later), an idempotent request
    returns its last answer. First attempts are never refused.

    The defaults are Finagle's: 20% more requests at most when everything fails, and 10
    retries a second (100 per window) that are always allowed. A server that is down then
    gets at most 1.2 times its usual load from a busy client, instead of 5 times
    (`RetryPolicy.max_attempts`), while a client sending one request a minute keeps
    retrying as if there were no budget.

    Give one budget to several transports or clients (`retry_budget=`) to bound their
    retries together; without one, each transport (and each client, for all its mounted
    transports) has a budget of its own with these defaults. Thread-safe, and usable from
    async code: its lock is held for a few arithmetic operations, never across I/O.

    Args:
        ratio: retries allowed per first attempt, over the window (0.2: 20%).
        min_per_second: retries allowed per second of the window whatever the traffic.
        window: seconds over which first attempts and retries are counted; they leave the
            window a tenth of it at a time (after between 0.9 and 1 `window`).
        clock: monotonic seconds (tests pass a fake one); `time.monotonic` by default.

    Example:
        >>> budget = idemclient.RetryBudget(ratio=0.1)
        >>> a = idemclient.Client(base_url="https://api.example", retry_budget=budget)
        >>> b = idemclient.wrap(httpx.Client(), retry_budget=budget)   # shares a's budget
    """

    def __init__(
        self,
        ratio: float = DEFAULT_BUDGET_RATIO,
        *,
        min_per_second: float = DEFAULT_MIN_RETRIES_PER_SECOND,
        window: float = DEFAULT_BUDGET_WINDOW,
        clock: Callable[[], float] | None = None,
    ) -> None:
        for name, value in (("ratio", ratio), ("min_per_second", min_per_second)):
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be a non-negative number, not {value!r}")
        if not (isinstance(window, (int, float)) and 0 < window < math.inf):
            raise ValueError(f"window must be positive seconds, not {window!r}")
        self.ratio = float(ratio)
        self.min_per_second = float(min_per_second)
        self.window = float(window)
        self._clock = clock or time.monotonic
        self._slice = self.window / _SLICES
        self._reserve = self.min_per_second * self.window
        self._lock = threading.Lock()
        _budgets.add(self)
        # first attempts and retries per slice of the window, a ring indexed by slice number
        self._firsts = [0] * _SLICES
        self._retries = [0] * _SLICES
        self._current = self._slice_of(self._clock())
        self._denied = 0

    def _slice_of(self, now: float) -> int:
        return math.floor(now / self._slice)

    def _advance(self) -> int:
        """Drop the slices that have left the window; the current slice's index (lock held)."""
        now = self._slice_of(self._clock())
        if now > self._current:
            passed = min(now - self._current, _SLICES)
            for number in range(self._current + 1, self._current + 1 + passed):
                self._firsts[number % _SLICES] = self._retries[number % _SLICES] = 0
            self._current = now
        return self._current % _SLICES

    def _available(self) -> float:
        return self._reserve + self.ratio * sum(self._firsts) - sum(self._retries)

    def deposit(self) -> None:
        """Count a first attempt (it adds `ratio` of a retry to the budget)."""
        with self._lock:
            self._firsts[self._advance()] += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget: `True` if it may be made, `False` if spent."""
        with self._lock:
            index = self._advance()
            if self._available() < 1.0:
                self._denied += 1
                return False
            self._retries[index] += 1
            return True

    @property
    def balance(self) -> int:
        """The retries that may be made now (whole ones)."""
        with self._lock:
            self._advance()
            return max(0, math.floor(self._available()))

    @property
    def denied(self) -> int:
        """Retries refused since this budget was made (a counter, for metrics)."""
        return self._denied

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio:g}, min_per_second={self.min_per_second:g}, "
            f"window={self.window:g}, balance={self.balance})"
        )


#: every budget of this process: a forked child gives each a fresh lock (a thread of the
#: parent may have held one at the fork, and no thread of the child would ever release it)
_budgets: weakref.WeakSet[RetryBudget] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for budget in list(_budgets):
        budget._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Own(enum.Enum):
    """The default of `retry_budget=`: a budget of the transport's (or client's) own."""

    BUDGET = "a budget of its own"

    def __repr__(self) -> str:
        return "<a RetryBudget of its own>"


#: `retry_budget=` left out: each transport (each client, for all its transports) makes its own.
OWN_BUDGET = _Own.BUDGET
#: What `retry_budget=` takes: a budget to share, `None` (no budget), or `OWN_BUDGET`.
BudgetOption = RetryBudget | None | Literal[_Own.BUDGET]


def own_budget(
    option: BudgetOption, clock: Callable[[], float] | None = None
) -> RetryBudget | None:
    """The budget a transport (or a client, for all its transports) uses: the one given,
    none, or a new one with the default settings on `clock`."""
    if option is OWN_BUDGET:
        return RetryBudget(clock=clock)
    if option is not None and not isinstance(option, RetryBudget):
        raise TypeError(f"retry_budget must be a RetryBudget or None, not {option!r}")
    return option

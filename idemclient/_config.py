"""Process-wide switches: the test mode of `idemclient.testing.set_testing`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ._policy import RetryPolicy


@dataclass(frozen=True, slots=True)
class TestingMode:
    on: bool = False
    max_attempts: int | None = None

    def apply(self, policy: RetryPolicy) -> RetryPolicy:
        """The policy as the test mode wants it (fewer attempts, if asked)."""
        if self.on and self.max_attempts is not None:
            return policy.replace(max_attempts=min(policy.max_attempts, self.max_attempts))
        return policy


_lock = threading.Lock()
_mode = TestingMode()


def testing_mode() -> TestingMode:
    return _mode


def set_testing_mode(mode: TestingMode) -> TestingMode:
    """Install `mode`; returns the previous one."""
    global _mode
    with _lock:
        previous, _mode = _mode, mode
    return previous

"""The renewal of held leases (`journal/_leases.py`), on its own: what is renewed, when it
stops. The journals' renewals are in the contract suite, and a long answer across hosts in
`test_fleet.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from idemclient.journal import _leases
from idemclient.journal._leases import Holds, Lease


def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Renewals:
    def __init__(self) -> None:
        self.calls: list[list[Lease]] = []
        self.lock = threading.Lock()

    def __call__(self, leases: Sequence[Lease], now: float) -> None:
        with self.lock:
            self.calls.append(list(leases))

    def keys(self) -> list[str]:
        with self.lock:
            return [lease[0] for call in self.calls for lease in call]


def test_a_hold_is_renewed_each_half_lease_until_dropped() -> None:
    renewals = Renewals()
    holds = Holds(renewals, time.time)
    holds.hold("k", 3, "host:1:2", 0.2)
    until(lambda: renewals.keys().count("k") >= 3)
    assert renewals.calls[0] == [("k", 3, "host:1:2", 0.2)]
    assert holds.held()["k"][0] == 3
    holds.drop("k", 2)  # an older claim's end: the newer hold stays
    assert "k" in holds.held()
    holds.drop("k", 3)
    count = len(renewals.keys())
    time.sleep(0.4)
    assert len(renewals.keys()) == count
    until(lambda: holds._thread is None)  # nothing held: the thread ended
    holds.close()


def test_renewal_stops_after_renew_for_and_survives_a_failing_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_leases, "RENEW_FOR", 0.5)
    failures = [2]
    renewals = Renewals()

    def renew(leases: Sequence[Lease], now: float) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError("the journal is unreachable a while")
        renewals(leases, now)

    holds = Holds(renew, time.time)
    holds.hold("k", 1, "host:1:2", 0.1)
    until(lambda: len(renewals.keys()) >= 1)  # after two failures, renewed all the same
    time.sleep(0.7)  # past RENEW_FOR: no more
    count = len(renewals.keys())
    time.sleep(0.3)
    assert len(renewals.keys()) == count
    holds.close()


def test_a_clock_that_jumps_starts_no_renewal() -> None:
    """When to renew is reckoned on the monotonic clock, not the journal's."""
    renewals = Renewals()
    jumped = [time.time()]
    holds = Holds(renewals, lambda: jumped[0])
    holds.hold("k", 1, "host:1:2", 60.0)
    jumped[0] += 3600
    time.sleep(0.3)
    assert renewals.keys() == []
    holds.close()

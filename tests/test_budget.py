"""`RetryBudget`: retries bounded to a share of first attempts, on a fake clock (no sleeps)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

import idemclient
from idemclient import Event, RetriesExhaustedError, RetryBudget, RetryPolicy
from idemclient.testing import set_testing


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_floor_allows_retries_without_any_first_attempt() -> None:
    budget = RetryBudget(min_per_second=2, window=10, clock=FakeClock())
    assert budget.balance == 20
    assert all(budget.try_withdraw() for _ in range(20))
    assert not budget.try_withdraw()
    assert budget.balance == 0
    assert budget.denied == 1


def test_first_attempts_deposit_a_share_of_a_retry() -> None:
    budget = RetryBudget(0.2, min_per_second=0, clock=FakeClock())
    for _ in range(4):
        budget.deposit()
    assert budget.balance == 0  # 0.8 of a retry: not a whole one
    assert not budget.try_withdraw()
    budget.deposit()
    assert budget.balance == 1
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    for _ in range(50):
        budget.deposit()
    assert budget.balance == 10
    assert sum(budget.try_withdraw() for _ in range(20)) == 10


def test_first_attempts_and_retries_leave_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.5, min_per_second=0, window=10, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert budget.balance == 5
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert budget.balance == 3
    clock.now += 5  # half the window: all still counted
    for _ in range(2):
        budget.deposit()
    assert budget.balance == 4
    clock.now += 5.5  # the first ten and both retries have left; the last two are in
    assert budget.balance == 1
    clock.now += 100  # long quiet: nothing counted, the floor only
    assert budget.balance == 0
    assert not budget.try_withdraw()


def test_spent_retries_come_back_when_they_leave_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.0, min_per_second=1, window=10, clock=clock)
    assert sum(budget.try_withdraw() for _ in range(15)) == 10
    clock.now += 10.0
    assert budget.balance == 10


@pytest.mark.parametrize(
    "options",
    [{"ratio": -0.1}, {"min_per_second": -1}, {"window": 0}, {"ratio": float("nan")}],
)
def test_settings_are_checked(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryBudget(**options)  # type: ignore[arg-type]


def test_retry_budget_must_be_a_budget_or_none(journal_path: Path) -> None:
    with pytest.raises(TypeError, match="retry_budget"):
        idemclient.IdempotentTransport(journal=journal_path, retry_budget=0.2)  # type: ignore[arg-type]


def test_the_budget_is_thread_safe() -> None:
    budget = RetryBudget(0.2, min_per_second=1, window=10, clock=FakeClock())
    granted = []

    def work() -> None:
        mine = 0
        for _ in range(1000):
            budget.deposit()
            mine += budget.try_withdraw()
        granted.append(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) <= 0.2 * 8000 + 10
    assert sum(granted) >= 0.2 * 8000  # every thread's deposits were counted


# -- through the transport ---------------------------------------------------------------


def always_503(counter: list[int]) -> httpx.MockTransport:
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            counter.append(1)
        return httpx.Response(503)

    return httpx.MockTransport(handler)


def failing_client(
    journal: Path, requests: list[int], budget: RetryBudget | None, **options: Any
) -> idemclient.Client:
    """A client of a server that answers 503 to everything, never sleeping."""
    return idemclient.Client(
        journal=journal,
        base_url="https://api.example",
        transport=always_503(requests),
        sleep=lambda seconds: None,
        retry_budget=budget,
        **options,
    )


def test_a_storm_of_503s_stays_within_the_budget_and_loses_nothing(journal_path: Path) -> None:
    clock = FakeClock()
    budget = RetryBudget(clock=clock)  # 20%, 10 a second, over 10 s
    requests: list[int] = []
    operations, threads = 200, 8
    with set_testing(True), failing_client(journal_path, requests, budget) as client:

        def charge(number: int) -> str:
            clock.now += 0.01  # 200 operations over 2 s of the fake clock
            with (
                pytest.raises(RetriesExhaustedError) as caught,
                idemclient.operation(f"charge-{number}"),
            ):
                client.post("/charges", json={"n": number})
            return str(caught.value)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            messages = list(pool.map(charge, range(operations)))
        elapsed = clock.now - 1000.0
        # first attempts, + 20% of them, + the floor over the time the storm lasted (all of
        # it inside one window)
        bound = operations + 0.2 * operations + 10.0 * 10.0
        assert elapsed < 10.0
        assert len(requests) <= bound
        assert len(requests) > operations  # some retries were allowed
        assert len(requests) < operations * RetryPolicy().max_attempts  # and most refused
        assert sum("retry budget was spent" in m for m in messages) >= operations - 40
        pending = client.journal.pending()
        assert {op.name for op in pending} == {f"charge-{n}" for n in range(operations)}
        assert budget.denied > 0


def test_a_denied_retry_is_an_event_and_a_warning(
    journal_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Event] = []
    requests: list[int] = []
    budget = RetryBudget(0.0, min_per_second=0.1, window=10, clock=FakeClock())  # 1 retry
    with failing_client(journal_path, requests, budget, hooks=[events.append]) as client:
        caplog.set_level(logging.WARNING, "idemclient")
        with pytest.raises(RetriesExhaustedError, match="the retry budget was spent"):
            client.post("/charges", json={})
    assert [e.kind for e in events] == [
        "registered", "sending", "answered", "retrying", "sending", "answered", "retry_denied",
        "gave_up",
    ]  # fmt: skip
    assert events[-2].status == 503
    assert len(requests) == 2
    assert any("not retried: the retry budget was spent" in r.message for r in caplog.records)


def test_a_plain_request_returns_its_last_answer_when_the_budget_is_spent(
    journal_path: Path,
) -> None:
    requests: list[int] = []
    budget = RetryBudget(0.0, min_per_second=0.0, clock=FakeClock())
    with failing_client(journal_path, requests, budget) as client:
        response = client.get("/status")
    assert response.status_code == 503
    assert len(requests) == 1


def test_no_budget_retries_as_the_policy_says(journal_path: Path) -> None:
    requests: list[int] = []
    with failing_client(journal_path, requests, None) as client:
        for _ in range(50):
            with pytest.raises(RetriesExhaustedError):
                client.post("/charges", json={})
    assert len(requests) == 50 * 5


def test_one_budget_shared_by_two_clients(journal_path: Path) -> None:
    budget = RetryBudget(0.0, min_per_second=0.3, window=10, clock=FakeClock())  # 3 retries
    requests: list[int] = []
    clients = [
        idemclient.wrap(httpx.Client(transport=always_503(requests)), journal=journal_path,
                        retry_budget=budget, sleep=lambda s: None)
        for _ in range(2)
    ]  # fmt: skip
    for client in clients:
        with client, pytest.raises(RetriesExhaustedError):
            client.post("https://api.example/charges", json={})
    assert len(requests) == 2 + 3  # two first attempts, three retries between them
    assert budget.denied == 2


def test_each_transport_has_a_budget_of_its_own_by_default(journal_path: Path) -> None:
    client = idemclient.wrap(
        httpx.Client(mounts={"https://other.example": httpx.HTTPTransport()}),
        journal=journal_path,
    )
    other = idemclient.IdempotentTransport(journal=journal_path)
    with client:
        main = client._transport
        mounted = next(iter(client._mounts.values()))
        assert isinstance(main, idemclient.IdempotentTransport)
        assert isinstance(mounted, idemclient.IdempotentTransport)
        assert isinstance(main.retry_budget, RetryBudget)
        assert mounted.retry_budget is main.retry_budget  # one client, one budget
        assert other.retry_budget is not main.retry_budget
    other.close()


def test_a_forked_child_gets_a_fresh_lock_of_each_budget() -> None:
    """A thread of the parent held a budget's lock at the fork: the child's first request
    waited forever for it (no thread of the child ever releases it)."""
    import os
    import threading
    import time

    budget = RetryBudget()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with budget._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: would hang on the parent's held lock
        budget.deposit()
        os._exit(0)
    release.set()
    thread.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung on the budget's lock")

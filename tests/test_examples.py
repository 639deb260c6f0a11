"""Every example runs against the local server, so none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .fakes import FakeAPI

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env} if env else None,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quickstart.py", "server effects: 1"),
        ("wrap_client.py", "server effects: 1"),
        ("async_orders.py", "server effects: 10"),
        ("httpx2_client.py", "httpx2.Response 201, attempts 2, replayed by the server: True"),
    ],
)
def test_example_runs(name: str, expected: str) -> None:
    assert expected in run(name)


def test_demo_charges_every_invoice_once() -> None:
    out = run("crash_and_resume.py")
    assert "every invoice charged exactly once" in out
    assert "duplicate charges                       0" in out
    assert "resent, replayed by server" in out


def test_batch_is_rerunnable(server_url_and_journal: tuple[str, Path]) -> None:
    url, journal = server_url_and_journal
    first = run("charge_batch.py", url, str(journal), "3")
    assert first.splitlines()[-1] == '{"from_journal": 0, "replayed_by_server": 0, "sent": 3}'
    second = run("charge_batch.py", url, str(journal), "3")
    assert second.splitlines()[-1] == '{"from_journal": 3, "replayed_by_server": 0, "sent": 0}'


SDK_EXAMPLES: dict[str, tuple[Callable[[str], dict[str, str]], int]] = {
    # example: (its environment, given the fake's URL; operations it performs)
    "anthropic_messages.py": (lambda url: {"ANTHROPIC_BASE_URL": url,
                                           "ANTHROPIC_API_KEY": "sk-ant-test"}, 2),
    "openai_chat.py": (lambda url: {"OPENAI_BASE_URL": f"{url}/v1",
                                    "OPENAI_API_KEY": "sk-test"}, 2),
    "stripe_charges.py": (lambda url: {"STRIPE_API_BASE": url,
                                       "STRIPE_API_KEY": "sk_test_x"}, 3),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SDK_EXAMPLES))
def test_sdk_example_acts_once_through_a_lost_answer_and_a_rerun(
    name: str, journal_path: Path
) -> None:
    """Each SDK example against a local fake of its API: the first answer is lost after the
    fake acted (the SDK's own retry gets the replay), and a second run of the script sends
    nothing: every operation is answered from the journal, with the same output."""
    environment, operations = SDK_EXAMPLES[name]
    with FakeAPI() as api:
        env = {**environment(api.url), "IDEMCLIENT_JOURNAL": str(journal_path)}
        api.inject("drop_after_acting", times=1)
        first = run(name, env=env)
        assert api.effect_count == operations
        requests = api.request_count
        assert run(name, env=env) == first
        assert (api.effect_count, api.request_count) == (operations, requests)
    for secret in ("sk-ant-test", "sk-test", "sk_test_x"):
        assert secret.encode() not in journal_path.read_bytes()

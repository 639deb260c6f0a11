"""httpx2 as a first-class client family: transports, wrap(), resume, responses, streams and
errors of the caller's own family, side by side with httpx; the contract suite under
`httpx2.alias_httpx()`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import httpx2
import openai
import pytest

import idemclient
import idemclient.httpx2
from idemclient import RetriesExhaustedError, RetryPolicy
from idemclient.testing import IdempotentApp, IdempotentServer


def test_importing_idemclient_does_not_import_httpx2() -> None:
    code = "import sys, idemclient; print('httpx2' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "False", result.stderr


def test_an_httpx2_client_on_the_transport_gets_httpx2_responses(journal_path: Path) -> None:
    app = IdempotentApp()
    app.inject("drop_after_acting")  # the first answer is lost: retried with the same key
    transport = idemclient.httpx2.IdempotentTransport(
        httpx2.MockTransport(cast(Any, app.handler)), journal=journal_path, sleep=lambda s: None
    )
    with httpx2.Client(transport=transport, base_url="https://api.example") as client:
        with idemclient.operation("charge-1"):
            first = client.post("/charges", json={"amount": 5})
        with idemclient.operation("charge-1"):
            replay = client.post("/charges", json={"amount": 5})
    for response in (first, replay):
        assert isinstance(response, httpx2.Response)
        assert isinstance(response.request, httpx2.Request)
    assert first.status_code == replay.status_code == 201
    assert first.extensions["idempotency"]["attempts"] == 2
    assert replay.extensions["idempotency"]["replayed"] is True
    assert replay.json() == first.json()
    assert app.effect_count == 1


def test_transport_errors_stay_in_the_callers_family(journal_path: Path) -> None:
    def down(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    transport = idemclient.httpx2.IdempotentTransport(
        httpx2.MockTransport(down), journal=journal_path, retry=RetryPolicy(max_attempts=2),
        sleep=lambda s: None,
    )  # fmt: skip
    with (
        httpx2.Client(transport=transport) as client,
        pytest.raises(RetriesExhaustedError) as info,
    ):
        client.post("https://api.example/charges", json={})
    assert isinstance(info.value.__cause__, httpx2.ConnectError)
    assert info.value.attempts == 2

    def unsupported(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.UnsupportedProtocol("no", request=request)

    transport = idemclient.httpx2.IdempotentTransport(
        httpx2.MockTransport(unsupported), journal=journal_path
    )
    with httpx2.Client(transport=transport) as client, pytest.raises(httpx2.UnsupportedProtocol):
        client.post("https://api.example/charges", json={})


def test_the_default_inner_transport_is_the_callers_family(
    server: IdempotentServer, journal_path: Path
) -> None:
    transport = idemclient.httpx2.IdempotentTransport(journal=journal_path)
    with httpx2.Client(transport=transport, base_url=server.url) as client:
        response = client.post("/charges", json={"amount": 1})
    assert isinstance(response, httpx2.Response)
    assert response.status_code == 201
    assert server.effect_count == 1


def test_wrap_takes_httpx2_clients_and_the_sdks_subclasses(
    server: IdempotentServer, journal_path: Path
) -> None:
    for client in (
        httpx2.Client(base_url=server.url),
        openai.DefaultHttpxClient(base_url=server.url),
        anthropic.DefaultHttpxClient(base_url=server.url),
    ):
        wrapped = idemclient.wrap(client, journal=journal_path)
        assert wrapped is client
        response = wrapped.post("/charges", json={"from": type(client).__name__})
        assert isinstance(response, httpx2.Response)
        assert response.status_code == 201
        wrapped.close()
    assert server.effect_count == 3
    # the SDKs accept the wrapped client as their own
    sdk = anthropic.Anthropic(
        api_key="test", base_url=server.url,
        http_client=idemclient.wrap(anthropic.DefaultHttpxClient(), journal=journal_path),
    )  # fmt: skip
    sdk.close()
    oai = openai.OpenAI(
        api_key="test", base_url=server.url,
        http_client=idemclient.wrap(openai.DefaultHttpxClient(), journal=journal_path),
    )  # fmt: skip
    oai.close()


@pytest.mark.anyio
async def test_async_httpx2_client_wrap_and_resume(
    server: IdempotentServer, journal_path: Path
) -> None:
    down = IdempotentServer()
    down_url = down.url
    down.stop()
    client = idemclient.wrap(
        httpx2.AsyncClient(base_url=down_url),
        journal=journal_path,
        retry=RetryPolicy(max_attempts=1),
    )
    with pytest.raises(RetriesExhaustedError) as info:
        await client.post("/orders", json={"cart": "c1"})
    assert isinstance(info.value.__cause__, httpx2.ConnectError)
    await client.aclose()
    resumer = idemclient.wrap(httpx2.AsyncClient(), journal=journal_path)
    report = await idemclient.aresume_pending(resumer, rebase={down_url: server.url})
    assert [r.outcome for r in report] == ["completed"]
    assert isinstance(report[0].response, httpx2.Response)
    await resumer.aclose()
    assert server.effect_count == 1


def test_httpx_and_httpx2_side_by_side_on_one_journal(journal_path: Path) -> None:
    app = IdempotentApp()
    one = httpx.Client(transport=idemclient.IdempotentTransport(
        httpx.MockTransport(app.handler), journal=journal_path))  # fmt: skip
    # the transport of `idemclient` itself serves an httpx2 client too (typed for httpx)
    two = httpx2.Client(transport=idemclient.IdempotentTransport(  # type: ignore[arg-type]
        httpx2.MockTransport(cast(Any, app.handler)), journal=journal_path))  # fmt: skip
    with idemclient.operation("shared"):
        first = one.post("https://api.example/x", json={})
    with idemclient.operation("shared"):
        again = two.post("https://api.example/x", json={})
    assert isinstance(first, httpx.Response)
    assert isinstance(again, httpx2.Response)
    assert again.extensions["idempotency"]["replayed"] is True
    assert app.effect_count == 1
    one.close()
    two.close()


CONTRACT = [
    "tests/test_transport.py",
    "tests/test_client.py",
    "tests/test_httpx_flows.py",
    "tests/test_lifecycles.py",
    "tests/test_testing.py",
    "tests/test_events.py",
    "tests/test_streams.py",
]
ALIASED = """
import sys
import httpx2
httpx2.alias_httpx()  # `import httpx` is httpx2 from here on, for the tests and idemclient alike
import httpx
assert httpx is httpx2
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-W",
                      "ignore::pytest.PytestAssertRewriteWarning", *sys.argv[1:]]))
"""


def test_the_contract_suite_passes_under_httpx2(tmp_path: Path) -> None:
    """The same tests, with httpx2 in httpx's place (`httpx2.alias_httpx()`): idemclient's
    one implementation serves the other family."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ALIASED, "--basetemp", str(tmp_path / "t"), *CONTRACT],
        capture_output=True, text=True, timeout=300, cwd=root, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_the_httpx2_client_classes(server: IdempotentServer, journal_path: Path) -> None:
    client = idemclient.httpx2.Client(base_url=server.url, journal=journal_path)
    with client:
        assert isinstance(client, httpx2.Client)
        assert isinstance(client._transport, httpx2.BaseTransport)
        with idemclient.operation("charge-1"):
            response = client.post("/charges", json={"amount": 5})
        assert isinstance(response, httpx2.Response)
        assert client.journal.get("charge-1") is not None
        assert list(client.resume_pending()) == []
    assert server.effect_count == 1


@pytest.mark.anyio
async def test_the_httpx2_async_client_class(server: IdempotentServer, journal_path: Path) -> None:
    client = idemclient.httpx2.AsyncClient(base_url=server.url, journal=journal_path)
    async with client:
        response = await client.post("/orders", json={"cart": "c1"})
        assert isinstance(response, httpx2.Response)
        assert list(await client.aresume_pending()) == []
    assert server.effect_count == 1

"""Under the SDKs people use (anthropic and openai, on httpx2): their own retries continue the
operation under one key, their users catch the SDKs' own error types, and a rerun of a named
operation replays, against a local fake of their APIs (`IdempotentServer`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

import idemclient
from idemclient import RetryPolicy
from idemclient.testing import IdempotentServer

from .fakes import FakeAPI

MESSAGE = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}


def _keys_sent(keys: list[str]) -> Callable[[idemclient.Event], None]:
    def hook(event: idemclient.Event) -> None:
        if event.kind == "sending":
            keys.append(event.key)

    return hook


def claude(server: IdempotentServer, journal: Path, **options: Any) -> anthropic.Anthropic:
    # idemclient gives up after one attempt: what follows is the SDK's own retrying
    http = idemclient.wrap(
        anthropic.DefaultHttpxClient(), journal=journal, retry=RetryPolicy(max_attempts=1),
        **options,
    )  # fmt: skip
    return anthropic.Anthropic(api_key="sk-test", base_url=server.url, http_client=http)


def test_the_sdks_own_retry_of_a_lost_answer_is_the_same_operation(
    server: IdempotentServer, journal_path: Path
) -> None:
    """The server acted and the answer was lost; anthropic retries (max_retries=2): one
    effect under one key, where each retry used to be a new operation with a new key."""
    server.inject("drop_after_acting", times=1)
    client = claude(server, journal_path)
    message = client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.id
    assert server.request_count == 2
    assert server.effect_count == 1
    with idemclient.Journal(journal_path) as journal:
        (op,) = journal.operations()
    assert (op.state, op.attempts) == ("completed", 2)
    client.close()


def test_a_named_operation_keeps_its_name_across_sdk_retries_and_replays_on_rerun(
    server: IdempotentServer, journal_path: Path
) -> None:
    server.inject("drop_after_acting", times=1)
    client = claude(server, journal_path)
    with idemclient.operation("reply-1"):
        first = client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    requests = server.request_count
    with idemclient.operation("reply-1"):  # the script, run again
        again = client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert again.id == first.id
    assert server.request_count == requests  # answered from the journal
    assert server.effect_count == 1
    with idemclient.Journal(journal_path) as journal:
        assert [op.name for op in journal.operations()] == ["reply-1"]  # never reply-1#2
    client.close()


def test_sdk_users_catch_the_sdks_own_errors(server: IdempotentServer, journal_path: Path) -> None:
    sending: list[str] = []
    client = claude(server, journal_path, hooks=[_keys_sent(sending)])
    server.inject("status", status=500, times=3)
    with idemclient.operation("reply-1"), pytest.raises(anthropic.InternalServerError):
        client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert len(sending) == 3  # the SDK's three tries (max_retries=2)...
    assert len(set(sending)) == 1  # ...are one operation, under one key
    with idemclient.Journal(journal_path) as journal:
        op = journal.get("reply-1")
    assert op is not None
    assert op.state == "pending"  # resumable with its key
    server.inject("status", status=422, times=1)
    with idemclient.operation("reply-2"), pytest.raises(anthropic.UnprocessableEntityError):
        client.messages.create(**{**MESSAGE, "max_tokens": 11})  # type: ignore[call-overload]
    sent = server.request_count
    with idemclient.operation("reply-2"), pytest.raises(anthropic.UnprocessableEntityError):
        client.messages.create(**{**MESSAGE, "max_tokens": 11})  # type: ignore[call-overload]
    assert server.request_count == sent  # the recorded 422, replayed: nothing sent
    client.close()


def test_the_ready_made_httpx2_client_hands_back_to_an_sdk(
    server: IdempotentServer, journal_path: Path
) -> None:
    """`idemclient.httpx2.Client(hand_back=True)` as an SDK's `http_client`: the SDK raises
    its own error types, its retries under one key; without it, idemclient's errors."""
    import idemclient.httpx2

    sending: list[str] = []

    def client(retries: int, **options: Any) -> anthropic.Anthropic:
        http = idemclient.httpx2.Client(journal=journal_path, retry=RetryPolicy(max_attempts=1),
                                        hooks=[_keys_sent(sending)], **options)  # fmt: skip
        return anthropic.Anthropic(api_key="sk", base_url=server.url, http_client=http,
                                   max_retries=retries)  # fmt: skip

    server.inject("status", status=500, times=3)
    with client(2, hand_back=True) as sdk, pytest.raises(anthropic.InternalServerError):
        sdk.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert (len(sending), len(set(sending))) == (3, 1)  # three tries, one key
    server.inject("status", status=500, times=1)
    with client(0) as sdk, pytest.raises(anthropic.APIConnectionError) as caught:
        sdk.messages.create(**{**MESSAGE, "max_tokens": 12})  # type: ignore[call-overload]
    assert isinstance(caught.value.__cause__, idemclient.RetriesExhaustedError)


def test_a_connection_error_reaches_the_sdk_as_its_own_type(journal_path: Path) -> None:
    down = IdempotentServer()
    url = down.url
    down.stop()
    http = idemclient.wrap(
        anthropic.DefaultHttpxClient(), journal=journal_path, retry=RetryPolicy(max_attempts=1)
    )
    client = anthropic.Anthropic(api_key="sk", base_url=url, http_client=http, max_retries=1)
    with pytest.raises(anthropic.APIConnectionError):
        client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    with idemclient.Journal(journal_path) as journal:
        (op,) = journal.operations()
    assert (op.state, op.attempts) == ("pending", 2)  # the SDK's retry: the same operation
    client.close()


def test_openai_retries_a_lost_answer_under_one_key(
    server: IdempotentServer, journal_path: Path
) -> None:
    server.inject("drop_after_acting", times=1)
    sending: list[str] = []
    http = idemclient.wrap(
        openai.DefaultHttpxClient(), journal=journal_path, retry=RetryPolicy(max_attempts=1),
        hooks=[_keys_sent(sending)],
    )  # fmt: skip
    client = openai.OpenAI(api_key="sk-test", base_url=server.url, http_client=http)
    completion = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert completion is not None
    assert server.effect_count == 1
    assert len(sending) == 2
    assert len(set(sending)) == 1
    client.close()


@pytest.mark.anyio
async def test_async_anthropic_retries_a_lost_answer_under_one_key(
    server: IdempotentServer, journal_path: Path
) -> None:
    server.inject("drop_after_acting", times=1)
    http = idemclient.wrap(
        anthropic.DefaultAsyncHttpxClient(), journal=journal_path,
        retry=RetryPolicy(max_attempts=1),
    )  # fmt: skip
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=server.url, http_client=http)
    await client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert server.effect_count == 1
    await client.close()


def test_a_caller_loop_retrying_the_same_request_continues_the_operation(
    journal_path: Path,
) -> None:
    """Not only SDKs: the same request sent again in the same context right after its
    operation gave up is that operation again; after it completed, it is a new one."""
    answers = iter([httpx.ConnectError("down"), httpx.ConnectError("down"), None, None])
    keys: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        error = next(answers)
        if error is not None:
            raise error
        return httpx.Response(201)

    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(server),
                           retry=RetryPolicy(max_attempts=1)) as client:  # fmt: skip
        for _ in range(3):
            try:
                client.post("https://api.example/charges", json={"amount": 5})
                break
            except idemclient.RetriesExhaustedError:
                continue
        assert len(set(keys)) == 1
        client.post("https://api.example/charges", json={"amount": 5})  # an intended repeat
        assert len(set(keys)) == 2
        assert len(client.journal.operations()) == 2


def test_inside_a_named_operation_the_journals_key_is_the_key(journal_path: Path) -> None:
    """An SDK that draws a key per call (stripe-python): a rerun replays instead of
    raising OperationMismatchError."""
    import uuid

    sent: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={"id": "ch_1"})

    with idemclient.Client(journal=journal_path, transport=httpx.MockTransport(server)) as client:
        for _ in range(2):
            with idemclient.operation("charge-inv-1"):
                response = client.post("https://api.example/charges", json={"amount": 5},
                                       headers={"Idempotency-Key": str(uuid.uuid4())})  # fmt: skip
            assert response.status_code == 201
    assert len(sent) == 1
    assert response.extensions["idempotency"]["replayed"] is True
    assert response.request.headers["Idempotency-Key"] == sent[0].headers["Idempotency-Key"]


# stripe-python sends its form body with httpx's deprecated `data=<bytes>`: not ours to fix
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_stripe_wrap_rerun_and_lost_answer(server: IdempotentServer, journal_path: Path) -> None:
    """stripe-python draws a random Idempotency-Key per call: inside a named operation the
    journal's key replaces it, so a rerun replays instead of charging again; its own retry
    (max_network_retries) of a lost answer stays one effect."""
    import stripe

    http = stripe.HTTPXClient(allow_sync_methods=True)
    assert idemclient.wrap(http, journal=journal_path) is http
    client = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": server.url}, http_client=http, max_network_retries=2
    )
    for _ in range(2):  # the script, run twice
        with idemclient.operation("charge-inv-1"):
            client.v1.charges.create(params={"amount": 500, "currency": "usd"})
    assert (server.effect_count, server.request_count) == (1, 1)
    server.inject("drop_after_acting", times=1)
    with idemclient.operation("charge-inv-2"):
        client.v1.charges.create(params={"amount": 600, "currency": "usd"})
    assert server.effect_count == 2  # one each
    with idemclient.Journal(journal_path) as journal:
        assert [(op.name, op.state) for op in journal.operations()] == [
            ("charge-inv-1", "completed"),
            ("charge-inv-2", "completed"),
        ]
    http.close()  # type: ignore[no-untyped-call]


def test_no_sdk_api_key_reaches_the_disk(server: IdempotentServer, journal_path: Path) -> None:
    """anthropic's `x-api-key`, openai's `Authorization: Bearer`, Azure OpenAI's `api-key`:
    none is in the journal, its -wal or its -shm."""
    secrets = ["sk-ant-SECRET-1", "sk-oai-SECRET-2", "azure-SECRET-3"]
    claude_client = anthropic.Anthropic(
        api_key=secrets[0], base_url=server.url,
        http_client=idemclient.wrap(anthropic.DefaultHttpxClient(), journal=journal_path),
    )  # fmt: skip
    claude_client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    oai = openai.OpenAI(
        api_key=secrets[1], base_url=server.url, default_headers={"api-key": secrets[2]},
        http_client=idemclient.wrap(openai.DefaultHttpxClient(), journal=journal_path),
    )  # fmt: skip
    oai.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    files = [journal_path, *(Path(f"{journal_path}{s}") for s in ("-wal", "-shm"))]
    raw = b"".join(f.read_bytes() for f in files if f.exists())
    assert b"/v1/messages" in raw  # the journal holds the requests...
    for secret in secrets:
        assert secret.encode() not in raw  # ...and none of the keys
    claude_client.close()
    oai.close()


# -- streams through the SDKs' own `stream=True` -------------------------------------------


@pytest.fixture
def gated() -> Iterator[FakeAPI]:
    with FakeAPI(gated=True) as api:
        yield api


def test_an_anthropic_stream_reaches_the_sdk_event_by_event_and_replays_whole(
    gated: FakeAPI, journal_path: Path
) -> None:
    """The fake holds every event after the first until the caller has seen the first: a
    stream read whole before its first event is handed over would come 10 s late."""
    client = claude(gated, journal_path)
    texts: list[str] = []
    with idemclient.operation("reply-1"):
        stream = client.messages.create(**MESSAGE, stream=True)  # type: ignore[call-overload]
        for event in stream:
            gated.release()
            if event.type == "content_block_delta":
                texts.append(event.delta.text)
    assert not gated.late
    assert "".join(texts) == "Hello from reply 1."
    requests = gated.request_count
    with idemclient.operation("reply-1"):  # the script, run again: the whole stream, replayed
        again = client.messages.create(**MESSAGE, stream=True)  # type: ignore[call-overload]
        replayed = [e.delta.text for e in again if e.type == "content_block_delta"]
    assert replayed == texts
    assert (gated.request_count, gated.effect_count) == (requests, 1)
    client.close()


def test_an_openai_stream_reaches_the_sdk_chunk_by_chunk_and_is_recorded(
    gated: FakeAPI, journal_path: Path
) -> None:
    http = idemclient.wrap(openai.DefaultHttpxClient(), journal=journal_path)
    client = openai.OpenAI(api_key="sk-test", base_url=f"{gated.url}/v1", http_client=http)
    words = []
    for chunk in client.chat.completions.create(**CHAT, stream=True):  # type: ignore[call-overload]
        gated.release()
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content)
    assert not gated.late
    assert "".join(words) == "Hello from reply 1."
    with idemclient.Journal(journal_path) as journal:
        (op,) = journal.operations()
        stored = journal.stored_response(op.key)
    assert op.state == "completed"  # recorded once the SDK read it to its end ([DONE])
    assert stored is not None
    assert stored.body.endswith(b"data: [DONE]\n\n")
    client.close()


@pytest.mark.anyio
async def test_an_async_anthropic_stream_reaches_the_sdk_event_by_event(
    gated: FakeAPI, journal_path: Path
) -> None:
    http = idemclient.wrap(anthropic.DefaultAsyncHttpxClient(), journal=journal_path)
    client = anthropic.AsyncAnthropic(api_key="sk-test", base_url=gated.url, http_client=http)
    texts = []
    stream = await client.messages.create(**MESSAGE, stream=True)  # type: ignore[call-overload]
    async for event in stream:
        gated.release()
        if event.type == "content_block_delta":
            texts.append(event.delta.text)
    assert not gated.late
    assert "".join(texts) == "Hello from reply 1."
    await client.close()


def test_a_server_error_handed_to_the_sdk_leaves_the_operation_pending(
    server: IdempotentServer, journal_path: Path
) -> None:
    """Anthropic's 529 "overloaded" is in no retry list of ours: handed to the SDK, it is
    not the operation's answer. The SDK's retries continue the operation, and after they
    run out a rerun sends it (it used to replay the 529 for ever, under name, name#2...)."""
    server.inject("status", status=529, times=3)
    client = claude(server, journal_path)
    with idemclient.operation("summary-42"), pytest.raises(anthropic.InternalServerError):
        client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    with idemclient.Journal(journal_path) as journal:
        assert [(op.name, op.state) for op in journal.operations()] == [("summary-42", "pending")]
    with idemclient.operation("summary-42"):
        assert client.messages.create(**MESSAGE).id  # type: ignore[call-overload]
    assert server.effect_count == 1
    with idemclient.Journal(journal_path) as journal:
        assert [(op.name, op.state) for op in journal.operations()] == [("summary-42", "completed")]
    client.close()

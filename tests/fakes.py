"""Local fakes of the APIs the SDKs talk to (Anthropic Messages, OpenAI Chat Completions,
Stripe), on `IdempotentServer`: they act once per Idempotency-Key, replay to a retry, take the
same injected faults, and answer in each API's own shape, JSON or, when the request asks for
`"stream": true`, server-sent events sent event by event.

`gated=True` holds every event after the first until the test calls `release()` (or 10
seconds pass, which `late` then records): a client that reads a stream whole before handing
over its first event cannot see that event in time.

Run it by itself to try the examples by hand: `python -m tests.fakes` prints its URL.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import httpx

from idemclient.testing import Effect, IdempotentServer, Reply

_GATE_SECONDS = 10.0


def _sse(events: list[tuple[str | None, Any]]) -> tuple[bytes, ...]:
    chunks = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        head = f"event: {name}\n" if name else ""
        chunks.append(f"{head}data: {text}\n\n".encode())
    return tuple(chunks)


def _words(number: int) -> list[str]:
    return ["Hello", " from", " reply", f" {number}."]


def anthropic_reply(request: dict[str, Any], number: int) -> Reply:
    model, words = request.get("model", "claude"), _words(number)
    message = {
        "id": f"msg_{number:04d}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "".join(words)}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": len(words)},
    }  # fmt: skip
    if not request.get("stream"):
        return Reply(200, json.dumps(message).encode())
    start = {**message, "content": [], "stop_reason": None}
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
    ]  # fmt: skip
    for word in words:
        delta = {"type": "text_delta", "text": word}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": delta}))  # fmt: skip
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                           "stop_sequence": None}, "usage": {"output_tokens": len(words)}}),
        ("message_stop", {"type": "message_stop"}),
    ]  # fmt: skip
    return Reply(200, _sse(events), "text/event-stream")


def openai_reply(request: dict[str, Any], number: int) -> Reply:
    model, words = request.get("model", "gpt"), _words(number)
    ident = f"chatcmpl-{number:04d}"
    if not request.get("stream"):
        completion = {
            "id": ident, "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "".join(words)}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }  # fmt: skip
        return Reply(200, json.dumps(completion).encode())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": model, "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish}]}  # fmt: skip

    events: list[tuple[str | None, Any]] = [(None, chunk({"role": "assistant", "content": ""}))]
    events += [(None, chunk({"content": word})) for word in words]
    events += [(None, chunk({}, "stop")), (None, "[DONE]")]
    return Reply(200, _sse(events), "text/event-stream")


def stripe_reply(path: str, form: dict[str, str], number: int) -> Reply:
    kind = path.rsplit("/", 1)[-1].split("?")[0]
    prefix, obj = {"charges": ("ch", "charge")}.get(kind, ("pi", "payment_intent"))
    status = "succeeded" if obj == "charge" else "requires_payment_method"
    metadata = {k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")}
    body = {
        "id": f"{prefix}_{number:04d}", "object": obj, "amount": int(form.get("amount", 0)),
        "currency": form.get("currency", "usd"), "status": status, "metadata": metadata,
        "livemode": False, "created": 1_700_000_000,
    }  # fmt: skip
    return Reply(200, json.dumps(body).encode())


class FakeAPI(IdempotentServer):
    """Anthropic's `/v1/messages`, OpenAI's `.../chat/completions` and Stripe's `/v1/...`
    on one loopback server, with `IdempotentServer`'s key semantics and faults."""

    def __init__(self, *, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        self._gate = threading.Event()
        self.late = False  # a gated stream waited for its client in vain

    def release(self) -> None:
        """Let gated streams go on: the client has seen their first event."""
        self._gate.set()

    def respond(self, effect: Effect, number: int) -> Reply:
        if effect.path.endswith("/messages"):
            return anthropic_reply(effect.json() or {}, number)
        if effect.path.endswith("/chat/completions"):
            return openai_reply(effect.json() or {}, number)
        if effect.path.startswith("/v1/"):
            return stripe_reply(effect.path, dict(parse_qsl(effect.body.decode())), number)
        return super().respond(effect, number)

    def pace(self, effect: Effect, index: int) -> None:
        if self.gated and index == 1 and not self._gate.wait(_GATE_SECONDS):
            self.late = True


class AnswerLostOnce:
    """A `httpx.MockTransport` handler whose first answer is lost (a read timeout, after the
    request arrived); every later request is answered 201 with `answer`. `keys`: the
    Idempotency-Key of each request, as it came."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.keys: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.headers["idempotency-key"])
        if len(self.keys) == 1:
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return httpx.Response(201, json=self.answer)


class SeeOther:
    """A `httpx.MockTransport` handler: a POST is answered 303 See Other to /orders/1; each
    GET that follows is answered by `hop(number, request)` (1 for the first). `posts`: the
    Idempotency-Key of each POST."""

    def __init__(self, hop: Callable[[int, httpx.Request], httpx.Response]) -> None:
        self.hop = hop
        self.posts: list[str] = []
        self.gets = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts.append(request.headers["idempotency-key"])
            return httpx.Response(303, headers={"location": "/orders/1"})
        self.gets += 1
        return self.hop(self.gets, request)


def main() -> None:
    """Serve until interrupted (for trying the examples by hand)."""
    with FakeAPI() as api:
        print(api.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"effects: {api.effect_count}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Claude replies, safe to retry: anthropic's own retries, and a rerun of this script, reuse
one Idempotency-Key per reply, so a lost answer never makes a second (billed) reply.

Run (real API): ANTHROPIC_API_KEY=sk-ant-... .venv/bin/python examples/anthropic_messages.py
The test suite runs it against a local fake (ANTHROPIC_BASE_URL, IDEMCLIENT_JOURNAL).
"""

from __future__ import annotations

import anthropic

import idemclient

MODEL = "claude-haiku-5-5"


def main() -> None:
    # The journal: $IDEMCLIENT_JOURNAL, else the user state directory (`idemclient where`).
    http = idemclient.wrap(anthropic.DefaultHttpxClient())
    client = anthropic.Anthropic(http_client=http)  # key and base URL from the environment
    ask: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "Write a one-line welcome note for Ada."}
    ]

    # A named operation: run this script again and the reply comes from the journal.
    with idemclient.operation("welcome-note-ada"):
        message = client.messages.create(model=MODEL, max_tokens=100, messages=ask)
    text = "".join(block.text for block in message.content if block.type == "text")
    print(f"reply {message.id}: {text}")

    # Streams stream (event by event) and are journaled as they pass.
    with (
        idemclient.operation("welcome-note-ada-streamed"),
        client.messages.stream(model=MODEL, max_tokens=100, messages=ask) as stream,
    ):
        text = "".join(stream.text_stream)
        streamed = stream.get_final_message()
    print(f"streamed {streamed.id}: {text}")
    client.close()


if __name__ == "__main__":
    main()

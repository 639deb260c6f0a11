"""OpenAI chat completions, safe to retry: the SDK's own retries, and a rerun of this script,
reuse one Idempotency-Key per completion.

Run (real API): OPENAI_API_KEY=sk-... .venv/bin/python examples/openai_chat.py
The test suite runs it against a local fake (OPENAI_BASE_URL, IDEMCLIENT_JOURNAL).
"""

from __future__ import annotations

import openai
from openai.types.chat import ChatCompletionMessageParam

import idemclient

MODEL = "gpt-4.1-mini"


def main() -> None:
    # The journal: $IDEMCLIENT_JOURNAL, else the user state directory (`idemclient where`).
    http = idemclient.wrap(openai.DefaultHttpxClient())
    client = openai.OpenAI(http_client=http)  # key and base URL from the environment
    ask: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Name a prime between 10 and 20."}
    ]

    with idemclient.operation("prime-question-1"):  # a rerun replays from the journal
        completion = client.chat.completions.create(model=MODEL, messages=ask)
    print(f"completion {completion.id}: {completion.choices[0].message.content}")

    with idemclient.operation("prime-question-1-streamed"):
        chunks = client.chat.completions.create(model=MODEL, messages=ask, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(f"streamed: {text}")
    client.close()


if __name__ == "__main__":
    main()

"""Stripe payment intents for a batch of invoices, each created exactly once: stripe-python
draws a new Idempotency-Key per call, but inside `operation()` the journal's key is used, so
a rerun of this script after a crash creates nothing twice.

Run (test mode): STRIPE_API_KEY=sk_test_... .venv/bin/python examples/stripe_charges.py
The test suite runs it against a local fake (STRIPE_API_BASE, IDEMCLIENT_JOURNAL).
"""

from __future__ import annotations

import os
import warnings

import stripe

import idemclient

INVOICES = {"inv_1001": 1500, "inv_1002": 4200, "inv_1003": 990}

# stripe-python sends its form body with httpx's deprecated `data=<bytes>`
warnings.filterwarnings("ignore", "Use 'content=<...>'", DeprecationWarning)


def main() -> None:
    http = idemclient.wrap(stripe.HTTPXClient(allow_sync_methods=True))  # the same object back
    client = stripe.StripeClient(
        os.environ["STRIPE_API_KEY"],
        http_client=http,
        base_addresses={"api": os.environ.get("STRIPE_API_BASE", "https://api.stripe.com")},
        max_network_retries=2,  # stripe's own retries keep the journal's key
    )
    for invoice, amount in INVOICES.items():
        with idemclient.operation(f"pay-{invoice}"):
            intent = client.v1.payment_intents.create(
                params={"amount": amount, "currency": "eur", "metadata": {"invoice": invoice}}
            )
        print(f"{invoice}: {intent.id} {intent.amount} {intent.currency}")
    http.close()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()

"""idemclient on httpx2 (extra `idemclient[httpx2]`): the transports and clients as httpx2
classes, for code that type-checks against httpx2.

`idemclient.wrap()`, `resume_pending()` and `idemclient.IdempotentTransport` serve httpx2
clients already, with responses, streams and errors of the caller's family (httpx2 is
Pydantic's maintained continuation of httpx, which the openai and anthropic SDKs build on).
Here the same classes are also `httpx2.BaseTransport`s, and `Client` / `AsyncClient` are
built on `httpx2.Client` / `httpx2.AsyncClient`. One implementation serves both families.

Example:
    >>> import httpx2, idemclient.httpx2
    >>> client = httpx2.Client(transport=idemclient.httpx2.IdempotentTransport())
    >>> with idemclient.httpx2.Client(base_url="https://api.example") as client:
    ...     client.post("/charges", json={"amount": 500})
"""

from __future__ import annotations

try:
    import httpx2
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("idemclient.httpx2 needs httpx2: pip install 'idemclient[httpx2]'") from exc

from ._client import _AsyncClientMixin, _SyncClientMixin
from ._transport import AsyncIdempotentTransport as _AsyncTransport
from ._transport import IdempotentTransport as _SyncTransport

__all__ = ["AsyncClient", "AsyncIdempotentTransport", "Client", "IdempotentTransport"]


class IdempotentTransport(_SyncTransport, httpx2.BaseTransport):  # type: ignore[misc]
    """`idemclient.IdempotentTransport`, as an `httpx2.BaseTransport`."""


class AsyncIdempotentTransport(_AsyncTransport, httpx2.AsyncBaseTransport):  # type: ignore[misc]
    """`idemclient.AsyncIdempotentTransport`, as an `httpx2.AsyncBaseTransport`."""


class Client(_SyncClientMixin, httpx2.Client):
    """An `httpx2.Client` whose POST and PATCH are journaled, keyed and retried (the twin of
    `idemclient.Client`)."""


class AsyncClient(_AsyncClientMixin, httpx2.AsyncClient):
    """An `httpx2.AsyncClient` whose POST and PATCH are journaled, keyed and retried."""

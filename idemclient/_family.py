"""The client families idemclient serves: `httpx` and `httpx2` (Pydantic's maintained
continuation of httpx: the same API in separate classes, which the openai and anthropic SDKs
build on).

Requests, responses, streams and errors stay in the caller's family. Whatever idemclient makes
itself (a replayed response, a body stream) is made from the family of the object it answers:
`family(request)`. Nothing here imports `httpx2`; the family of an object is the module its
class comes from, so `httpx2.alias_httpx()` (httpx2 under the name `httpx`) works as well.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Literal, Protocol

__all__ = ["AsyncTransport", "SyncTransport", "error_kind", "family", "is_family_object"]

_FAMILIES = ("httpx", "httpx2")
_by_type: dict[type, ModuleType | None] = {}


def _family_of_type(cls: type) -> ModuleType | None:
    for klass in cls.__mro__:
        root = klass.__module__.partition(".")[0]
        if root in _FAMILIES:
            return sys.modules[root]
    return None


def is_family_object(obj: object) -> bool:
    """Whether `obj` is an instance of a class of httpx or httpx2 (subclasses included)."""
    cls = type(obj)
    if cls not in _by_type:
        _by_type[cls] = _family_of_type(cls)
    return _by_type[cls] is not None


def family(obj: object) -> ModuleType:
    """The module (`httpx` or `httpx2`) whose classes `obj` belongs to.

    Raises:
        TypeError: `obj` belongs to neither.
    """
    cls = type(obj)
    module = _by_type.get(cls)
    if module is None:
        module = _by_type[cls] = _family_of_type(cls)
        if module is None:
            raise TypeError(f"{obj!r} is not an httpx or httpx2 object")
    return module


ErrorKind = Literal["never_sent", "maybe_received", "other"]
#: By class name, for both families: no byte of the request left this process.
_NEVER_SENT = frozenset({"ConnectError", "ConnectTimeout", "PoolTimeout"})
#: By class name: the server may have acted, and its answer was lost.
_MAYBE_RECEIVED = frozenset(
    {"ReadTimeout", "WriteTimeout", "ReadError", "WriteError", "RemoteProtocolError"}
)
_kinds: dict[type, ErrorKind | None] = {}


def error_kind(error: BaseException) -> ErrorKind | None:
    """What a transport error of either family says about sending (`None`: not a transport
    error of httpx or httpx2)."""
    cls = type(error)
    if cls in _kinds:
        return _kinds[cls]
    kind: ErrorKind | None = None
    names = {k.__name__ for k in cls.__mro__ if k.__module__.partition(".")[0] in _FAMILIES}
    if "TransportError" in names:
        kind = (
            "never_sent"
            if names & _NEVER_SENT
            else "maybe_received"
            if names & _MAYBE_RECEIVED
            else "other"
        )
    _kinds[cls] = kind
    return kind


class SyncTransport(Protocol):
    """A sync transport of either family (`httpx.BaseTransport`, `httpx2.BaseTransport`)."""

    def handle_request(self, request: Any, /) -> Any: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """An async transport of either family."""

    async def handle_async_request(self, request: Any, /) -> Any: ...

    async def aclose(self) -> None: ...

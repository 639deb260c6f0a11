"""A journaled operation as a row of `COLUMNS`, the same in every backend: the records the
rest of idemclient sees, and the JSON of the header columns."""

from __future__ import annotations

import functools
import json
from typing import Any

from idemclient._records import Operation, StoredResponse, utc

from . import _decide

__all__ = [
    "COLUMNS",
    "headers_from_json",
    "headers_json",
    "operation",
    "stored_request",
    "stored_response",
    "stored_row",
]

COLUMNS = (
    "name, key, state, method, url, attempts, created_at, updated_at, response_status, "
    "last_error, fingerprint, first_sent_at, lease_owner, lease_expires, lease_version, "
    "response_headers, response_body, response_body_kept, recoveries, previous_key, "
    "key_header, key_style, moved_fingerprint"
)


def operation(row: tuple[Any, ...]) -> Operation:
    return Operation(
        name=row[0],
        key=row[1],
        state=row[2],
        method=row[3],
        url=row[4],
        attempts=row[5],
        created_at=utc(row[6]),
        updated_at=utc(row[7]),
        response_status=row[8],
        last_error=row[9],
        recoveries=row[18],
        previous_key=row[19],
        key_header=row[20],
        key_style=row[21],
    )


def headers_json(headers: list[tuple[str, str]], encoding: str) -> str:
    """A `headers` or `response_headers` column: a JSON list of [name, value] pairs, as it
    always was, when the text is ASCII or UTF-8; else (iso-8859-1) an object that names the
    encoding the text was decoded with, so that it encodes back to the very bytes.

    A bare list is read as UTF-8. That is exact for every row written so far that was ASCII
    or UTF-8, and gives iso-8859-1 rows written before the encoding was kept the same text
    (their bytes cannot be told apart from UTF-8 ones: both decode to the same text).
    """
    return _headers_json(tuple(headers), encoding)


@functools.lru_cache(maxsize=64)
def _headers_json(headers: tuple[tuple[str, str], ...], encoding: str) -> str:
    # (a client's requests mostly carry the same journaled headers: encoded once)
    if encoding in ("ascii", "utf-8"):
        return json.dumps(headers)
    return json.dumps({"encoding": encoding, "headers": headers})


def headers_from_json(text: str | None) -> tuple[list[tuple[str, str]], str]:
    """`headers_json` read back: the pairs and their encoding."""
    stored: Any = json.loads(text or "[]")
    encoding = "utf-8"
    if isinstance(stored, dict):
        encoding, stored = str(stored["encoding"]), stored["headers"]
    return [(str(k), str(v)) for k, v in stored], encoding


def stored_response(row: tuple[Any, ...]) -> StoredResponse | None:
    if row[8] is None:
        return None
    headers, encoding = headers_from_json(row[15])
    return StoredResponse(row[8], headers, bytes(row[16] or b""), bool(row[17]), encoding)


def stored_row(row: tuple[Any, ...]) -> _decide.StoredRow:
    """A row of `COLUMNS` as the registration rules read it."""
    return _decide.StoredRow(
        operation(row), fingerprint=row[10], first_sent_at=row[11], lease_owner=row[12],
        lease_expires=row[13], lease_version=row[14], moved_fingerprint=row[22],
        response=stored_response(row),
    )  # fmt: skip


def stored_request(row: tuple[Any, ...]) -> tuple[str, str, list[tuple[str, str]], bytes, str]:
    """The stored request of a row of `COLUMNS` followed by the `headers` and `body` columns:
    method, URL, headers, body and the headers' encoding."""
    pairs, encoding = headers_from_json(row[-2])
    return row[3], row[4], pairs, bytes(row[-1]), encoding

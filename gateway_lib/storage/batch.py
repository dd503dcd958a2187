"""Table service requests written directly: entity-group transactions (the ``$batch`` body and
reading its answer) and the pieces a single conditional update shares with them.

The format is the Table service's OData batch ("Performing entity group transactions" in the
Storage REST reference): one ``multipart/mixed`` batch holding one changeset, one
``application/http`` part per operation. The answer has the same shape: one HTTP response per
operation, or, when the changeset fails, a single response whose error message starts with the
failing operation's index (``"1:The specified entity already exists."``).

Why not ``TableClient.submit_transaction``: it builds and parses this MIME with the standard
library's ``email`` package, several times the CPU of writing it directly (ADR 0008 has the numbers).
That cost lands on every settle in strict quota mode, and on leased mode's journal commit, where it
holds the event loop while requests are in flight. The request still goes through the SDK's pipeline (request signing,
x-ms-date, retries, tracing, transport); only the body and the reading of the answer are ours.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gateway_lib.storage.base import Entity, Op
from gateway_lib.storage.memory import check_key, normalise_properties

_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps builds an encoder per call when given options

_METHODS = {"insert": "POST", "upsert": "PUT", "update": "PUT", "delete": "DELETE"}
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_BOUNDARY = re.compile(rb'boundary="?([^";\r\n]+)"?', re.IGNORECASE)
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")
_INDEX = re.compile(r"^(\d+):")


@dataclass(frozen=True)
class Failure:
    """The operation that failed a changeset (or the batch as a whole: ``index`` None)."""

    status: int
    index: int | None
    code: str
    message: str


def encode(account_url: str, table: str, ops: Sequence[Op]) -> tuple[bytes, str]:
    """The ``$batch`` body for ``ops`` on ``table`` and its Content-Type."""
    changeset, batch = f"changeset_{uuid.uuid4()}", f"batch_{uuid.uuid4()}"
    table_url = f"{account_url}/{table}"
    parts = [f"--{changeset}\r\n".encode() + _part(table_url, op) for op in ops]
    body = b"".join([
        f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n".encode(),
        b"\r\n".join(parts),
        f"\r\n--{changeset}--\r\n--{batch}--\r\n".encode(),
    ])
    return body, f"multipart/mixed; boundary={batch}"


def decode(status: int, content_type: str, body: bytes, ops: int) -> list[str | None] | Failure:
    """The new ETag of each operation (None for a delete), or why the transaction was refused."""
    if status != 202:  # the batch itself was refused (malformed, too large, not authorised, unavailable)
        code, message = error(body)
        return Failure(status, None, code, message)
    responses = _responses(body, content_type.encode("latin-1"))
    for code_, _, payload in responses:
        if not 200 <= code_ < 300:
            code, message = error(payload)
            found = _INDEX.match(message)
            return Failure(code_, int(found.group(1)) if found else 0, code, message)
    if len(responses) != ops:
        return Failure(status, None, "MalformedBatchResponse", f"{len(responses)} answers to {ops} operations")
    return [headers.get("etag") for _, headers, _ in responses]


def entity_json(entity: Entity) -> bytes:
    """An entity as the Table service's JSON. Every int is typed Edm.Int64 (a counter that starts small
    must keep one type as it grows past 2**31) and every float Edm.Double (2.0 must not become Int32)."""
    check_key(entity.partition_key, "PartitionKey")
    check_key(entity.row_key, "RowKey")
    doc: dict[str, Any] = {"PartitionKey": entity.partition_key, "RowKey": entity.row_key}
    for name, value in normalise_properties(entity.properties).items():
        kind = type(value)
        if kind is int:
            doc[name], doc[f"{name}@odata.type"] = str(value), "Edm.Int64"
        elif kind is float:
            doc[name], doc[f"{name}@odata.type"] = value, "Edm.Double"
        else:
            doc[name] = value
    return _COMPACT.encode(doc).encode()


def _part(table_url: str, op: Op) -> bytes:
    e = op.entity
    if op.kind == "insert":  # no echo of the entity: only its ETag is read
        url, extra = table_url, ["Prefer: return-no-content"]
    else:
        url = entity_url(table_url, e)
        # An update is always conditional in a batch: without If-Match it would be an upsert in disguise.
        extra = [] if op.kind == "upsert" else [f"If-Match: {op.etag or '*'}"]
    head = ["Content-Type: application/http", "Content-Transfer-Encoding: binary", "",
            f"{_METHODS[op.kind]} {url} HTTP/1.1", "Accept: application/json;odata=nometadata",
            "DataServiceVersion: 3.0", *extra]
    if op.kind == "delete":
        return ("\r\n".join(head) + "\r\n\r\n").encode()
    payload = entity_json(e)
    head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def entity_url(table_url: str, entity: Entity) -> str:
    """The entity's own URL: ``{table}(PartitionKey='…',RowKey='…')``."""
    return f"{table_url}(PartitionKey='{_key(entity.partition_key)}',RowKey='{_key(entity.row_key)}')"


def _key(value: str) -> str:
    """A key inside the entity URL: quotes doubled (OData), then percent-encoded."""
    return quote(value.replace("'", "''"), safe="")


def _responses(body: bytes, content_type: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers with lower-case names, body) of every HTTP response in a multipart body,
    changesets included, in order."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return []
    out = []
    for part in body.split(b"--" + found.group(1))[1:]:
        split = _BLANK_LINE.split(part, maxsplit=1)
        if len(split) < 2:
            continue  # the closing "--" after the last boundary
        mime_headers, content = split
        if b"multipart/mixed" in mime_headers.lower():
            out += _responses(content, mime_headers)
        elif (status := _STATUS_LINE.match(content := content.lstrip())) is not None:
            http_head, *payload = _BLANK_LINE.split(content, maxsplit=1)
            out.append((int(status.group(1)), _headers(http_head), b"".join(payload).strip()))
    return out


def _headers(block: bytes) -> dict[str, str]:
    lines = block.decode("latin-1").splitlines()[1:]  # after the status line
    return {name.strip().lower(): value.strip() for name, sep, value in (line.partition(":") for line in lines) if sep}


def error(payload: bytes) -> tuple[str, str]:
    """(code, message) of an OData error body; the raw text when it is not one."""
    try:
        error = json.loads(payload)["odata.error"]
        return str(error.get("code") or ""), str((error.get("message") or {}).get("value") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", payload[:200].decode("utf-8", "replace")

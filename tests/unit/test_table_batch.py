"""The entity-group transaction wire format (gateway_lib/storage/batch.py).

Azurite runs the same transactions end to end in the store contract
(tests/integration/test_azure_store.py); these pin the bytes and the reading of answers,
including answers Azurite does not produce on demand (a refused batch, a short answer).
"""

from __future__ import annotations

import json
import re

import pytest

from gateway_lib.storage import batch
from gateway_lib.storage.azure_tables import _failed
from gateway_lib.storage.base import Entity, Op, StorageError, StorageUnavailable, TransactionFailed

ACCOUNT = "https://acct.table.core.windows.net"


def _requests(body: bytes, content_type: str) -> list[tuple[str, dict[str, str], bytes]]:
    """(request line, headers, payload) of each operation, read back with nothing but the format's rules."""
    outer = re.search(r"boundary=(\S+)", content_type)
    assert outer is not None
    text = body.decode()
    assert text.startswith(f"--{outer.group(1)}\r\n") and text.endswith(f"--{outer.group(1)}--\r\n")
    inner = re.search(r"Content-Type: multipart/mixed; boundary=(changeset_\S+)\r\n", text)
    assert inner is not None
    parts = text.split(f"--{inner.group(1)}")[1:-1]
    out = []
    for part in parts:
        mime, http = part.strip("\r\n").split("\r\n\r\n", 1)
        assert mime.splitlines() == ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
        head, _, payload = http.partition("\r\n\r\n")
        line, *header_lines = head.split("\r\n")
        headers = dict(h.split(": ", 1) for h in header_lines)
        out.append((line, headers, payload.removesuffix("\r\n").encode()))
    return out


def test_each_op_kind_becomes_its_rest_call_with_conditions_and_typed_json() -> None:
    ops = [Op("insert", Entity("p'1", "a b", {"n": 2**40, "f": 2.0, "s": "ü", "ok": True, "gone": None})),
           Op("update", Entity("p'1", "it's", {"n": 1}), etag='W/"datetime\'2026\'"'),
           Op("update", Entity("p'1", "any", {})),
           Op("upsert", Entity("p'1", "u", {})),
           Op("delete", Entity("p'1", "d/x".replace("/", "%")), etag="W/\"1\"")]
    body, content_type = batch.encode(ACCOUNT, "Ledger", ops)
    assert content_type.startswith("multipart/mixed; boundary=batch_")
    sent = _requests(body, content_type)
    assert [line for line, _, _ in sent] == [
        f"POST {ACCOUNT}/Ledger HTTP/1.1",
        f"PUT {ACCOUNT}/Ledger(PartitionKey='p%27%271',RowKey='it%27%27s') HTTP/1.1",
        f"PUT {ACCOUNT}/Ledger(PartitionKey='p%27%271',RowKey='any') HTTP/1.1",
        f"PUT {ACCOUNT}/Ledger(PartitionKey='p%27%271',RowKey='u') HTTP/1.1",
        f"DELETE {ACCOUNT}/Ledger(PartitionKey='p%27%271',RowKey='d%25x') HTTP/1.1",
    ]
    conditions = [headers.get("If-Match") for _, headers, _ in sent]
    assert conditions == [None, 'W/"datetime\'2026\'"', "*", None, 'W/"1"']  # an upsert alone is unconditional
    assert sent[0][1]["Prefer"] == "return-no-content"  # no entity echoed back: only the ETag is read
    assert all(h["DataServiceVersion"] == "3.0" for _, h, _ in sent)
    for _, headers, payload in sent[:4]:
        assert int(headers["Content-Length"]) == len(payload) and headers["Content-Type"] == "application/json"
    assert sent[4][2] == b"" and "Content-Length" not in sent[4][1]
    assert json.loads(sent[0][2]) == {
        "PartitionKey": "p'1", "RowKey": "a b", "n": str(2**40), "n@odata.type": "Edm.Int64",
        "f": 2.0, "f@odata.type": "Edm.Double", "s": "ü", "ok": True}


def test_keys_and_values_azure_would_refuse_fail_before_anything_is_sent() -> None:
    with pytest.raises(ValueError):
        batch.encode(ACCOUNT, "t", [Op("insert", Entity("p", "a#b", {}))])
    with pytest.raises(ValueError):
        batch.encode(ACCOUNT, "t", [Op("insert", Entity("p", "r", {"n": 2**64}))])


OK = (b"--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n"
      b"--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
      b"HTTP/1.1 204 No Content\r\nDataServiceVersion: 3.0;\r\nETag: W/\"datetime'2026-11-24T04%3A59%3A52.1Z'\"\r\n\r\n\r\n"
      b"--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
      b"HTTP/1.1 204 No Content\r\nDataServiceVersion: 3.0;\r\n\r\n\r\n"
      b"--changesetresponse_2--\r\n--batchresponse_1--\r\n")
FAILED = (b"--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n"
          b"--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
          b"HTTP/1.1 409 Conflict\r\nContent-ID: 2\r\nContent-Type: application/json;odata=minimalmetadata\r\n\r\n"
          b'{"odata.error":{"code":"EntityAlreadyExists","message":{"lang":"en-US",'
          b'"value":"1:The specified entity already exists.\\nRequestId:x"}}}\r\n'
          b"--changesetresponse_2--\r\n--batchresponse_1--\r\n")
CT = "multipart/mixed; boundary=batchresponse_1"


def test_a_committed_batch_gives_each_ops_etag_in_order() -> None:
    assert batch.decode(202, CT, OK, 2) == ["W/\"datetime'2026-11-24T04%3A59%3A52.1Z'\"", None]
    assert batch.decode(202, CT, OK.replace(b"\r\n", b"\n"), 2) == batch.decode(202, CT, OK, 2)  # bare LF too


def test_a_refused_changeset_names_the_failing_op_and_its_code() -> None:
    failure = batch.decode(202, CT, FAILED, 2)
    assert failure == batch.Failure(409, 1, "EntityAlreadyExists", "1:The specified entity already exists.\nRequestId:x")
    error = _failed(failure)
    assert isinstance(error, TransactionFailed) and (error.index, error.reason) == (1, "exists")


def test_a_refused_batch_and_a_short_answer_are_storage_errors_not_op_failures() -> None:
    busy = batch.decode(503, "application/json", b'{"odata.error":{"code":"ServerBusy","message":{"value":"busy"}}}', 1)
    assert busy == batch.Failure(503, None, "ServerBusy", "busy")
    assert isinstance(_failed(busy), StorageUnavailable)
    bad = batch.decode(400, "text/html", b"<html>nope</html>", 1)
    assert isinstance(bad, batch.Failure) and bad.index is None and bad.message == "<html>nope</html>"
    assert type(_failed(bad)) is StorageError
    short = batch.decode(202, CT, OK, 3)
    assert isinstance(short, batch.Failure) and short.code == "MalformedBatchResponse"
    assert type(_failed(short)) is StorageError

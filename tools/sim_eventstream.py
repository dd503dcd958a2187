"""AWS event-stream framing (``application/vnd.amazon.eventstream``), encoder side.

A frame is: prelude (total length u32, headers length u32, CRC32 of those 8 bytes),
headers, payload, then CRC32 of everything before it; all big-endian. Each header is
name length u8, name, value type u8 (7 = string), value length u16, value. This is
the layout ``botocore.eventstream.EventStreamBuffer`` decodes.
"""

from __future__ import annotations

import json
import struct
from binascii import crc32
from typing import Any

_STRING_TYPE = 7
# Bedrock pads every event payload with a "p" field so payload sizes do not leak the
# text length; clients must ignore it, so the simulator sends one too.
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"


def encode_headers(headers: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING_TYPE, len(raw_value)) + raw_value
    return bytes(out)


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    raw_headers = encode_headers(headers)
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    head = prelude + struct.pack(">I", crc32(prelude) & 0xFFFFFFFF) + raw_headers + payload
    return head + struct.pack(">I", crc32(head) & 0xFFFFFFFF)


def event_frame(event_type: str, payload: dict[str, Any]) -> bytes:
    body = dict(payload, p=_PADDING[: 4 + len(event_type) % 20])
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_frame(headers, json.dumps(body, separators=(",", ":")).encode())


def exception_frame(exception_type: str, message: str) -> bytes:
    """A modelled mid-stream exception, e.g. ``throttlingException``; botocore raises it."""
    headers = {":exception-type": exception_type, ":content-type": "application/json",
               ":message-type": "exception"}
    return encode_frame(headers, json.dumps({"message": message}).encode())


def broken_frame() -> bytes:
    """A frame whose message CRC is wrong: the client's decoder must refuse it."""
    frame = bytearray(event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}}))
    frame[-1] ^= 0xFF
    return bytes(frame)

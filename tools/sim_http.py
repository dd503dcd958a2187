"""Bare ASGI plumbing for the provider simulator: requests in, bodies and streams out.

The simulator is a benchmark upstream too, so it speaks ASGI directly (no framework
routing or middleware per request) and keeps connections alive between calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from .sim_state import MAX_DELAY_MS, Fault

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 16 * 1024 * 1024
BODY_TIMEOUT_S = 30.0


class BodyTooLarge(Exception):
    """The request body exceeded ``MAX_BODY_BYTES``."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # raw (still percent-encoded), so an encoded ":" in a Bedrock model id survives
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ``None`` when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


async def read_request(scope: Scope, receive: Receive) -> Request:
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    body = await asyncio.wait_for(_read_body(receive), BODY_TIMEOUT_S)
    return Request(scope["method"], raw_path.decode("latin-1").split("?", 1)[0], query, headers, body)


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


def _header_list(content_type: str, headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    pairs = [(b"content-type", content_type.encode())]
    pairs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    return pairs


async def send_bytes(send: Send, status: int, body: bytes, content_type: str,
                     headers: dict[str, str] | None = None) -> None:
    pairs = [*_header_list(content_type, headers), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send_bytes(send, status, body, "application/json", headers)


async def drop_connection(send: Send) -> None:
    """Close the TCP connection abruptly, whatever has been sent so far.

    ASGI has no "abort" message. uvicorn's ``send`` is a bound method of its request
    cycle, which holds the transport; aborting it is what a crashed upstream looks like.
    Elsewhere, raising makes the server close the connection itself.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionAbortedError("simulated connection drop")
    transport.abort()
    # Let connection_lost run, so uvicorn marks the cycle disconnected and sends nothing more.
    for _ in range(3):
        await asyncio.sleep(0)


@dataclass(frozen=True)
class StreamFaultFrames:
    """How one provider spells a fault inside its stream."""

    error: Callable[[Fault], bytes]  # a mid-stream error event
    malformed: bytes  # a frame the client cannot decode


async def send_stream(send: Send, frames: Sequence[bytes], content_type: str, headers: dict[str, str],
                      chunk_delay_ms: int, fault: Fault | None, spelled: StreamFaultFrames) -> None:
    """Send ``frames`` one body message each; a stream fault strikes after ``after_chunks`` frames."""
    await send({"type": "http.response.start", "status": 200, "headers": _header_list(content_type, headers)})
    strike_at = _strike_index(fault, len(frames))
    for index, frame in enumerate(frames):
        if index == strike_at and fault is not None and fault.mode == "stall":
            await asyncio.sleep(min(fault.delay_ms, MAX_DELAY_MS) / 1000)  # goes quiet, then carries on
        elif index == strike_at and fault is not None:
            await _strike(send, fault, spelled)
            return
        if index and chunk_delay_ms:
            await asyncio.sleep(chunk_delay_ms / 1000)
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _strike_index(fault: Fault | None, frame_count: int) -> int | None:
    if fault is None or fault.mode == "slow":
        return None
    default = 1 if fault.mode in ("cut", "malformed", "stall") else 0
    after = fault.after_chunks if fault.after_chunks is not None else default
    return min(max(after, 0), frame_count - 1)


async def _strike(send: Send, fault: Fault, spelled: StreamFaultFrames) -> None:
    if fault.mode == "cut":
        await drop_connection(send)
        return
    frame = spelled.malformed if fault.mode == "malformed" else spelled.error(fault)
    await send({"type": "http.response.body", "body": frame, "more_body": False})

"""The OpenAI REST wire, read: answers, SSE streams and error statuses, for every relay that speaks it.

Azure OpenAI and any OpenAI-compatible endpoint answer in the same JSON and SSE shapes and report
failures with the same statuses and ``error`` objects; only the name in the messages differs.
Pure functions of bytes and headers: the relays own the connections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway_lib.errors import ProviderError
from gateway_lib.providers.base import StreamEvent, seconds, usage_of

_decode = json.JSONDecoder().decode  # on str: json.loads would sniff each event's encoding first


@dataclass(frozen=True)
class Wire:
    """Whose wire this is: the provider's registered name and the name its messages use."""

    provider: str
    label: str

    def error(self, message: str, kind: str, **facts: Any) -> ProviderError:
        retryable = facts.pop("retryable", kind not in ("bad_request", "content_filter"))
        return ProviderError(message, provider=self.provider, kind=kind, retryable=retryable, **facts)

    def answer(self, raw: bytes, key: str, kind: type = list) -> dict[str, Any]:
        """The answer's JSON object, checked by one key every answer of its kind has."""
        try:
            answer = _decode(raw.decode())  # UTF-8 only (RFC 8259): the bytes may be relayed as they came
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get(key), kind):
            raise self.error(f"{self.label} returned an unreadable response", "malformed")
        return answer

    def status_error(self, status: int, headers: Any, raw: bytes) -> ProviderError:
        """An error status as the one provider error: may the next target be tried, and after how long."""
        detail, label, retry_after = upstream_message(status, raw), self.label, retry_after_of(headers)
        if status == 429:
            return self.error(f"{label} is throttling ({detail})", "rate_limited", upstream_status=status,
                              retry_after=retry_after)
        if status >= 500 or status == 408:
            return self.error(f"{label} failed with {status} ({detail})", "server_error", upstream_status=status,
                              retry_after=retry_after)
        if status == 404:  # an unknown deployment, model or version: our configuration, not the caller's request
            return self.error(f"{label} has no such deployment or model ({detail})", "server_error",
                              upstream_status=status)
        if status in (401, 403):
            return self.error(f"the gateway's credentials were refused by {label}", "auth", upstream_status=status)
        if status == 400 and "content_filter" in detail:
            # A policy decision about this prompt, not an outage: never retried on another target.
            return self.error(f"{label}'s content filter refused the prompt; change the messages and retry",
                              "content_filter", upstream_status=status, param="messages")
        return self.error(f"{label} rejected the request: {detail}", "bad_request", upstream_status=status)

    def translate(self, exc: Exception, mid_stream: bool = False) -> ProviderError:
        """Transport failures as the one provider error (the only place that knows aiohttp's exceptions)."""
        import aiohttp

        where = " mid-stream" if mid_stream else ""
        if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors too
            return self.error(f"{self.label} timed out{where}", "timeout")
        if isinstance(exc, aiohttp.ClientError | ConnectionError):
            return self.error(f"{self.label} connection failed{where}", "connection")
        return self.error(f"{self.label} returned an unreadable response{where}", "malformed")


def upstream_message(status: int, raw: bytes) -> str:
    """``code: message`` from an error answer's ``error`` object, else the status."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    error = body.get("error", body) if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = str(error.get("message") or "") if isinstance(error, dict) else ""
    # Upstream messages can quote the prompt (e.g. validation errors): keep them short.
    return f"{code or status}: {message[:200]}" if message else str(code or status)


def retry_after_of(headers: Any) -> float | None:
    for name in ("retry-after-ms", "retry-after"):
        value = seconds(headers.get(name) if headers is not None else None)
        if value is not None:
            return value / 1000 if name == "retry-after-ms" else value
    return None


class SseStream:
    """One upstream stream's SSE lines, into events; an ``event:`` line names the ``data:`` line after it."""

    def __init__(self, wire: Wire, chat: bool) -> None:
        self.wire, self.chat, self.tail = wire, chat, b""
        self.name: str | None = None  # the pending ``event:`` field
        self.opened = False  # the upstream answered 2xx: a failure from here on is mid-stream

    def feed(self, received: bytes) -> list[StreamEvent]:
        lines = (self.tail + received).split(b"\n")
        self.tail = lines.pop()  # an incomplete line waits for the next read
        return self.events(lines)

    def end(self) -> list[StreamEvent]:
        lines, self.tail = [self.tail], b""
        return self.events(lines)

    def events(self, lines: list[bytes]) -> list[StreamEvent]:
        """The events of complete lines that arrived together, all but the last marked ``more``."""
        events = []
        for line in lines:
            if line.startswith(b"data:"):
                data, name, self.name = line[5:].strip(), self.name, None
                event = None if data == b"[DONE]" else self._event(data, name)
                if event is not None:
                    events.append(event)
            elif line.startswith(b"event:"):
                self.name = line[6:].strip().decode()
            elif not line.strip():
                self.name = None
        for event in events[:-1]:
            event.more = True
        return events

    def _event(self, data: bytes, name: str | None) -> StreamEvent | None:
        chunk = _decode(data.decode())
        if not isinstance(chunk, dict):
            raise ValueError("SSE data is not a JSON object")
        if chunk.get("error") or name == "error" or chunk.get("type") == "error":
            # A failure inside an open stream arrives as an error event
            raise self.wire.error(f"{self.wire.label} reported an error mid-stream", "server_error")
        return chat_event(chunk, data) if self.chat else StreamEvent(chunk=chunk, raw=data, name=name)


def chat_event(chunk: dict[str, Any], raw: bytes) -> StreamEvent | None:
    usage = chunk.get("usage")
    choices = chunk.get("choices") or []
    if not choices and not usage:
        return None  # Azure's prompt_filter_results preamble: OpenAI clients expect choices[0]
    text = "".join(str((c.get("delta") or {}).get("content") or "") for c in choices)
    text += "".join(str(((tc.get("function") or {}).get("arguments")) or "")
                    for c in choices for tc in (c.get("delta") or {}).get("tool_calls") or [])
    return StreamEvent(chunk=chunk, usage=usage_of(usage, "prompt_tokens", "completion_tokens"), text=text, raw=raw)

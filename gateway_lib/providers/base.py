"""The narrow protocol every provider adapter implements.

An adapter turns a validated ``ChatRequest`` plus one ``Target`` into an
OpenAI-shaped completion, or into a stream of OpenAI ``chat.completion.chunk``
dicts. Adapters never touch quotas, storage, auth or settings; every upstream
failure leaves them as a ``ProviderError`` that says whether a fallback may follow.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway_lib.config.catalog import Target
from gateway_lib.operations.schema import ChatRequest


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class CallContext:
    """Per-call facts an adapter may forward upstream (never caller identity)."""

    request_id: str
    traceparent: str | None = None
    max_tokens: int | None = None  # the effective cap after guardrails (may be clamped)


def seconds(raw: str | None) -> float | None:
    """A Retry-After delay in seconds: a finite number >= 0, else None (an HTTP-date is rare upstream, and
    "inf" or "nan" would hold a target's circuit open for the life of the process)."""
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def usage_of(reported: Any, prompt_key: str, completion_key: str) -> Usage | None:
    """An upstream's usage object, or None when it is missing or unreadable: never read as zero tokens."""
    if not isinstance(reported, dict):
        return None
    prompt, completion = reported.get(prompt_key), reported.get(completion_key)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (prompt, completion)):
        return None
    return Usage(prompt, completion)  # type: ignore[arg-type]  # checked just above


@dataclass
class Completion:
    """A whole (non-streamed) answer in OpenAI ``chat.completion`` shape."""

    body: dict[str, Any]
    usage: Usage | None  # None: the upstream reported none (the pipeline bills an estimate instead)


@dataclass
class StreamEvent:
    """One OpenAI ``chat.completion.chunk`` dict.

    The adapter always asks its upstream for usage. The final event carries it in
    ``usage`` (and in ``chunk["usage"]`` with empty ``choices``); the pipeline decides
    whether the caller asked to see that chunk.
    """

    chunk: dict[str, Any]
    usage: Usage | None = None
    text: str = field(default="")  # the content delta, for counting tokens of a cut stream
    raw: bytes | None = None  # the chunk's JSON exactly as the upstream sent it: relayed without re-encoding
    more: bool = False  # another event already arrived with this one: the pipeline writes them together


class Provider(Protocol):
    """What the pipeline needs from a provider: one call, and one stream."""

    name: str

    async def complete(self, request: ChatRequest, target: Target, ctx: CallContext) -> Completion: ...

    def stream(self, request: ChatRequest, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        """Open the upstream stream. Connection and status errors must surface on the first
        ``__anext__`` (before any chunk), so the router can still fall back."""
        ...

    async def aclose(self) -> None: ...

"""The narrow protocol every provider adapter implements.

An adapter turns one validated operation request (chat, embeddings, responses, messages) plus one
``Target`` into a whole answer in that operation's wire shape, or into a stream of its events. It says
up front what each target can do (``Capabilities``) and, for one request, whether it can take it
(``check``): "not supported here" is an ordinary answer, never an exception. Adapters never touch
quotas, storage, auth or settings; every upstream failure leaves them as a ``ProviderError`` that
says whether a fallback may follow.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target

# Operations, as capabilities name them. A streamed call is its own capability: "<operation>_stream".
CHAT, EMBEDDINGS, RESPONSES, MESSAGES = "chat", "embeddings", "responses", "messages"


def streamed(operation: str) -> str:
    return f"{operation}_stream"


@dataclass(frozen=True)
class ProviderSettings:
    """What every provider shares, plus each provider's own section by name (read by its folder)."""

    azure_client_id: str | None  # user-assigned managed identity client id
    upstream_timeout_seconds: float
    connect_timeout_seconds: float
    sections: Mapping[str, Any] = field(default_factory=dict)

    def section(self, provider: str) -> Any:
        return self.sections[provider]


@dataclass(frozen=True)
class Capabilities:
    """What one target can do: operations (``chat``, ``chat_stream``, ``embeddings``...) and the
    parameter features a request may need (``n``, ``logprobs``, ``audio``, ``prediction``, ``store``...)."""

    operations: frozenset[str] = frozenset()
    features: frozenset[str] = frozenset()

    def lacks(self, operation: str, features: frozenset[str]) -> str | None:
        """The first thing asked that this target cannot do (an operation or a feature), or None."""
        if operation not in self.operations:
            return operation
        missing = sorted(features - self.features)
        return missing[0] if missing else None


@dataclass(frozen=True)
class Unsupported:
    """A target cannot take this request; ``param`` names what (the caller's 400 if no target can)."""

    message: str
    param: str | None = None
    code: str = "unsupported_parameter"


class OperationRequest(Protocol):
    """What every validated request offers the pipeline, whatever its dialect."""

    operation: ClassVar[str]

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...

    @property
    def provider_hint(self) -> str | None: ...

    @property
    def priority(self) -> str | None: ...

    @property
    def requested_max_tokens(self) -> int | None: ...

    def features(self) -> frozenset[str]:
        """Parameter capabilities a target needs to serve this request (``n``, ``logprobs``...)."""
        ...

    def wire_body(self, max_tokens: int | None) -> dict[str, Any]:
        """The request as its dialect's wire JSON, without gateway-only fields (``provider_hint``,
        ``priority``), with ``max_tokens`` (the effective output cap, when set) under the caller's own
        parameter name. A relay adds only what its upstream needs (the deployment as ``model``...)."""
        ...


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
    """A whole (non-streamed) answer in the operation's wire shape (``chat.completion``, an embeddings list...)."""

    body: dict[str, Any]
    usage: Usage | None  # None: the upstream reported none (the pipeline bills an estimate instead)
    raw: bytes | None = None  # ``body`` exactly as the upstream sent it, when a relay can pass it on as it came


@dataclass
class StreamEvent:
    """One event of a stream in the operation's wire shape (an OpenAI ``chat.completion.chunk``, a
    Responses or Anthropic event named by ``name``).

    The adapter always asks its upstream for usage. The event that carries it has ``usage`` set;
    the operation decides whether the caller sees it.
    """

    chunk: dict[str, Any]
    usage: Usage | None = None
    text: str = field(default="")  # the content delta, for counting tokens of a cut stream
    raw: bytes | None = None  # the chunk's JSON exactly as the upstream sent it: relayed without re-encoding
    more: bool = False  # another event already arrived with this one: the pipeline writes them together
    name: str | None = None  # the SSE ``event:`` field, for dialects that name their events


class Provider(Protocol):
    """What the pipeline needs from a provider: a check, one call, and one stream."""

    name: str

    def check(self, request: Any, target: Target) -> Unsupported | None:
        """Whether ``target`` can take this very request (content it cannot carry, a tool it lacks)."""
        ...

    async def complete(self, request: Any, target: Target, ctx: CallContext) -> Completion: ...

    def stream(self, request: Any, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        """Open the upstream stream. Connection and status errors must surface on the first
        ``__anext__`` (before any chunk), so the router can still fall back."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class KeepsObjects(Protocol):
    """A provider whose upstream keeps what it answered (Azure's stored responses) and can read or delete it.
    Providers without state do not implement it; one that does may still answer ``Unsupported`` per operation."""

    async def stored(self, operation: str, object_id: str, target: Target, ctx: CallContext, *,
                     delete: bool = False) -> dict[str, Any] | Unsupported | None:
        """The object ``operation`` keeps under ``object_id`` (or, with ``delete``, the deletion's answer);
        None when the upstream has no such object (expired, deleted)."""
        ...

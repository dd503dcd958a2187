"""What an operation tells the one pipeline: how to screen it, read its usage, and render it.

Chat completions, embeddings, the Responses API, Anthropic Messages and the task API all run the
same pipeline (``operations/pipeline.py``). Each is described once by an ``Operation``: its request
model's prompt (what guardrails screen and count), how usage and text are read from a whole answer
and from one stream event (relays pass wire JSON through, so the dialect knows where usage sits),
and how events and errors are framed for the caller.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from gateway_lib.errors import GatewayError
from gateway_lib.providers.base import StreamEvent, Usage

_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps builds an encoder per call when given options

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.guardrails.screen import Prompt
    from gateway_lib.routing.plan import RoutePlan

R = TypeVar("R")


def sse(data: dict[str, Any], name: str | None = None) -> bytes:
    """One Server-Sent Event; ``name`` becomes its ``event:`` field (Responses and Anthropic name theirs)."""
    payload = b"data: " + _COMPACT.encode(data).encode() + b"\n\n"
    return b"event: " + name.encode() + b"\n" + payload if name else payload


def _relayed(event: StreamEvent) -> bytes:
    """The event as the upstream sent it when it is unchanged; else re-encoded."""
    data = b"data: " + event.raw + b"\n\n" if event.raw is not None else sse(event.chunk)
    return b"event: " + event.name.encode() + b"\n" + data if event.name else data


def _openai_error(error: GatewayError) -> dict[str, Any]:
    return error.body()


@dataclass(frozen=True)
class Operation(Generic[R]):
    """One operation's part in the pipeline. ``R`` is its validated request model."""

    name: str  # the capability it needs: chat | embeddings | responses | messages
    route: str  # the route label on cost rows and telemetry
    prompt: Callable[[R], Prompt]  # what guardrails screen and count
    usage: Callable[[dict[str, Any]], Usage | None]  # from a whole answer (None: unreported)
    answer_text: Callable[[dict[str, Any]], str]  # what an answer generated (billing an answer without usage)
    stream_usage: Callable[[StreamEvent], Usage | None] = field(default=lambda event: event.usage)
    stream_text: Callable[[StreamEvent], str] = field(default=lambda event: event.text)
    frame: Callable[[R, StreamEvent], bytes | None] = field(default=lambda request, event: _relayed(event))
    stream_end: bytes = b""  # what closes a whole stream (chat's ``data: [DONE]``)
    error_body: Callable[[GatewayError], dict[str, Any]] = field(default=_openai_error)  # the dialect's shape
    error_event: str | None = None  # the ``event:`` name of a mid-stream error, in dialects that name events
    sequenced: bool = False  # events carry ``sequence_number`` (Responses): an error event takes the next one

    def error_frame(self, error: GatewayError, last: StreamEvent | None = None) -> bytes:
        """A mid-stream error in the dialect's shape; ``last``: the event the caller received before it."""
        body = self.error_body(error)
        if self.sequenced:
            number = last.chunk.get("sequence_number") if last is not None else None
            body["sequence_number"] = number + 1 if isinstance(number, int) else 0
        return sse(body, self.error_event)


class KeptState(Protocol):
    """A request's part in state its target keeps between requests (the Responses API's stored responses):
    ``operations/response_state.py``. The pipeline calls it where routing and answers pass."""

    async def pin(self, plan: RoutePlan) -> RoutePlan:
        """The plan narrowed to the target that keeps what the request continues (or raises)."""
        ...

    async def keep(self, target: Target, answer: dict[str, Any]) -> None:
        """Note a whole answer the target keeps, before the caller sees it."""
        ...

    async def see(self, target: Target, event: StreamEvent) -> None:
        """The same for a stream, event by event, before each goes out."""
        ...

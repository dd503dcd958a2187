"""What an operation is on Bedrock: the targets that serve it, and how it is checked, called and streamed.

Each operation's module ends with its ``OPERATION``; ``operations.OPERATIONS`` lists them, and the provider's
capabilities and the adapter's dispatch both come from that list. A new operation is a module and a row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway_lib.config.catalog import Target
from gateway_lib.errors import InvalidRequest
from gateway_lib.providers.base import CallContext, Completion, StreamEvent, Unsupported

CHECK = CallContext(request_id="check")  # a dry run of a translation carries no real request's context


class Calls(Protocol):
    """The adapter's boto3 calls, run on its pool; botocore's failures arrive as ProviderError."""

    async def converse(self, ctx: CallContext, region: str, kwargs: dict[str, Any]) -> Any: ...

    async def invoke(self, ctx: CallContext, region: str, kwargs: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """InvokeModel: the body's bytes and the response's HTTP headers."""
        ...


class Translator(Protocol):
    def translate(self, event: Any) -> Iterable[StreamEvent]: ...


@dataclass(frozen=True)
class StreamCall:
    method: str  # the boto3 method: converse_stream, invoke_model_with_response_stream
    key: str  # the response key its events are under
    kwargs: dict[str, Any]
    translator: Translator


Complete = Callable[[Calls, Any, Target, CallContext, int], Awaitable[Completion]]
Stream = Callable[[Any, Target, CallContext, int], StreamCall]


def _no_check(request: Any, target: Target) -> Unsupported | None:
    return None


@dataclass(frozen=True)
class BedrockOperation:
    serves: Callable[[Target], bool]
    complete: Complete  # (calls, request, target, ctx, created) -> the whole answer
    stream: Stream | None = None  # None: served whole only
    check: Callable[[Any, Target], Unsupported | None] = _no_check  # what the translation cannot carry


def converts(translate: Callable[[Any, Target, CallContext], Any]) -> Callable[[Any, Target], Unsupported | None]:
    """A check that dry-runs ``translate``: what it refuses, this target does not support."""
    def check(request: Any, target: Target) -> Unsupported | None:
        try:
            translate(request, target, CHECK)
        except InvalidRequest as error:
            return Unsupported(error.message, error.param, error.code or "unsupported_parameter")
        return None

    return check

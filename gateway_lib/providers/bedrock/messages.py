"""Anthropic Messages on Bedrock's InvokeModel, in Anthropic's own format.

The body is the caller's Messages request less what Bedrock does not take (model, stream, metadata,
the gateway's hints), plus ``anthropic_version``; the answer is relayed as Anthropic wrote it. A stream's
chunks are Anthropic's events, each inside one event-stream ``chunk``; they go out unchanged except the
last, whose ``amazon-bedrock-invocationMetrics`` (Bedrock's, not Anthropic's) is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.errors import ProviderError
from gateway_lib.operations.messages import MessagesRequest, answer_usage
from gateway_lib.providers.base import CHAT, CallContext, Completion, StreamEvent, Usage
from gateway_lib.providers.bedrock.operation import BedrockOperation, Calls, StreamCall
from gateway_lib.providers.bedrock.transform import PROVIDER, error_from_aws

ANTHROPIC_VERSION = "bedrock-2023-05-31"
_METRICS = "amazon-bedrock-invocationMetrics"
# Anthropic's in-stream error types, as the gateway's provider error kinds.
_STREAM_ERRORS = {"overloaded_error": "server_error", "api_error": "server_error", "rate_limit_error": "rate_limited",
                  "invalid_request_error": "bad_request"}


def is_anthropic(deployment: str) -> bool:
    """A model id, an inference profile id or an ARN naming one of Anthropic's models."""
    return re.search(r"(^|[./])anthropic\.", deployment) is not None


def invoke_kwargs(request: MessagesRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
    body = request.wire_body(ctx.max_tokens) | {"anthropic_version": ANTHROPIC_VERSION}
    return {"modelId": target.deployment, "body": json.dumps(body, separators=(",", ":")),
            "contentType": "application/json", "accept": "application/json"}


def from_invoke(raw: bytes) -> Completion:
    """InvokeModel's body -> the Anthropic ``message`` as the caller gets it."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("content"), list):
        raise ProviderError("Bedrock returned an unreadable response.", provider=PROVIDER, kind="malformed",
                            retryable=True)
    return Completion(body=body, usage=answer_usage(body))


class MessagesStreamTranslator:
    """InvokeModelWithResponseStream events -> Anthropic's SSE events, usage read on ``message_delta``.

    ``message_start`` is held until the next event: until an event is yielded the stream can still fall
    back, and a failure right after it should (nothing was produced).
    """

    def __init__(self) -> None:
        self._held: StreamEvent | None = None
        self._input = 0

    def translate(self, event: Mapping[str, Any]) -> list[StreamEvent]:
        for key, value in event.items():
            if key.endswith("Exception"):
                raise error_from_aws(key, None, str((value or {}).get("message", "")))
        chunk = event.get("chunk")
        if not isinstance(chunk, dict) or "bytes" not in chunk:
            return []
        out = self._event(chunk["bytes"])
        if out.name == "message_start":
            self._held = out
            return []
        if self._held is not None:
            self._held.more, held, self._held = True, self._held, None
            return [held, out]
        return [out]

    def _event(self, raw: bytes) -> StreamEvent:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ValueError("an Anthropic stream event is not a typed JSON object")
        kind = data["type"]
        if kind == "error":
            error: dict[str, Any] = data["error"] if isinstance(data.get("error"), dict) else {}
            raise ProviderError(f"Bedrock reported an error mid-stream ({error.get('type')}).", provider=PROVIDER,
                                kind=_STREAM_ERRORS.get(str(error.get("type")), "server_error"), retryable=True)
        usage: Usage | None = None
        if kind == "message_start":
            start = answer_usage(data.get("message") or {})
            self._input = start.prompt_tokens if start else 0
        elif kind == "message_delta" and isinstance(data.get("usage"), dict):
            output = data["usage"].get("output_tokens")
            usage = Usage(self._input, output) if isinstance(output, int) and output >= 0 else None
        if _METRICS in data or b"\n" in raw:  # one SSE data line, in Anthropic's format only
            data.pop(_METRICS, None)
            raw = json.dumps(data, separators=(",", ":")).encode()
        return StreamEvent(data, usage=usage, text=_text(data), raw=raw, name=kind)


def _text(data: dict[str, Any]) -> str:
    delta = data.get("delta") if data.get("type") == "content_block_delta" else None
    if not isinstance(delta, dict):
        return ""
    return str(delta.get("text") or delta.get("partial_json") or delta.get("thinking") or "")


async def complete(calls: Calls, request: MessagesRequest, target: Target, ctx: CallContext, created: int) -> Completion:
    raw, _ = await calls.invoke(ctx, target.region, invoke_kwargs(request, target, ctx))
    return from_invoke(raw)


def stream(request: MessagesRequest, target: Target, ctx: CallContext, created: int) -> StreamCall:
    return StreamCall("invoke_model_with_response_stream", "body", invoke_kwargs(request, target, ctx),
                      MessagesStreamTranslator())


# Bedrock's own validation answers for what the body carries: there is nothing to check before sending.
OPERATION = BedrockOperation(serves=lambda target: target.kind == CHAT and is_anthropic(target.deployment),
                             complete=complete, stream=stream)

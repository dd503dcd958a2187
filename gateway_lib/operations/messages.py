"""Anthropic Messages as an operation: its request models, the chat-shaped view guardrails screen and
count, Anthropic's usage, and Anthropic's error shape ``{"type": "error", "error": {"type", "message"}}``.

Bedrock's Anthropic models take the request in this very format (``providers/bedrock/messages.py``), so
content blocks stay as the caller wrote them; the chat view exists only to screen and estimate.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from gateway_lib.errors import GatewayError, InvalidRequest
from gateway_lib.operations.base import Operation
from gateway_lib.operations.schema import Message, Priority, ProviderHint, ToolCall, ToolCallFunction
from gateway_lib.providers.base import MESSAGES, StreamEvent, Usage, usage_of

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
# Fields of the Messages API Bedrock's InvokeModel does not take (the gateway keeps them to itself).
GATEWAY_ONLY = frozenset({"model", "stream", "metadata", "service_tier", "provider_hint", "priority"})
_BETA = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a beta feature's name, e.g. context-1m-2025-08-07


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else _texts(self.content)


class _Conversation(BaseModel):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share."""

    model_config = ConfigDict(extra="forbid", strict=True)
    produces_output: ClassVar[bool] = True
    token_param: ClassVar[str] = "max_tokens"

    model: str = Field(min_length=1, max_length=256)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @cached_property
    def chat_messages(self) -> list[Message]:
        """The conversation as chat messages: what guardrails screen and count."""
        out: list[Message] = []
        if self.system:
            out.append(Message(role="system", content=self.system if isinstance(self.system, str)
                               else _texts(self.system)))
        for message in self.messages:
            out += _chat(message)
        return out


class MessagesRequest(_Conversation):
    """``POST /v1/messages``, plus the gateway's routing hints."""

    operation: ClassVar[str] = MESSAGES

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # structured output (format: a JSON schema), as Bedrock takes it
    service_tier: str | None = None
    provider_hint: ProviderHint = None
    priority: Priority | None = None
    _betas: tuple[str, ...] = PrivateAttr(default=())  # the ``anthropic-beta`` header's features

    def with_betas(self, header: str | None) -> MessagesRequest:
        """The request with the beta features its ``anthropic-beta`` header names (comma-separated), which
        Bedrock takes in the body as ``anthropic_beta``; a malformed name is a 400 naming the header."""
        names = tuple(name.strip() for name in (header or "").split(",") if name.strip())
        bad = next((name for name in names if not _BETA.fullmatch(name)), None)
        if bad is not None:
            raise InvalidRequest(f"anthropic-beta: {bad[:64]!r} is not a beta feature name.", param="anthropic-beta")
        self._betas = names
        return self

    @property
    def requested_max_tokens(self) -> int:
        return self.max_tokens

    @property
    def max_completion_tokens(self) -> int:
        return self.max_tokens

    def features(self) -> frozenset[str]:
        return frozenset()

    @property
    def prompt(self) -> _Prompt:
        return _Prompt(self)

    def wire_body(self, max_tokens: int | None) -> dict[str, Any]:
        """The request in Anthropic's own format, less what only the gateway reads, with its token cap."""
        body = self.model_dump(mode="json", exclude_unset=True, exclude=set(GATEWAY_ONLY))
        body["max_tokens"] = max_tokens or self.max_tokens
        if self._betas:
            body["anthropic_beta"] = list(self._betas)
        return body


class CountTokensRequest(_Conversation):
    """``POST /v1/messages/count_tokens``: routed as a Messages request would be, so it takes the same models."""

    operation: ClassVar[str] = MESSAGES
    stream: ClassVar[bool] = False
    provider_hint: ClassVar[None] = None
    priority: ClassVar[None] = None
    requested_max_tokens: ClassVar[None] = None

    def features(self) -> frozenset[str]:
        return frozenset()

    @property
    def prompt(self) -> _Prompt:
        return _Prompt(self)


class _Prompt:
    """The chat-shaped view of a Messages request, as guardrails read it."""

    produces_output: ClassVar[bool] = True
    token_param: ClassVar[str] = "max_tokens"

    def __init__(self, request: _Conversation) -> None:
        self._request = request
        self.messages = request.chat_messages
        self.tools = request.tools
        self.response_format = None
        self.max_completion_tokens = getattr(request, "max_tokens", None)
        self.requested_max_tokens = self.max_completion_tokens


def _chat(message: AnthropicMessage) -> list[Message]:
    if isinstance(message.content, str):
        return [Message(role=message.role, content=message.content)]
    parts: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    for block in message.content:
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": "data:image"}})  # counted at its worst case
        elif kind == "tool_use":
            calls.append(ToolCall(id=str(block.get("id", "")), function=ToolCallFunction(
                name=str(block.get("name", "")), arguments=json.dumps(block.get("input", {})))))
        elif kind == "tool_result":
            content = block.get("content")
            text = content if isinstance(content, str) else _texts(content if isinstance(content, list) else [])
            results.append(Message(role="tool", content=text, tool_call_id=str(block.get("tool_use_id", ""))))
        elif kind == "thinking":
            parts.append({"type": "text", "text": str(block.get("thinking", ""))})
        else:  # documents, search results...: their JSON stands in for what the model reads
            parts.append({"type": "text", "text": json.dumps(block, separators=(",", ":"))})
    head = [Message(role=message.role, content=parts or None, tool_calls=calls or None)] if parts or calls else []
    return results + head


def _texts(blocks: list[Any]) -> str:
    return "\n".join(str(b.get("text", "")) for b in blocks if isinstance(b, dict) and b.get("type") == "text")


# ---------------------------------------------------------------- reading answers and rendering errors


def answer_usage(body: dict[str, Any]) -> Usage | None:
    """Anthropic's input_tokens leave out prompt-cache reads and writes: billed here as input too."""
    usage = usage_of(body.get("usage"), "input_tokens", "output_tokens")
    if usage is None:
        return None
    cached = sum(n for key in ("cache_creation_input_tokens", "cache_read_input_tokens")
                 if isinstance(n := body["usage"].get(key), int) and n > 0)
    return Usage(usage.prompt_tokens + cached, usage.completion_tokens)


def answer_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for block in body.get("content") or []:
        if isinstance(block, dict):
            parts.append(str(block.get("text") or block.get("thinking") or ""))
            if block.get("type") == "tool_use":
                parts += [str(block.get("name") or ""), json.dumps(block.get("input", {}))]
    return "".join(parts)


def error_body(error: GatewayError) -> dict[str, Any]:
    """Anthropic's error shape; the SDKs pick their exception class by status, so statuses stay the gateway's."""
    kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def frame(request: MessagesRequest, event: StreamEvent) -> bytes:
    name = event.name or str(event.chunk.get("type") or "message")
    data = event.raw if event.raw is not None else json.dumps(event.chunk, separators=(",", ":")).encode()
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


ANTHROPIC_MESSAGES: Operation[MessagesRequest] = Operation(
    name=MESSAGES, route="messages", prompt=lambda request: request.prompt, usage=answer_usage,
    answer_text=answer_text, frame=frame, error_body=error_body, error_event="error",
)

"""OpenAI Chat Completions as an operation: the request is its own prompt, usage is OpenAI's."""

from __future__ import annotations

from typing import Any

from gateway_lib.operations.base import Operation, sse
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import CHAT, StreamEvent, Usage, usage_of

SSE_DONE = b"data: [DONE]\n\n"


def answer_usage(body: dict[str, Any]) -> Usage | None:
    return usage_of(body.get("usage"), "prompt_tokens", "completion_tokens")


def answer_text(body: dict[str, Any]) -> str:
    """What a whole answer generated: its content, tool-call names and arguments (for a usage estimate)."""
    parts: list[str] = []
    for choice in body.get("choices") or []:
        message = choice.get("message") or {} if isinstance(choice, dict) else {}
        content = message.get("content")
        parts.append(content if isinstance(content, str) else "")
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {} if isinstance(call, dict) else {}
            parts += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    return "".join(parts)


def frame(request: ChatRequest, event: StreamEvent) -> bytes | None:
    """The chunk as the caller should see it: the gateway always asks for usage, the caller may not have."""
    chunk = event.chunk
    if event.usage is None or request.include_usage:
        return b"data: " + event.raw + b"\n\n" if event.raw else sse(chunk)
    if not chunk.get("choices"):
        return None  # the usage-only final chunk the caller did not ask for
    return sse({k: v for k, v in chunk.items() if k != "usage"})


CHAT_COMPLETIONS: Operation[ChatRequest] = Operation(
    name=CHAT, route="chat", prompt=lambda request: request, usage=answer_usage, answer_text=answer_text,
    frame=frame, stream_end=SSE_DONE,
)

"""Pure transforms between the OpenAI Responses API and Bedrock Converse.

The request goes through the chat view (``ResponsesRequest.as_chat``) and ``transform.to_converse_request``,
so it has the same documented gaps as chat (see ``transform``): a JSON schema in ``text.format`` is an
instruction in the system prompt, not enforced. Bedrock keeps no responses: ``store`` and
``previous_response_id`` never reach this module (routing refuses them by capability).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.errors import ProviderError
from gateway_lib.operations.responses import ResponsesRequest
from gateway_lib.providers.base import CHAT, CallContext, Completion, StreamEvent, Usage
from gateway_lib.providers.bedrock.operation import BedrockOperation, Calls, StreamCall, converts
from gateway_lib.providers.bedrock.transform import (
    PROVIDER,
    finish_reason,
    raise_exception_event,
    to_converse_request,
    usage_from,
)


def to_converse(request: ResponsesRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
    return to_converse_request(request.as_chat(), target, ctx)


def from_converse(response: Mapping[str, Any], request: ResponsesRequest, target: Target, *, created: int) -> Completion:
    """A Converse response -> a Responses API ``response`` object."""
    message = response.get("output", {}).get("message")
    if not isinstance(message, dict) or "stopReason" not in response:  # what botocore could parse of a cut body
        raise ProviderError("Bedrock returned an unreadable response.", provider=PROVIDER, kind="malformed",
                            retryable=True)
    status = _status(response.get("stopReason"))  # a malformed model output raises here: another target may do better
    output: list[dict[str, Any]] = []
    for block in message.get("content", []):
        if "text" in block:
            output.append(_message(block["text"], "completed"))
        elif "toolUse" in block:
            use = block["toolUse"]
            output.append(_function_call(use["toolUseId"], use["name"], json.dumps(use.get("input", {})), "completed"))
    usage = usage_from(response.get("usage"))
    body = response_object(request, target, _id("resp"), created, status, output, usage)
    return Completion(body=body, usage=usage)


def response_object(request: ResponsesRequest, target: Target, response_id: str, created: int, status: str,
                    output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
    """The ``response`` object, echoing the request's settings as OpenAI does."""
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "model": target.model,
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature, "top_p": request.top_p, "tools": request.tools or [],
        "tool_choice": request.tool_choice or "auto", "parallel_tool_calls": request.parallel_tool_calls is not False,
        "text": {"format": (request.text.format if request.text and request.text.format else {"type": "text"})},
        "metadata": request.metadata or {}, "store": False, "previous_response_id": None, "truncation": "disabled",
        "usage": _usage(usage) if usage is not None else None,
    }


def _usage(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _status(stop_reason: str | None) -> str:
    return "incomplete" if finish_reason(stop_reason) == "length" else "completed"


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or _id("msg"), "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(call_id: str, name: str, arguments: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class ResponsesStreamTranslator:
    """ConverseStream events -> the Responses API's event sequence, numbered by ``sequence_number``.

    ``response.created`` and ``response.in_progress`` go out with the first output, not on messageStart:
    until an event is yielded the stream can still fall back. Converse opens a content block explicitly
    only for a tool call; a text block starts with its first delta.
    """

    def __init__(self, request: ResponsesRequest, target: Target, *, created: int) -> None:
        self._request, self._target, self._created = request, target, created
        self._id = _id("resp")
        self._sequence = 0
        self._started = False
        self._output: list[dict[str, Any]] = []
        self._open: dict[int, dict[str, Any]] = {}  # Converse block index -> its output item, while open
        self._text: dict[int, str] = {}  # Converse block index -> the text of its open message so far
        self._status = "completed"

    def translate(self, event: Mapping[str, Any]) -> list[StreamEvent]:
        raise_exception_event(event)
        out: list[StreamEvent] = []
        if "contentBlockStart" in event:
            out += self._tool_start(event["contentBlockStart"])
        elif "contentBlockDelta" in event:
            out += self._delta(event["contentBlockDelta"])
        elif "contentBlockStop" in event:
            out += self._close(event["contentBlockStop"].get("contentBlockIndex", 0))
        elif "messageStop" in event:
            self._status = _status(event["messageStop"].get("stopReason"))
            for index in list(self._open):
                out += self._close(index)
        elif "metadata" in event:
            out += self._finish(usage_from(event["metadata"].get("usage")))
        if out and not self._started:
            self._started = True
            head = response_object(self._request, self._target, self._id, self._created, "in_progress", [], None)
            out[:0] = [self._event("response.created", response=head),
                       self._event("response.in_progress", response=head)]
            for number, item in enumerate(out):  # numbered in the order they go out
                item.chunk["sequence_number"] = number
            self._sequence = len(out)
        return out

    def _event(self, kind: str, generated: str = "", usage: Usage | None = None, **fields: Any) -> StreamEvent:
        """One event; ``generated`` is the model output it carries (what a cut stream is billed from)."""
        chunk = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return StreamEvent(chunk, usage=usage, text=generated, name=kind)

    def _add(self, index: int, item: dict[str, Any]) -> list[StreamEvent]:
        self._open[index] = item
        self._output.append(item)
        return [self._event("response.output_item.added", output_index=len(self._output) - 1, item=dict(item))]

    def _tool_start(self, start: Mapping[str, Any]) -> list[StreamEvent]:
        tool = start.get("start", {}).get("toolUse")
        if not tool:
            return []
        return self._add(start.get("contentBlockIndex", 0),
                         _function_call(tool["toolUseId"], tool["name"], "", "in_progress"))

    def _delta(self, delta_event: Mapping[str, Any]) -> list[StreamEvent]:
        delta, index = delta_event.get("delta", {}), delta_event.get("contentBlockIndex", 0)
        out: list[StreamEvent] = []
        if "text" in delta:
            if index not in self._open:
                out += self._add(index, _message("", "in_progress"))
                out.append(self._event("response.content_part.added", item_id=self._open[index]["id"],
                                       output_index=self._position(index), content_index=0, part=_text_part("")))
            item = self._open[index]
            self._text[index] = self._text.get(index, "") + delta["text"]
            out.append(self._event("response.output_text.delta", generated=delta["text"], item_id=item["id"],
                                   output_index=self._position(index), content_index=0, delta=delta["text"],
                                   logprobs=[]))
        elif "toolUse" in delta and index in self._open:
            item, arguments = self._open[index], str(delta["toolUse"].get("input", ""))
            item["arguments"] += arguments
            out.append(self._event("response.function_call_arguments.delta", generated=arguments, item_id=item["id"],
                                   output_index=self._position(index), delta=arguments))
        return out  # reasoning and citations have no event here

    def _close(self, index: int) -> list[StreamEvent]:
        item = self._open.pop(index, None)
        if item is None:
            return []
        position, out = self._position_of(item), []
        if item["type"] == "message":
            text = self._text.pop(index, "")
            item.update(status="completed", content=[_text_part(text)])
            out.append(self._event("response.output_text.done", item_id=item["id"], output_index=position,
                                   content_index=0, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=position,
                                   content_index=0, part=_text_part(text)))
        else:
            item["status"] = "completed"
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=position, name=item["name"], arguments=item["arguments"]))
        out.append(self._event("response.output_item.done", output_index=position, item=dict(item)))
        return out

    def _finish(self, usage: Usage | None) -> list[StreamEvent]:
        out = [event for index in list(self._open) for event in self._close(index)]
        final = response_object(self._request, self._target, self._id, self._created, self._status,
                                self._output, usage)
        kind = "response.incomplete" if self._status == "incomplete" else "response.completed"
        return [*out, self._event(kind, usage=usage, response=final)]

    def _position(self, index: int) -> int:
        return self._position_of(self._open[index])

    def _position_of(self, item: dict[str, Any]) -> int:
        return next(i for i, candidate in enumerate(self._output) if candidate is item)


async def complete(calls: Calls, request: ResponsesRequest, target: Target, ctx: CallContext, created: int) -> Completion:
    response = await calls.converse(ctx, target.region, to_converse(request, target, ctx))
    return from_converse(response, request, target, created=created)


def stream(request: ResponsesRequest, target: Target, ctx: CallContext, created: int) -> StreamCall:
    return StreamCall("converse_stream", "stream", to_converse(request, target, ctx),
                      ResponsesStreamTranslator(request, target, created=created))


OPERATION = BedrockOperation(serves=lambda target: target.kind == CHAT, complete=complete, stream=stream,
                             check=converts(to_converse))

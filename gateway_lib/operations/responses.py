"""The OpenAI Responses API as an operation: its request model, the chat-shaped view guardrails screen,
and how usage and text are read from a whole response and from its named stream events.

Azure OpenAI relays the request as sent (``wire_body``); Bedrock translates it through Converse
(``providers/bedrock/responses.py``), reading the same chat view (``as_chat``) the chat transform reads.
Input items are checked here, where a mistake can be named as the caller wrote it (``input[2].call_id``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway_lib.errors import GatewayError, InvalidRequest
from gateway_lib.operations.base import Operation, sse
from gateway_lib.operations.schema import ChatRequest, Message, Priority, ProviderHint, ToolCall, ToolCallFunction
from gateway_lib.providers.base import RESPONSES, StreamEvent, Usage, usage_of

_GATEWAY_FIELDS = frozenset({"provider_hint", "priority"})
_TEXT_PARTS = {"input_text", "output_text", "text"}
_ROLES = {"user", "assistant", "system", "developer"}
_TOOL_CHOICES = ("none", "auto", "required")
MIN_OUTPUT_TOKENS = 16  # OpenAI's and Azure's Responses API refuse a smaller max_output_tokens


class InputItem(BaseModel):
    """One item of ``input``: a message, a function call echoed back, or its output. SDKs echo output
    items back with more keys (``id``, ``status``, ``annotations``): ignored, as chat ignores them."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: str | None = None
    role: str | None = None
    content: str | list[dict[str, Any]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[dict[str, Any]] | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: what the gateway takes of OpenAI's request, plus its routing hints."""

    model_config = ConfigDict(extra="forbid", strict=True)
    operation: ClassVar[str] = RESPONSES
    produces_output: ClassVar[bool] = True
    token_param: ClassVar[str] = "max_output_tokens"

    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None  # reasoning models on Azure only (a feature)
    provider_hint: ProviderHint = None
    priority: Priority | None = None

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, stream: Any) -> Any:
        return False if stream is None else stream

    @field_validator("max_output_tokens")
    @classmethod
    def _at_least_openais_minimum(cls, tokens: int | None) -> int | None:
        if tokens is not None and tokens < MIN_OUTPUT_TOKENS:
            raise InvalidRequest(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                                 f"{MIN_OUTPUT_TOKENS}, but got {tokens} instead.", code="integer_below_min_value",
                                 param="max_output_tokens")
        return tokens

    @model_validator(mode="after")
    def _readable(self) -> ResponsesRequest:
        for index, tool in enumerate(self.tools or ()):
            if tool.get("type") != "function" or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise InvalidRequest("Only tools of type 'function' with a name are supported.", code="invalid_value",
                                     param=f"tools[{index}]")
        _check_tool_choice(self.tool_choice, {tool["name"] for tool in self.tools or ()})
        _ = self.messages, self.response_format  # read once, here, so a bad item is a 400 naming it
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    @property
    def max_completion_tokens(self) -> int | None:
        return self.max_output_tokens

    def features(self) -> frozenset[str]:
        """State kept upstream (only targets that keep responses can take it), and reasoning settings."""
        wanted = {"store": self.store, "previous_response_id": self.previous_response_id, "reasoning": self.reasoning}
        return frozenset(name for name, value in wanted.items() if value)

    # ---------------------------------------------------------------- the chat-shaped view

    @cached_property
    def messages(self) -> list[Message]:
        head = [Message(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            return [*head, Message(role="user", content=self.input)]
        return head + _messages(self.input)

    @property
    def chat_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return [{"type": "function", "function": {k: v for k, v in tool.items() if k in ("name", "description", "parameters")}}
                for tool in self.tools]

    @property
    def response_format(self) -> dict[str, Any] | None:
        form = self.text.format if self.text else None
        if not form or form.get("type") in (None, "text"):
            return None
        if form.get("type") == "json_schema":
            if not isinstance(form.get("schema"), dict) or not isinstance(form.get("name"), str):
                raise InvalidRequest("text.format of type 'json_schema' needs a 'name' and a 'schema' object.",
                                     code="invalid_value", param="text.format")
            spec = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
            return {"type": "json_schema", "json_schema": spec}
        if form.get("type") == "json_object":
            return {"type": "json_object"}
        raise InvalidRequest(f"text.format type '{form.get('type')}' is not supported.", code="invalid_value",
                             param="text.format")

    def as_chat(self) -> ChatRequest:
        """The same conversation as a chat request (for the Converse transform)."""
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        return ChatRequest.model_construct(
            model=self.model, messages=self.messages, tools=self.chat_tools, tool_choice=choice,
            response_format=self.response_format, temperature=self.temperature, top_p=self.top_p,
            max_completion_tokens=self.max_output_tokens, stream=self.stream)

    def wire_body(self, max_tokens: int | None) -> dict[str, Any]:
        """The request as the caller sent it, for a relay: the gateway's hints out, its token cap in."""
        body = self.model_dump(mode="json", exclude_unset=True, exclude=set(_GATEWAY_FIELDS))
        if max_tokens is not None:  # a cap from a nearly full context window may fall below the API's minimum
            body["max_output_tokens"] = max(max_tokens, MIN_OUTPUT_TOKENS)
        return body


def _check_tool_choice(choice: str | dict[str, Any] | None, tools: set[str]) -> None:
    """OpenAI's checks, made here so every target answers alike (a relay would pass a bad choice on)."""
    if isinstance(choice, str) and choice not in _TOOL_CHOICES:
        raise InvalidRequest(f"Invalid value: '{choice[:64]}'. Supported values are: 'none', 'auto', and 'required'.",
                             code="invalid_value", param="tool_choice")
    if not isinstance(choice, dict):
        return
    if not isinstance(choice.get("type"), str):
        raise InvalidRequest("Missing required parameter: 'tool_choice.type'.", code="missing_required_parameter",
                             param="tool_choice")
    if choice["type"] == "function" and choice.get("name") not in tools:
        raise InvalidRequest(f"Tool choice '{str(choice.get('name'))[:64]}' not found in 'tools' parameter.",
                             code="invalid_value", param="tool_choice")


def _messages(items: list[InputItem]) -> list[Message]:
    out: list[Message] = []
    for index, item in enumerate(items):
        kind = item.type or "message"
        where = f"input[{index}]"
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            call = ToolCall(id=_required(item.call_id, where, "call_id"),
                            function=ToolCallFunction(name=_required(item.name, where, "name"),
                                                      arguments=item.arguments or "{}"))
            if out and out[-1].role == "assistant" and out[-1].tool_calls is not None:
                out[-1].tool_calls.append(call)  # parallel calls: one assistant turn, as chat has them
            else:
                out.append(Message(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            output = item.output if isinstance(item.output, str) else _parts_text(item.output or [])
            out.append(Message(role="tool", content=output, tool_call_id=_required(item.call_id, where, "call_id")))
        else:
            raise InvalidRequest(f"Input items of type '{kind}' are not supported by this gateway.",
                                 code="invalid_value", param=f"{where}.type")
    return out


def _message(item: InputItem, where: str) -> Message:
    if item.role not in _ROLES:
        raise InvalidRequest(f"Invalid value for '{where}.role': expected one of {', '.join(sorted(_ROLES))}.",
                             code="invalid_value", param=f"{where}.role")
    if item.content is None:
        raise InvalidRequest(f"Missing required parameter: '{where}.content'.", code="missing_required_parameter",
                             param=f"{where}.content")
    content = item.content if isinstance(item.content, str) else [_part(p, f"{where}.content[{i}]")
                                                                  for i, p in enumerate(item.content)]
    return Message(role=item.role, content=content)  # type: ignore[arg-type]  # checked against _ROLES


def _part(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part.get("type")
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "refusal", "refusal": part["refusal"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail", "auto")}}
    raise InvalidRequest(f"Content part type '{kind}' is not supported here (input_text, output_text, refusal, "
                         "input_image by image_url).", code="invalid_value", param=where)


def _parts_text(parts: list[dict[str, Any]]) -> str:
    return "".join(str(p.get("text", "")) for p in parts if p.get("type") in _TEXT_PARTS)


def _required(value: str | None, where: str, name: str) -> str:
    if not value:
        raise InvalidRequest(f"Missing required parameter: '{where}.{name}'.", code="missing_required_parameter",
                             param=f"{where}.{name}")
    return value


# ---------------------------------------------------------------- reading answers and events


def answer_usage(body: dict[str, Any]) -> Usage | None:
    return usage_of(body.get("usage"), "input_tokens", "output_tokens")


def answer_text(body: dict[str, Any]) -> str:
    """What a response generated: message text, and function-call names and arguments."""
    parts: list[str] = []
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            parts += [str(item.get("name") or ""), str(item.get("arguments") or "")]
        content = item.get("content") if item.get("type") == "message" else None
        for part in content if isinstance(content, list) else ():  # a relayed answer is checked no deeper than "output"
            parts.append(str(part.get("text") or "") if isinstance(part, dict) else "")
    return "".join(parts)


def stream_usage(event: StreamEvent) -> Usage | None:
    """Usage sits on the terminal event's response (a relayed stream's events are read here)."""
    if event.usage is not None:
        return event.usage
    if event.chunk.get("type") in ("response.completed", "response.incomplete", "response.failed"):
        response = event.chunk.get("response")
        return answer_usage(response) if isinstance(response, dict) else None
    return None


def stream_text(event: StreamEvent) -> str:
    if event.text:
        return event.text
    if event.chunk.get("type") in ("response.output_text.delta", "response.function_call_arguments.delta"):
        return str(event.chunk.get("delta") or "")
    return ""


def frame(request: ResponsesRequest, event: StreamEvent) -> bytes:
    """Each event under its own ``event:`` name, as OpenAI sends them; relayed bytes stay as received."""
    name = event.name or str(event.chunk.get("type") or "") or None
    data = b"data: " + event.raw + b"\n\n" if event.raw is not None else sse(event.chunk)
    return b"event: " + name.encode() + b"\n" + data if name else data


def error_event(error: GatewayError) -> dict[str, Any]:
    """The Responses stream's ``error`` event (``Operation.error_frame`` numbers it after the last event)."""
    return {"type": "error", "code": error.code, "message": error.message, "param": error.param}


RESPONSES_API: Operation[ResponsesRequest] = Operation(
    name=RESPONSES, route="responses", prompt=lambda request: request, usage=answer_usage, answer_text=answer_text,
    stream_usage=stream_usage, stream_text=stream_text, frame=frame, error_body=error_event, error_event="error",
    sequenced=True,
)

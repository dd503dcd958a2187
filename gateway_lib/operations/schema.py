"""Request models at the JSON edge: OpenAI Chat Completions and the task API.

Top-level fields are those the installed ``openai`` SDK types (``chat_params``); any other is
**rejected** with 400 ``unknown_parameter`` (as OpenAI does), so a typo such as ``max_token`` never
silently changes behaviour. SDK parameters the gateway does not model are kept as sent (pydantic's
extras) for the relays that forward them. Unknown keys
inside a message are ignored: SDKs echo assistant messages back with extra keys
(``refusal``, ``audio``) and rejecting them would break multi-turn chats.

Types are strict, as OpenAI's are: ``"stream": "yes"``, ``"max_tokens": true`` or
``"temperature": "1.5"`` are 400s, not coerced (an int is still a valid float). Errors
name the parameter the way OpenAI does: ``messages[0].content``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway_lib.errors import InvalidRequest
from gateway_lib.operations import chat_params
from gateway_lib.providers import registry
from gateway_lib.providers.base import CHAT

# Gateway extensions: routing hints the upstream never sees.
_GATEWAY_ONLY = frozenset({"provider_hint", "priority"})

Role = Literal["system", "developer", "user", "assistant", "tool"]
Priority = Literal["low_cost", "low_latency", "quality"]


def _known_provider(hint: str | None) -> str | None:
    if hint is not None and hint not in registry.names():
        raise ValueError(f"must be one of {', '.join(registry.names())}")
    return hint


ProviderHint = Annotated[str | None, AfterValidator(_known_provider)]  # a registered provider's name


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined); used for size checks and token estimates."""
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ChatRequest(BaseModel):
    """OpenAI Chat Completions request, plus the gateway's routing hints."""

    # extra="allow" keeps the SDK-typed parameters not modelled below; ``_sdk_parameters`` refuses the rest.
    model_config = ConfigDict(extra="allow", strict=True)
    operation: ClassVar[str] = CHAT
    produces_output: ClassVar[bool] = True

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False  # null is accepted and means false, as OpenAI has it
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # Advisory: forwarded where the target's API takes them (docs in README "Chat parameters").
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    safety_identifier: str | None = Field(default=None, max_length=256)
    reasoning_effort: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    # Gateway extensions (ignored by OpenAI clients that do not send them).
    provider_hint: ProviderHint = None
    priority: Priority | None = None

    @model_validator(mode="before")
    @classmethod
    def _sdk_parameters(cls, payload: Any) -> Any:
        if not isinstance(payload, dict):
            return payload
        name = chat_params.unknown(payload)
        if name is not None:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", code="unknown_parameter",
                                 param=name)
        return chat_params.whole_numbers(payload)

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream(cls, stream: Any) -> Any:
        return False if stream is None else stream

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _whole_biases(cls, biases: Any) -> Any:
        return chat_params.whole_numbers(biases, tuple(biases)) if isinstance(biases, dict) else biases

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @model_validator(mode="after")
    def _one_token_cap(self) -> ChatRequest:
        # Raised as our own error (pydantic passes it through) so that it names the parameter.
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequest("Invalid value for 'max_completion_tokens': send max_tokens or max_completion_tokens, "
                                 "not both.", code="invalid_value", param="max_completion_tokens")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("Invalid value for 'stream_options': only allowed when 'stream' is true.",
                                 code="invalid_value", param="stream_options")
        return self

    @model_validator(mode="after")
    def _references_hold(self) -> ChatRequest:
        """What OpenAI refuses across fields; raised as our own errors so that they name the parameter."""
        for i, message in enumerate(self.messages):
            if message.role == "tool" and message.tool_call_id is None:
                raise InvalidRequest(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                                     code="missing_required_parameter", param=f"messages[{i}].tool_call_id")
        if self.response_format is not None and self.response_format.get("type") == "json_schema" \
                and self.response_format.get("json_schema") is None:
            raise InvalidRequest("Missing required parameter: 'response_format.json_schema'.",
                                 code="missing_required_parameter", param="response_format.json_schema")
        named = _named_function(self.tool_choice)
        if named is not None and named not in _function_names(self.tools):
            raise InvalidRequest(f"Invalid value for 'tool_choice': no function named '{named[:64]}' in 'tools'.",
                                 code="invalid_value", param="tool_choice")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def features(self) -> frozenset[str]:
        return chat_params.features(self)

    @property
    def choices(self) -> int:
        """Answers asked for (``n``): each may use up to the output cap."""
        return self.n or 1

    def wire_body(self, max_tokens: int | None) -> dict[str, Any]:
        """What the caller set, as OpenAI wire JSON; the output cap under the name the caller used."""
        body = self.model_dump(include=self.model_fields_set - _GATEWAY_ONLY, exclude_none=True)
        cap = max_tokens or self.requested_max_tokens
        if cap is not None:
            body["max_completion_tokens" if self.max_completion_tokens else "max_tokens"] = cap
        return body

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _named_function(tool_choice: str | dict[str, Any] | None) -> str | None:
    """The function ``{"type": "function", "function": {"name": ...}}`` names, if it names one."""
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _function_names(tools: list[dict[str, Any]] | None) -> set[str]:
    functions = (tool.get("function") for tool in tools or ())
    return {f["name"] for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)}


class GenerateRequest(BaseModel):
    """The task API: a prompt plus a named task template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    task: Literal["chat", "summarise", "extract", "classify", "rewrite"] = "chat"
    model: str = Field(default="chat-default", min_length=1, max_length=256)
    priority: Priority | None = None
    provider_hint: ProviderHint = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    labels: list[str] | None = None  # classify: the allowed labels
    fields: list[str] | None = None  # extract: the fields to pull out
    style: str | None = Field(default=None, max_length=200)  # rewrite: the target style


def parse_model(model: type[BaseModel], payload: Any) -> Any:
    """Validate ``payload``; the first problem becomes a 400 naming the offending parameter."""
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    param = _param(first["loc"]) or None
    if first["type"] in ("extra_forbidden", "missing"):
        # The last part is the field's own name, as the caller spelled it ("Temperature" is no union tag).
        loc = first["loc"]
        parent = _param(loc[:-1])
        param = (f"{parent}.{loc[-1]}" if parent else str(loc[-1])) if loc else None  # "" too: "stream_options."
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", code="unknown_parameter", param=param)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
    union = _union_at(first["loc"])
    if union is not None:  # one error per alternative of a union (str | list, ...): say which were tried
        alternatives = [e for e in errors if tuple(e["loc"][:union]) == tuple(first["loc"][:union])]
        deepest = max(alternatives, key=lambda e: len(_fields(e["loc"])))
        if len(_fields(deepest["loc"])) > len(_fields(first["loc"])):  # the caller chose a branch; it failed inside
            first, param = deepest, _param(deepest["loc"])
        else:
            kinds = " or ".join(dict.fromkeys(_kind(e["loc"][union]) for e in alternatives))
            return InvalidRequest(f"Invalid type for '{param}': expected {kinds}.", code="invalid_type", param=param)
    if first["type"] in _TYPE_ERRORS:
        return InvalidRequest(f"Invalid type for '{param}': expected {_TYPE_ERRORS[first['type']]}.",
                              code="invalid_type", param=param)
    message = str(first["msg"]).removeprefix("Value error, ")
    where = f"'{param}'" if param else "the request"
    return InvalidRequest(f"Invalid value for {where}: {message}.", code="invalid_value", param=param)


# pydantic puts the alternative's name into an error's location inside a union ("str", "list[str]", a model name)
_KINDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
          "list[str]": "an array of strings", "list[dict[str,any]]": "an array of objects", "dict[str,any]": "an object"}

_TYPE_ERRORS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
                "dict_type": "an object", "model_type": "an object", "list_type": "an array"}


def _is_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _KINDS or "[" in part or part[:1].isupper())


def _union_at(loc: tuple[int | str, ...]) -> int | None:
    return next((i for i, part in enumerate(loc) if _is_tag(part)), None)


def _kind(tag: int | str) -> str:
    return _KINDS.get(str(tag), str(tag))


def _fields(loc: tuple[int | str, ...]) -> list[int | str]:
    return [part for part in loc if not _is_tag(part)]


def _param(loc: tuple[int | str, ...]) -> str:
    """OpenAI's spelling of a location: ``messages[0].content``."""
    out = ""
    for part in _fields(loc):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out

"""Pure transforms between OpenAI Chat Completions and the Bedrock Converse API.

No I/O here: ``bedrock.py`` calls boto3 and hands the plain dicts to these functions.

Documented gaps (what Converse cannot express, and what we do instead):

* ``system``/``developer`` messages anywhere in the conversation go to the top-level
  ``system`` list, in order: Converse has no mid-conversation system turn.
* Consecutive messages of the same role are merged, because Converse requires user
  and assistant turns to alternate; ``tool`` messages become ``toolResult`` blocks in
  a user turn, so a run of tool results (plus a following user message) is one turn.
* ``temperature`` is clamped to 0..1 (Converse's documented range; OpenAI allows 0..2).
* ``response_format`` ``json_object``/``json_schema`` is best effort: an instruction
  (with the schema) is appended to the system prompt; the output is *not* enforced.
* ``tool_choice="none"`` omits the tools, unless the history already holds tool
  blocks: Converse then requires ``toolConfig``, so the tools stay (choice ``auto``).
* Images: only ``data:`` URLs (png/jpeg/gif/webp) are passed on; remote URLs are a 400
  because Converse takes bytes and the gateway does not fetch arbitrary URLs.
* ``presence_penalty``, ``frequency_penalty``, ``seed``, ``user`` and
  ``parallel_tool_calls`` have no Converse equivalent and are ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.errors import InvalidRequest, ProviderError
from gateway_lib.http import strict_json
from gateway_lib.operations.schema import ChatRequest, Message
from gateway_lib.providers.base import CallContext, Completion, StreamEvent, Usage, usage_of

PROVIDER = "bedrock"

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
# The model produced output that cannot be turned into an answer: another target may do better.
_MALFORMED_STOPS = ("malformed_model_output", "malformed_tool_use")
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}
_JSON_INSTRUCTION = "Respond with a single valid JSON object and nothing else: no prose, no code fences."
_CONVERSATION_START = "(start of the conversation)"

Block = dict[str, Any]
Turn = dict[str, Any]


# ---------------------------------------------------------------- request


def to_converse_request(request: ChatRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
    """OpenAI request -> keyword arguments for ``converse``/``converse_stream``."""
    system, turns = split_messages(request.messages)
    system += _response_format_instruction(request.response_format)
    has_tool_blocks = any("toolUse" in b or "toolResult" in b for t in turns for b in t["content"])
    if has_tool_blocks and not request.tools:
        # Bedrock wants a toolConfig whenever the history holds tool blocks; OpenAI lets a caller replay a tool
        # exchange and then ask without tools. Offering tools the caller did not would let the model call them,
        # so the exchange goes as text.
        turns, has_tool_blocks = _tool_blocks_as_text(turns), False
    kwargs: dict[str, Any] = {"modelId": target.deployment, "messages": turns}
    if system:
        kwargs["system"] = [{"text": text} for text in system]
    if inference := inference_config(request, ctx):
        kwargs["inferenceConfig"] = inference
    if tool_config := _tool_config(request.tools, request.tool_choice, has_tool_blocks):
        if not target.supports_tools:
            raise InvalidRequest(f"Model '{target.model}' does not support tools.", code="tools_unsupported",
                                 param="tools")
        kwargs["toolConfig"] = tool_config
    return kwargs


def split_messages(messages: Iterable[Message]) -> tuple[list[str], list[Turn]]:
    """System texts, and alternating user/assistant turns (same-role neighbours merged)."""
    system: list[str] = []
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            if text := message.text():
                system.append(text)
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message, index)
        if not blocks:
            continue  # Converse rejects empty turns and blank text blocks
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        # Converse requires a user turn first; OpenAI takes an assistant greeting (or instructions alone) first.
        turns.insert(0, {"role": "user", "content": [{"text": _CONVERSATION_START}]})
    return system, turns


def _tool_blocks_as_text(turns: list[Turn]) -> list[Turn]:
    def text(block: Block) -> Block:
        if "toolUse" in block:
            use = block["toolUse"]
            return {"text": f"[called tool {use['name']} (id {use['toolUseId']}) with {json.dumps(use['input'])}]"}
        if "toolResult" in block:
            result = block["toolResult"]
            output = " ".join(str(c.get("text", "")) for c in result["content"])
            return {"text": f"[result of tool call {result['toolUseId']}: {output}]"}
        return block

    return [{"role": t["role"], "content": [text(b) for b in t["content"]]} for t in turns]


def _blocks(message: Message, index: int) -> list[Block]:
    if message.role == "tool":
        return [_tool_result(message, index)]
    blocks = _content_blocks(message.content, index)
    for call in message.tool_calls or ():
        blocks.append({"toolUse": {"toolUseId": call.id, "name": call.function.name,
                                   "input": _tool_arguments(call.function.arguments, index)}})
    return blocks


def _content_blocks(content: str | list[dict[str, Any]] | None, index: int) -> list[Block]:
    if isinstance(content, str):
        return [{"text": content}] if content.strip() else []
    blocks: list[Block] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            if str(part.get("text", "")).strip():
                blocks.append({"text": str(part["text"])})
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), index))
        else:
            raise InvalidRequest(f"Content part type '{kind}' is not supported for this model.",
                                 code="unsupported_content", param=f"messages[{index}].content")
    return blocks


def _image_block(image_url: Any, index: int) -> Block:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param = f"messages[{index}].content"
    if not isinstance(url, str):
        raise InvalidRequest("An image part needs 'image_url.url', a string.", code="invalid_value", param=param)
    header, _, data = url.partition(",")
    mime = header.removeprefix("data:").removesuffix(";base64")
    if not header.startswith("data:") or not header.endswith(";base64") or mime not in _IMAGE_FORMATS:
        raise InvalidRequest("Images must be base64 data URLs (png, jpeg, gif or webp) for this model.",
                             code="unsupported_content", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("The image data URL is not valid base64.", code="invalid_value", param=param) from None
    return {"image": {"format": _IMAGE_FORMATS[mime], "source": {"bytes": raw}}}


def _tool_result(message: Message, index: int) -> Block:
    if not message.tool_call_id:
        raise InvalidRequest("A 'tool' message needs 'tool_call_id'.", code="missing_required_parameter",
                             param=f"messages[{index}].tool_call_id")
    return {"toolResult": {"toolUseId": message.tool_call_id, "content": [{"text": message.text() or "(no output)"}]}}


def _tool_arguments(arguments: str, index: int) -> dict[str, Any]:
    try:
        value = strict_json.loads(arguments or "{}")
    except (ValueError, RecursionError, InvalidRequest):  # bad JSON, a 4,300-digit number, 10,000 nested "["
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest("Tool call arguments must be a JSON object encoded as a string.",
                             code="invalid_value", param=f"messages[{index}].tool_calls")
    return value


def inference_config(request: ChatRequest, ctx: CallContext) -> dict[str, Any]:
    """maxTokens (the guardrail-clamped cap wins), temperature, topP, stopSequences."""
    config: dict[str, Any] = {}
    max_tokens = ctx.max_tokens if ctx.max_tokens is not None else request.requested_max_tokens
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    if request.temperature is not None:
        config["temperature"] = min(request.temperature, 1.0)
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop:
        config["stopSequences"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    return config


def _tool_config(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None,
                 has_tool_blocks: bool) -> dict[str, Any] | None:
    if not tools or (choice == "none" and not has_tool_blocks):
        return None
    config: dict[str, Any] = {"tools": [_tool_spec(tool, i) for i, tool in enumerate(tools)]}
    if choice in (None, "auto", "none"):
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str) and choice["function"]["name"]):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    else:
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or a named function.",
                             code="invalid_value", param="tool_choice")
    return config


def _tool_spec(tool: dict[str, Any], index: int) -> dict[str, Any]:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not function["name"]:
        raise InvalidRequest("Only tools of type 'function' with a name are supported.", code="invalid_value",
                             param=f"tools[{index}]")
    spec: dict[str, Any] = {"name": function["name"],
                            "inputSchema": {"json": function.get("parameters") or {"type": "object", "properties": {}}}}
    if function.get("description"):
        spec["description"] = function["description"]
    return {"toolSpec": spec}


def _response_format_instruction(response_format: dict[str, Any] | None) -> list[str]:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return []
    if kind == "json_object":
        return [_JSON_INSTRUCTION]
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("response_format.json_schema must be an object with a 'schema' object.",
                                 code="invalid_value", param="response_format.json_schema")
        return [f"{_JSON_INSTRUCTION} The object must match this JSON Schema: {json.dumps(spec.get('schema', {}))}"]
    raise InvalidRequest(f"response_format type '{kind}' is not supported.", code="invalid_value",
                         param="response_format")


# ---------------------------------------------------------------- response


def from_converse_response(response: Mapping[str, Any], target: Target, *, completion_id: str,
                           created: int) -> Completion:
    """A Converse response -> an OpenAI ``chat.completion``."""
    if not isinstance(response.get("output", {}).get("message"), dict) or "stopReason" not in response:
        # botocore hands back what it could parse of a truncated body (often nothing): not an empty answer
        raise ProviderError("Bedrock returned an unreadable response.", provider=PROVIDER, kind="malformed",
                            retryable=True)
    finish = finish_reason(response.get("stopReason"))
    blocks = response.get("output", {}).get("message", {}).get("content", [])
    text = "".join(b["text"] for b in blocks if "text" in b)
    tool_calls = [_tool_call(b["toolUse"]) for b in blocks if "toolUse" in b]
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = usage_from(response.get("usage"))
    body = {"id": completion_id, "object": "chat.completion", "created": created, "model": target.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage.as_openai()
    return Completion(body=body, usage=usage)


def finish_reason(stop_reason: str | None) -> str:
    if stop_reason in _MALFORMED_STOPS:
        raise ProviderError(f"Bedrock returned unusable model output ({stop_reason}).", provider=PROVIDER,
                            kind="malformed", retryable=True)
    return FINISH_REASONS.get(stop_reason or "", "stop")


def usage_from(usage: Any) -> Usage | None:
    return usage_of(usage, "inputTokens", "outputTokens")


def _tool_call(tool_use: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": tool_use["toolUseId"], "type": "function",
            "function": {"name": tool_use["name"], "arguments": json.dumps(tool_use.get("input", {}))}}


# ---------------------------------------------------------------- stream


class StreamTranslator:
    """ConverseStream events -> OpenAI chunks; holds the little state a stream needs.

    The role chunk always comes first; Bedrock numbers content blocks across text and
    tools, OpenAI numbers tool calls from 0, hence the index map.
    """

    def __init__(self, target: Target, *, completion_id: str, created: int) -> None:
        self._base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                      "model": target.model}
        self._tool_index: dict[int, int] = {}
        self._started = False

    def translate(self, event: Mapping[str, Any]) -> list[StreamEvent]:
        """One upstream event -> zero or more chunks; an exception event raises ProviderError."""
        raise_exception_event(event)
        out: list[StreamEvent] = []
        if "contentBlockStart" in event:
            out += self._block_start(event["contentBlockStart"])
        elif "contentBlockDelta" in event:
            out += self._block_delta(event["contentBlockDelta"])
        elif "messageStop" in event:
            out.append(self._chunk({}, finish_reason(event["messageStop"].get("stopReason"))))
        elif "metadata" in event:
            usage = usage_from(event["metadata"].get("usage"))
            if usage is not None:  # else the pipeline estimates it from what was streamed
                out.append(StreamEvent({**self._base, "choices": [], "usage": usage.as_openai()}, usage=usage))
        if out and not self._started:
            # The role chunk goes out with the first output, not on messageStart: until a chunk is yielded the
            # stream can still fall back, and a failure right after messageStart should (nothing was produced).
            out.insert(0, self._chunk({"role": "assistant", "content": ""}))
            self._started = True
        return out

    def _block_start(self, start: Mapping[str, Any]) -> list[StreamEvent]:
        tool = start.get("start", {}).get("toolUse")
        if not tool:
            return []
        index = self._tool_index.setdefault(start.get("contentBlockIndex", 0), len(self._tool_index))
        call = {"index": index, "id": tool["toolUseId"], "type": "function",
                "function": {"name": tool["name"], "arguments": ""}}
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, delta_event: Mapping[str, Any]) -> list[StreamEvent]:
        delta = delta_event.get("delta", {})
        if "text" in delta:
            return [StreamEvent(self._chunk({"content": delta["text"]}).chunk, text=delta["text"])]
        tool = delta.get("toolUse")
        block = delta_event.get("contentBlockIndex", 0)
        if tool is None or block not in self._tool_index:
            return []  # reasoning, citations and the like have no OpenAI chunk
        arguments = str(tool.get("input", ""))
        call = {"index": self._tool_index[block], "function": {"arguments": arguments}}
        # ``text`` is what a cut stream is billed from: the arguments are model output too (as on Azure).
        return [StreamEvent(self._chunk({"tool_calls": [call]}).chunk, text=arguments)]

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> StreamEvent:
        return StreamEvent({**self._base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


# ---------------------------------------------------------------- errors

_RATE_LIMITED = {"throttlingexception", "toomanyrequestsexception", "servicequotaexceededexception",
                 "throttling", "requestlimitexceeded"}
_SERVER = {"internalserverexception", "serviceunavailableexception", "modelnotreadyexception",
           "modelerrorexception", "modelstreamerrorexception", "internalfailure", "serviceunavailable",
           "resourcenotfoundexception"}  # not found: the target is misconfigured, not the caller's fault
_TIMEOUT = {"modeltimeoutexception", "requesttimeout", "requesttimeoutexception"}
_AUTH = {"accessdeniedexception", "accessdenied", "unrecognizedclientexception", "invalidsignatureexception",
         "expiredtokenexception", "expiredtoken", "invalidclienttokenid", "invalididentitytoken",
         "incompletesignature", "missingauthenticationtokenexception"}
_BAD_REQUEST = {"validationexception"}


def raise_exception_event(event: Mapping[str, Any]) -> None:
    """A stream's exception event (``throttlingException``, ``modelStreamErrorException``...) as our error."""
    for key, value in event.items():
        if key.endswith("Exception"):
            raise error_from_aws(key, None, str((value or {}).get("message", "")))


def error_from_aws(code: str, status: int | None, message: str, retry_after: float | None = None) -> ProviderError:
    """An AWS error code (HTTP or event-stream exception) -> our ProviderError.

    Auth failures are retryable: it is our credential that failed, and another
    provider can still serve the caller. Upstream text is shown only for validation
    errors, where it helps the caller; others may carry account ids and ARNs.
    """
    kind = _kind(code.lower(), status)
    retryable = kind != "bad_request"
    shown = f"Bedrock rejected the request: {message}" if kind == "bad_request" else f"Bedrock error ({code})."
    return ProviderError(shown, provider=PROVIDER, kind=kind, retryable=retryable, upstream_status=status,
                         retry_after=retry_after)


def _kind(code: str, status: int | None) -> str:
    for kind, codes in (("rate_limited", _RATE_LIMITED), ("server_error", _SERVER), ("timeout", _TIMEOUT),
                        ("auth", _AUTH), ("bad_request", _BAD_REQUEST)):
        if code in codes:
            return kind
    if status is None or status >= 500:
        return "server_error"
    if status == 429:
        return "rate_limited"
    if status == 408:
        return "timeout"
    return "auth" if status in (401, 403) else "bad_request"

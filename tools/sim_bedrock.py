"""Bedrock Runtime Converse and ConverseStream, as botocore expects them on the wire.

Shapes follow the bedrock-runtime service model shipped in botocore
(``botocore/data/bedrock-runtime/2023-09-30/service-2.json``): errors are a status,
``x-amzn-ErrorType`` and ``{"message": ...}``; streams are event-stream frames whose
``:event-type`` names a ``ConverseStreamOutput`` member, and mid-stream failures are
``:message-type exception`` frames naming one of its exception members.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import sim_text
from .sim_eventstream import broken_frame, event_frame, exception_frame
from .sim_http import Request, Send, StreamFaultFrames, drop_connection, send_bytes, send_json, send_stream
from .sim_state import Fault, SimState, replaces_answer, take_fault

PROVIDER = "bedrock"
_STOP = {"end": "end_turn", "length": "max_tokens", "stop": "stop_sequence", "filtered": "content_filtered"}
_ERROR_TYPES = {
    400: "ValidationException", 403: "AccessDeniedException", 404: "ResourceNotFoundException",
    408: "ModelTimeoutException", 424: "ModelErrorException", 429: "ThrottlingException",
    500: "InternalServerException", 503: "ServiceUnavailableException",
}
# ConverseStreamOutput only models these exceptions as stream events.
_STREAM_EXCEPTIONS = {400: "validationException", 424: "modelStreamErrorException", 429: "throttlingException",
                      503: "serviceUnavailableException"}


@dataclass(frozen=True)
class Answer:
    pieces: tuple[str, ...]  # text pieces, or tool-use input JSON pieces
    tool_use: dict[str, Any] | None  # {"toolUseId", "name", "input"}
    stop_reason: str
    input_tokens: int
    output_tokens: int

    def usage(self) -> dict[str, int]:
        return {"inputTokens": self.input_tokens, "outputTokens": self.output_tokens,
                "totalTokens": self.input_tokens + self.output_tokens}


class BedrockError(Exception):
    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.error_type = error_type or _ERROR_TYPES.get(status) or (
            "InternalServerException" if status >= 500 else "ValidationException")


async def handle_converse(request: Request, model_id: str, stream: bool, state: SimState, send: Send) -> None:
    """``POST /model/{modelId}/converse`` and ``/converse-stream``."""
    started = time.monotonic()
    try:
        body = _validated(request)
    except BedrockError as exc:
        await send_error(send, exc)
        return
    fault = await take_fault(state, PROVIDER, model_id, stream)
    if fault and replaces_answer(fault, stream):
        await non_stream_fault(send, fault)
        return
    answer = build_answer(body, model_id)
    if not stream:
        await send_json(send, 200, converse_body(answer, elapsed_ms(started)), request_id())
        return
    frames = stream_frames(answer, elapsed_ms(started))
    spelled = StreamFaultFrames(error=stream_error, malformed=broken_frame())
    await send_stream(send, frames, "application/vnd.amazon.eventstream", request_id(),
                      state.config.chunk_delay_ms, fault, spelled)


def json_body(request: Request) -> dict[str, Any]:
    """The signed request's JSON object body, or the ``BedrockError`` Bedrock answers instead."""
    auth = request.headers.get("authorization", "")
    # Any SigV4 signature is accepted unverified; Bedrock API keys arrive as bearer tokens.
    if not auth.startswith(("AWS4-HMAC-SHA256 ", "Bearer ")):
        raise BedrockError(403, "Missing Authentication Token", "MissingAuthenticationTokenException")
    body = request.json()
    if not isinstance(body, dict):
        raise BedrockError(400, "Malformed input request, please reformat your input and try again.")
    return body


def _validated(request: Request) -> dict[str, Any]:
    body = json_body(request)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BedrockError(400, "A conversation must start with a user message. Try again with a conversation "
                                "that starts with a user message.")
    _check_conversation(messages, has_tools=bool(body.get("toolConfig")))
    max_tokens = (body.get("inferenceConfig") or {}).get("maxTokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise BedrockError(400, "1 validation error detected: Value at 'inferenceConfig.maxTokens' failed to "
                                "satisfy constraint: Member must have value greater than or equal to 1")
    return body


def _check_conversation(messages: list[Any], has_tools: bool) -> None:
    """The conversation rules Bedrock enforces (its own messages): a gateway that breaks them must fail here."""
    if not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise BedrockError(400, "A conversation must start with a user message. Try again with a conversation "
                                "that starts with a user message.")
    for i, turn in enumerate(messages):
        if i and turn.get("role") == messages[i - 1].get("role"):
            raise BedrockError(400, "A conversation must alternate between user and assistant roles. Make sure the "
                                    "conversation alternates between user and assistant roles and try again.")
        for j, block in enumerate(turn.get("content") or ()):
            if "text" in block and not str(block["text"]).strip():
                raise BedrockError(400, f"The text field in the ContentBlock object at messages.{i}.content.{j} is "
                                        "blank. Add text to the text field, and try again.")
            if ("toolUse" in block or "toolResult" in block) and not has_tools:
                raise BedrockError(400, "The toolConfig field must be defined when using toolUse and toolResult "
                                        "content blocks.")


def request_id() -> dict[str, str]:
    return {"x-amzn-requestid": str(uuid.uuid4())}


def elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def send_error(send: Send, error: BedrockError) -> None:
    headers = {**request_id(), "x-amzn-errortype": error.error_type}
    await send_json(send, error.status, {"message": error.message}, headers)


async def non_stream_fault(send: Send, fault: Fault, malformed: bytes = b'{"output": {"message": ') -> None:
    """A fault that replaces a whole answer: a dropped connection, a truncated body, or an error status."""
    if fault.mode == "cut":
        await drop_connection(send)
    elif fault.mode == "malformed":
        await send_bytes(send, 200, malformed, "application/json", request_id())
    else:
        await send_error(send, BedrockError(fault.status, fault.message or _default_message(fault.status),
                                            fault.error_type))


def _default_message(status: int) -> str:
    if status == 429:
        return "Too many requests, please wait before trying again."
    return f"Simulated Bedrock error {status}."


def stream_error(fault: Fault, names: dict[int, str] = _STREAM_EXCEPTIONS) -> bytes:
    """A modelled mid-stream exception frame (its name by status from ``names``, or the fault's ``error_type``)."""
    name = fault.error_type or names.get(fault.status, "internalServerException")
    return exception_frame(name[0].lower() + name[1:], fault.message or _default_message(fault.status))


def block_text(block: Any) -> str:
    """The text a content block carries: text, tool-use name and input, or tool-result content."""
    if not isinstance(block, dict):
        return ""
    if "text" in block:
        return str(block["text"])
    if isinstance(block.get("toolUse"), dict):
        use = block["toolUse"]
        return f"{use.get('name', '')} {json.dumps(use.get('input', {}))}"
    if isinstance(block.get("toolResult"), dict):
        inner = block["toolResult"].get("content") or []
        return " ".join(block_text(b) if "text" in b else json.dumps(b.get("json")) for b in inner
                        if isinstance(b, dict))
    return ""


def input_tokens(body: dict[str, Any]) -> int:
    """Input tokens per the simulator's documented rule (see ``sim_text``)."""
    system = sum(sim_text.count_tokens(block_text(b)) for b in body.get("system") or [])
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    text = sum(sim_text.count_tokens(block_text(b)) for m in messages for b in m.get("content") or [])
    tools = (body.get("toolConfig") or {}).get("tools")
    return system + text + sim_text.MESSAGE_OVERHEAD * len(messages) + sim_text.tool_definition_tokens(tools)


def _last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    return " ".join(block_text(b) for b in users[-1].get("content") or []) if users else ""


def build_answer(body: dict[str, Any], model_id: str) -> Answer:
    prompt = _last_user_text(body)
    tool_config = body.get("toolConfig") or {}
    specs = [t["toolSpec"] for t in tool_config.get("tools") or [] if isinstance(t, dict) and "toolSpec" in t]
    used = input_tokens(body)
    if sim_text.wants_tool(prompt, len(specs)):
        use = _tool_use(specs, tool_config.get("toolChoice"), prompt)
        arguments = json.dumps(use["input"])
        spent = sim_text.count_tokens(use["name"] + " " + arguments)
        return Answer(tuple(sim_text.chunk_text(arguments)), use, "tool_use", used, spent)
    config = body.get("inferenceConfig") or {}
    stops = [s for s in config.get("stopSequences") or [] if isinstance(s, str)]
    reply = sim_text.make_reply(f"Simulated reply from {model_id}: ", prompt, config.get("maxTokens"), stops)
    return Answer(reply.pieces, None, _STOP[reply.finish], used, reply.tokens)


def _tool_use(specs: list[dict[str, Any]], choice: Any, prompt: str) -> dict[str, Any]:
    wanted = choice.get("tool", {}).get("name") if isinstance(choice, dict) else None
    spec = next((s for s in specs if s.get("name") == wanted), specs[0])
    schema = (spec.get("inputSchema") or {}).get("json")
    return {"toolUseId": f"tooluse_{uuid.uuid4().hex[:22]}", "name": spec.get("name", "tool"),
            "input": sim_text.tool_arguments(schema, prompt)}


def converse_body(answer: Answer, latency_ms: int) -> dict[str, Any]:
    content = [{"toolUse": answer.tool_use}] if answer.tool_use else [{"text": "".join(answer.pieces)}]
    return {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": answer.stop_reason,
            "usage": answer.usage(), "metrics": {"latencyMs": latency_ms}}


def stream_frames(answer: Answer, latency_ms: int) -> list[bytes]:
    """Every event-stream frame of the streamed answer, in Bedrock's order."""
    frames = [event_frame("messageStart", {"role": "assistant"})]
    if answer.tool_use:
        start = {"toolUse": {"toolUseId": answer.tool_use["toolUseId"], "name": answer.tool_use["name"]}}
        frames.append(event_frame("contentBlockStart", {"contentBlockIndex": 0, "start": start}))
        deltas: list[dict[str, Any]] = [{"toolUse": {"input": piece}} for piece in answer.pieces]
    else:
        deltas = [{"text": piece} for piece in answer.pieces]
    frames += [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": d}) for d in deltas]
    frames.append(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
    frames.append(event_frame("messageStop", {"stopReason": answer.stop_reason}))
    frames.append(event_frame("metadata", {"usage": answer.usage(), "metrics": {"latencyMs": latency_ms}}))
    return frames

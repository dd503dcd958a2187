"""Azure OpenAI chat completions, as the real service answers them (JSON and SSE).

Shapes follow Azure's data plane: ``prompt_filter_results`` on the answer and on a
first stream chunk with empty ``choices``; with ``stream_options.include_usage`` every
chunk carries ``"usage": null`` and a last chunk with empty ``choices`` carries usage.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import sim_text
from .sim_http import Request, Send, StreamFaultFrames, drop_connection, send_bytes, send_json, send_stream
from .sim_state import Fault, SimState, take_fault

PROVIDER = "azure_openai"
FINGERPRINT = "fp_sim0001"
_SAFE = {"filtered": False, "severity": "safe"}
FILTER_RESULTS = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": FILTER_RESULTS}]
# What a filter that fired reports: one category over the deployment's threshold.
FILTER_HIT = {**FILTER_RESULTS, "violence": {"filtered": True, "severity": "medium"}}
PROMPT_FILTERED_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read our "
    "documentation: https://go.microsoft.com/fwlink/?linkid=2198766")
_FINISH = {"end": "stop", "stop": "stop", "length": "length", "filtered": "content_filter"}
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request was invalid."),
    401: ("401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
                 "valid key for an active subscription and use a correct regional API endpoint for your resource."),
    403: ("403", "Forbidden: the principal does not have access to this deployment."),
    404: ("DeploymentNotFound", "The API deployment for this resource does not exist."),
    408: ("Timeout", "The operation was timeout."),
    429: ("429", "Requests to the ChatCompletions_Create Operation have exceeded the rate limit of your current "
                 "pricing tier. Please retry after {retry} seconds."),
    500: ("InternalServerError", "The server had an error while processing your request. Sorry about that!"),
    503: ("ServiceUnavailable", "The service is temporarily unable to process your request. Please try again later."),
}


@dataclass(frozen=True)
class Answer:
    """What the simulated model produced, before it is rendered as JSON or chunks."""

    content: str | None
    pieces: tuple[str, ...]  # content pieces, or tool-call argument pieces
    tool_call: dict[str, Any] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0}}


async def handle_chat(request: Request, deployment: str, state: SimState, send: Send) -> None:
    """``POST /openai/deployments/{deployment}/chat/completions``."""
    problem = _check_request(request, state)
    if problem:
        await send_json(send, *problem)
        return
    body = request.json()
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        await send_json(send, 400, _invalid("'messages' is a required property and must be a non-empty array."))
        return
    if sim_text.prompt_filtered(_last_user_text(body)):
        await send_json(send, 400, prompt_filtered_body(), _response_headers())
        return
    stream = bool(body.get("stream"))
    fault = await take_fault(state, PROVIDER, deployment, stream)
    if fault and (not stream or (fault.mode == "status" and fault.after_chunks is None)):
        await _non_stream_fault(send, fault)
        return
    answer = build_answer(body, deployment)
    model = state.config.model_for(deployment)
    headers = _response_headers()
    if stream:
        frames = stream_frames(answer, model, _include_usage(body))
        await send_stream(send, frames, "text/event-stream; charset=utf-8", headers, state.config.chunk_delay_ms,
                          fault, StreamFaultFrames(error=_stream_error, malformed=b"data: {\"id\": \"chatcmpl-\n\n"))
        return
    await send_json(send, 200, completion_body(answer, model), headers)


def _check_request(request: Request, state: SimState) -> tuple[int, dict[str, Any]] | None:
    key = request.headers.get("api-key")
    bearer = request.headers.get("authorization", "")
    if not key and not bearer.startswith("Bearer "):
        return 401, error_body(401)
    if state.config.azure_api_key and key and key != state.config.azure_api_key:
        return 401, error_body(401)
    if not request.query.get("api-version"):
        return 400, _invalid("Missing required query parameter: api-version.", param="api-version",
                             code="missing_required_parameter")
    return None


def _invalid(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def error_body(status: int, retry_after: float | None = None, message: str | None = None) -> dict[str, Any]:
    code, default = _ERRORS.get(status, (str(status), f"Simulated upstream error {status}."))
    text = message or default.format(retry=math.ceil(retry_after or 1))
    return {"error": {"code": code, "message": text, "type": "invalid_request_error" if status < 500 else
                      "server_error", "param": None}}


def prompt_filtered_body() -> dict[str, Any]:
    """Azure's answer when the input filter refuses the prompt (the same for streamed requests)."""
    return {"error": {"message": PROMPT_FILTERED_MESSAGE, "type": None, "param": "prompt", "code": "content_filter",
                      "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                    "content_filter_result": FILTER_HIT}}}


def _retry_headers(retry_after: float | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    return {"retry-after": str(math.ceil(retry_after)), "retry-after-ms": str(int(retry_after * 1000))}


async def _non_stream_fault(send: Send, fault: Fault) -> None:
    if fault.mode == "cut":
        await drop_connection(send)
    elif fault.mode == "malformed":
        await send_bytes(send, 200, b'{"id": "chatcmpl-broken", "choices": [', "application/json")
    else:
        retry = fault.retry_after if fault.retry_after is not None else (1 if fault.status == 429 else None)
        headers = {**_response_headers(), **_retry_headers(retry)}
        await send_json(send, fault.status, error_body(fault.status, retry, fault.message), headers)


def _stream_error(fault: Fault) -> bytes:
    body = error_body(fault.status, fault.retry_after, fault.message)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _response_headers() -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return {"x-request-id": request_id, "apim-request-id": request_id,
            "x-ratelimit-remaining-requests": "999", "x-ratelimit-remaining-tokens": "999999"}


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def message_text(message: dict[str, Any]) -> str:
    """All text a message carries: content (string or text parts) and tool calls."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    parts = [content if isinstance(content, str) else ""]
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        parts += [str(function.get("name", "")), str(function.get("arguments", ""))]
    return " ".join(parts)


def prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens per the simulator's documented rule (see ``sim_text``)."""
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    text_tokens = sum(sim_text.count_tokens(message_text(m)) for m in messages)
    return text_tokens + sim_text.MESSAGE_OVERHEAD * len(messages) + sim_text.tool_definition_tokens(body.get("tools"))


def _last_user_text(body: dict[str, Any]) -> str:
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]


def build_answer(body: dict[str, Any], deployment: str) -> Answer:
    """The deterministic answer for a validated request body."""
    prompt = _last_user_text(body)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    used = prompt_tokens(body)
    if body.get("tool_choice") != "none" and sim_text.wants_tool(prompt, len(tools)):
        call = _tool_call(tools, body.get("tool_choice"), prompt)
        arguments = call["function"]["arguments"]
        spent = sim_text.count_tokens(call["function"]["name"] + " " + arguments)
        return Answer(None, tuple(sim_text.chunk_text(arguments)), call, "tool_calls", used, spent)
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    reply = sim_text.make_reply(f"Simulated reply from {deployment}: ", prompt, cap, _stops(body))
    return Answer(reply.text, reply.pieces, None, _FINISH[reply.finish], used, reply.tokens)


def _tool_call(tools: list[dict[str, Any]], choice: Any, prompt: str) -> dict[str, Any]:
    wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    functions = [t.get("function", {}) for t in tools]
    function = next((f for f in functions if f.get("name") == wanted), functions[0])
    arguments = json.dumps(sim_text.tool_arguments(function.get("parameters"), prompt))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": function.get("name", "tool"), "arguments": arguments}}


def completion_body(answer: Answer, model: str) -> dict[str, Any]:
    filtered = answer.finish_reason == "content_filter"
    # A filtered answer is withheld when not streamed; the tokens generated are still billed.
    message: dict[str, Any] = {"role": "assistant", "content": None if filtered else answer.content, "refusal": None}
    if answer.tool_call:
        message["tool_calls"] = [answer.tool_call]
    choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason, "logprobs": None,
              "content_filter_results": FILTER_HIT if filtered else FILTER_RESULTS}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": answer.usage(), "system_fingerprint": FINGERPRINT,
            "prompt_filter_results": PROMPT_FILTER}


def stream_frames(answer: Answer, model: str, include_usage: bool) -> list[bytes]:
    """Every SSE frame of the streamed answer, ``[DONE]`` included."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT}
    if include_usage:
        base["usage"] = None
    chunks: list[dict[str, Any]] = [{"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                     "prompt_filter_results": PROMPT_FILTER}]
    chunks += [_delta_chunk(base, delta) for delta in _deltas(answer)]
    last = _delta_chunk(base, {}, answer.finish_reason)
    if answer.finish_reason == "content_filter":  # the chunk that ends a filtered stream says what fired
        last["choices"][0]["content_filter_results"] = FILTER_HIT
    chunks.append(last)
    if include_usage:
        chunks.append({**base, "choices": [], "usage": answer.usage()})
    return [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _deltas(answer: Answer) -> list[dict[str, Any]]:
    call = answer.tool_call
    if call is None:
        return [{"role": "assistant", "content": "", "refusal": None}] + [{"content": p} for p in answer.pieces]
    head = {"index": 0, "id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}}
    first = {"role": "assistant", "content": None, "tool_calls": [head]}
    return [first] + [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in answer.pieces]


def _delta_chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {**base, "choices": [choice]}

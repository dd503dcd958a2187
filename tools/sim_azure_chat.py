"""Azure OpenAI chat completions, as the real service answers them (JSON and SSE).

Shapes follow Azure's data plane: ``prompt_filter_results`` on the answer and on a
first stream chunk with empty ``choices``; with ``stream_options.include_usage`` every
chunk carries ``"usage": null`` and a last chunk with empty ``choices`` carries usage.
``n`` answers with n choices (usage counts them all); ``logprobs``/``top_logprobs`` add
``choices[i].logprobs.content``; a ``response_format`` JSON schema (or ``json_object``) is
answered with valid JSON; a forced ``tool_choice`` always calls the tool.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import sim_schema, sim_text
from .sim_azure import (
    FILTER_HIT,
    FILTER_RESULTS,
    FINGERPRINT,
    PROMPT_FILTER,
    PROVIDER,
    check_request,
    invalid,
    non_stream_fault,
    prompt_filtered_body,
    response_headers,
    stream_error,
)
from .sim_http import Request, Send, StreamFaultFrames, send_json, send_stream
from .sim_state import SimState, replaces_answer, take_fault

_FINISH = {"end": "stop", "stop": "stop", "length": "length", "filtered": "content_filter"}
MAX_N = 128
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Choice:
    """One generated choice, before it is rendered as JSON or chunks."""

    content: str | None
    pieces: tuple[str, ...]  # content pieces, or tool-call argument pieces
    tool_call: dict[str, Any] | None
    finish_reason: str
    tokens: int
    logprobs: list[dict[str, Any]] | None  # one entry per content piece, when asked


@dataclass(frozen=True)
class Answer:
    choices: tuple[Choice, ...]
    prompt_tokens: int

    def usage(self) -> dict[str, Any]:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": 0}}


class BadChat(ValueError):
    """A request Azure refuses with 400; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


async def handle_chat(request: Request, deployment: str, state: SimState, send: Send, needs_version: bool = True) -> None:
    """``POST /openai/deployments/{deployment}/chat/completions`` and ``/openai/v1/chat/completions``."""
    problem = check_request(request, state, needs_version)
    if problem:
        await send_json(send, *problem)
        return
    body = request.json()
    try:
        answer = build_answer(_validated(body), deployment)
    except BadChat as exc:
        await send_json(send, 400, invalid(str(exc), exc.param), response_headers())
        return
    if sim_text.prompt_filtered(_last_user_text(body)):
        await send_json(send, 400, prompt_filtered_body(), response_headers())
        return
    stream = bool(body.get("stream"))
    fault = await take_fault(state, PROVIDER, deployment, stream)
    if fault and replaces_answer(fault, stream):
        await non_stream_fault(send, fault)
        return
    model = state.config.model_for(deployment)
    if stream:
        frames = stream_frames(answer, model, _include_usage(body))
        await send_stream(send, frames, "text/event-stream; charset=utf-8", response_headers(),
                          state.config.chunk_delay_ms, fault,
                          StreamFaultFrames(error=stream_error, malformed=b"data: {\"id\": \"chatcmpl-\n\n"))
        return
    await send_json(send, 200, completion_body(answer, model), response_headers())


def _validated(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadChat("'messages' is a required property and must be a non-empty array.", "messages")
    n = body.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N):
        raise BadChat(f"Invalid value for 'n': must be an integer between 1 and {MAX_N}.", "n")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise BadChat(f"Invalid 'top_logprobs': must be an integer between 0 and {MAX_TOP_LOGPROBS}.", "top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise BadChat("Invalid value for 'logprobs': must be true when 'top_logprobs' is set.", "logprobs")
    _check_response_format(body)
    return body


def _check_response_format(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return
    if fmt.get("type") == "json_schema" and not (fmt.get("json_schema") or {}).get("name"):
        raise BadChat("Missing required parameter: 'response_format.json_schema.name'.", "response_format.json_schema.name")
    if fmt.get("type") == "json_object" and "json" not in json.dumps(body["messages"]).lower():
        raise BadChat("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                      "'json_object'.", "messages")


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
    """The deterministic answer (``n`` identical choices) for a validated request body."""
    prompt = _last_user_text(body)
    top = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    choices = tuple(_choice(body, deployment, prompt, top) for _ in range(body.get("n") or 1))
    return Answer(choices, prompt_tokens(body))


def _choice(body: dict[str, Any], deployment: str, prompt: str, top: int | None) -> Choice:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    if _calls_tool(body, prompt, tools):
        call = _tool_call(tools, body.get("tool_choice"), prompt)
        arguments = call["function"]["arguments"]
        spent = sim_text.count_tokens(call["function"]["name"] + " " + arguments)
        return Choice(None, tuple(sim_text.chunk_text(arguments)), call, "tool_calls", spent, None)
    reply = _reply(body, deployment, prompt)
    logprobs = sim_text.token_logprobs(reply.pieces, top) if top is not None else None
    return Choice(reply.text, reply.pieces, None, _FINISH[reply.finish], reply.tokens, logprobs)


def _calls_tool(body: dict[str, Any], prompt: str, tools: list[dict[str, Any]]) -> bool:
    """A forced ``tool_choice`` always calls; otherwise ``CALL_TOOL``, unless the last turn is a tool's result."""
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return False
    if choice == "required" or isinstance(choice, dict):
        return True
    last = body["messages"][-1]
    return not (isinstance(last, dict) and last.get("role") == "tool") and sim_text.wants_tool(prompt, len(tools))


def _reply(body: dict[str, Any], deployment: str, prompt: str) -> sim_text.Reply:
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    fmt = sim_schema.as_object(body.get("response_format"))
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        return sim_text.structured_reply(sim_schema.generate(schema, sim_text.prompt_echo(prompt)), cap)
    if fmt.get("type") == "json_object":
        return sim_text.structured_reply({"answer": sim_text.prompt_echo(prompt, sim_text.ECHO_WORDS)}, cap)
    return sim_text.make_reply(f"Simulated reply from {deployment}: ", prompt, cap, _stops(body))


def _tool_call(tools: list[dict[str, Any]], choice: Any, prompt: str) -> dict[str, Any]:
    wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    functions = [t.get("function", {}) for t in tools]
    function = next((f for f in functions if f.get("name") == wanted), None)
    if function is None and wanted is not None:
        raise BadChat(f"Invalid value for 'tool_choice': no function named '{wanted}' in 'tools'.", "tool_choice")
    function = function or functions[0]
    arguments = json.dumps(sim_text.tool_arguments(function.get("parameters"), prompt))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": function.get("name", "tool"), "arguments": arguments}}


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def completion_body(answer: Answer, model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [_choice_body(i, c) for i, c in enumerate(answer.choices)],
            "usage": answer.usage(), "system_fingerprint": FINGERPRINT, "prompt_filter_results": PROMPT_FILTER}


def _choice_body(index: int, choice: Choice) -> dict[str, Any]:
    filtered = choice.finish_reason == "content_filter"
    # A filtered answer is withheld when not streamed; the tokens generated are still billed.
    message: dict[str, Any] = {"role": "assistant", "content": None if filtered else choice.content, "refusal": None}
    if choice.tool_call:
        message["tool_calls"] = [choice.tool_call]
    logprobs = None if choice.logprobs is None else {"content": choice.logprobs, "refusal": None}
    return {"index": index, "message": message, "finish_reason": choice.finish_reason, "logprobs": logprobs,
            "content_filter_results": FILTER_HIT if filtered else FILTER_RESULTS}


def stream_frames(answer: Answer, model: str, include_usage: bool) -> list[bytes]:
    """Every SSE frame of the streamed answer, ``[DONE]`` included; choices interleave piece by piece."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT}
    if include_usage:
        base["usage"] = None
    chunks: list[dict[str, Any]] = [{"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                     "prompt_filter_results": PROMPT_FILTER}]
    per_choice = [_choice_chunks(base, i, c) for i, c in enumerate(answer.choices)]
    for step in range(max(len(c) for c in per_choice)):
        chunks += [c[step] for c in per_choice if step < len(c)]
    if include_usage:
        chunks.append({**base, "choices": [], "usage": answer.usage()})
    return [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _choice_chunks(base: dict[str, Any], index: int, choice: Choice) -> list[dict[str, Any]]:
    logprobs = choice.logprobs
    chunks = [_delta_chunk(base, index, delta, logprobs=None if logprobs is None else [])
              for delta in _deltas(choice)]
    if logprobs is not None:  # the first delta carries the role only; each later one carries its piece's logprob
        for chunk, entry in zip(chunks[1:], logprobs, strict=False):
            chunk["choices"][0]["logprobs"] = {"content": [entry], "refusal": None}
    last = _delta_chunk(base, index, {}, choice.finish_reason)
    if choice.finish_reason == "content_filter":  # the chunk that ends a filtered stream says what fired
        last["choices"][0]["content_filter_results"] = FILTER_HIT
    return [*chunks, last]


def _deltas(choice: Choice) -> list[dict[str, Any]]:
    call = choice.tool_call
    if call is None:
        return [{"role": "assistant", "content": "", "refusal": None}] + [{"content": p} for p in choice.pieces]
    head = {"index": 0, "id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}}
    first = {"role": "assistant", "content": None, "tool_calls": [head]}
    return [first] + [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in choice.pieces]


def _delta_chunk(base: dict[str, Any], index: int, delta: dict[str, Any], finish: str | None = None,
                 logprobs: list[Any] | None = None) -> dict[str, Any]:
    wrapped = None if logprobs is None else {"content": logprobs, "refusal": None}
    choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": wrapped}
    return {**base, "choices": [choice]}

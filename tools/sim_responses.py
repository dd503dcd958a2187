"""Azure OpenAI's Responses API: ``POST /openai/v1/responses`` (and the preview ``/openai/responses``), whole or streamed.

Input is a string or items (messages with text or ``input_text`` parts, ``function_call`` and
``function_call_output`` items); ``instructions``, function ``tools`` and ``tool_choice``,
``max_output_tokens`` (a cut answer is ``incomplete``), ``text.format`` (``json_schema``: valid JSON
of the schema; ``json_object``). Azure keeps state: an answer stored (``store``, default true) can be
read back (``GET .../responses/{id}``), deleted, and continued with ``previous_response_id``, whose
input and output tokens count again as input. Events are rendered by ``tools.sim_responses_stream``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from . import sim_schema, sim_text
from .sim_azure import PROVIDER, check_request, invalid, non_stream_fault, response_headers
from .sim_http import Request, Send, StreamFaultFrames, send_json, send_stream
from .sim_responses_stream import error_frame, event_frames
from .sim_state import SimState, replaces_answer, take_fault

MIN_OUTPUT_TOKENS = 16


class BadResponse(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclass(frozen=True)
class Turn:
    """What the request says, read once: the prompt to answer and the tokens it costs."""

    prompt: str
    results_only: bool  # the last input item returns a function call's output
    input_tokens: int


async def handle_create(request: Request, state: SimState, send: Send, needs_version: bool) -> None:
    """``POST /openai/v1/responses`` and ``POST /openai/responses?api-version=...``."""
    problem = check_request(request, state, needs_version)
    if problem:
        await send_json(send, *problem)
        return
    body = request.json()
    try:
        deployment = _validated(body)
        response = build_response(body, state, state.config.model_for(deployment))
    except BadResponse as exc:
        await send_json(send, exc.status, invalid(str(exc), exc.param), response_headers())
        return
    stream = bool(body.get("stream"))
    fault = await take_fault(state, PROVIDER, deployment, stream)
    if fault and replaces_answer(fault, stream):
        await non_stream_fault(send, fault, b'{"id": "resp_broken", "output": [')
        return
    if body.get("store", True) is not False:
        state.responses.put(response)
    if not stream:
        await send_json(send, 200, response, response_headers())
        return
    frames = event_frames(response)
    spelled = StreamFaultFrames(error=lambda f: error_frame(f, len(frames)), malformed=b"event: response.created\n"
                                b"data: {\"type\": \"response.created\", \"response\": \n\n")
    await send_stream(send, frames, "text/event-stream; charset=utf-8", response_headers(),
                      state.config.chunk_delay_ms, fault, spelled)


async def handle_stored(request: Request, response_id: str, state: SimState, send: Send, needs_version: bool) -> None:
    """``GET`` and ``DELETE`` on ``.../responses/{id}``."""
    problem = check_request(request, state, needs_version)
    if problem:
        await send_json(send, *problem)
        return
    if request.method == "DELETE" and state.responses.delete(response_id):
        await send_json(send, 200, {"id": response_id, "object": "response.deleted", "deleted": True})
        return
    stored = state.responses.get(response_id) if request.method == "GET" else None
    if stored is None:
        await send_json(send, 404, invalid(f"Response with id '{response_id}' not found."), response_headers())
        return
    await send_json(send, 200, stored, response_headers())


def _validated(body: Any) -> str:
    """The deployment a valid body names; raises ``BadResponse`` with OpenAI's wording otherwise."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise BadResponse("Missing required parameter: 'model'.", "model")
    if not isinstance(body.get("input"), (str, list)) or not body["input"]:
        raise BadResponse("Missing required parameter: 'input'.", "input")
    cap = body.get("max_output_tokens")
    if cap is not None and (not isinstance(cap, int) or cap < MIN_OUTPUT_TOKENS):
        raise BadResponse(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                          f"{MIN_OUTPUT_TOKENS}, but got {cap} instead.", "max_output_tokens")
    fmt = _format(body)
    if fmt.get("type") == "json_schema" and not fmt.get("name"):
        raise BadResponse("Missing required parameter: 'text.format.name'.", "text.format.name")
    return body["model"]


def _format(body: dict[str, Any]) -> dict[str, Any]:
    return sim_schema.as_object(sim_schema.as_object(body.get("text")).get("format")) or {"type": "text"}


def _items(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body["input"]
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    if not all(isinstance(item, dict) for item in raw):
        raise BadResponse("Invalid type for 'input': expected a string or an array of input items.", "input")
    return raw


def item_text(item: dict[str, Any]) -> str:
    """The text an input or output item carries: message content, a call's name and arguments, a call's output."""
    kind = item.get("type", "message")
    if kind == "function_call":
        return f"{item.get('name', '')} {item.get('arguments', '')}"
    if kind == "function_call_output":
        output = item.get("output")
        return output if isinstance(output, str) else json.dumps(output)
    content = item.get("content")
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def read_turn(body: dict[str, Any], state: SimState) -> Turn:
    """The prompt, and input tokens: instructions, items (+overhead each), tools, and any previous response's tokens."""
    items = _items(body)
    previous = _previous(body, state)
    _check_call_outputs(items, previous)
    tokens = sim_text.count_tokens(str(body.get("instructions") or ""))
    tokens += sum(sim_text.count_tokens(item_text(i)) + sim_text.MESSAGE_OVERHEAD for i in items)
    tokens += sim_text.tool_definition_tokens(body.get("tools"))
    if previous:
        tokens += previous["usage"]["input_tokens"] + previous["usage"]["output_tokens"]
    last = items[-1]
    if last.get("type") == "function_call_output":
        return Turn(item_text(last), True, tokens)
    users = [i for i in items if i.get("type", "message") == "message" and i.get("role") == "user"]
    return Turn(item_text(users[-1]) if users else "", False, tokens)


def _previous(body: dict[str, Any], state: SimState) -> dict[str, Any] | None:
    previous_id = body.get("previous_response_id")
    if previous_id is None:
        return None
    previous = state.responses.get(str(previous_id))
    if previous is None:
        raise BadResponse(f"Previous response with id '{previous_id}' not found.", "previous_response_id")
    return previous


def _check_call_outputs(items: list[dict[str, Any]], previous: dict[str, Any] | None) -> None:
    """Every ``function_call_output`` answers a call in this input or in the previous response, as OpenAI checks."""
    calls = {i.get("call_id") for i in items if i.get("type") == "function_call"}
    calls |= {o.get("call_id") for o in (previous or {}).get("output", []) if o.get("type") == "function_call"}
    for item in items:
        if item.get("type") == "function_call_output" and item.get("call_id") not in calls:
            raise BadResponse(f"No tool call found for function call output with call_id {item.get('call_id')}.",
                              "input")


def build_response(body: dict[str, Any], state: SimState, model: str) -> dict[str, Any]:
    """The whole response object (status completed, or incomplete when ``max_output_tokens`` cut it)."""
    turn = read_turn(body, state)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice", "auto")
    forced = choice == "required" or isinstance(choice, dict)
    if tools and choice != "none" and (forced or (not turn.results_only and sim_text.wants_tool(turn.prompt, 1))):
        item, cut = _function_call(tools, choice, turn.prompt), False
        spent = sim_text.count_tokens(f"{item['name']} {item['arguments']}")
    else:
        reply = _reply(body, turn.prompt, body["model"])
        item, spent, cut = _message(reply), reply.tokens, reply.finish == "length"
    usage = {"input_tokens": turn.input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": spent, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": turn.input_tokens + spent}
    return {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed", "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "output": [item], "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False, "temperature": body.get("temperature", 1.0),
            "text": {"format": _format(body)}, "tool_choice": choice, "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"), "usage": usage,
            "user": body.get("user"), "metadata": body.get("metadata") or {},
            "service_tier": body.get("service_tier", "default")}


def _reply(body: dict[str, Any], prompt: str, deployment: str) -> sim_text.Reply:
    fmt, cap = _format(body), body.get("max_output_tokens")
    if fmt.get("type") == "json_schema":
        value = sim_schema.generate(fmt.get("schema") or {"type": "object"}, sim_text.prompt_echo(prompt))
        return sim_text.structured_reply(value, cap)
    if fmt.get("type") == "json_object":
        return sim_text.structured_reply({"answer": sim_text.prompt_echo(prompt, sim_text.ECHO_WORDS)}, cap)
    return sim_text.make_reply(f"Simulated reply from {deployment}: ", prompt, cap, [])


def _message(reply: sim_text.Reply) -> dict[str, Any]:
    part = {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "incomplete" if reply.finish == "length"
            else "completed", "role": "assistant", "content": [part]}


def _function_call(tools: list[dict[str, Any]], choice: Any, prompt: str) -> dict[str, Any]:
    wanted = choice.get("name") if isinstance(choice, dict) else None
    tool = next((t for t in tools if t.get("name") == wanted), None)
    if tool is None and wanted is not None:
        raise BadResponse(f"Tool choice '{wanted}' not found in 'tools' parameter.", "tool_choice")
    tool = tool or tools[0]
    arguments = json.dumps(sim_text.tool_arguments(tool.get("parameters"), prompt))
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": f"call_{uuid.uuid4().hex[:24]}",
            "name": tool.get("name", "tool"), "arguments": arguments, "status": "completed"}

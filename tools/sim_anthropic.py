"""Anthropic Messages bodies on Bedrock ``InvokeModel`` / ``InvokeModelWithResponseStream`` (``anthropic.*`` ids).

The request is Anthropic's Messages body with ``anthropic_version`` ("bedrock-2023-05-31") in it and no
``model`` or ``stream`` (Bedrock refuses keys it does not know). The answer is a Messages object; a stream
is Anthropic's events (``message_start`` ... ``message_stop``), each one JSON document that the caller
wraps in an event-stream ``chunk`` (see ``tools.sim_invoke``). A forced ``tool_choice`` (``any`` or
``tool``) always answers with a ``tool_use`` block whose ``input`` is valid for the tool's
``input_schema``; ``CALL_TOOL`` in the last user turn calls a tool under ``auto``; ``output_config.format``
``{"type": "json_schema", "schema"}`` is answered with text that is valid JSON of the schema.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from . import sim_schema, sim_text
from .sim_bedrock import BedrockError
from .sim_invoke_types import InvokeAnswer

_STOP = {"end": "end_turn", "length": "max_tokens", "stop": "stop_sequence", "filtered": "refusal"}
ALLOWED_KEYS = frozenset({
    "anthropic_version", "anthropic_beta", "messages", "system", "max_tokens", "temperature", "top_p", "top_k",
    "stop_sequences", "tools", "tool_choice", "metadata", "thinking", "output_config",
})


def validated(body: dict[str, Any]) -> dict[str, Any]:
    """The checks Bedrock applies to an Anthropic body, with its messages."""
    for key in ("anthropic_version", "max_tokens", "messages"):
        if key not in body:
            raise BedrockError(400, f"Malformed input request: #: required key [{key}] not found, please reformat "
                                    "your input and try again.")
    extra = sorted(set(body) - ALLOWED_KEYS)
    if extra:
        raise BedrockError(400, f"Malformed input request: #: extraneous key [{extra[0]}] is not permitted, please "
                                "reformat your input and try again.")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BedrockError(400, "max_tokens: must be an integer greater than or equal to 1")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BedrockError(400, "messages: at least one message is required")
    if messages[0].get("role") != "user":
        raise BedrockError(400, "messages: first message must use the \"user\" role")
    return body


def block_text(block: Any) -> str:
    """The text a content block carries: text, tool_use name and input, tool_result content."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        return f"{block.get('name', '')} {json.dumps(block.get('input', {}))}"
    if kind == "tool_result":
        return content_text(block.get("content"))
    return ""


def content_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(block_text(b) for b in content)
    return block_text(content)


def input_tokens(body: dict[str, Any]) -> int:
    """Input tokens per the simulator's rule: system + every block's text + overhead per message + tool definitions."""
    messages = body["messages"]
    text = sum(sim_text.count_tokens(content_text(m.get("content"))) for m in messages)
    system = sim_text.count_tokens(content_text(body.get("system")))
    return system + text + sim_text.MESSAGE_OVERHEAD * len(messages) + sim_text.tool_definition_tokens(body.get("tools"))


def _last_user(body: dict[str, Any]) -> tuple[str, bool]:
    """The last user turn's text, and whether that turn only returns tool results."""
    users = [m for m in body["messages"] if m.get("role") == "user"]
    if not users:
        return "", False
    content = users[-1].get("content")
    blocks = content if isinstance(content, list) else [content]
    results_only = all(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks)
    return content_text(content), results_only


def model_name(model_id: str) -> str:
    """What Bedrock reports as ``model``: the id without region prefix, vendor and version suffix."""
    name = model_id.rsplit("anthropic.", 1)[-1]
    return name.split("-v", 1)[0] if "-v" in name else name


def build(body: dict[str, Any], model_id: str) -> InvokeAnswer:
    """The whole answer and its stream events for a validated body."""
    prompt, results_only = _last_user(body)
    used = input_tokens(body)
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = sim_schema.as_object(body.get("tool_choice")) or {"type": "auto"}
    forced = choice.get("type") in ("any", "tool")
    if tools and choice.get("type") != "none" and (forced or (not results_only and sim_text.wants_tool(prompt, 1))):
        return _tool_answer(tools, choice, prompt, used, model_id)
    reply, stop_sequence = _reply(body, model_id, prompt)
    message = _message(model_id, [{"type": "text", "text": reply.text}], _STOP[reply.finish], stop_sequence,
                       used, reply.tokens)
    deltas = [{"type": "text_delta", "text": piece} for piece in reply.pieces]
    return InvokeAnswer(message, _events(message, {"type": "text", "text": ""}, deltas), used, reply.tokens)


def _reply(body: dict[str, Any], model_id: str, prompt: str) -> tuple[sim_text.Reply, str | None]:
    # Bedrock's structured output for Claude on InvokeModel: output_config.format (docs: structured-output.html).
    fmt = sim_schema.as_object(sim_schema.as_object(body.get("output_config")).get("format"))
    if fmt.get("type") == "json_schema":
        value = sim_schema.generate(fmt.get("schema") or {"type": "object"}, sim_text.prompt_echo(prompt))
        return sim_text.structured_reply(value, body["max_tokens"]), None
    stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str) and s]
    reply = sim_text.make_reply(f"Simulated reply from {model_id}: ", prompt, body["max_tokens"], stops)
    if reply.finish != "stop":
        return reply, None
    full = sim_text.make_reply(f"Simulated reply from {model_id}: ", prompt, None, []).text
    return reply, next((s for s in stops if full.find(s) == len(reply.text)), stops[0])


def _tool_answer(tools: list[dict[str, Any]], choice: dict[str, Any], prompt: str, used: int,
                 model_id: str) -> InvokeAnswer:
    wanted = choice.get("name") if choice.get("type") == "tool" else None
    tool = next((t for t in tools if t.get("name") == wanted), None)
    if tool is None and wanted is not None:
        raise BedrockError(400, f"tool_choice: tool '{wanted}' not found in tools")
    tool = tool or tools[0]
    arguments = sim_text.tool_arguments(tool.get("input_schema"), prompt)
    block = {"type": "tool_use", "id": f"toolu_bdrk_{uuid.uuid4().hex[:24]}", "name": tool.get("name", "tool"),
             "input": arguments}
    text = json.dumps(arguments)
    spent = sim_text.count_tokens(f"{block['name']} {text}")
    message = _message(model_id, [block], "tool_use", None, used, spent)
    deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in sim_text.chunk_text(text)]
    return InvokeAnswer(message, _events(message, {**block, "input": {}}, deltas), used, spent)


def _message(model_id: str, content: list[dict[str, Any]], stop_reason: str, stop_sequence: str | None,
             used: int, spent: int) -> dict[str, Any]:
    return {"id": f"msg_bdrk_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": model_name(model_id), "content": content, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": used, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": spent}}


def _events(message: dict[str, Any], start_block: dict[str, Any], deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's stream: ``message_start`` reports 1 output token, ``message_delta`` the final count."""
    opening = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {**message["usage"], "output_tokens": 1}}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": opening},
                                    {"type": "content_block_start", "index": 0, "content_block": start_block}]
    events += [{"type": "content_block_delta", "index": 0, "delta": delta} for delta in deltas]
    events += [{"type": "content_block_stop", "index": 0},
               {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                   "stop_sequence": message["stop_sequence"]},
                "usage": {"output_tokens": message["usage"]["output_tokens"]}},
               {"type": "message_stop"}]
    return events

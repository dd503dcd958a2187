"""The task API's system templates: each task is a documented prompt around the caller's text.

``POST /api/generate`` turns a ``GenerateRequest`` into an ordinary ``ChatRequest`` and
sends it down the same pipeline as chat completions (auth, guardrails, quotas,
ledger): there is no side door.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from gateway_lib.errors import GatewayError, InvalidRequest
from gateway_lib.operations.schema import ChatRequest, GenerateRequest, parse_model

if TYPE_CHECKING:
    from gateway_lib.operations.pipeline import Served

TEMPLATES: dict[str, str] = {
    "chat": "You are a helpful assistant for enterprise users. Answer clearly and concisely.",
    "summarise": (
        "Summarise the user's text in plain language. Keep every fact, number and name that matters; "
        "drop repetition. Answer with the summary only."
    ),
    "extract": (
        "Extract the requested fields from the user's text and answer with one JSON object whose keys are "
        "exactly these fields: {fields}. Use null for a field the text does not contain. Do not add keys."
    ),
    "classify": (
        "Classify the user's text into exactly one of these labels: {labels}. "
        "Answer with the label only, spelled exactly as given."
    ),
    "rewrite": "Rewrite the user's text in this style: {style}. Keep its meaning. Answer with the rewrite only.",
}


NAMES_MAX_CHARS = 2_000  # labels or fields together: a template, not a second prompt
_DECORATION = " \t\r\n\"'`.*"  # what a model puts around a label it was asked to answer with alone
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def system_prompt(req: GenerateRequest) -> str:
    template = TEMPLATES[req.task]
    if req.task == "extract":
        fields = _names(req.fields, "fields", "Task 'extract' needs a 'fields' list of distinct, non-blank names.", 1)
        return template.format(fields=", ".join(fields))
    if req.task == "classify":
        labels = _names(req.labels, "labels", "Task 'classify' needs a 'labels' list of at least two distinct, "
                        "non-blank labels.", 2)
        return template.format(labels=", ".join(labels))
    if req.task == "rewrite":
        return template.format(style=req.style or "clear, plain business English")
    return template


def _names(given: list[str] | None, param: str, message: str, least: int) -> list[str]:
    names = given or []
    distinct = {n.strip().casefold() for n in names}
    if "" in distinct or len(distinct) < least or len(distinct) != len(names):  # blank, too few, repeated
        raise InvalidRequest(message, param=param)
    if sum(len(n) for n in names) > NAMES_MAX_CHARS:
        raise InvalidRequest(f"'{param}' may hold at most {NAMES_MAX_CHARS} characters together.", param=param)
    return names


def to_chat(req: GenerateRequest) -> ChatRequest:
    """The chat request a task runs as (validated like any chat request: a mismatch is a 400, not a bug)."""
    return parse_model(ChatRequest, {
        "model": req.model,
        "messages": [{"role": "system", "content": system_prompt(req)}, {"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens,
        "temperature": req.temperature if req.temperature is not None else (0.0 if req.task != "chat" else None),
        "provider_hint": req.provider_hint,
        "priority": req.priority,
        "response_format": {"type": "json_object"} if req.task == "extract" else None,
    })


def in_task_terms(error: GatewayError) -> GatewayError:
    """An error about the chat a task became, told in the task API's terms: its caller sent a prompt, not
    messages (messages[0] is the task's template, messages[1] the prompt)."""
    if error.param is not None and error.param.startswith("messages"):
        error.param = "prompt"
        error.message = error.message.replace("messages[1]", "the prompt").replace("messages[0]", "the task template")
        # A size counts the template too (labels, fields, style): do not tell the caller it was the prompt alone.
        error.message = error.message.replace("The prompt is", "The prompt with the task's template is")
    return error


def render(job: GenerateRequest, served: Served, request_id: str) -> dict[str, Any]:
    """The task API's answer: the output plus who served it, usage, estimated cost and the request id."""
    message = (served.body.get("choices") or [{}])[0].get("message") or {}
    content = message.get("content")
    output = content if isinstance(content, str) else ""  # a tool call, or parts: no text to parse
    parsed: dict[str, Any] = {}
    if job.task == "classify":
        parsed["label"] = classified(output, job.labels or [])
    elif job.task == "extract":
        parsed["extracted"] = extracted(output, job.fields or [])
    return {
        "request_id": request_id,
        "task": job.task,
        "output": output,
        **parsed,
        "provider": served.target.provider,
        "model": served.body.get("model") or served.target.model,
        "usage": served.usage.as_openai(),
        "estimated_cost_usd": str(served.cost_usd),
        "finish_reason": (served.body.get("choices") or [{}])[0].get("finish_reason"),
    }


def classified(output: str, labels: list[str]) -> str | None:
    """The label the model answered with, spelled as the caller gave it; None when the answer is not one.
    An exact answer wins ("U.S." among "U.S." and "U.S"); else quotes, stars and a full stop around either
    side are ignored, if that leaves one label."""
    exact = [label for label in labels if label.strip().casefold() == output.strip().casefold()]
    if len(exact) == 1:
        return exact[0]
    bare = output.strip(_DECORATION).casefold()
    loose = [label for label in labels if label.strip(_DECORATION).casefold() == bare]
    return loose[0] if len(loose) == 1 else None


def extracted(output: str, fields: list[str]) -> dict[str, Any] | None:
    """The requested fields from the model's JSON answer (null for one it left out, no others); None when the
    answer is not a JSON object (a model may ignore the instruction, or run out of tokens)."""
    text = output.strip()
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except (ValueError, RecursionError):
        return None
    return {field: value.get(field) for field in fields} if isinstance(value, dict) else None

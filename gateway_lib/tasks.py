"""The task API's system templates: each task is a documented prompt around the caller's text.

``POST /api/generate`` turns a ``GenerateRequest`` into an ordinary ``ChatRequest`` and
sends it down the same pipeline as chat completions (auth, guardrails, quotas,
ledger): there is no side door.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import GatewayError, InvalidRequest
from .schema import ChatRequest, GenerateRequest, parse_model

if TYPE_CHECKING:
    from .pipeline import Served

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


def system_prompt(req: GenerateRequest) -> str:
    template = TEMPLATES[req.task]
    if req.task == "extract":
        if not req.fields:
            raise InvalidRequest("Task 'extract' needs a non-empty 'fields' list.", param="fields")
        return template.format(fields=", ".join(req.fields))
    if req.task == "classify":
        if not req.labels or len(req.labels) < 2:
            raise InvalidRequest("Task 'classify' needs a 'labels' list with at least two labels.", param="labels")
        return template.format(labels=", ".join(req.labels))
    if req.task == "rewrite":
        return template.format(style=req.style or "clear, plain business English")
    return template


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
    return error


def render(job: GenerateRequest, served: Served, request_id: str) -> dict[str, Any]:
    """The task API's answer: the output plus who served it, usage, estimated cost and the request id."""
    message = (served.body.get("choices") or [{}])[0].get("message") or {}
    return {
        "request_id": request_id,
        "task": job.task,
        "output": message.get("content") or "",
        "provider": served.target.provider,
        "model": served.body.get("model") or served.target.model,
        "usage": served.usage.as_openai(),
        "estimated_cost_usd": str(served.cost_usd),
        "finish_reason": (served.body.get("choices") or [{}])[0].get("finish_reason"),
    }

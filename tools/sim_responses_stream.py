"""The Responses API's stream: one SSE event per step, each with ``type`` and ``sequence_number``.

``response.created``, ``response.in_progress``, then per output item ``response.output_item.added``,
for a message ``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``; for a function call
``response.function_call_arguments.delta``... and ``.done``; then ``response.output_item.done``,
and last ``response.completed`` (or ``response.incomplete``) carrying the whole response with usage.
A failure mid-stream is an ``error`` event. No ``[DONE]`` line ends this stream.
"""

from __future__ import annotations

import json
from typing import Any

from . import sim_text
from .sim_azure import error_body
from .sim_state import Fault


def event_frames(response: dict[str, Any]) -> list[bytes]:
    """Every SSE frame of ``response`` streamed."""
    opening = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": opening},
                                    {"type": "response.in_progress", "response": opening}]
    for index, item in enumerate(response["output"]):
        events += _item_events(index, item)
    final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    events.append({"type": final, "response": response})
    return [_frame({**event, "sequence_number": number}) for number, event in enumerate(events)]


def _item_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    ids = {"item_id": item["id"], "output_index": index}
    if item["type"] == "function_call":
        pieces = sim_text.chunk_text(item["arguments"])
        return [{"type": "response.output_item.added", "output_index": index,
                 "item": {**item, "arguments": "", "status": "in_progress"}},
                *({"type": "response.function_call_arguments.delta", **ids, "delta": p} for p in pieces),
                {"type": "response.function_call_arguments.done", **ids, "name": item["name"],
                 "arguments": item["arguments"]},
                {"type": "response.output_item.done", "output_index": index, "item": item}]
    part = item["content"][0]
    parts = {**ids, "content_index": 0}
    return [{"type": "response.output_item.added", "output_index": index,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **parts, "part": {**part, "text": ""}},
            *({"type": "response.output_text.delta", **parts, "delta": p, "logprobs": []}
              for p in sim_text.split_pieces(part["text"])),
            {"type": "response.output_text.done", **parts, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **parts, "part": part},
            {"type": "response.output_item.done", "output_index": index, "item": item}]


def _frame(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def error_frame(fault: Fault, frame_count: int) -> bytes:
    """The ``error`` event a fault sends after ``after_chunks`` events (its sequence number follows theirs)."""
    detail = error_body(fault.status, fault.retry_after, fault.message)["error"]
    sequence = min(max(fault.after_chunks or 0, 0), frame_count - 1)
    return _frame({"type": "error", "code": detail["code"], "message": detail["message"], "param": None,
                   "sequence_number": sequence})

"""What a model family produces for Bedrock ``InvokeModel``, before the simulator frames it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InvokeAnswer:
    payload: dict[str, Any]  # the InvokeModel response body
    events: list[dict[str, Any]] | None  # the stream's chunk payloads; None: the model cannot stream
    input_tokens: int
    output_tokens: int

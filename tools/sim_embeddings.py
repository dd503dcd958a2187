"""Deterministic embedding vectors, and Azure OpenAI's embeddings route.

A vector is seeded from a hash of its input, so the same text always embeds the same
way on every provider. Its first k components do not depend on the length asked for, so
asking for fewer ``dimensions`` shortens and re-normalises the same vector (as the
text-embedding-3 models do). Components are float32 values, so the ``float`` and
``base64`` (little-endian float32) encodings carry exactly the same numbers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from typing import Any

from . import sim_text
from .sim_azure import PROVIDER, check_request, invalid, non_stream_fault, response_headers
from .sim_http import Request, Send, send_json
from .sim_state import SimState, take_fault

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192


def vector(seed_text: str, dimensions: int, normalize: bool = True) -> list[float]:
    """The embedding of ``seed_text``: unit length unless ``normalize`` is false, float32 components."""
    rng = random.Random(hashlib.sha256(seed_text.encode()).digest())
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    scale = 1.0 / (math.sqrt(sum(v * v for v in raw)) or 1.0) if normalize else 0.1
    return [_float32(v * scale) for v in raw]


def _float32(value: float) -> float:
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


def base64_floats(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def native_dimensions(model: str) -> int:
    return 3072 if "3-large" in model else 1536


class BadEmbedding(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def azure_inputs(body: Any) -> list[tuple[str, int]]:
    """Each input as (seed text, token count): a string, a list of strings, a token array or a list of those."""
    if not isinstance(body, dict) or "input" not in body:
        raise BadEmbedding("'input' is a required property", "input")
    raw = body["input"]
    items = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)) else raw
    if not isinstance(items, list) or not items or len(items) > MAX_INPUTS:
        raise BadEmbedding(f"'$.input' must hold between 1 and {MAX_INPUTS} inputs.", "input")
    parsed = [_one_input(item) for item in items]
    longest = max(tokens for _, tokens in parsed)
    if longest > MAX_INPUT_TOKENS:
        raise BadEmbedding(f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you requested "
                           f"{longest} tokens in your input. Please reduce your input.", "input")
    return parsed


def _one_input(item: Any) -> tuple[str, int]:
    if isinstance(item, str) and item:
        return item, sim_text.count_tokens(item)
    if isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        return " ".join(map(str, item)), len(item)
    raise BadEmbedding("'$.input' is invalid. Please check the API reference: "
                       "https://platform.openai.com/docs/api-reference.", "input")


def _dimensions(body: dict[str, Any], model: str) -> int:
    asked = body.get("dimensions")
    if asked is None:
        return native_dimensions(model)
    if "embedding-3" not in model:
        raise BadEmbedding("This model does not support specifying dimensions.", "dimensions")
    if not isinstance(asked, int) or isinstance(asked, bool) or not 1 <= asked <= native_dimensions(model):
        raise BadEmbedding(f"Invalid value for 'dimensions': must be between 1 and {native_dimensions(model)}.",
                           "dimensions")
    return asked


def embeddings_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Azure's embeddings answer for a request body (raises ``BadEmbedding`` on what Azure refuses)."""
    inputs = azure_inputs(body)
    dimensions = _dimensions(body, model)
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadEmbedding("Invalid value for 'encoding_format': must be 'float' or 'base64'.", "encoding_format")
    data = []
    for index, (seed, _) in enumerate(inputs):
        values = vector(seed, dimensions)
        data.append({"object": "embedding", "index": index,
                     "embedding": base64_floats(values) if encoding == "base64" else values})
    tokens = sum(count for _, count in inputs)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def handle_embeddings(request: Request, deployment: str, state: SimState, send: Send,
                            needs_version: bool = True) -> None:
    """``POST /openai/deployments/{deployment}/embeddings`` and ``/openai/v1/embeddings``."""
    problem = check_request(request, state, needs_version)
    if problem:
        await send_json(send, *problem)
        return
    model = state.config.model_for(deployment)
    if "embed" not in model:
        await send_json(send, 400, {"error": {"code": "OperationNotSupported", "message": "The embeddings operation "
                                              f"does not work with the specified model, {model}. Please choose "
                                              "different model and try again.", "type": None, "param": None}})
        return
    try:
        answer = embeddings_body(request.json(), model)
    except BadEmbedding as exc:
        await send_json(send, 400, invalid(str(exc), exc.param), response_headers())
        return
    fault = await take_fault(state, PROVIDER, deployment)
    if fault:
        await non_stream_fault(send, fault, b'{"object": "list", "data": [{"embedding": [0.1, ')
        return
    await send_json(send, 200, answer, response_headers())

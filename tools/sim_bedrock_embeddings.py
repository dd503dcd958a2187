"""Titan Text Embeddings V2 and Cohere Embed v3 bodies on Bedrock ``InvokeModel``.

Titan: ``{"inputText", "dimensions"?: 256|512|1024, "normalize"?: true, "embeddingTypes"?: ["float",
"binary"]}`` → ``{"embedding", "inputTextTokenCount", "embeddingsByType"}``. Cohere:
``{"texts": [...], "input_type", "truncate"?, "embedding_types"?}`` → ``{"embeddings": [[...]], "id",
"response_type": "embeddings_floats", "texts"}``, or with ``embedding_types`` ``"embeddings":
{"float": [...], "int8": [...], ...}`` and ``"response_type": "embeddings_by_type"``. Neither streams.
Vectors come from ``tools.sim_embeddings``, so a text embeds the same way everywhere.
"""

from __future__ import annotations

import uuid
from typing import Any

from . import sim_text
from .sim_bedrock import BedrockError
from .sim_embeddings import vector
from .sim_invoke_types import InvokeAnswer

TITAN_DIMENSIONS = (256, 512, 1024)
TITAN_MAX_TOKENS = 8192
TITAN_KEYS = frozenset({"inputText", "dimensions", "normalize", "embeddingTypes"})
COHERE_DIMENSIONS = 1024
COHERE_MAX_TEXTS = 96
COHERE_MAX_CHARS = 2048
COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")
COHERE_KEYS = frozenset({"texts", "input_type", "truncate", "embedding_types", "images"})
COHERE_TYPES = ("float", "int8", "uint8", "binary", "ubinary")


def _malformed(detail: str) -> BedrockError:
    return BedrockError(400, f"Malformed input request: {detail}, please reformat your input and try again.")


def _check_keys(body: dict[str, Any], allowed: frozenset[str], required: tuple[str, ...]) -> None:
    for key in required:
        if key not in body:
            raise _malformed(f"#: required key [{key}] not found")
    extra = sorted(set(body) - allowed)
    if extra:
        raise _malformed(f"#: extraneous key [{extra[0]}] is not permitted")


def titan(body: dict[str, Any]) -> InvokeAnswer:
    _check_keys(body, TITAN_KEYS, ("inputText",))
    text = body["inputText"]
    if not isinstance(text, str) or not text:
        raise _malformed("#/inputText: expected minLength: 1, actual: 0")
    dimensions = body.get("dimensions", 1024)
    if dimensions not in TITAN_DIMENSIONS:
        raise _malformed(f"#/dimensions: {dimensions} is not a valid enum value")
    kinds = body.get("embeddingTypes") or ["float"]
    if not isinstance(kinds, list) or not set(kinds) <= {"float", "binary"}:
        raise _malformed("#/embeddingTypes: expected a list of \"float\" and \"binary\"")
    tokens = sim_text.count_tokens(text)
    if tokens > TITAN_MAX_TOKENS:
        raise BedrockError(400, f"400 Bad Request: Too many input tokens. Max input tokens: {TITAN_MAX_TOKENS}, "
                                f"request input token count: {tokens}")
    values = vector(text, dimensions, normalize=body.get("normalize", True) is not False)
    by_type: dict[str, Any] = {"float": values}
    if "binary" in kinds:
        by_type["binary"] = [1 if v > 0 else 0 for v in values]
    payload = {"embedding": values, "inputTextTokenCount": tokens, "embeddingsByType": by_type}
    return InvokeAnswer(payload, None, tokens, 0)


def cohere(body: dict[str, Any]) -> InvokeAnswer:
    _check_keys(body, COHERE_KEYS, ("texts", "input_type"))
    texts = body["texts"]
    if not isinstance(texts, list) or not 1 <= len(texts) <= COHERE_MAX_TEXTS or \
            not all(isinstance(t, str) for t in texts):
        raise _malformed(f"#/texts: expected between 1 and {COHERE_MAX_TEXTS} strings")
    if body["input_type"] not in COHERE_INPUT_TYPES:
        raise _malformed(f"#/input_type: {body['input_type']} is not a valid enum value")
    texts = [_truncated(t, body.get("truncate", "NONE")) for t in texts]
    kinds = body.get("embedding_types")
    if kinds is not None and (not isinstance(kinds, list) or not kinds or not set(kinds) <= set(COHERE_TYPES)):
        raise _malformed("#/embedding_types: expected a list of " + ", ".join(COHERE_TYPES))
    floats = [vector(t, COHERE_DIMENSIONS) for t in texts]
    tokens = sum(sim_text.count_tokens(t) for t in texts)
    payload: dict[str, Any] = {"id": str(uuid.uuid4()), "texts": texts}
    if kinds is None:
        payload.update(embeddings=floats, response_type="embeddings_floats")
    else:
        payload.update(embeddings={k: [_typed(v, k) for v in floats] for k in kinds},
                       response_type="embeddings_by_type")
    return InvokeAnswer(payload, None, tokens, 0)


def _truncated(text: str, truncate: Any) -> str:
    if len(text) <= COHERE_MAX_CHARS:
        return text
    if truncate == "START":
        return text[-COHERE_MAX_CHARS:]
    if truncate == "END":
        return text[:COHERE_MAX_CHARS]
    raise _malformed(f"#/texts: a text is longer than {COHERE_MAX_CHARS} characters and truncate is NONE")


def _typed(values: list[float], kind: str) -> list[float] | list[int]:
    """Cohere's compressed forms: int8/uint8 scale by the largest component; (u)binary packs signs 8 to a byte."""
    if kind == "float":
        return values
    if kind in ("int8", "uint8"):
        peak = max(abs(v) for v in values) or 1.0
        signed = [max(-128, min(127, round(v / peak * 127))) for v in values]
        return signed if kind == "int8" else [v + 128 for v in signed]
    bits = [1 if v > 0 else 0 for v in values]
    packed = [int("".join(map(str, bits[i:i + 8])).ljust(8, "0"), 2) for i in range(0, len(bits), 8)]
    return packed if kind == "ubinary" else [b - 128 for b in packed]

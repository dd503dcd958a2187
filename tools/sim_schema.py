"""A deterministic JSON value that satisfies a JSON schema: the simulator's structured answers.

Covers what ``response_format``/``text.format`` JSON schemas and tool ``parameters`` use in
practice, including the shapes the openai SDK emits for pydantic models (``$ref`` into
``$defs``, ``anyOf`` with ``null`` for optional fields, ``enum``/``const`` for literals,
``format: date-time``): objects (every declared property, required or not, as strict mode
requires), arrays (``minItems``, at least one item), strings (``enum``, ``format``, length
bounds), numbers and integers (bounds, ``multipleOf``), booleans and null. Strings carry
``hint``, so an answer still echoes the prompt. Unknown keywords are ignored.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 8  # a recursive schema (a tree of nodes) ends in its shortest branch past this depth
_FORMATS = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "time": "00:00:00", "email": "sim@example.com",
            "uuid": "00000000-0000-4000-8000-000000000000", "uri": "https://example.com/", "ipv4": "127.0.0.1",
            "hostname": "example.com", "duration": "P1D"}
_SAMPLE_FOR_TYPE = {"string", "integer", "number", "boolean", "array", "object", "null"}


def as_object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (request fields are untrusted)."""
    return value if isinstance(value, dict) else {}


def generate(schema: Any, hint: str = "simulated") -> Any:
    """A value valid for ``schema`` (a dict, or ``True``/``{}`` for anything)."""
    root = schema if isinstance(schema, dict) else {}
    return _value(root, root, hint or "simulated", 0)


def _value(schema: dict[str, Any], root: dict[str, Any], hint: str, depth: int) -> Any:
    schema = _resolved(schema, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _value(_preferred_branch(schema[key], root, depth), root, hint, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged = _merge(merged, _resolved(part, root) if isinstance(part, dict) else {})
        return _value(merged, root, hint, depth + 1)
    kind = _type_of(schema)
    if kind == "object":
        return _object(schema, root, hint, depth)
    if kind == "array":
        return _array(schema, root, hint, depth)
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string(schema, hint)


def _resolved(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref`` pointers (``#/$defs/X``, ``#/definitions/X``, ``#``); siblings of ``$ref`` are kept."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < MAX_DEPTH:
        target: Any = root
        for part in schema["$ref"].lstrip("#").strip("/").split("/"):
            if part:
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **(target if isinstance(target, dict) else {})}
        seen += 1
    return schema if isinstance(schema, dict) else {}


def _preferred_branch(branches: list[Any], root: dict[str, Any], depth: int) -> dict[str, Any]:
    """The first non-null branch (so optional fields carry data), or a null one past ``MAX_DEPTH``."""
    resolved = [_resolved(b, root) for b in branches if isinstance(b, dict)]
    non_null = [b for b in resolved if _type_of(b) != "null"]
    null = [b for b in resolved if _type_of(b) == "null"]
    if depth >= MAX_DEPTH and null:
        return null[0]
    return (non_null or resolved or [{}])[0]


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        non_null = [k for k in kind if k != "null"]
        kind = non_null[0] if non_null else "null"
    if isinstance(kind, str) and kind in _SAMPLE_FOR_TYPE:
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    merged = {**left, **right}
    if "properties" in left or "properties" in right:
        merged["properties"] = {**left.get("properties", {}), **right.get("properties", {})}
        merged["required"] = [*left.get("required", []), *right.get("required", [])]
    return merged


def _object(schema: dict[str, Any], root: dict[str, Any], hint: str, depth: int) -> dict[str, Any]:
    properties = as_object(schema.get("properties"))
    required = set(schema.get("required") or ())
    if depth >= MAX_DEPTH:  # only what must be there, to end recursion
        properties = {k: v for k, v in properties.items() if k in required}
    return {name: _value(spec if isinstance(spec, dict) else {}, root, hint, depth + 1)
            for name, spec in properties.items()}


def _array(schema: dict[str, Any], root: dict[str, Any], hint: str, depth: int) -> list[Any]:
    prefix = [p for p in schema.get("prefixItems") or [] if isinstance(p, dict)]
    items = as_object(schema.get("items"))
    low = int(schema.get("minItems", 0) or 0)
    high = schema.get("maxItems")
    count = max(low, len(prefix), 0 if depth >= MAX_DEPTH else 1)
    if isinstance(high, int):
        count = min(count, high)
    return [_value(prefix[i] if i < len(prefix) else items, root, hint, depth + 1) for i in range(count)]


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    low = _bound(schema, "minimum", "exclusiveMinimum", integer, +1)
    high = _bound(schema, "maximum", "exclusiveMaximum", integer, -1)
    value: float = 1 if integer else 1.5
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    step = schema.get("multipleOf")
    if isinstance(step, (int, float)) and step > 0:
        value = math.ceil(value / step) * step
        if high is not None and value > high:
            value -= step
    return int(value) if integer else float(value)


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str, integer: bool, direction: int) -> float | None:
    if isinstance(schema.get(inclusive), (int, float)):
        return float(schema[inclusive])
    edge = schema.get(exclusive)
    if isinstance(edge, (int, float)) and not isinstance(edge, bool):
        nudge = 1 if integer else 0.5
        return float(math.floor(edge) + 1 if integer and direction > 0 else
                     math.ceil(edge) - 1 if integer else edge + direction * nudge)
    return None


def _string(schema: dict[str, Any], hint: str) -> str:
    text = _FORMATS.get(str(schema.get("format")), hint)
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = text + "x" * (low - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text

"""JSON as RFC 8259 has it, for what callers send.

Python's parser also takes NaN, Infinity, numbers past a double (1e400 becomes inf) and lone UTF-16
surrogates ("\\ud800"). None of them can be sent on: the SDKs refuse to encode them, and failing
there looked like a provider failure (a 503 that counted against every target's circuit breaker).
It also takes a key twice in one object, the last value winning; another hop that keeps the first
would see a different request (RFC 8259 4: names SHOULD be unique), so that is refused too.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from gateway_lib.errors import InvalidRequest

_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a surrogate escape, paired or not


def loads(text: str | bytes | bytearray) -> Any:
    """Parse ``text``; raises ``json.JSONDecodeError``/``UnicodeDecodeError`` for what is not JSON at all and
    ``InvalidRequest`` (400 ``invalid_json``) for what Python takes but JSON does not.

    Bytes must be UTF-8 (RFC 8259 8.1; a BOM is ignored): Python would also take UTF-16 and UTF-32, where
    the escape check below, a search of the text, would not see a surrogate escape for the NULs in it."""
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8-sig")
    elif text.startswith("\ufeff"):  # what json.loads says of a str with a BOM
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    try:
        value = _decoder().decode(text)
    except _Duplicate as dup:  # rare: only then parse again to find where the key is
        where = _duplicate_path(json.loads(text, parse_constant=_no_constant, object_pairs_hook=_Marked.of))
        raise InvalidRequest(f"The JSON repeats the key '{dup.key[:64]}' in one object (at {where or 'the top'}); "
                             "send each key once.", code="invalid_json", param=where or None) from None
    if _ESCAPE.search(text):  # rare: only then walk the document
        _no_lone_surrogates(value)
    return value


@functools.cache
def _decoder() -> json.JSONDecoder:
    """Built once: ``json.loads`` with these options builds a decoder (and its scanner) per call."""
    return json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique)


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # the one check on the hot path: a dict the size of its pairs has no repeat
        seen: set[str] = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return value


class _Marked(dict[str, Any]):
    """An object of the second parse, carrying the key it repeats (None if it repeats none)."""

    repeated: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _Marked:
        value = cls(pairs)
        if len(value) != len(pairs):
            seen: set[str] = set()
            value.repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return value


def _duplicate_path(value: Any) -> str:
    """OpenAI's spelling of where the first repeated key is (``messages[0].content``)."""
    pending: list[tuple[Any, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, _Marked):
            if item.repeated is not None:
                return f"{path}.{item.repeated}" if path else item.repeated
            pending.extend((v, f"{path}.{k}" if path else k) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
    return ""


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"The JSON contains {name}, which JSON does not allow.", code="invalid_json")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InvalidRequest(f"The number {text[:40]} is out of range.", code="invalid_json")
    return value


def _no_lone_surrogates(value: Any) -> None:
    pending = [value]  # a loop, not recursion: the parser allows deeper nesting than a recursive walk would
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest("The JSON contains a lone UTF-16 surrogate escape (\\ud800-\\udfff without "
                                     "its pair); send valid Unicode.", code="invalid_json") from None

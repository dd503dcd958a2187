"""JSON as RFC 8259 has it, for what callers send.

Python's parser also takes NaN, Infinity, numbers past a double (1e400 becomes inf) and lone UTF-16
surrogates ("\\ud800"). None of them can be sent on: the SDKs refuse to encode them, and failing
there looked like a provider failure (a 503 that counted against every target's circuit breaker).
"""

from __future__ import annotations

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
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    if _ESCAPE.search(text):  # rare: only then walk the document
        _no_lone_surrogates(value)
    return value


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

"""The logging privacy filter: credentials and content never reach a log record, whatever a library logs."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"
_SENSITIVE = re.compile(
    r"(?:^|[_\-.])(authorization|auth|api[_\-.]?key|apikey|subscription[_\-.]?key|access[_\-.]?key|secret|password"
    r"|passwd|token|cookie|set[_\-.]?cookie|signature|sig|sas|prompt|content|completion|messages?|text"
    r"|functions?[_\-.]?key|private[_\-.]?key|credentials?|assertion|jwt|output|answer)(?:$|[_\-.])",
    re.IGNORECASE,
)
# Sizes and media metadata say how much or what kind, never what: prompt_tokens, content-type.
_METADATA = re.compile(r"[_\-.](tokens|chars|count|ms|bytes|length|type|encoding)$", re.IGNORECASE)
_LOGRECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


@functools.lru_cache(maxsize=4096)  # the same few dozen names (dimensions, headers) on every request
def is_sensitive(name: str) -> bool:
    """True for names like Authorization, x-api-key, access_token, prompt, content; not prompt_tokens, content-type."""
    return bool(_SENSITIVE.search(name)) and not _METADATA.search(name)


@functools.lru_cache(maxsize=1024)  # a record kind's keys come in the same order every time
def any_sensitive(names: tuple[str, ...]) -> bool:
    return any(is_sensitive(name) for name in names)


def redact(value: object) -> str:
    """A placeholder that says something was there without saying what."""
    return "" if value is None or value == "" else REDACTED


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with sensitive keys' values redacted (headers, dimensions)."""
    return {k: redact(v) if is_sensitive(k) else v for k, v in values.items()}


class PrivacyFilter(logging.Filter):
    """Blanks extra attributes (and custom_dimensions keys) named like credentials or content.

    Defence in depth: the gateway never logs such fields, but a future ``extra={"prompt": ...}``
    must not reach App Insights. The message text itself cannot be inspected this way.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name in [n for n in vars(record) if n not in _LOGRECORD_ATTRS]:
            value = getattr(record, name)
            if name in ("custom_dimensions", "custom_measurements") and isinstance(value, Mapping):
                if any_sensitive(tuple(value)):
                    setattr(record, name, redact_mapping(value))
            elif is_sensitive(name):
                setattr(record, name, redact(value))
        return True


def install_privacy_filter(logger: logging.Logger | None = None) -> None:
    """Add ``PrivacyFilter`` to every handler of ``logger`` (default: root, where the Functions worker's handler is)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, PrivacyFilter) for f in handler.filters):
            handler.addFilter(PrivacyFilter())

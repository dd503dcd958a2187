"""W3C trace context and request ids at the edge.

The caller's ``traceparent`` is continued (our span in their trace is what goes upstream)
and a well-formed ``x-request-id`` is kept, so their logs join ours.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True)
class TraceContext:
    trace_id: str  # 32 lowercase hex, not all zero
    span_id: str  # 16 lowercase hex (the W3C "parent-id"), not all zero
    flags: int = 1

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse_traceparent(header: str | None) -> TraceContext | None:
    """The caller's trace context, or None when absent or invalid (W3C Trace Context, level 1)."""
    match = _TRACEPARENT.fullmatch((header or "").strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields; later versions may append more.
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def new_traceparent() -> TraceContext:
    """A fresh, sampled trace for a caller that sent none."""
    return TraceContext(secrets.token_hex(16), _span_id())


def child_traceparent(parent: TraceContext | None) -> TraceContext:
    """Our span in the caller's trace (what we send upstream); a new trace when there is no parent."""
    if parent is None:
        return new_traceparent()
    # Version 00 defines the sampled bit (and level 2 the random-trace-id bit): the others are sent as zero.
    return TraceContext(parent.trace_id, _span_id(), parent.flags & 0x03)


def _span_id() -> str:
    span = secrets.token_hex(8)
    return span if span != "0" * 16 else _span_id()


def accept_request_id(header: str | None) -> str:
    """The caller's x-request-id when well-formed (it joins their logs to ours), else a new uuid4."""
    value = (header or "").strip()
    return value if _REQUEST_ID.fullmatch(value) else str(uuid.uuid4())

"""What admission hands a request: its reservation, to be settled or released exactly once."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal


@dataclass
class Reservation:
    """What ``reserve`` admitted; hand it back to ``settle`` or ``release`` exactly once."""

    caller_key: str
    request_id: str
    tier: str
    team: str | None
    tokens: int  # estimated prompt + max_tokens
    usd: Decimal  # priced at the dearest target the request may fall back to
    minute: str
    epoch: int
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    accounted: bool = True  # False: admitted fail-open without counters
    round_trips: int = 0  # storage round trips spent on this request so far
    names: tuple[str | None, str | None] = (None, None)  # the app's and the user's readable names, for the directory


@dataclass(frozen=True)
class Settlement:
    already_settled: bool  # the cost row existed: a retried settle, counted once
    round_trips: int  # total for the request (reserve + settle)

"""Usage counters and the limit checks made against them (pure: no I/O).

One counters row per caller (and per team) holds the current minute, day and month
windows plus the in-flight reservations; ``quota.Admission`` reads and writes it
under an ETag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from .errors import QuotaExceeded, RateLimited
from .overrides import LIMIT_NAMES, Override
from .storage.base import Entity
from .tiers import Tier

if TYPE_CHECKING:
    from .quota import Reservation

COUNTERS_ROW = "counters"
EPOCH_SECONDS = 900  # a reservation lives 15-30 min (two generations), far beyond any request
ZERO = Decimal(0)


@dataclass(frozen=True)
class Limits:
    """Effective limits; None = unlimited (a team with no override is tracked, not limited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_day: Decimal | None = None
    usd_per_month: Decimal | None = None

    @classmethod
    def of(cls, tier: Tier | None, override: Override | None) -> Limits:
        base = {n: getattr(tier, n) for n in LIMIT_NAMES} if tier else {}
        return cls(**{**base, **(override.limits if override else {})})  # type: ignore[arg-type]


# ---- counters ----------------------------------------------------------------------------------

def minute_key(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M")


def epoch_of(now: datetime) -> int:
    return int(now.timestamp()) // EPOCH_SECONDS


@dataclass(frozen=True)
class Counters:
    """One caller's (or team's) usage: windows keyed by UTC minute/day/month, plus in-flight reservations.

    Reservations are kept in two generations of ``EPOCH_SECONDS``: a reservation whose
    instance died before settling drops out after at most two epochs instead of
    blocking the budget for ever.
    """

    minute: str = ""
    minute_requests: int = 0
    minute_tokens: int = 0
    day: str = ""
    day_tokens: int = 0
    day_usd: Decimal = ZERO
    month: str = ""
    month_tokens: int = 0
    month_usd: Decimal = ZERO
    epoch: int = 0
    reserved_tokens: int = 0
    reserved_usd: Decimal = ZERO
    prev_reserved_tokens: int = 0
    prev_reserved_usd: Decimal = ZERO

    @property
    def in_flight_tokens(self) -> int:
        return self.reserved_tokens + self.prev_reserved_tokens

    @property
    def in_flight_usd(self) -> Decimal:
        return self.reserved_usd + self.prev_reserved_usd

    @classmethod
    def from_entity(cls, entity: Entity | None) -> Counters:
        if entity is None:
            return cls()
        p, defaults = entity.properties, cls()
        return cls(**{name: type(getattr(defaults, name))(p[name]) if name in p else getattr(defaults, name)
                      for name in cls.__dataclass_fields__})

    def to_entity(self, partition_key: str) -> Entity:
        return Entity(partition_key, COUNTERS_ROW, {n: getattr(self, n) for n in self.__dataclass_fields__})

    def rolled(self, now: datetime) -> Counters:
        """Advance windows to ``now``. Only forward: an instance whose clock lags never resets a newer window."""
        c = self
        if minute_key(now) > c.minute:
            c = replace(c, minute=minute_key(now), minute_requests=0, minute_tokens=0)
        if now.strftime("%Y-%m-%d") > c.day:
            c = replace(c, day=now.strftime("%Y-%m-%d"), day_tokens=0, day_usd=ZERO)
        if now.strftime("%Y-%m") > c.month:
            c = replace(c, month=now.strftime("%Y-%m"), month_tokens=0, month_usd=ZERO)
        epoch = epoch_of(now)
        if epoch == c.epoch + 1:
            c = replace(c, epoch=epoch, prev_reserved_tokens=c.reserved_tokens, prev_reserved_usd=c.reserved_usd,
                        reserved_tokens=0, reserved_usd=ZERO)
        elif epoch > c.epoch + 1:
            c = replace(c, epoch=epoch, prev_reserved_tokens=0, prev_reserved_usd=ZERO, reserved_tokens=0,
                        reserved_usd=ZERO)
        return c

    def reserve(self, tokens: int, usd: Decimal, requests: int = 1) -> Counters:
        return replace(self, minute_requests=self.minute_requests + requests,
                       minute_tokens=self.minute_tokens + tokens,
                       reserved_tokens=self.reserved_tokens + tokens, reserved_usd=self.reserved_usd + usd)

    def released(self, minute: str, epoch: int, requests: int, tokens: int, usd: Decimal) -> Counters:
        """Give back an unused reservation of ``requests``/``tokens``/``usd`` taken in ``minute``/``epoch``
        (a lease's remainder): nothing was consumed, so no window but the minute's moves."""
        c = self
        if c.minute == minute:
            c = replace(c, minute_requests=max(0, c.minute_requests - requests),
                        minute_tokens=max(0, c.minute_tokens - tokens))
        if epoch == c.epoch:
            c = replace(c, reserved_tokens=max(0, c.reserved_tokens - tokens),
                        reserved_usd=max(ZERO, c.reserved_usd - usd))
        elif epoch == c.epoch - 1:
            c = replace(c, prev_reserved_tokens=max(0, c.prev_reserved_tokens - tokens),
                        prev_reserved_usd=max(ZERO, c.prev_reserved_usd - usd))
        return c

    def settle(self, res: Reservation, tokens: int, usd: Decimal) -> Counters:
        """Replace the reservation with actual usage (the reservation may already have expired)."""
        c = replace(self, day_tokens=self.day_tokens + tokens, day_usd=self.day_usd + usd,
                    month_tokens=self.month_tokens + tokens, month_usd=self.month_usd + usd)
        if c.minute == res.minute:  # the minute's token count becomes actual; a past minute is left alone
            c = replace(c, minute_tokens=max(0, c.minute_tokens - res.tokens + tokens))
        if res.epoch == c.epoch:
            c = replace(c, reserved_tokens=max(0, c.reserved_tokens - res.tokens),
                        reserved_usd=max(ZERO, c.reserved_usd - res.usd))
        elif res.epoch == c.epoch - 1:
            c = replace(c, prev_reserved_tokens=max(0, c.prev_reserved_tokens - res.tokens),
                        prev_reserved_usd=max(ZERO, c.prev_reserved_usd - res.usd))
        return c


# ---- admission checks (pure) -------------------------------------------------------------------

def seconds_until(now: datetime, end: datetime) -> int:
    return max(1, math.ceil((end - now).total_seconds()))


def next_minute(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1)


def next_day(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def next_month(now: datetime) -> datetime:
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def rate_headers(c: Counters, limits: Limits, now: datetime) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers for the minute window (omitted when unlimited)."""
    reset = f"{seconds_until(now, next_minute(now))}s"
    headers: dict[str, str] = {}
    for kind, limit, used in (("requests", limits.requests_per_minute, c.minute_requests),
                              ("tokens", limits.tokens_per_minute, c.minute_tokens)):
        if limit is not None:
            headers.update({f"x-ratelimit-limit-{kind}": str(limit),
                            f"x-ratelimit-remaining-{kind}": str(max(0, limit - used)),
                            f"x-ratelimit-reset-{kind}": reset})
    return headers


def check(c: Counters, limits: Limits, tokens: int, usd: Decimal, now: datetime, who: str,
          requests: int = 1) -> None:
    """Raise if admitting ``tokens``/``usd`` more would pass a limit: rate first, then budgets."""
    after = c.reserve(tokens, usd, requests)
    rate: tuple[tuple[int | None, int, str], ...] = (
        (limits.requests_per_minute, after.minute_requests, "requests per minute"),
        (limits.tokens_per_minute, after.minute_tokens, "tokens per minute"),
    )
    for limit, value, what in rate:
        if limit is not None and value > limit:
            raise RateLimited(f"Rate limit of {limit} {what} reached for {who}.",
                              retry_after=seconds_until(now, next_minute(now)), headers=rate_headers(c, limits, now))
    budgets: tuple[tuple[int | Decimal | None, int | Decimal, str, datetime], ...] = (
        (limits.tokens_per_day, c.day_tokens + after.in_flight_tokens, "daily token quota", next_day(now)),
        (limits.usd_per_day, c.day_usd + after.in_flight_usd, "daily USD budget", next_day(now)),
        (limits.tokens_per_month, c.month_tokens + after.in_flight_tokens, "monthly token quota", next_month(now)),
        (limits.usd_per_month, c.month_usd + after.in_flight_usd, "monthly USD budget", next_month(now)),
    )
    for cap, spent, what, end in budgets:
        if cap is not None and spent > cap:
            raise QuotaExceeded(f"The {what} ({cap}) of {who} is used up; it resets at {end.isoformat()}.",
                                retry_after=seconds_until(now, end), headers=rate_headers(c, limits, now))

"""Usage counters and the limit checks made against them (pure: no I/O).

One counters row per caller (and per team) holds the current minute, day and month
windows plus the in-flight reservations; ``quota.Admission`` reads and writes it
under an ETag.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gateway_lib.config.tiers import Tier
from gateway_lib.errors import QuotaExceeded, RateLimited
from gateway_lib.quota.overrides import LIMIT_NAMES, Override, money_json
from gateway_lib.storage.base import Entity

if TYPE_CHECKING:
    from gateway_lib.quota.reservation import Reservation

COUNTERS_ROW = "counters"
# Every counters write carries a fresh marker, and the row keeps the last few. A write whose reply was
# lost (connection reset, storage failing over) may or may not have landed; the marker tells, so a
# retry never applies a change twice and a lost reservation is given back instead of blocking budget.
WRITERS_KEPT = 16
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
    return now.isoformat()[:16]  # "%Y-%m-%dT%H:%M", without strftime's per-call format parsing


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
        p = entity.properties
        new = object.__new__(cls)  # as in ``_with``: the values are converted here, no __post_init__ to run
        new.__dict__.update({name: kind(p[name]) if name in p else default for name, kind, default in _FIELDS})
        return new

    def to_entity(self, partition_key: str) -> Entity:
        return Entity(partition_key, COUNTERS_ROW, {n: getattr(self, n) for n in self.__dataclass_fields__})

    def rolled(self, now: datetime) -> Counters:
        """Advance windows to ``now``. Only forward: an instance whose clock lags never resets a newer window."""
        c, minute = self, minute_key(now)
        day = minute[:10]
        if minute > c.minute:
            c = c._with(minute=minute, minute_requests=0, minute_tokens=0)
        if day > c.day:
            c = c._with(day=day, day_tokens=0, day_usd=ZERO)
        if day[:7] > c.month:
            c = c._with(month=day[:7], month_tokens=0, month_usd=ZERO)
        epoch = epoch_of(now)
        if epoch == c.epoch + 1:
            c = c._with(epoch=epoch, prev_reserved_tokens=c.reserved_tokens, prev_reserved_usd=c.reserved_usd,
                        reserved_tokens=0, reserved_usd=ZERO)
        elif epoch > c.epoch + 1:
            c = c._with(epoch=epoch, prev_reserved_tokens=0, prev_reserved_usd=ZERO, reserved_tokens=0,
                        reserved_usd=ZERO)
        return c

    def _with(self, **changes: Any) -> Counters:
        """``dataclasses.replace`` without running ``__init__`` over all fields again (a fifth of the
        cost): a request makes several of these, and there is no ``__post_init__`` to skip."""
        new = object.__new__(Counters)
        new.__dict__.update(self.__dict__, **changes)
        return new

    def reserve(self, tokens: int, usd: Decimal, requests: int = 1, epoch: int | None = None) -> Counters:
        """Add in-flight room to the generation of ``epoch`` (the one its settlement will take it from).

        A request whose reservation epoch turned before its write reached the row (it waited for the
        row, or the row was rolled by another instance) belongs in the previous generation: put in the
        current one, its settlement would take it from the previous one instead, clamped at zero."""
        c = self._with(minute_requests=self.minute_requests + requests, minute_tokens=self.minute_tokens + tokens)
        if epoch == self.epoch - 1:
            return c._with(prev_reserved_tokens=self.prev_reserved_tokens + tokens,
                           prev_reserved_usd=self.prev_reserved_usd + usd)
        return c._with(reserved_tokens=self.reserved_tokens + tokens, reserved_usd=self.reserved_usd + usd)

    def released(self, minute: str, epoch: int, requests: int, tokens: int, usd: Decimal) -> Counters:
        """Give back an unused reservation of ``requests``/``tokens``/``usd`` taken in ``minute``/``epoch``
        (a lease's remainder): nothing was consumed, so no window but the minute's moves."""
        c = self
        if c.minute == minute:
            c = c._with(minute_requests=max(0, c.minute_requests - requests),
                        minute_tokens=max(0, c.minute_tokens - tokens))
        return c._unreserved(epoch, tokens, usd)

    def settle(self, res: Reservation, tokens: int, usd: Decimal) -> Counters:
        """Replace the reservation with actual usage (the reservation may already have expired)."""
        c = self._with(day_tokens=self.day_tokens + tokens, day_usd=self.day_usd + usd,
                       month_tokens=self.month_tokens + tokens, month_usd=self.month_usd + usd)
        if c.minute == res.minute:  # the minute's token count becomes actual; a past minute is left alone
            c = c._with(minute_tokens=max(0, c.minute_tokens - res.tokens + tokens))
        return c._unreserved(res.epoch, res.tokens, res.usd)

    def _unreserved(self, epoch: int, tokens: int, usd: Decimal) -> Counters:
        """Take a reservation made in ``epoch`` out of whichever generation still holds it (if any)."""
        if epoch == self.epoch:
            return self._with(reserved_tokens=max(0, self.reserved_tokens - tokens),
                              reserved_usd=max(ZERO, self.reserved_usd - usd))
        if epoch == self.epoch - 1:
            return self._with(prev_reserved_tokens=max(0, self.prev_reserved_tokens - tokens),
                              prev_reserved_usd=max(ZERO, self.prev_reserved_usd - usd))
        return self


_FIELDS = tuple((name, type(getattr(Counters(), name)), getattr(Counters(), name)) for name in Counters.__dataclass_fields__)


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


@dataclass(frozen=True)
class Release:
    """Reserved room to give back: what a reservation (or a lease) added to the row."""

    minute: str
    epoch: int
    requests: int
    tokens: int
    usd: Decimal

    def apply(self, counters: Counters) -> Counters:
        return counters.released(self.minute, self.epoch, self.requests, self.tokens, self.usd)


# Picks the room a reservation takes on a counters row (rolled to now), or raises a GatewayError to refuse;
# returns the counters to add it to (a lease's plan first gives the old lease back) and the room.
Plan = Callable[[Counters, datetime], tuple[Counters, Release]]


def writers(entity: Entity | None) -> list[str]:
    """The markers of the last counters writes that landed on the row, newest first."""
    return str(entity.properties.get("writers") or "").split(",") if entity is not None else []


def stamped(new: Entity, marker: str, read: Entity | None) -> Entity:
    """``new`` carrying ``marker`` in front of the row's recent ones (``read``: the row it replaces)."""
    history = ",".join([marker, *writers(read)][:WRITERS_KEPT])
    return replace(new, properties={**new.properties, "writers": history})


# ---- JSON edge: the usage view ---------------------------------------------------------------------

def usage_document(caller_key: str, tier: Tier | None, c: Counters, limits: Limits, override: Override | None,
                   now: datetime) -> dict[str, Any]:
    """JSON for GET /api/v1/usage (money as strings, like every USD amount the gateway emits)."""

    def period(used: Mapping[str, Any], limit: Mapping[str, Any], end: datetime) -> dict[str, Any]:
        remaining = {k: None if v is None else max(v - used[k], 0 * v) for k, v in limit.items()}
        return {"used": {k: money_json(v) for k, v in used.items()}, "limit": {k: money_json(v) for k, v in limit.items()},
                "remaining": {k: money_json(v) for k, v in remaining.items()}, "resets_at": end.isoformat()}

    return {
        "caller": caller_key, "tier": tier.name if tier else None,
        "status": override.status if override else "active", "alias": override.alias if override else None,
        "minute": period({"requests": c.minute_requests, "tokens": c.minute_tokens},
                         {"requests": limits.requests_per_minute, "tokens": limits.tokens_per_minute},
                         next_minute(now)),
        "day": period({"tokens": c.day_tokens, "usd": c.day_usd},
                      {"tokens": limits.tokens_per_day, "usd": limits.usd_per_day}, next_day(now)),
        "month": period({"tokens": c.month_tokens, "usd": c.month_usd},
                        {"tokens": limits.tokens_per_month, "usd": limits.usd_per_month}, next_month(now)),
        "in_flight": {"tokens": c.in_flight_tokens, "usd": str(c.in_flight_usd)},
    }

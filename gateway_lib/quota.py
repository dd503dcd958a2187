"""Admission control: reserve -> settle, with counters in Table Storage shared by every instance.

A counter in process memory would multiply every limit by the number of Function
instances, so each caller has one counters row (``{prefix}usage``, PK = caller key,
RK ``counters``) and every change to it is a conditional write on its ETag. Layout,
round trips and the overspend bound: docs/storage.md.

* ``reserve`` admits a request against its worst case (estimated prompt + max_tokens,
  priced) or raises ``RateLimited`` / ``QuotaExceeded`` / ``ServiceUnavailable``.
* ``settle`` / ``release`` swap the reservation for the actual usage and insert the
  request's cost row, in one entity-group transaction (idempotent per request).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from .errors import GatewayError, InvalidRequest, QuotaExceeded, RateLimited, ServiceUnavailable
from .identity import Caller
from .ledger import CALLERS_PARTITION, CallerDirectory, CostRow, callers_table, table_key, usage_table
from .storage.base import Entity, EntityExists, Op, PreconditionFailed, StorageError, TableStore, TransactionFailed
from .tiers import Tier

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

COUNTERS_ROW = "counters"
EPOCH_SECONDS = 900  # a reservation lives 15-30 min (two generations), far beyond any request
OVERRIDE_TTL_SECONDS = 30.0  # staleness window of an override change on other instances
RESERVE_ATTEMPTS = 6
SETTLE_ATTEMPTS = 12
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month",
               "usd_per_day", "usd_per_month")
STATUSES = ("active", "blocked", "downgraded")
ZERO = Decimal(0)


def overrides_table(prefix: str) -> str:
    return f"{prefix}overrides"


def tables(prefix: str) -> list[str]:
    """Every table quota and ledger use (create them once at deployment or startup)."""
    return [usage_table(prefix), overrides_table(prefix), callers_table(prefix)]


def team_partition(team: str) -> str:
    return table_key(f"team:{team}")


# ---- overrides ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """Per-caller (or per-team) limits replacing any subset of the tier's, plus the budget status."""

    limits: Mapping[str, int | Decimal] = field(default_factory=dict)
    status: str = "active"  # active | blocked | downgraded (set by budget enforcement)
    alias: str | None = None  # downgraded: the alias requests are routed to instead
    reason: str | None = None
    updated_at: str | None = None
    etag: str | None = None
    updated_by: str | None = None  # caller key of the admin (or "budget" for enforcement)

    def __post_init__(self) -> None:
        unknown = set(self.limits) - set(LIMIT_NAMES)
        if unknown or self.status not in STATUSES or (self.status == "downgraded" and not self.alias):
            raise ValueError(f"invalid override: unknown limits {sorted(unknown)} or status {self.status!r}")

    def properties(self) -> dict[str, Any]:
        return {**self.limits, "status": self.status, "alias": self.alias, "reason": self.reason,
                "updated_at": self.updated_at, "updated_by": self.updated_by}

    @classmethod
    def from_entity(cls, entity: Entity) -> Override:
        p = entity.properties
        limits = {n: (Decimal(str(p[n])) if n.startswith("usd") else int(p[n])) for n in LIMIT_NAMES if n in p}
        return cls(limits, str(p.get("status", "active")), p.get("alias"), p.get("reason"), p.get("updated_at"),
                   entity.etag, p.get("updated_by"))


def _override_key(subject: str, kind: str) -> tuple[str, str]:
    if kind not in ("caller", "team"):
        raise ValueError("override kind is 'caller' or 'team'")
    return kind, table_key(subject)


async def get_override(store: TableStore, prefix: str, subject: str, kind: str = "caller") -> Override | None:
    """The stored override for a caller key (or team name), uncached: for the admin route."""
    entity = await store.get(overrides_table(prefix), *_override_key(subject, kind))
    return Override.from_entity(entity) if entity else None


async def put_override(
    store: TableStore, prefix: str, subject: str, override: Override, kind: str = "caller",
) -> Override:
    """Write an override. With ``override.etag`` the write is conditional: the admin route and budget
    enforcement both edit this row, and the ETag stops one silently undoing the other's change."""
    pk, rk = _override_key(subject, kind)
    entity = Entity(pk, rk, override.properties())
    table = overrides_table(prefix)
    written = await (store.update(table, entity, override.etag) if override.etag else store.upsert(table, entity))
    return replace(override, etag=written.etag)


async def delete_override(store: TableStore, prefix: str, subject: str, kind: str = "caller") -> None:
    await store.delete(overrides_table(prefix), *_override_key(subject, kind))


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

    def reserve(self, tokens: int, usd: Decimal) -> Counters:
        return replace(self, minute_requests=self.minute_requests + 1, minute_tokens=self.minute_tokens + tokens,
                       reserved_tokens=self.reserved_tokens + tokens, reserved_usd=self.reserved_usd + usd)

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

def _seconds_until(now: datetime, end: datetime) -> int:
    return max(1, math.ceil((end - now).total_seconds()))


def _next_minute(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0) + timedelta(minutes=1)


def _next_day(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def _next_month(now: datetime) -> datetime:
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def rate_headers(c: Counters, limits: Limits, now: datetime) -> dict[str, str]:
    """OpenAI-style x-ratelimit-* headers for the minute window (omitted when unlimited)."""
    reset = f"{_seconds_until(now, _next_minute(now))}s"
    headers: dict[str, str] = {}
    for kind, limit, used in (("requests", limits.requests_per_minute, c.minute_requests),
                              ("tokens", limits.tokens_per_minute, c.minute_tokens)):
        if limit is not None:
            headers.update({f"x-ratelimit-limit-{kind}": str(limit),
                            f"x-ratelimit-remaining-{kind}": str(max(0, limit - used)),
                            f"x-ratelimit-reset-{kind}": reset})
    return headers


def check(c: Counters, limits: Limits, tokens: int, usd: Decimal, now: datetime, who: str) -> None:
    """Raise if admitting ``tokens``/``usd`` more would pass a limit: rate first, then budgets."""
    after = c.reserve(tokens, usd)
    rate: tuple[tuple[int | None, int, str], ...] = (
        (limits.requests_per_minute, after.minute_requests, "requests per minute"),
        (limits.tokens_per_minute, after.minute_tokens, "tokens per minute"),
    )
    for limit, value, what in rate:
        if limit is not None and value > limit:
            raise RateLimited(f"Rate limit of {limit} {what} reached for {who}.",
                              retry_after=_seconds_until(now, _next_minute(now)), headers=rate_headers(c, limits, now))
    budgets: tuple[tuple[int | Decimal | None, int | Decimal, str, datetime], ...] = (
        (limits.tokens_per_day, c.day_tokens + after.in_flight_tokens, "daily token quota", _next_day(now)),
        (limits.usd_per_day, c.day_usd + after.in_flight_usd, "daily USD budget", _next_day(now)),
        (limits.tokens_per_month, c.month_tokens + after.in_flight_tokens, "monthly token quota", _next_month(now)),
        (limits.usd_per_month, c.month_usd + after.in_flight_usd, "monthly USD budget", _next_month(now)),
    )
    for cap, spent, what, end in budgets:
        if cap is not None and spent > cap:
            raise QuotaExceeded(f"The {what} ({cap}) of {who} is used up; it resets at {end.isoformat()}.",
                                retry_after=_seconds_until(now, end), headers=rate_headers(c, limits, now))


# ---- the engine ----------------------------------------------------------------------------------

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
    snapshot: Entity | None = None  # counters as we last wrote them: settle tries this ETag first
    team_snapshot: Entity | None = None


@dataclass(frozen=True)
class Settlement:
    already_settled: bool  # the cost row existed: a retried settle, counted once
    round_trips: int  # total for the request (reserve + settle)


class Admission:
    """Reserve/settle against shared counters. One per process; safe for concurrent requests."""

    def __init__(
        self, store: TableStore, settings: Settings, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None, override_ttl: float = OVERRIDE_TTL_SECONDS,
    ) -> None:
        self._store, self._settings = store, settings
        self._prefix = settings.storage.table_prefix
        self._table = usage_table(self._prefix)
        self._clock, self._monotonic, self._sleep = clock, monotonic, sleep
        self._rng = rng or random.Random()
        self._ttl = override_ttl
        self._overrides: dict[tuple[str, str], tuple[float, Override | None]] = {}
        self._directory = CallerDirectory(store, self._prefix)
        self._tables_ready = False

    async def effective_alias(self, caller: Caller, alias: str) -> str:
        """The alias to route: the override's alias while budget enforcement has the caller downgraded."""
        try:
            await self._ensure_tables()  # the first call of a request: tables may not exist yet
            override = await self._cached_override(caller.key, "caller", None)
        except StorageError as exc:
            if caller.tier.fail_open:
                return alias
            raise _unavailable() from exc
        return override.alias if override and override.status == "downgraded" and override.alias else alias

    async def reserve(self, caller: Caller, *, tokens: int, usd: Decimal, request_id: str) -> Reservation:
        """Admit the request's worst case or raise RateLimited / QuotaExceeded / ServiceUnavailable."""
        now = self._clock()
        res = Reservation(caller.key, request_id, caller.tier.name, caller.team, tokens, usd, minute_key(now),
                          epoch_of(now))
        try:
            res.round_trips += await self._ensure_tables()
            override = await self._cached_override(caller.key, "caller", res)
            if override is not None and override.status == "blocked":
                why = override.reason or "budget spent"
                raise QuotaExceeded(f"{caller.display} is blocked by budget enforcement ({why}).",
                                    retry_after=_seconds_until(now, _next_month(now)))
            res.snapshot, res.headers = await self._admit(table_key(caller.key), Limits.of(caller.tier, override),
                                                          res, caller.display)
            if caller.team:
                await self._admit_team(caller.team, res)
        except StorageError as exc:
            return self._storage_down(caller, res, exc)
        return res

    async def settle(self, res: Reservation, row: CostRow) -> Settlement:
        """Swap the reservation for the row's actual usage and insert the row: one transaction, idempotent."""
        return await self._finish(res, row)

    async def release(self, res: Reservation, row: CostRow) -> Settlement:
        """A failed request: drop the reservation, count whatever the row says was consumed, write the row."""
        return await self._finish(res, row)

    async def usage_view(self, subject: Caller | str, tier: Tier | None = None,
                         now: datetime | None = None) -> dict[str, Any]:
        """Current minute/day/month usage with limits and what remains (GET /api/v1/usage).

        ``subject`` is a caller, or (for admins) a caller key whose tier comes from the callers directory.
        """
        now = now or self._clock()
        await self._ensure_tables()
        key = subject.key if isinstance(subject, Caller) else subject
        tier = subject.tier if isinstance(subject, Caller) else await self._directory_tier(key) or tier
        override = await self._cached_override(key, "caller", None)
        entity = await self._store.get(self._table, table_key(key), COUNTERS_ROW)
        counters = Counters.from_entity(entity).rolled(now)
        return usage_document(key, tier, counters, Limits.of(tier, override), override, now)

    async def get_overrides(self, subject: str) -> dict[str, Any]:
        """The caller's override as JSON (admin route)."""
        await self._ensure_tables()
        return override_json(subject, await get_override(self._store, self._prefix, subject))

    async def put_overrides(self, subject: str, body: Mapping[str, Any], changed_by: str) -> dict[str, Any]:
        """Merge ``body`` into the caller's override (admin route); ETag-conditional, retried on a race."""
        await self._ensure_tables()
        for attempt in range(SETTLE_ATTEMPTS):
            current = await get_override(self._store, self._prefix, subject)
            merged = merge_override(current, body, changed_by, self._clock())
            try:
                # Conditional (or insert): budget enforcement may set status at the same moment.
                saved = await (put_override(self._store, self._prefix, subject, merged) if current
                               else self._insert_override(subject, merged))
            except (PreconditionFailed, EntityExists):
                await self._backoff(attempt)
                continue
            self._overrides.pop(("caller", subject), None)  # this instance sees the change at once
            return override_json(subject, saved)
        raise ServiceUnavailable("The override kept changing underneath; retry.", retry_after=1)

    # -- internals --

    async def _ensure_tables(self) -> int:
        """Create our tables once per process (3 round trips per process lifetime, 0 after)."""
        if self._tables_ready:
            return 0
        await self._store.ensure_tables(tables(self._prefix))
        self._tables_ready = True
        return len(tables(self._prefix))

    async def _insert_override(self, subject: str, override: Override) -> Override:
        pk, rk = _override_key(subject, "caller")
        written = await self._store.insert(overrides_table(self._prefix), Entity(pk, rk, override.properties()))
        return replace(override, etag=written.etag)

    async def _directory_tier(self, caller_key: str) -> Tier | None:
        row = await self._store.get(callers_table(self._prefix), CALLERS_PARTITION, table_key(caller_key))
        name = row.properties.get("tier") if row else None
        return self._settings.tiers.tiers.get(str(name)) if name else None

    async def _admit(self, pk: str, limits: Limits, res: Reservation, who: str) -> tuple[Entity, dict[str, str]]:
        for attempt in range(RESERVE_ATTEMPTS):
            now = self._clock()
            entity = await self._get(pk, res)
            counters = Counters.from_entity(entity).rolled(now)
            check(counters, limits, res.tokens, res.usd, now, who)
            admitted = counters.reserve(res.tokens, res.usd)
            try:
                # The ETag condition is what makes check-then-write safe across instances: if another
                # request was admitted or settled since our read, our check used stale numbers -> 412.
                written = await self._write_counters(entity, admitted.to_entity(pk), res)
                return written, rate_headers(admitted, limits, now)
            except (PreconditionFailed, EntityExists):  # EntityExists: two first requests raced to create the row
                await self._backoff(attempt)
        # Only this caller's own concurrency keeps winning the race: ask it to slow down (429, not 503).
        raise RateLimited(f"Too many concurrent requests for {who}; retry shortly.", retry_after=1)

    async def _admit_team(self, team: str, res: Reservation) -> None:
        override = await self._cached_override(team, "team", res)
        try:
            res.team_snapshot, _ = await self._admit(team_partition(team), Limits.of(None, override), res,
                                                     f"team {team}")
        except GatewayError:
            await self._undo(res)  # the caller's reservation must not outlive the team's refusal
            raise

    async def _undo(self, res: Reservation) -> None:
        """Take the caller's reservation back out (a zero-usage settle without a cost row)."""
        pk, entity = table_key(res.caller_key), res.snapshot
        for attempt in range(SETTLE_ATTEMPTS):
            entity = entity or await self._get(pk, res)
            undone = Counters.from_entity(entity).rolled(self._clock()).settle(res, 0, ZERO)
            undone = replace(undone, minute_requests=max(0, undone.minute_requests - 1))
            try:
                await self._write_counters(entity, undone.to_entity(pk), res)
                return
            except PreconditionFailed:  # someone else wrote since: redo on fresh numbers
                entity = None
                await self._backoff(attempt)

    async def _finish(self, res: Reservation, row: CostRow) -> Settlement:
        if not res.accounted:
            return await self._record_unaccounted(res, row)
        res.round_trips += await self._directory.register(res.caller_key, res.team, res.tier, row.time)
        pk, entity = table_key(res.caller_key), res.snapshot
        for attempt in range(SETTLE_ATTEMPTS):
            entity = entity or await self._get(pk, res)
            settled = Counters.from_entity(entity).rolled(row.time).settle(res, row.total_tokens, row.cost_usd)
            try:
                # Insert first: a retry of a settle that already committed fails on op 0 as "exists".
                ops = [Op("insert", row.to_entity()), _counters_op(entity, settled.to_entity(pk))]
                res.round_trips += 1
                await self._store.transact(self._table, ops)
                break
            except TransactionFailed as exc:
                if exc.reason == "exists":
                    return Settlement(True, res.round_trips)  # already settled: counting again would double it
                if exc.reason not in ("precondition", "not_found"):
                    raise
                entity = None  # 412: an admission or settle of another request changed the counters
                await self._backoff(attempt)
        else:
            raise StorageError(f"settle of {res.request_id} lost the ETag race {SETTLE_ATTEMPTS} times")
        if res.team:
            await self._settle_team(res, row)
        return Settlement(False, res.round_trips)

    async def _settle_team(self, res: Reservation, row: CostRow) -> None:
        pk, entity = team_partition(res.team or ""), res.team_snapshot
        for attempt in range(SETTLE_ATTEMPTS):
            entity = entity or await self._get(pk, res)
            settled = Counters.from_entity(entity).rolled(row.time).settle(res, row.total_tokens, row.cost_usd)
            try:
                await self._write_counters(entity, settled.to_entity(pk), res)
                return
            except (PreconditionFailed, EntityExists):
                entity = None
                await self._backoff(attempt)
        log.error("team counters not settled", extra={"request_id": res.request_id, "team": res.team})

    async def _record_unaccounted(self, res: Reservation, row: CostRow) -> Settlement:
        """Fail-open admission: no counters to touch, but try to keep the one-cost-row-per-request rule."""
        try:
            res.round_trips += await self._ensure_tables() + 1
            await self._store.insert(self._table, replace(row, accounted=False).to_entity())
        except EntityExists:
            return Settlement(True, res.round_trips)
        except StorageError:
            log.error("cost row of a fail-open request lost: storage unreachable",
                      extra={"request_id": res.request_id, "caller": res.caller_key, "cost_usd": str(row.cost_usd)})
        return Settlement(False, res.round_trips)

    def _storage_down(self, caller: Caller, res: Reservation, exc: StorageError) -> Reservation:
        if not caller.tier.fail_open:
            raise _unavailable() from exc
        log.warning("quota storage unreachable: admitting fail-open without counters",
                    extra={"request_id": res.request_id, "caller": caller.key, "tier": caller.tier.name,
                           "error": str(exc)})
        return replace(res, accounted=False, snapshot=None, team_snapshot=None, headers={})

    async def _cached_override(self, subject: str, kind: str, res: Reservation | None) -> Override | None:
        hit = self._overrides.get((kind, subject))
        if hit is not None and self._monotonic() - hit[0] < self._ttl:
            return hit[1]
        if res is not None:
            res.round_trips += 1
        value = await get_override(self._store, self._prefix, subject, kind)
        self._overrides[(kind, subject)] = (self._monotonic(), value)
        return value

    async def _get(self, pk: str, res: Reservation) -> Entity | None:
        res.round_trips += 1
        return await self._store.get(self._table, pk, COUNTERS_ROW)

    async def _write_counters(self, read: Entity | None, new: Entity, res: Reservation) -> Entity:
        res.round_trips += 1
        if read is None or read.etag is None:
            return await self._store.insert(self._table, new)
        return await self._store.update(self._table, new, read.etag)

    async def _backoff(self, attempt: int) -> None:
        # Full jitter: instances that collided once must not collide again in lock-step.
        await self._sleep(self._rng.uniform(0, min(0.2, 0.01 * 2**attempt)))


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("quota storage is unavailable; request refused (fail-closed)", retry_after=5)


def _counters_op(read: Entity | None, new: Entity) -> Op:
    return Op("insert", new) if read is None or read.etag is None else Op("update", new, etag=read.etag)


# ---- JSON edge: usage view and admin overrides -------------------------------------------------------

def _money(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def usage_document(caller_key: str, tier: Tier | None, c: Counters, limits: Limits, override: Override | None,
                   now: datetime) -> dict[str, Any]:
    """JSON for GET /api/v1/usage (money as strings, like every USD amount the gateway emits)."""

    def period(used: Mapping[str, Any], limit: Mapping[str, Any], end: datetime) -> dict[str, Any]:
        remaining = {k: None if v is None else max(v - used[k], 0 * v) for k, v in limit.items()}
        return {"used": {k: _money(v) for k, v in used.items()}, "limit": {k: _money(v) for k, v in limit.items()},
                "remaining": {k: _money(v) for k, v in remaining.items()}, "resets_at": end.isoformat()}

    return {
        "caller": caller_key, "tier": tier.name if tier else None,
        "status": override.status if override else "active", "alias": override.alias if override else None,
        "minute": period({"requests": c.minute_requests, "tokens": c.minute_tokens},
                         {"requests": limits.requests_per_minute, "tokens": limits.tokens_per_minute},
                         _next_minute(now)),
        "day": period({"tokens": c.day_tokens, "usd": c.day_usd},
                      {"tokens": limits.tokens_per_day, "usd": limits.usd_per_day}, _next_day(now)),
        "month": period({"tokens": c.month_tokens, "usd": c.month_usd},
                        {"tokens": limits.tokens_per_month, "usd": limits.usd_per_month}, _next_month(now)),
        "in_flight": {"tokens": c.in_flight_tokens, "usd": str(c.in_flight_usd)},
    }


def override_json(subject: str, override: Override | None) -> dict[str, Any]:
    o = override or Override()
    return {"caller": subject, "limits": {k: _money(v) for k, v in o.limits.items()}, "status": o.status,
            "alias": o.alias, "reason": o.reason, "updated_at": o.updated_at, "updated_by": o.updated_by}


def merge_override(current: Override | None, body: Mapping[str, Any], changed_by: str, now: datetime) -> Override:
    """Apply an admin PUT: limits present are set (null removes one), absent fields are kept.

    Keeping absent fields means an admin changing a limit never lifts a budget block by accident.
    """
    if not isinstance(body, Mapping) or set(body) - {"limits", "status", "alias", "reason"}:
        raise InvalidRequest("Body must be an object with 'limits', 'status', 'alias' and/or 'reason'.")
    base = current or Override()
    limits = dict(base.limits)
    for name, value in (body.get("limits") or {}).items():
        if value is None:
            limits.pop(name, None)
        else:
            limits[name] = _limit_value(name, value)
    status = body.get("status", base.status)
    alias = body.get("alias", base.alias if status == "downgraded" else None)
    try:
        return Override(limits, status, alias, body.get("reason", base.reason), now.isoformat(), base.etag,
                        changed_by)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid override: status must be one of {', '.join(STATUSES)} "
                             "('downgraded' needs an 'alias').", param="status") from exc


def _limit_value(name: str, value: Any) -> int | Decimal:
    if name not in LIMIT_NAMES:
        raise InvalidRequest(f"Unknown limit '{name}'; known: {', '.join(LIMIT_NAMES)}.", param=f"limits.{name}")
    try:
        parsed = Decimal(str(value)) if name.startswith("usd") else int(value)
    except (InvalidOperation, ValueError, TypeError):
        parsed = -1
    finite = not isinstance(parsed, Decimal) or parsed.is_finite()
    if isinstance(value, bool) or not finite or not parsed > 0:
        kind = "decimal string" if name.startswith("usd") else "integer"
        raise InvalidRequest(f"Limit '{name}' must be a positive {kind}.", param=f"limits.{name}")
    return parsed

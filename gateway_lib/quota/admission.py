"""Admission control: reserve -> settle, with counters in Table Storage shared by every instance.

A counter in process memory would multiply every limit by the number of Function
instances, so each caller has one counters row (``{prefix}usage``, PK = caller key,
RK ``counters``) and every change to it is a conditional write on its ETag. Layout,
round trips and the overspend bound: docs/storage.md.

* ``reserve`` admits a request (estimated prompt + expected output tokens, its worst case in USD)
  or raises ``RateLimited`` / ``QuotaExceeded`` / ``ServiceUnavailable``.
* ``settle`` / ``release`` swap the reservation for the actual usage and insert the
  request's cost row, in one entity-group transaction (idempotent per request).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import (
    CALLERS_PARTITION,
    CallerDirectory,
    CostRow,
    as_committed,
    callers_table,
    capped,
    table_key,
    usage_table,
)
from gateway_lib.config.tiers import Tier
from gateway_lib.errors import GatewayError, QuotaExceeded, RateLimited, ServiceUnavailable
from gateway_lib.quota.counter_rows import AlreadySettled, CounterRows
from gateway_lib.quota.counters import (
    COUNTERS_ROW,
    ZERO,
    Counters,
    Limits,
    Plan,
    Release,
    check,
    epoch_of,
    minute_key,
    next_month,
    rate_headers,
    seconds_until,
    usage_document,
)
from gateway_lib.quota.expected import ExpectedOutput
from gateway_lib.quota.overrides import (
    Override,
    get_override,
    merge_override,
    override_json,
    override_key,
    overrides_table,
    put_override,
)
from gateway_lib.quota.reservation import Reservation, Settlement
from gateway_lib.shielded import Shielded
from gateway_lib.storage import circuit
from gateway_lib.storage.base import (
    Entity,
    EntityExists,
    PreconditionFailed,
    StorageError,
    TableStore,
)
from gateway_lib.storage.circuit import StorageDown

if TYPE_CHECKING:
    from gateway_lib.config.settings import Settings

log = logging.getLogger(__name__)

OVERRIDE_TTL_SECONDS = 30.0  # staleness window of an override change on other instances
RESERVE_ATTEMPTS = 6
# ... and at least this long: three instances serving one caller's two requests can lose a few races in a
# row, and that is not the caller's own concurrency (which is what the 429 after losing tells it).
RESERVE_PATIENCE_SECONDS = 1.0
SETTLE_ATTEMPTS = 12  # admin override writes


class _Stale:
    """A cached override past its time to live (``None`` is a cached "no override")."""


_STALE = _Stale()



def tables(prefix: str) -> list[str]:
    """Every table quota and ledger use (create them once at deployment or startup)."""
    return [usage_table(prefix), overrides_table(prefix), callers_table(prefix)]


def team_partition(team: str) -> str:
    return capped(table_key(f"team:{team}"), team)


# ---- the engine ----------------------------------------------------------------------------------

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
        self._clock, self._monotonic = clock, monotonic
        self._ttl = override_ttl
        self._overrides: dict[tuple[str, str], tuple[float, Override | None]] = {}
        self._rows = CounterRows(store, self._table, clock=clock, monotonic=monotonic, sleep=sleep,
                                 rng=rng or random.Random())
        # Reservation writes (shielded from their request's cancellation) and give-backs of abandoned ones: kept
        # from the GC, and awaited by aclose before what it commits and gives back.
        self._reserving: set[asyncio.Future[Any]] = set()
        self._detached: set[asyncio.Future[Any]] = set()
        self._directory = CallerDirectory(store, self._prefix)
        self._tables_ready = False
        self.expected_output = ExpectedOutput()  # what tokens-per-minute admission counts for an answer

    async def effective_alias(self, caller: Caller, alias: str) -> str:
        """The alias to route: the override's alias while budget enforcement has the caller downgraded."""
        try:
            with circuit.deadline():
                await self._ensure_tables()  # the first call of a request: tables may not exist yet
                override = await self._cached_override(caller.key, "caller", None)
        except StorageError as exc:
            if caller.tier.fail_open:
                return alias
            raise _unavailable(exc) from exc
        return override.alias if override and override.status == "downgraded" and override.alias else alias

    async def reserve(self, caller: Caller, *, tokens: int, usd: Decimal, request_id: str) -> Reservation:
        """Admit the request's worst case or raise RateLimited / QuotaExceeded / ServiceUnavailable.

        A request cancelled meanwhile (its caller hung up) does not cancel the write: a write cut off in flight
        leaves its outcome unknown (a lease grant has taken the old lease out of reach by then). It ends, and
        the room it reserved is given back. Its row lock waits and storage calls end within the request's
        storage deadline (``circuit.deadline``), and at once while storage is known to be down."""
        admitted = self._reserve_now(caller, tokens, usd, request_id)
        if admitted is not None:
            return admitted  # nothing written, so nothing a cancellation could cut off
        with circuit.deadline():  # the task takes it along
            reserving = Shielded(self._reserve(caller, tokens, usd, request_id))
        self._reserving.add(reserving.task)
        reserving.task.add_done_callback(self._reserving.discard)
        try:
            return await reserving
        except asyncio.CancelledError:
            reserving.task.add_done_callback(self._give_back_abandoned)
            raise

    def _give_back_abandoned(self, task: asyncio.Future[Reservation]) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # refused or failed: nothing was reserved
        self._detach(self._abandon(task.result()))

    def _detach(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` past its request, outside the request's storage deadline (a spent one would refuse its
        every call); drained on shutdown."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(work, context=circuit.background_context())
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        return task

    async def _abandon(self, res: Reservation) -> None:
        if not res.accounted:
            return  # admitted fail-open: nothing on the counters
        if await self._give_back(res) and res.team:
            await self._give_back(res, team_partition(res.team))

    async def _give_back(self, res: Reservation, pk: str | None = None) -> bool:
        """``_undo``, or leave the room to drop out with its reservation epoch when storage is out of reach."""
        try:
            await self._undo(res, pk)
        except StorageError:
            log.warning("reservation left to expire", extra={"request_id": res.request_id})
            return False
        return True

    def _reserve_now(self, caller: Caller, tokens: int, usd: Decimal, request_id: str) -> Reservation | None:
        """A reservation admitted without storage, or None: every strict reservation is a write."""
        return None

    @staticmethod
    def _reservation(caller: Caller, tokens: int, usd: Decimal, request_id: str, now: datetime) -> Reservation:
        return Reservation(caller.key, request_id, caller.tier.name, caller.team, tokens, usd, minute_key(now),
                           epoch_of(now), names=(caller.app_name, caller.user_name))

    async def _reserve(self, caller: Caller, tokens: int, usd: Decimal, request_id: str) -> Reservation:
        now = self._clock()
        res = self._reservation(caller, tokens, usd, request_id, now)
        try:
            res.round_trips += await self._ensure_tables()
            override = await self._cached_override(caller.key, "caller", res)
            if override is not None and override.status == "blocked":
                why = override.reason or "budget spent"
                raise QuotaExceeded(f"{caller.display} is blocked by budget enforcement ({why}).",
                                    retry_after=seconds_until(now, next_month(now)))
            res.headers = await self._admit(table_key(caller.key), Limits.of(caller.tier, override), res,
                                            caller.display)
            if caller.team:
                await self._admit_team(caller.team, res)
        except StorageError as exc:
            return self._storage_down(caller, res, exc)
        return res

    async def settle(self, res: Reservation, row: CostRow) -> Settlement:
        """Swap the reservation for the row's actual usage and insert the row: one transaction, idempotent."""
        return await self._finish(res, row)

    def settle_now(self, res: Reservation, row: CostRow) -> Settlement | None:
        """Settle without waiting, where that is possible (leased mode journals it); else None: ``settle``."""
        return None

    async def release(self, res: Reservation, row: CostRow) -> Settlement:
        """A failed request: drop the reservation, count whatever the row says was consumed, write the row."""
        return await self._finish(res, row)

    async def usage_view(self, subject: Caller | str, now: datetime | None = None) -> dict[str, Any]:
        """Current minute/day/month usage with limits and what remains (GET /api/v1/usage).

        ``subject`` is a caller, or (for admins) a caller key whose tier comes from the callers directory.
        """
        now = now or self._clock()
        await self._ensure_tables()
        key = subject.key if isinstance(subject, Caller) else subject
        tier = subject.tier if isinstance(subject, Caller) else await self._directory_tier(key)
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
            merged = merge_override(current, body, changed_by, self._clock(), self._settings.catalogue.aliases)
            try:
                # Conditional (or insert): budget enforcement may set status at the same moment.
                saved = await (put_override(self._store, self._prefix, subject, merged) if current
                               else self._insert_override(subject, merged))
            except (PreconditionFailed, EntityExists):
                await self._rows.backoff(attempt)
                continue
            self._overrides.pop(("caller", subject), None)  # this instance sees the change at once
            return override_json(subject, saved)
        raise ServiceUnavailable("The override kept changing underneath; retry.", retry_after=1)

    async def flush(self, pk: str | None = None) -> None:
        """Nothing is buffered here: every settle is written before it returns (leases.py buffers)."""

    async def aclose(self) -> None:
        """Graceful shutdown: let reservation writes under way end, commit what is buffered, stop looking for
        the outcome of lost writes."""
        await self._drain()  # first: a reservation of a request the host cancelled may bring a lease to give back
        await self._commit_buffered()
        self._rows.aclose()

    async def _commit_buffered(self) -> None:
        """Nothing is buffered here (see ``flush``); leased admission commits its journal and returns leases."""

    async def _drain(self) -> None:
        for _ in range(2):  # the writes under way, then the give-backs those start (never chasing new traffic)
            pending = [*self._reserving, *self._detached]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    # -- internals --

    async def _ensure_tables(self) -> int:
        """Create our tables once per process (3 round trips per process lifetime, 0 after)."""
        if self._tables_ready:
            return 0
        await self._store.ensure_tables(tables(self._prefix))
        self._tables_ready = True
        return len(tables(self._prefix))

    async def _insert_override(self, subject: str, override: Override) -> Override:
        pk, rk = override_key(subject, "caller")
        written = await self._store.insert(overrides_table(self._prefix), Entity(pk, rk, override.properties()))
        return replace(override, etag=written.etag)

    async def _directory_tier(self, caller_key: str) -> Tier | None:
        row = await self._store.get(callers_table(self._prefix), CALLERS_PARTITION, table_key(caller_key))
        name = row.properties.get("tier") if row else None
        return self._settings.tiers.tiers.get(str(name)) if name else None

    async def _admit(self, pk: str, limits: Limits, res: Reservation, who: str) -> dict[str, str]:
        """Add the reservation to the row; returns the x-ratelimit-* headers."""
        async with self._rows.locked(pk):
            return await self._admit_locked(pk, limits, res, who)

    async def _admit_locked(self, pk: str, limits: Limits, res: Reservation, who: str) -> dict[str, str]:
        def plan(counters: Counters, now: datetime) -> tuple[Counters, Release]:
            check(counters, limits, res.tokens, res.usd, now, who)
            return counters, Release(res.minute, res.epoch, 1, res.tokens, res.usd)

        admitted, _, now = await self._reserve_on_row(pk, res, who, plan)
        return rate_headers(admitted, limits, now)

    async def _reserve_on_row(self, pk: str, res: Reservation, who: str, plan: Plan,
                              gives_back: Release | None = None) -> tuple[Counters, Release, datetime]:
        """Reserve the room ``plan`` picks on the row (row lock held); returns the counters written, the room
        and the time of the check. ``plan`` sees the rolled counters and raises a GatewayError to refuse;
        ``gives_back``: room ``plan`` releases in the same write (a leased grant returns the old lease)."""
        for attempt in self._reserve_attempts():
            now = self._clock()
            entity, counters, room = await self._planned(pk, res, now, plan, use_known=attempt == 0)
            admitted = counters.reserve(room.tokens, room.usd, room.requests, room.epoch)
            try:
                # The ETag condition is what makes check-then-write safe across instances: if another
                # request was admitted or settled since our read, our check used stale numbers -> 412.
                self._rows.remember(pk, await self._rows.reserving_write(pk, entity, admitted.to_entity(pk), res, room,
                                                               gives_back))
                return admitted, room, now
            except PreconditionFailed:
                self._rows.remember(pk, None)  # another instance wrote: what we knew is stale
                if attempt:  # the first miss is usually just our stale copy: re-read at once
                    await self._rows.backoff(attempt)
        # Only this caller's own concurrency keeps winning the race: ask it to slow down (429, not 503).
        raise RateLimited(f"Too many concurrent requests for {who}; retry shortly.", retry_after=1)

    def _reserve_attempts(self) -> Iterator[int]:
        """Attempt numbers for a reserve that keeps losing the ETag race: at least ``RESERVE_ATTEMPTS`` and
        at least ``RESERVE_PATIENCE_SECONDS``."""
        patience_ends = self._monotonic() + RESERVE_PATIENCE_SECONDS
        attempt = 0
        while attempt < RESERVE_ATTEMPTS or (attempt < 10 * RESERVE_ATTEMPTS and self._monotonic() < patience_ends):
            yield attempt
            attempt += 1

    async def _planned(self, pk: str, res: Reservation, now: datetime, plan: Plan,
                       use_known: bool) -> tuple[Entity | None, Counters, Release]:
        """The counters row to write and what ``plan`` makes of it, or a refusal. A remembered copy may be
        stale (a settle on another instance since), which the ETag only catches at write time; so never
        refuse on it: a refusal is re-checked on freshly read numbers."""
        known = self._rows.known(pk) if use_known else None
        if known is not None:
            try:
                return known, *plan(_rolled_for(known, res, now), now)
            except GatewayError:
                self._rows.remember(pk, None)
        entity = await self._rows.get(pk, res)
        return entity, *plan(_rolled_for(entity, res, now), now)

    async def _admit_team(self, team: str, res: Reservation) -> None:
        try:
            override = await self._cached_override(team, "team", res)
            await self._admit(team_partition(team), Limits.of(None, override), res, f"team {team}")
        except (GatewayError, StorageError):  # refused, or the team's row out of reach (a 503 or fail-open)
            # The caller's reservation must not outlive the team's refusal. Waited for only while the request's
            # storage deadline lasts (the refusal may be that deadline running out); past it, in the background.
            giving_back = self._detach(self._give_back(res))
            left = circuit.remaining()
            await asyncio.wait({giving_back}, timeout=None if left is None else max(left, 0.0))
            raise

    async def _undo(self, res: Reservation, pk: str | None = None) -> None:
        """Take the reservation back out of the caller's row (or ``pk``, its team's): a zero-usage settle
        without a cost row."""

        async def write(entity: Entity | None, pk: str) -> Entity:
            undone = Counters.from_entity(entity).rolled(self._clock()).settle(res, 0, ZERO)
            if undone.minute == res.minute:  # a past minute's count is gone already: not the new one's to lower
                undone = replace(undone, minute_requests=max(0, undone.minute_requests - 1))
            return await self._rows.write(entity, undone.to_entity(pk), res)

        await self._rows.until_written(res, pk or table_key(res.caller_key), write, "undo", gives_back_only=True,
                                       owed=Release(res.minute, res.epoch, 1, res.tokens, res.usd))

    async def _finish(self, res: Reservation, row: CostRow) -> Settlement:
        if not res.accounted:
            return await self._record_unaccounted(res, row)

        async def write(entity: Entity | None, pk: str) -> Entity:
            settled = Counters.from_entity(entity).rolled(row.time).settle(res, row.total_tokens, row.cost_usd)
            # A settle that waited out an outage (or a long queue for the row) commits late, as a journal may.
            rows, index = as_committed([row], self._clock())
            return await self._rows.commit(entity, settled.to_entity(pk), rows, res, index)

        try:
            await self._rows.until_written(res, table_key(res.caller_key), write, "settle")
        except AlreadySettled:
            return Settlement(True, res.round_trips)
        try:  # list the caller for the budget rollup (once per process; retried on its next request if this fails)
            res.round_trips += await self._directory.register(res.caller_key, res.team, res.tier, row.time,
                                                              tenant=row.tenant_id, names=res.names)
        except StorageError:
            log.warning("caller not yet listed for the budget rollup", extra={"caller": res.caller_key})
        if res.team:
            await self._settle_team(res, row)
        return Settlement(False, res.round_trips)

    async def _settle_team(self, res: Reservation, row: CostRow) -> None:
        """Team counters follow the caller's; a loss here under-counts the team until the rollup, which sums
        the cost rows (authoritative), so it is logged rather than raised."""

        async def write(entity: Entity | None, pk: str) -> Entity:
            settled = Counters.from_entity(entity).rolled(row.time).settle(res, row.total_tokens, row.cost_usd)
            return await self._rows.write(entity, settled.to_entity(pk), res)

        try:
            await self._rows.until_written(res, team_partition(res.team or ""), write, "team settle")
        except StorageError:
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
            raise _unavailable(exc) from exc
        log.warning("quota storage unreachable: admitting fail-open without counters",
                    extra={"request_id": res.request_id, "caller": caller.key, "tier": caller.tier.name,
                           "error": str(exc)})
        return replace(res, accounted=False, headers={})

    def _fresh_override(self, subject: str, kind: str) -> Override | _Stale | None:
        """The cached override while it is fresh, else ``_STALE`` (it has to be read)."""
        hit = self._overrides.get((kind, subject))
        return hit[1] if hit is not None and self._monotonic() - hit[0] < self._ttl else _STALE

    async def _cached_override(self, subject: str, kind: str, res: Reservation | None) -> Override | None:
        hit = self._fresh_override(subject, kind)
        if not isinstance(hit, _Stale):
            return hit
        if res is not None:
            res.round_trips += 1
        value = await get_override(self._store, self._prefix, subject, kind)
        self._overrides[(kind, subject)] = (self._monotonic(), value)
        return value



def _rolled_for(entity: Entity | None, res: Reservation, now: datetime) -> Counters:
    """The row's counters rolled to ``now``, refusing a reservation whose epoch the row no longer holds.

    Room goes into the generation of the reservation's epoch, and its settlement takes it from there. Two
    turns after that epoch the generation is gone from the row: room added now would land in the current
    one and never be taken back, held by nobody until it expired (a seeded interleaving test across the
    storage thread found it). Only a request that waited more than one epoch (15 min, beyond any HTTP
    timeout) for its reservation, or an instance whose clock lags the row's writer by as much, gets here.
    """
    counters = Counters.from_entity(entity).rolled(now)
    if res.epoch < counters.epoch - 1:
        log.warning("reservation refused: its epoch is gone from the row (clock skew or a long wait)",
                    extra={"request_id": res.request_id, "epoch": res.epoch, "row_epoch": counters.epoch})
        raise ServiceUnavailable("The request waited too long for its quota reservation; retry.", retry_after=1)
    return counters


def _unavailable(cause: Exception | None = None) -> ServiceUnavailable:
    # Its own code: "quota storage down" and "every provider down" call for different responses.
    retry_after = cause.retry_after if isinstance(cause, StorageDown) else 5  # down: until the next probe
    return ServiceUnavailable("quota storage is unavailable; request refused (fail-closed)",
                              code="storage_unavailable", retry_after=retry_after)


def background(pk: str, what: str) -> Reservation:
    """A stand-in reservation for background writes to a row (round trips and messages only)."""
    return Reservation(pk, what, "", None, 0, ZERO, "", 0)

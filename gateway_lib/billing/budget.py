"""Budget rollup: the one place cost rows are aggregated, budgets compared and alerts raised.

``run_rollup`` is driven by a timer (``BUDGET_ROLLUP_SCHEDULE``). Each run, per caller:
read the ledger rows after the caller's checkpoint and before ``now - SETTLE_LAG``, add them
to the caller/team/model aggregates for their day and month, compare with budgets (raise
alerts, enforce), then advance the checkpoint. docs/budgets.md explains the design.

Exactly-once without a lock: every aggregate row carries ``applied_to``, the last ledger
RowKey folded into it, and is written with an ETag condition. Re-reading rows that were
already applied (a crash before the checkpoint moved, or a second run racing this one)
adds nothing, because only rows with a RowKey above ``applied_to`` count. The checkpoint is
only a read optimisation; the watermarks are the truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from gateway_lib.billing import alerts as alerting
from gateway_lib.billing import ledger
from gateway_lib.billing.alerts import Alert, AlertSink, claim_alert, deliver_pending, key_part
from gateway_lib.billing.spend import crossed_thresholds, day_period, forecast_exhaustion, month_period, period_end, period_start
from gateway_lib.billing.spend_index import SPEND_PREFIX, SpendKey, settle_day, spend_pk
from gateway_lib.config.settings import BudgetSettings
from gateway_lib.storage.base import Entity, EntityExists, PreconditionFailed, StorageUnavailable, TableStore

log = logging.getLogger("gateway.budget")

Clock = Callable[[], datetime]

# Cost rows are keyed by ``settled_at``, stamped before the row commits; a row may become
# visible a moment after a later-stamped one. Reading only rows older than this lag means
# the checkpoint never moves past a row that is still in flight (it would be skipped forever).
SETTLE_LAG = timedelta(minutes=2)
assert ledger.LATE_AFTER * 1.5 < SETTLE_LAG, "rows committed on time must land before the settle lag passes them"
CHECKPOINTS, LATE_CHECKPOINTS = "checkpoint", "late-checkpoint"  # rollup partitions: the ledger's, the index's
MIN_SLICE = 10  # floor of rows per caller per round; the slice is max_rows / callers above that
TIMER_BUDGET = timedelta(minutes=4)  # under host.json's functionTimeout (10 min) and the 5-minute schedule
AFTER_AGGREGATION_SHARE = 0.25  # of a run's time kept for lifting restrictions and delivering alerts
CONFLICT_RETRIES = 8


def rollup_table(prefix: str) -> str:
    return f"{prefix}rollup"


def caller_pk(caller_key: str) -> str:
    return f"caller|{key_part(caller_key)}"


def team_pk(team: str) -> str:
    return f"team|{key_part(team)}"


def model_pk(provider: str, model: str) -> str:
    return f"model|{key_part(provider)}|{key_part(model)}"


@dataclass(frozen=True)
class Budget:
    usd_per_day: Decimal | None = None
    usd_per_month: Decimal | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def for_period(self, period: str) -> Decimal | None:
        return self.usd_per_day if period.startswith("day|") else self.usd_per_month

    def tokens_for_period(self, period: str) -> Decimal | None:
        tokens = self.tokens_per_day if period.startswith("day|") else self.tokens_per_month
        return None if tokens is None else Decimal(tokens)


@dataclass(frozen=True)
class CallerInfo:
    key: str
    tier: str | None = None
    team: str | None = None


class BudgetLookup(Protocol):
    async def caller_budget(self, caller: CallerInfo) -> Budget: ...

    async def team_budget(self, team: str) -> Budget: ...


class Enforcer(Protocol):
    async def restrict(self, caller_key: str, since: datetime, until: datetime) -> bool:
        """Mark the caller blocked/downgraded for the period ``since``..``until``; True if this call changed it."""
        ...

    async def lift_expired(self, now: datetime) -> int:
        """Clear budget restrictions whose period has ended; returns how many were lifted."""
        ...


@dataclass(frozen=True)
class CostRow:
    """What the rollup needs from one ledger row."""

    row_key: str  # the ledger RowKey, or the late index's key for a row that came through it
    settled_at: datetime
    cost: Decimal
    tokens: int
    team: str | None
    provider: str | None
    model: str | None
    late: bool = False  # from the late index: ``row_key`` is measured against ``late_applied_to``
    input_tokens: int = 0
    output_tokens: int = 0
    price_version: str = ""
    spend_key: SpendKey | None = None  # the daily spend row it belongs to (spend_index)

    @classmethod
    def of(cls, row: ledger.CostRow, late_key: str | None = None) -> CostRow:
        return cls(late_key or row.row_key, row.time, row.cost_usd, row.total_tokens, row.team, row.provider,
                   row.model, late=late_key is not None, input_tokens=row.prompt_tokens,
                   output_tokens=row.completion_tokens, price_version=row.price_version, spend_key=SpendKey.of(row))

    @classmethod
    def of_late(cls, late: ledger.LateRow) -> CostRow:
        return cls.of(late.row, late.key)


@dataclass
class RollupReport:
    started: datetime
    callers: int = 0
    callers_processed: int = 0
    rows_applied: int = 0
    late_rows_applied: int = 0  # through the late index
    backlog: bool = False  # the run ended (row budget or deadline) before every caller was drained
    stopped_early: bool = False  # the deadline ended the run; the next one resumes
    alerts_raised: list[str] = field(default_factory=list)
    alerts_delivered: int = 0
    alerts_pending: int = 0
    restricted: list[str] = field(default_factory=list)
    lifted: int = 0
    callers_failed: list[str] = field(default_factory=list)  # skipped this run on an error of their own


@dataclass
class Aggregate:
    spend: Decimal = Decimal(0)
    tokens: int = 0
    requests: int = 0
    first_at: datetime | None = None
    applied_to: str = ""  # last ledger RowKey folded in: the idempotency watermark
    late_applied_to: str = ""  # the same for the late index (its keys are in commit order)
    input_tokens: int = 0
    output_tokens: int = 0
    versions: frozenset[str] = frozenset()  # catalogue versions whose prices the rows carry

    def fresh(self, rows: Sequence[CostRow]) -> list[CostRow]:
        """The rows this aggregate has not folded in yet, each judged by its own watermark."""
        return [r for r in rows if r.row_key > (self.late_applied_to if r.late else self.applied_to)]

    def plus(self, rows: Sequence[CostRow]) -> Aggregate:
        return Aggregate(
            spend=self.spend + sum((r.cost for r in rows), Decimal(0)),
            tokens=self.tokens + sum(r.tokens for r in rows), requests=self.requests + len(rows),
            first_at=min(filter(None, (self.first_at, *(r.settled_at for r in rows)))),
            applied_to=max([self.applied_to, *(r.row_key for r in rows if not r.late)]),
            late_applied_to=max([self.late_applied_to, *(r.row_key for r in rows if r.late)]),
            input_tokens=self.input_tokens + sum(r.input_tokens for r in rows),
            output_tokens=self.output_tokens + sum(r.output_tokens for r in rows),
            versions=self.versions | {r.price_version for r in rows if r.price_version},
        )

    def props(self) -> dict[str, Any]:
        props = {"spend": str(self.spend), "tokens": self.tokens, "requests": self.requests,
                 "first_at": self.first_at.isoformat() if self.first_at else None, "applied_to": self.applied_to,
                 "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        props |= {"versions": json.dumps(sorted(self.versions))} if self.versions else {}
        return props | ({"late_applied_to": self.late_applied_to} if self.late_applied_to else {})

    @classmethod
    def of(cls, entity: Entity | None) -> Aggregate:
        if entity is None:
            return cls()
        p = entity.properties
        first = p.get("first_at")
        return cls(Decimal(p.get("spend", "0")), int(p.get("tokens", 0)), int(p.get("requests", 0)),
                   datetime.fromisoformat(first) if first else None, p.get("applied_to", ""),
                   p.get("late_applied_to", ""), int(p.get("input_tokens", 0)), int(p.get("output_tokens", 0)),
                   frozenset(json.loads(p.get("versions") or "[]")))


# --- the run -------------------------------------------------------------------------------------


@dataclass
class _Run:
    store: TableStore
    prefix: str
    settings: BudgetSettings
    budgets: BudgetLookup
    clock: Clock
    sinks: Sequence[AlertSink]
    enforcer: Enforcer | None
    deadline: datetime | None
    cutoff: datetime
    report: RollupReport

    @property
    def table(self) -> str:
        return rollup_table(self.prefix)

    def out_of_time(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def done_aggregating(self) -> bool:
        """Aggregation stops with a quarter of the run's time left, so lifting expired restrictions and
        delivering alerts still get to run when a backlog would take the whole budget."""
        if self.deadline is None:
            return False
        return self.clock() >= self.deadline - (self.deadline - self.report.started) * AFTER_AGGREGATION_SHARE


async def run_rollup(
    store: TableStore, settings: BudgetSettings, budgets: BudgetLookup, clock: Clock, sinks: Sequence[AlertSink],
    *, prefix: str, enforcer: Enforcer | None = None, deadline: datetime | None = None,
    settle_lag: timedelta = SETTLE_LAG,
) -> RollupReport:
    """One rollup pass: bounded by ``settings.rollup_max_rows`` and ``deadline``; safe to run concurrently."""
    now = clock()
    run = _Run(store, prefix, settings, budgets, clock, sinks, enforcer, deadline, now - settle_lag,
               RollupReport(started=now))
    callers = await _list_callers(store, prefix)
    run.report.callers = len(callers)
    await _round_robin(run, await _rotate(run, callers))
    await _lift_expired(run)
    await _deliver(run)
    return run.report


async def _list_callers(store: TableStore, prefix: str) -> list[CallerInfo]:
    """Every caller partition, from the ledger's directory."""
    found: list[CallerInfo] = []
    after: str | None = None
    while page := await ledger.list_callers(store, prefix, after=after):
        found.extend(CallerInfo(e.caller_key, e.tier, e.team) for e in page)
        after = page[-1].partition_key
    return found


async def query_all(store: TableStore, table: str, partition: str, page: int = 1000) -> list[Entity]:
    found: list[Entity] = []
    start: str | None = None
    while True:
        rows = await store.query(table, partition, row_key_from=start, limit=page)
        found.extend(rows)
        if len(rows) < page:
            return found
        start = f"{rows[-1].row_key} "  # keys hold no control characters: " " sorts right after the last key


async def _rotate(run: _Run, callers: Sequence[CallerInfo]) -> list[CallerInfo]:
    """Start after the caller the previous run served last, so a backlog never favours the same callers."""
    ordered = sorted(callers, key=lambda c: c.key)
    cursor = await run.store.get(run.table, "state", "cursor")
    last = cursor.properties.get("caller", "") if cursor else ""
    split = next((i for i, c in enumerate(ordered) if c.key > last), 0)
    return ordered[split:] + ordered[:split]


async def _round_robin(run: _Run, callers: list[CallerInfo]) -> None:
    """Slices of at most ``slice_size`` rows per caller per round until the run's row budget is spent.

    A visit costs at least one unit even when the caller has nothing new, so the work per run
    stays bounded with many idle callers; the cursor makes the next run continue where this stopped.
    """
    remaining = run.settings.rollup_max_rows
    slice_size = max(MIN_SLICE, remaining // max(len(callers), 1))
    checkpoints = await _checkpoints(run, CHECKPOINTS)
    late_checkpoints = await _checkpoints(run, LATE_CHECKPOINTS)
    active, last_served = list(callers), None
    try:
        while active:
            for caller in list(active):
                if remaining <= 0 or run.done_aggregating():
                    run.report.backlog = True
                    run.report.stopped_early = remaining > 0
                    return
                part, limit = key_part(caller.key), min(slice_size, remaining)
                try:
                    used, drained, checkpoints[part] = await _roll_caller(
                        run, caller, checkpoints.get(part, ""), limit)
                    if drained:  # caught up with the ledger (so used < limit): its late index, usually one empty read
                        late_used, drained, late_checkpoints[part] = await _roll_late(
                            run, caller, late_checkpoints.get(part, ""), limit - used)
                        used += late_used
                except StorageUnavailable:
                    raise  # everyone's trouble: the run ends and the next resumes from the checkpoints
                except Exception as exc:  # one caller's bad data must not stop the rollup of every other
                    log.exception("rollup of a caller failed; skipped until the next run",
                                  extra={"caller": caller.key, "error": type(exc).__name__})
                    run.report.callers_failed.append(caller.key)
                    used, drained = 0, True
                remaining -= max(used, 1)
                last_served = caller.key
                if drained:
                    active.remove(caller)
    finally:
        if last_served is not None:
            await run.store.upsert(run.table, Entity("state", "cursor", {"caller": last_served}))


async def _roll_caller(run: _Run, caller: CallerInfo, after: str, limit: int) -> tuple[int, bool, str]:
    """Apply one slice of a caller's rows; returns (rows read, drained, new checkpoint)."""
    fetched = [r async for r in ledger.iter_cost_rows(run.store, run.prefix, caller.key, after or None, limit)]
    window = [r for r in fetched if r.time < run.cutoff]
    drained = len(fetched) < limit or len(window) < len(fetched)
    if not window:  # caught up: what was read is still inside the settle lag (charged as a visit)
        return 0, drained, after
    # A late row is counted through its twin in the late index (_roll_late), never here: whether this
    # read saw it is chance, the index is not. It still moves the checkpoint like any other row.
    rows = [CostRow.of(r) for r in window if not r.late]
    if rows:
        aggregates = await _apply(run, caller.key, rows)
        await _evaluate(run, caller, aggregates, rows, as_of=run.cutoff if drained else rows[-1].settled_at)
    await _advance_checkpoint(run, CHECKPOINTS, caller.key, window[-1].row_key)  # last: the rest is idempotent
    run.report.callers_processed += 1
    run.report.rows_applied += len(rows)
    return len(window), drained, window[-1].row_key


async def _roll_late(run: _Run, caller: CallerInfo, after: str, limit: int) -> tuple[int, bool, str]:
    """Apply one slice of the caller's late index: rows committed after the rollup may have passed their
    settle time (a leased journal that waited out an outage). The index's keys are in commit order and the
    same settle lag applies to them, so this checkpoint never passes an entry that is still in flight."""
    fetched = [r async for r in ledger.iter_late_rows(run.store, run.prefix, caller.key, after or None, limit)]
    window = [r for r in fetched if r.committed_at < run.cutoff]
    drained = len(fetched) < limit or len(window) < len(fetched)
    if not window:
        return len(fetched), drained, after
    rows = [CostRow.of_late(r) for r in window]
    aggregates = await _apply(run, caller.key, rows)
    await _evaluate(run, caller, aggregates, rows, as_of=run.cutoff)
    await _advance_checkpoint(run, LATE_CHECKPOINTS, caller.key, window[-1].key)
    run.report.late_rows_applied += len(window)
    return len(window), drained, window[-1].key


async def _checkpoints(run: _Run, partition: str) -> dict[str, str]:
    return {e.row_key: str(e.properties.get("after", "")) for e in await query_all(run.store, run.table, partition)}


async def _advance_checkpoint(run: _Run, partition: str, caller_key: str, row_key: str) -> None:
    """Move forward only: a slower concurrent run must not drag the checkpoint back."""
    for _ in range(CONFLICT_RETRIES):
        current = await run.store.get(run.table, partition, key_part(caller_key))
        if current and str(current.properties.get("after", "")) >= row_key:
            return
        entity = Entity(partition, key_part(caller_key), {"after": row_key, "at": run.clock().isoformat()})
        try:
            if current is None:
                await run.store.insert(run.table, entity)
            else:
                await run.store.update(run.table, entity, current.etag or "*")
            return
        except (EntityExists, PreconditionFailed):
            continue


# --- aggregation ---------------------------------------------------------------------------------


def _targets(caller_key: str, rows: Sequence[CostRow]) -> dict[tuple[str, str], list[CostRow]]:
    """Every aggregate row the batch touches, with the rows that belong to it."""
    targets: dict[tuple[str, str], list[CostRow]] = {}
    caller = key_part(caller_key)
    for row in rows:
        if row.spend_key is not None:  # the spend reports' daily row
            targets.setdefault((spend_pk(settle_day(row.settled_at)), row.spend_key.row_key), []).append(row)
        for period in (day_period(row.settled_at), month_period(row.settled_at)):
            keys = [(caller_pk(caller_key), period)]
            if row.provider and row.model:  # a request that never reached a provider has no model to bill
                keys.append((model_pk(row.provider, row.model), f"{period}|by|{caller}"))
            if row.team:
                keys.append((team_pk(row.team), f"{period}|by|{caller}"))
            for key in keys:
                targets.setdefault(key, []).append(row)
    return targets


async def _apply(run: _Run, caller_key: str, rows: Sequence[CostRow]) -> dict[tuple[str, str], Aggregate]:
    targets = _targets(caller_key, rows)
    keys = list(targets)
    results = await asyncio.gather(*(_apply_one(run, pk, rk, targets[(pk, rk)]) for pk, rk in keys))
    totals = {(pk, rk.split("|by|", 1)[0]) for pk, rk in keys if "|by|" in rk and not pk.startswith(SPEND_PREFIX)}
    # Totals are recomputed even when every contribution was already applied: a crash after the
    # contributions but before the totals re-reads the same rows (checkpoint not moved) and lands here.
    total_results = await asyncio.gather(*(_recompute_total(run, pk, period) for pk, period in totals))
    return dict(zip(keys, results, strict=True)) | dict(zip(totals, total_results, strict=True))


async def _apply_one(run: _Run, pk: str, rk: str, rows: Sequence[CostRow]) -> Aggregate:
    """Fold the rows above the row's watermark in, with an ETag condition; a loser re-reads and retries."""
    for _ in range(CONFLICT_RETRIES):
        entity = await run.store.get(run.table, pk, rk)
        current = Aggregate.of(entity)
        fresh = current.fresh(rows)
        if not fresh:
            return current
        updated = current.plus(fresh)
        labels = fresh[0].spend_key.props() if pk.startswith(SPEND_PREFIX) and fresh[0].spend_key else {}
        try:
            await _write(run, Entity(pk, rk, updated.props() | labels), entity)
            return updated
        except (EntityExists, PreconditionFailed):
            continue
    raise PreconditionFailed(f"rollup row {pk}/{rk} kept changing")


async def _recompute_total(run: _Run, pk: str, period: str) -> Aggregate:
    """A team/model total is the sum of per-caller contributions, rewritten under an ETag.

    Whoever writes last read the contributions after every earlier successful write, so the
    total converges to the true sum even when several runs recompute it at once.
    """
    for _ in range(CONFLICT_RETRIES):
        entity = await run.store.get(run.table, pk, period)
        parts = await run.store.query(run.table, pk, row_key_from=f"{period}|by|", row_key_to=f"{period}|by}}")
        total = Aggregate()
        for part in map(Aggregate.of, parts):
            total = Aggregate(total.spend + part.spend, total.tokens + part.tokens, total.requests + part.requests,
                              min(filter(None, (total.first_at, part.first_at)), default=None),
                              input_tokens=total.input_tokens + part.input_tokens,
                              output_tokens=total.output_tokens + part.output_tokens,
                              versions=total.versions | part.versions)
        try:
            await _write(run, Entity(pk, period, total.props() | {"contributors": len(parts)}), entity)
            return total
        except (EntityExists, PreconditionFailed):
            continue
    raise PreconditionFailed(f"rollup total {pk}/{period} kept changing")


async def _write(run: _Run, entity: Entity, read: Entity | None) -> None:
    if read is None:
        await run.store.insert(run.table, entity)
    else:
        await run.store.update(run.table, entity, read.etag or "*")


# --- budgets, alerts, enforcement ----------------------------------------------------------------


Aggregates = dict[tuple[str, str], Aggregate]


async def _evaluate(run: _Run, caller: CallerInfo, aggregates: Aggregates, rows: Sequence[CostRow],
                    as_of: datetime) -> None:
    budget = await run.budgets.caller_budget(caller)
    teams = {team_pk(r.team): r.team for r in rows if r.team}  # a long name's key part is hashed: not reversible
    for (pk, period), agg in aggregates.items():
        if pk == caller_pk(caller.key):
            await _check(run, "caller", caller.key, period, agg.spend, budget.for_period(period))
            await _check(run, "caller", caller.key, period, Decimal(agg.tokens), budget.tokens_for_period(period),
                         "token_threshold")
            # Enforce only in the current period (by the clock, not the rows' time): a backlog row from
            # yesterday, or the 00:01 run's rows of 23:59, must not block today.
            if run.clock() < period_end(period) and crossed_thresholds(agg.spend, budget.for_period(period), [100]):
                await _restrict(run, caller.key, period_start(period), period_end(period))
        elif pk.startswith("team|") and "|by|" not in period:
            team, team_budget = teams[pk], await run.budgets.team_budget(teams[pk])
            await _check(run, "team", team, period, agg.spend, team_budget.for_period(period))
            await _check(run, "team", team, period, Decimal(agg.tokens), team_budget.tokens_for_period(period),
                         "token_threshold")
    try:
        await _forecast(run, caller.key, budget, aggregates, as_of)
    except ArithmeticError:  # a forecast is advice: it must never stop the rollup of this or any other caller
        log.exception("burn-rate forecast failed", extra={"caller": caller.key})


async def _check(run: _Run, scope: alerting.AlertScope, subject: str, period: str, spend: Decimal,
                 budget: Decimal | None, kind: alerting.AlertKind = "threshold") -> None:
    # Claims are attempted on the absolute spend, not on "crossed in this batch": a crash after
    # the aggregate moved but before the claim must still raise the alert on resume.
    for threshold in crossed_thresholds(spend, budget, run.settings.alert_thresholds):
        assert budget is not None
        await _raise(run, Alert(kind, scope, subject, period, threshold, spend, budget, run.clock()))


async def _forecast(run: _Run, caller_key: str, budget: Budget, aggregates: Aggregates, as_of: datetime) -> None:
    month = aggregates.get((caller_pk(caller_key), month_period(as_of)))
    if month is None or budget.usd_per_month is None:
        return
    today = aggregates.get((caller_pk(caller_key), day_period(as_of))) or await _read_agg(
        run, caller_pk(caller_key), day_period(as_of))
    yesterday = await _read_agg(run, caller_pk(caller_key), day_period(as_of - timedelta(days=1)))
    start = yesterday.first_at if yesterday.requests else today.first_at
    at = forecast_exhaustion(month.spend, budget.usd_per_month, today.spend + yesterday.spend, start, as_of)
    if at is not None:
        await _raise(run, Alert("forecast", "caller", caller_key, month_period(as_of), None, month.spend,
                                budget.usd_per_month, run.clock(), forecast_at=at))


async def _read_agg(run: _Run, pk: str, rk: str) -> Aggregate:
    return Aggregate.of(await run.store.get(run.table, pk, rk))


async def _raise(run: _Run, alert: Alert) -> None:
    alert = replace(alert, delivery={sink.name: None for sink in run.sinks})
    if await claim_alert(run.store, run.prefix, alert):
        run.report.alerts_raised.append(alert.row_key)
        log.warning("budget alert raised", extra={"custom_dimensions": alert.as_json()})


async def _restrict(run: _Run, caller_key: str, since: datetime, until: datetime) -> None:
    if run.enforcer is None or run.settings.enforcement == "none":
        return
    if await run.enforcer.restrict(caller_key, since, until):
        run.report.restricted.append(caller_key)


async def _lift_expired(run: _Run) -> None:
    if run.enforcer is not None and not run.out_of_time():
        run.report.lifted = await run.enforcer.lift_expired(run.clock())


async def _deliver(run: _Run) -> None:
    if not run.sinks:
        return
    report = await deliver_pending(run.store, run.prefix, run.sinks, run.clock(), deadline=run.deadline,
                                   clock=run.clock)
    run.report.alerts_delivered, run.report.alerts_pending = report.delivered, report.pending

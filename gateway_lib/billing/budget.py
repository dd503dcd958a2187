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
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal

from gateway_lib.billing import alerts as alerting
from gateway_lib.billing import ledger
from gateway_lib.billing.alerts import Alert, AlertSink, claim_alert, deliver_pending, key_part
from gateway_lib.billing.rollup_rows import (  # also read as budget.<name> (the rollup tests)
    Aggregate,
    Budget,
    BudgetLookup,
    CallerInfo,
    Clock,
    CostRow,
    Enforcer,
    RollupReport,
    caller_pk,
    model_pk,
    rollup_table,
    team_pk,
)
from gateway_lib.billing.spend import crossed_thresholds, day_period, forecast_exhaustion, month_period, period_end, period_start
from gateway_lib.billing.spend_index import SPEND_PREFIX, settle_day, spend_pk
from gateway_lib.config.settings import BudgetSettings
from gateway_lib.storage.base import Entity, EntityExists, PreconditionFailed, StorageUnavailable, TableStore

log = logging.getLogger("gateway.budget")

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

"""Budget rollup on the memory store: exactly-once aggregation, alerts, forecast, enforcement, fairness.

The scenarios (``scenario_*``) take any ``TableStore``; tests/integration/test_budget_azurite.py
runs the same ones against Azurite.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.billing import alerts, budget, ledger
from gateway_lib.billing.alerts import Alert
from gateway_lib.billing.budget import run_rollup
from gateway_lib.billing.enforcement import OverrideBudgets, OverrideEnforcer
from gateway_lib.billing.rollup_rows import Budget, RollupReport
from gateway_lib.config.settings import BudgetSettings
from gateway_lib.config.tiers import TierPolicy, default_tiers_json, parse_tiers
from gateway_lib.quota import admission as quota
from gateway_lib.quota import overrides
from gateway_lib.storage.base import Entity, Op, StorageUnavailable, TableStore
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit import test_quota

T0 = datetime(2026, 3, 10, tzinfo=UTC)
TENANT = "00000000-0000-4000-8000-000000000de0"


# --- fakes and helpers ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: datetime, step: timedelta = timedelta(0)) -> None:
        self.now, self.step = now, step

    def __call__(self) -> datetime:
        now = self.now
        self.now += self.step
        return now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class FakeSink:
    def __init__(self, name: str = "webhook") -> None:
        self.name, self.failing = name, False
        self.sent: list[Alert] = []

    async def send(self, alert: Alert) -> None:
        await asyncio.sleep(0)
        if self.failing:
            raise ConnectionError("sink down")
        self.sent.append(alert)


def caller_key(app: str) -> str:
    return f"{TENANT}:{app}:-"


def policy() -> TierPolicy:
    parsed = parse_tiers(default_tiers_json(), [])
    assert parsed is not None
    return parsed


def settings(**changes: Any) -> BudgetSettings:
    base = BudgetSettings(rollup_schedule="0 */5 * * * *", alert_thresholds=(50, 80, 100), enforcement="none",
                          downgrade_alias=None, rollup_max_rows=5000, alert_webhook_url=None)
    return dataclasses.replace(base, **changes)


async def prepare(store: TableStore, prefix: str) -> None:
    await store.ensure_tables([*quota.tables(prefix), budget.rollup_table(prefix), alerts.alerts_table(prefix)])


async def write_cost(store: TableStore, prefix: str, app: str, at: datetime, usd: str, *, team: str | None = None,
                     provider: str = "azure_openai", model: str = "gpt-4o-mini", tier: str = "untiered",
                     committed_late_at: datetime | None = None) -> ledger.CostRow:
    """A cost row in the agreed layout, plus the caller directory entry, as settling a request leaves them.

    ``committed_late_at``: as a leased journal commits a row after an outage, marked late and with its
    twin in the late index, in one transaction.
    """
    values: dict[str, Any] = dict(
        request_id=str(uuid.uuid4()), time=at, caller_key=caller_key(app), app_id=app, tenant_id=TENANT,
        user_id=None, team=team, label=None, route="chat.completions", task=None, alias=model, provider=provider,
        model=model, deployment=None, region="eastus", prompt_tokens_estimated=10, completion_tokens_estimated=10,
        prompt_tokens=7, completion_tokens=3, cost_usd=Decimal(usd), price_version="t", catalogue_version="t",
        latency_ms=5, status="ok", http_status=200,
    )
    names = {f.name for f in dataclasses.fields(ledger.CostRow)}  # the ledger's columns, as it defines them
    row = ledger.CostRow(**{k: v for k, v in values.items() if k in names})
    if committed_late_at is None:
        await store.insert(ledger.usage_table(prefix), row.to_entity())
    else:
        row = dataclasses.replace(row, late=True)
        await store.transact(ledger.usage_table(prefix), [Op("insert", row.to_entity()),
                                                          Op("insert", ledger.late_twin(row, committed_late_at))])
    # "untiered" is no tier of the policy: budgets come from overrides only, unless a test says otherwise.
    await ledger.CallerDirectory(store, prefix).register(row.caller_key, team, tier, at)
    return row


async def set_budget(store: TableStore, prefix: str, subject: str, *, day: str | None = None,
                     month: str | None = None, kind: str = "caller") -> None:
    limits = {k: Decimal(v) for k, v in (("usd_per_day", day), ("usd_per_month", month)) if v is not None}
    await overrides.put_override(store, prefix, subject, overrides.Override(limits), kind)


async def rollup(store: TableStore, prefix: str, clock: FakeClock, sinks: Sequence[Any] = (), *,
                 cfg: BudgetSettings | None = None, deadline: datetime | None = None) -> RollupReport:
    cfg = cfg or settings()
    enforcer = OverrideEnforcer(store, prefix, cfg.enforcement, cfg.downgrade_alias, clock)
    return await run_rollup(store, cfg, OverrideBudgets(store, prefix, policy()), clock, sinks, prefix=prefix,
                            enforcer=enforcer, deadline=deadline)


async def aggregate(store: TableStore, prefix: str, pk: str, rk: str) -> budget.Aggregate:
    return budget.Aggregate.of(await store.get(budget.rollup_table(prefix), pk, rk))


async def caller_month_spend(store: TableStore, prefix: str, app: str, month: str = "month|202603") -> Decimal:
    return (await aggregate(store, prefix, budget.caller_pk(caller_key(app)), month)).spend


async def stored_alerts(store: TableStore, prefix: str, kind: str | None = None) -> list[Alert]:
    found = await alerts.list_alerts(store, prefix, T0 - timedelta(days=40), 1000, now=T0 + timedelta(days=40))
    return [a for a in found if kind is None or a.kind == kind]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- scenarios (shared with the Azurite tests) ---------------------------------------------------


async def scenario_thresholds_once(store: TableStore, prefix: str) -> None:
    await prepare(store, prefix)
    await set_budget(store, prefix, caller_key("a"), month="100", day="1000")
    sink, clock = FakeSink(), FakeClock(T0 + timedelta(hours=12))
    for usd in ("55", "0", "30", "0", "20", "0"):
        if usd != "0":
            await write_cost(store, prefix, "a", clock.now - timedelta(minutes=10), usd)
        await rollup(store, prefix, clock, [sink])
        clock.advance(minutes=5)
    thresholds = sorted(a.threshold or 0 for a in sink.sent if a.kind == "threshold")
    assert thresholds == [50, 80, 100]
    assert await caller_month_spend(store, prefix, "a") == Decimal("105")


async def scenario_token_thresholds_once(store: TableStore, prefix: str) -> None:
    """A daily token budget (a caller's, a team's) alerts at 50/80/100 % once per period, apart from USD."""
    await prepare(store, prefix)
    await overrides.put_override(store, prefix, caller_key("a"), overrides.Override({"tokens_per_day": 40}))
    await overrides.put_override(store, prefix, "ml", overrides.Override({"tokens_per_month": 50}), "team")
    sink, clock = FakeSink(), FakeClock(T0 + timedelta(hours=12))
    for _ in range(5):  # 10 tokens a row: 25, 50, 75, 100, 125 % of the caller's day; 20 .. 100 % of the team's month
        await write_cost(store, prefix, "a", clock.now - timedelta(minutes=10), "0.01", team="ml")
        await rollup(store, prefix, clock, [sink])
        await rollup(store, prefix, clock, [sink])  # a second run raises nothing again
        clock.advance(minutes=5)
    raised = sorted((a.scope, a.period, a.threshold) for a in sink.sent if a.kind == "token_threshold")
    assert raised == [("caller", "day|20260310", 50), ("caller", "day|20260310", 80), ("caller", "day|20260310", 100),
                      ("team", "month|202603", 50), ("team", "month|202603", 80), ("team", "month|202603", 100)]
    assert [a for a in sink.sent if a.kind != "token_threshold"] == [], "no USD budget was set: no USD alert"
    caller_alert = next(a for a in sink.sent if a.scope == "caller" and a.threshold == 100)
    assert (caller_alert.spend, caller_alert.budget) == (Decimal(40), Decimal(40))
    assert caller_alert.as_json()["unit"] == "tokens" and "40 of 40 tokens" in caller_alert.text()


async def scenario_concurrent_runs(store: TableStore, prefix: str) -> None:
    await prepare(store, prefix)
    for app in ("a", "b", "c"):
        await set_budget(store, prefix, caller_key(app), month="10")
        for minute in range(12):
            await write_cost(store, prefix, app, T0 + timedelta(minutes=minute), "1.25", team="search")
    await set_budget(store, prefix, "search", month="40", kind="team")
    sinks = [FakeSink(), FakeSink()]
    clock = FakeClock(T0 + timedelta(hours=1))
    await asyncio.gather(*(rollup(store, prefix, clock, [sink]) for sink in sinks))
    await asyncio.gather(*(rollup(store, prefix, clock, [sink]) for sink in sinks))
    for app in ("a", "b", "c"):
        assert await caller_month_spend(store, prefix, app) == Decimal("15.00")
    team = await aggregate(store, prefix, budget.team_pk("search"), "month|202603")
    assert (team.spend, team.requests) == (Decimal("45.00"), 36)
    raised = await stored_alerts(store, prefix)
    delivered = [a.row_key for sink in sinks for a in sink.sent]
    assert len(delivered) == len(set(delivered)) == len(raised)  # each alert raised and posted once
    assert {a.subject for a in raised if a.scope == "team"} == {"search"}


async def scenario_failing_sink_retried(store: TableStore, prefix: str, sink: Any, fail: Callable[[bool], None],
                                        sent: Callable[[], int]) -> None:
    await prepare(store, prefix)
    await set_budget(store, prefix, caller_key("a"), month="100000", day="10")
    await write_cost(store, prefix, "a", T0 + timedelta(hours=20), "6")
    clock = FakeClock(T0 + timedelta(hours=21))
    fail(True)
    first = await rollup(store, prefix, clock, [sink])
    assert (len(first.alerts_raised), first.alerts_delivered, first.alerts_pending) == (1, 0, 1)
    [pending] = await stored_alerts(store, prefix)
    assert pending.pending_sinks == [sink.name] and pending.attempts == 1 and pending.last_error
    fail(False)
    clock.advance(minutes=5)
    second = await rollup(store, prefix, clock, [sink])
    assert (second.alerts_raised, second.alerts_delivered, second.alerts_pending) == ([], 1, 0)
    [done] = await stored_alerts(store, prefix)
    assert done.delivery[sink.name] and done.attempts == 2 and sent() == 1
    clock.advance(minutes=5)
    assert (await rollup(store, prefix, clock, [sink])).alerts_delivered == 0 and sent() == 1


async def scenario_backlog_across_runs(store: TableStore, prefix: str) -> None:
    await prepare(store, prefix)
    for i in range(100):  # "aa-hot" sorts first: it is served before the others in the first round
        await write_cost(store, prefix, "aa-hot", T0 + timedelta(seconds=i), "0.01")
    for app in ("cold1", "cold2", "cold3"):
        await write_cost(store, prefix, app, T0, "0.50")
        await write_cost(store, prefix, app, T0 + timedelta(seconds=1), "0.50")
    clock, cfg = FakeClock(T0 + timedelta(hours=1)), settings(rollup_max_rows=20)
    first = await rollup(store, prefix, clock, cfg=cfg)
    assert first.backlog and first.rows_applied <= 20
    for app in ("cold1", "cold2", "cold3"):  # one hot caller cannot starve the others
        assert await caller_month_spend(store, prefix, app) == Decimal("1.00")
    for _ in range(10):
        report = await rollup(store, prefix, clock, cfg=cfg)
        assert report.rows_applied <= 20
        if not report.backlog:
            break
    assert not report.backlog
    assert await caller_month_spend(store, prefix, "aa-hot") == Decimal("1.00")


async def scenario_late_rows(store: TableStore, prefix: str) -> None:
    """Rows a leased journal committed after an outage, behind and ahead of the checkpoint, count once."""
    await prepare(store, prefix)
    await set_budget(store, prefix, caller_key("a"), day="10")
    for i in range(4):
        await write_cost(store, prefix, "a", T0 + timedelta(minutes=i), "1", team="ml")
    clock = FakeClock(T0 + timedelta(hours=1))
    assert (await rollup(store, prefix, clock)).rows_applied == 4  # the checkpoint is now past T0+3min
    committed = clock.now
    for at, usd in ((T0 + timedelta(seconds=90), "2"), (T0 + timedelta(seconds=150), "3"),
                    (T0 + timedelta(minutes=57), "4")):  # the last one is ahead of the checkpoint
        await write_cost(store, prefix, "a", at, usd, team="ml", committed_late_at=committed)
    clock.advance(minutes=1)
    early = await rollup(store, prefix, clock)
    # Its index entries are still inside the settle lag; the ledger pass skips the late row it can see.
    assert (early.rows_applied, early.late_rows_applied) == (0, 0)
    assert await caller_month_spend(store, prefix, "a") == Decimal("4")
    clock.advance(minutes=5)
    assert (await rollup(store, prefix, clock)).late_rows_applied == 3
    for pk, rk in ((budget.caller_pk(caller_key("a")), "day|20260310"), (budget.caller_pk(caller_key("a")),
                   "month|202603"), (budget.team_pk("ml"), "month|202603"),
                   (budget.model_pk("azure_openai", "gpt-4o-mini"), "month|202603")):
        agg = await aggregate(store, prefix, pk, rk)
        assert (agg.spend, agg.requests) == (Decimal("13"), 7), (pk, rk)
    assert sorted(a.threshold or 0 for a in await stored_alerts(store, prefix)) == [50, 80, 100]
    clock.advance(minutes=5)
    again = await rollup(store, prefix, clock)
    assert (again.rows_applied, again.late_rows_applied) == (0, 0)
    assert await caller_month_spend(store, prefix, "a") == Decimal("13")
    # The two watermarks are apart: rows on time after the late ones still count.
    await write_cost(store, prefix, "a", clock.now, "0.5", team="ml")
    clock.advance(minutes=5)
    assert (await rollup(store, prefix, clock)).rows_applied == 1
    assert await caller_month_spend(store, prefix, "a") == Decimal("13.5")


async def scenario_late_rows_crash_then_resume(store: TableStore, prefix: str, crash_at: int) -> bool:
    """Crash a run that folds late rows in at its ``crash_at``-th write; True when it got that far."""
    await prepare(store, prefix)
    for i in range(3):
        await write_cost(store, prefix, "a", T0 + timedelta(minutes=i), "1", team="ml")
        await write_cost(store, prefix, "b", T0 + timedelta(minutes=i), "1", team="ml")
    clock = FakeClock(T0 + timedelta(hours=1))
    await rollup(store, prefix, clock)
    for app in ("a", "b"):
        await write_cost(store, prefix, app, T0 + timedelta(seconds=30), "5", team="ml", committed_late_at=clock.now)
        await write_cost(store, prefix, app, T0 + timedelta(minutes=59), "7", team="ml", committed_late_at=clock.now)
    await write_cost(store, prefix, "a", clock.now, "11", team="ml")  # on time, folded by the same run
    clock.advance(minutes=5)
    crashing = CrashingStore(store, crash_at)
    with contextlib.suppress(RuntimeError):
        await rollup(crashing, prefix, clock)  # type: ignore[arg-type]
    clock.advance(minutes=5)
    await rollup(store, prefix, clock)
    assert await caller_month_spend(store, prefix, "a") == Decimal("26")
    assert await caller_month_spend(store, prefix, "b") == Decimal("15")
    team = await aggregate(store, prefix, budget.team_pk("ml"), "month|202603")
    assert (team.spend, team.requests) == (Decimal("41"), 11)
    return crashing.writes >= crash_at


class Severed:
    """One instance's view of a shared store, with an outage of its own."""

    def __init__(self, inner: TableStore) -> None:
        self.inner, self.down = inner, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("get", "query", "insert", "update", "upsert", "delete", "transact", "ensure_tables"):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StorageUnavailable("this instance cannot reach storage")
            return await attr(*args, **kwargs)

        return call


async def scenario_leased_outage_then_rollup(store: TableStore, prefix: str) -> None:
    """The gap the late index closes, with the real journal: instance A waits out an outage while
    instance B serves the same caller, the rollup moves past A's rows, then A commits them."""
    from tests.unit.test_leases import leased, serve  # the leased journal's own test helpers
    from tests.unit.test_quota import make_caller

    await prepare(store, prefix)
    clock, severed = FakeClock(T0 + timedelta(hours=9)), Severed(store)
    a = leased(severed, clock, prefix, monotonic=iter(range(10**9)).__next__)  # type: ignore[arg-type]
    b = leased(store, clock, prefix)  # type: ignore[arg-type]
    caller = make_caller()
    for i in range(3):
        assert await serve(a, caller, clock, i, cost="0.25")  # type: ignore[arg-type]
    severed.down = True
    await a.flush()  # kept in A's journal
    clock.advance(minutes=1)
    for i in range(3, 5):
        assert await serve(b, caller, clock, i, cost="0.5")  # type: ignore[arg-type]
    await b.flush()
    clock.advance(minutes=3)
    first = await rollup(store, prefix, clock)
    assert first.rows_applied == 2  # B's rows; the checkpoint is past A's settle times now
    severed.down = False
    await a.flush()  # four minutes after they settled: late
    clock.advance(minutes=3)
    second = await rollup(store, prefix, clock)
    assert (second.rows_applied, second.late_rows_applied) == (0, 3)
    await a.aclose()
    await b.aclose()
    spend = await aggregate(store, prefix, budget.caller_pk(caller.key), "day|20260310")
    assert (spend.spend, spend.requests) == (Decimal("1.75"), 5), "every row counted once"
    counters = await test_quota.counters_of(store, caller.key, prefix)
    assert counters.day_usd == spend.spend, "counters, ledger and rollup agree"


# --- tests ---------------------------------------------------------------------------------------


def test_rows_committed_late_count_once_through_the_late_index() -> None:
    run(scenario_late_rows(MemoryTableStore(), "gw"))


def test_a_crash_at_any_write_while_folding_late_rows_resumes_without_double_counting() -> None:
    crash_at = 1
    while run(scenario_late_rows_crash_then_resume(MemoryTableStore(), "gw", crash_at)):
        crash_at += 1
    assert crash_at > 20, f"the run made only {crash_at - 1} writes: the scenario lost its late rows"


def test_a_caught_up_caller_whose_newest_rows_are_inside_the_lag_still_has_its_late_index_read() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        clock = FakeClock(T0 + timedelta(hours=1))
        await write_cost(store, "gw", "a", T0, "1")
        await rollup(store, "gw", clock)  # the checkpoint is at T0
        await write_cost(store, "gw", "a", T0 - timedelta(seconds=30), "5",  # behind it
                         committed_late_at=clock.now - timedelta(minutes=4))
        for second in range(10):  # a full slice of rows, every one still inside the settle lag
            await write_cost(store, "gw", "a", clock.now - timedelta(seconds=50 - second), "0.01")
        report = await rollup(store, "gw", clock, cfg=settings(rollup_max_rows=10))
        assert (report.rows_applied, report.late_rows_applied, report.backlog) == (0, 1, False)
        assert await caller_month_spend(store, "gw", "a") == Decimal("6")

    run(go())


@pytest.mark.parametrize("mode", ["leased", "strict"])
def test_a_row_judged_on_time_that_then_waits_for_its_row_lock_is_still_counted(mode: str) -> None:
    # Whether a row is late is decided when its transaction is sent, under the row lock, not when the
    # batch is cut or the row stamped: here the lock is held for 20 s by then, while another instance's
    # row is rolled up. A strict settle queued behind a slow writer of its row is in the same spot.
    async def go() -> None:
        from tests.unit.test_leases import leased, serve

        store = MemoryTableStore()
        await prepare(store, "t")
        clock = FakeClock(T0 + timedelta(hours=9))
        a, b = leased(store, clock), leased(store, clock)  # type: ignore[arg-type]
        caller = test_quota.make_caller()
        if mode == "strict":
            _, a = await test_quota.new_admission(store, clock)  # type: ignore[arg-type,assignment]
            res = await a.reserve(caller, tokens=10, usd=Decimal("0.3"), request_id="r0")
        else:
            assert await serve(a, caller, clock, 0, cost="0.25")  # type: ignore[arg-type]
        clock.advance(seconds=59)
        pk = ledger.table_key(caller.key)
        lock = a._rows.lock(pk)
        await lock.acquire()
        if mode == "strict":  # stamped now: 59 s after its request began, still on time
            row = test_quota.make_row(caller, "r0", clock.now, 3, 4, Decimal("0.25"))
            writing = asyncio.create_task(a.settle(res, row))
        else:  # the batch is cut now: r0 is 59 s old
            writing = asyncio.create_task(a.flush())
        await asyncio.sleep(0.01)  # the write reaches the lock
        clock.advance(seconds=20)
        assert await serve(b, caller, clock, 1, cost="0.5")  # type: ignore[arg-type]
        await b.flush()
        clock.advance(minutes=3)
        await rollup(store, "t", clock)  # the checkpoint passes r1, and r0's key with it
        lock.release()
        await writing
        clock.advance(minutes=5)
        await rollup(store, "t", clock)
        await a.aclose()
        await b.aclose()
        spend = await aggregate(store, "t", budget.caller_pk(caller.key), "day|20260310")
        assert (spend.spend, spend.requests) == (Decimal("0.75"), 2)

    run(go())


def test_a_leased_instance_back_from_an_outage_has_its_rows_rolled_up() -> None:
    run(scenario_leased_outage_then_rollup(MemoryTableStore(), "t"))


def test_each_threshold_alerts_once_per_period_across_runs() -> None:
    run(scenario_thresholds_once(MemoryTableStore(), "gw"))


def test_token_budgets_alert_at_each_threshold_once_per_period() -> None:
    run(scenario_token_thresholds_once(MemoryTableStore(), "gw"))


def test_a_jump_past_several_thresholds_raises_each_once() -> None:
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), day="10")
        await write_cost(store, "gw", "a", T0, "12")
        for _ in range(3):
            await rollup(store, "gw", FakeClock(T0 + timedelta(hours=1)), [sink])
        assert sorted((a.period, a.threshold) for a in sink.sent) == [("day|20260310", t) for t in (50, 80, 100)]

    run(go())


def test_steep_burn_raises_one_forecast_alert_with_exhaustion_time() -> None:
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), month="1000")
        for minute in range(0, 180, 10):  # 18 x 10 = 180 USD in 3 hours: 60 USD/h
            await write_cost(store, "gw", "a", T0 + timedelta(minutes=minute), "10")
        clock = FakeClock(T0 + timedelta(hours=3, minutes=2))
        await rollup(store, "gw", clock, [sink])
        await write_cost(store, "gw", "a", clock.now, "10")
        clock.advance(minutes=5)
        await rollup(store, "gw", clock, [sink])
        [forecast] = [a for a in sink.sent if a.kind == "forecast"]
        assert forecast.period == "month|202603" and forecast.threshold is None
        assert forecast.forecast_at is not None and T0 + timedelta(hours=15) < forecast.forecast_at < T0 + timedelta(
            hours=18)
        assert not [a for a in sink.sent if a.kind == "threshold"]  # 19 % of budget: no threshold yet

    run(go())


def test_slow_burn_raises_no_forecast() -> None:
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), month="1000")
        for hours in range(0, 36, 6):
            await write_cost(store, "gw", "a", T0 - timedelta(days=1) + timedelta(hours=hours), "1")
        await rollup(store, "gw", FakeClock(T0 + timedelta(hours=14)), [sink])
        assert sink.sent == []

    run(go())


def test_forecast_formula() -> None:
    now = T0 + timedelta(hours=10)
    at = budget.forecast_exhaustion(Decimal(100), Decimal(200), Decimal(100), T0, now)
    assert at == now + timedelta(hours=10)  # 10 USD/h, 100 USD left
    assert budget.forecast_exhaustion(Decimal(1), Decimal(200), Decimal(1), T0, now) is None  # after month end
    assert budget.forecast_exhaustion(Decimal(200), Decimal(200), Decimal(9), T0, now) is None  # already spent
    # A single request a minute ago is averaged over at least an hour, not extrapolated from one minute.
    early = budget.forecast_exhaustion(Decimal(1), Decimal(200), Decimal(1), now - timedelta(minutes=1), now)
    assert early == now + timedelta(hours=199)


def test_thresholds_use_exact_decimals() -> None:
    assert budget.crossed_thresholds(Decimal("79.99"), Decimal("100"), (50, 80, 100)) == [50]
    assert budget.crossed_thresholds(Decimal("0.30"), Decimal("0.30"), (50, 80, 100)) == [50, 80, 100]
    assert budget.crossed_thresholds(Decimal("5"), None, (50,)) == []


def test_period_end_rolls_over_months_and_years() -> None:
    assert budget.period_end("month|202612") == datetime(2027, 1, 1, tzinfo=UTC)
    assert budget.period_end("day|20260228") == datetime(2026, 3, 1, tzinfo=UTC)


def test_failing_sink_is_retried_on_the_next_run_and_then_marked_sent() -> None:
    sink = FakeSink()

    def fail(on: bool) -> None:
        sink.failing = on

    run(scenario_failing_sink_retried(MemoryTableStore(), "gw", sink, fail, lambda: len(sink.sent)))


def test_a_sink_that_succeeded_is_not_called_again_when_another_fails() -> None:
    async def go() -> None:
        store, ok, bad = MemoryTableStore(), FakeSink("telemetry"), FakeSink("webhook")
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), day="1")
        await write_cost(store, "gw", "a", T0, "0.6")
        bad.failing = True
        clock = FakeClock(T0 + timedelta(hours=1))
        await rollup(store, "gw", clock, [ok, bad])
        bad.failing = False
        clock.advance(minutes=5)
        await rollup(store, "gw", clock, [ok, bad])
        assert (len(ok.sent), len(bad.sent)) == (1, 1)

    run(go())


def test_an_alert_after_a_slow_delivery_is_leased_from_the_time_of_its_own_turn() -> None:
    # The first alert's webhook takes 3 minutes; a second instance comes by while the second alert is being
    # posted. A lease stamped with the run's start time would have run out already: it would post it again.
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        clock = FakeClock(T0 + timedelta(hours=1))
        for threshold in (50, 80):
            assert await alerts.claim_alert(store, "gw", Alert("threshold", "caller", "x", "month|202603", threshold,
                                                               Decimal(9), Decimal(10), clock.now,
                                                               delivery={"webhook": None}))
        posted: list[str] = []
        second_under_way, other_run_done = asyncio.Event(), asyncio.Event()

        class Slow(FakeSink):
            async def send(self, alert: Alert) -> None:
                if alert.threshold == 50:
                    clock.advance(minutes=3)  # timeouts and retries against a struggling webhook
                else:
                    second_under_way.set()
                    await other_run_done.wait()
                posted.append(alert.row_key)

        class Fast(FakeSink):
            async def send(self, alert: Alert) -> None:
                posted.append(alert.row_key)

        async def other_instance() -> None:
            await second_under_way.wait()
            await alerts.deliver_pending(store, "gw", [Fast()], clock(), clock=clock)
            other_run_done.set()

        await asyncio.gather(alerts.deliver_pending(store, "gw", [Slow()], clock(), clock=clock), other_instance())
        assert sorted(posted) == sorted(set(posted)) and len(posted) == 2, posted

    run(go())


def test_a_caller_that_moved_to_another_tier_is_budgeted_by_its_current_tier() -> None:
    # basic has a $1/day budget, standard $10/day: $2 today on standard is 20 %, not a block.
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        await write_cost(store, "gw", "a", T0 - timedelta(days=3), "0.10", tier="basic")
        await write_cost(store, "gw", "a", T0 + timedelta(hours=1), "2", tier="standard")  # upgraded since
        listed = await ledger.list_callers(store, "gw")
        assert [(c.caller_key, c.tier) for c in listed] == [(caller_key("a"), "standard")]
        report = await rollup(store, "gw", FakeClock(T0 + timedelta(hours=2)), cfg=settings(enforcement="block"))
        assert report.restricted == []

    run(go())


def test_a_team_name_of_any_length_is_rolled_up_and_alerted_on() -> None:
    # A team comes from a token claim; escaped for a key, 200 "é" are 1,200 characters: past Azure's 1 KiB.
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        await prepare(store, "gw")
        team = "é" * 200
        await set_budget(store, "gw", team, day="1", kind="team")
        await write_cost(store, "gw", "a", T0, "0.9", team=team)
        report = await rollup(store, "gw", FakeClock(T0 + timedelta(hours=1)), [sink])
        total = await aggregate(store, "gw", budget.team_pk(team), "day|20260310")
        assert total.spend == Decimal("0.9") and report.callers_failed == []
        assert [(a.scope, a.subject, a.threshold) for a in sink.sent] == [("team", team, 50), ("team", team, 80)]
        assert len(budget.team_pk(team).encode()) <= 1024 and quota.team_partition(team) == f"team:{team}"

    run(go())


def test_a_caller_whose_rollup_fails_is_skipped_and_every_other_caller_is_rolled_up() -> None:
    class Poisoned(MemoryTableStore):
        async def query(self, table: str, partition_key: str | None = None, **kwargs: Any) -> Any:
            if partition_key == ledger.table_key(caller_key("a")):
                raise ValueError("a row this version cannot read")
            return await super().query(table, partition_key, **kwargs)

    async def go() -> None:
        store = Poisoned()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("b"), day="1")
        for app in "abc":
            await write_cost(store, "gw", app, T0, "2")
        clock = FakeClock(T0 + timedelta(hours=1))
        report = await rollup(store, "gw", clock, cfg=settings(enforcement="block"))
        assert report.callers_failed == [caller_key("a")] and report.restricted == [caller_key("b")]
        assert [await caller_month_spend(store, "gw", app) for app in "bc"] == [Decimal(2), Decimal(2)]
        clock.advance(minutes=5)
        again = await rollup(store, "gw", clock)  # the next run visits the others first, then tries it again
        assert again.callers_failed == [caller_key("a")]

    run(go())


def test_concurrent_runs_neither_double_count_nor_duplicate_alerts() -> None:
    run(scenario_concurrent_runs(MemoryTableStore(), "gw"))


def test_a_hot_caller_cannot_starve_others_and_a_backlog_drains_across_runs() -> None:
    run(scenario_backlog_across_runs(MemoryTableStore(), "gw"))


def test_rows_inside_the_settle_lag_wait_for_a_later_run() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        clock = FakeClock(T0 + timedelta(hours=1))
        await write_cost(store, "gw", "a", clock.now - timedelta(minutes=5), "1")
        await write_cost(store, "gw", "a", clock.now - timedelta(seconds=30), "2")  # may have late neighbours
        await rollup(store, "gw", clock)
        assert await caller_month_spend(store, "gw", "a") == Decimal("1")
        clock.advance(minutes=5)
        await rollup(store, "gw", clock)
        assert await caller_month_spend(store, "gw", "a") == Decimal("3")

    run(go())


def test_team_and_model_totals_sum_every_callers_contribution() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        await write_cost(store, "gw", "a", T0, "1.10", team="r&d/ml", model="gpt-4o")
        await write_cost(store, "gw", "b", T0, "2.20", team="r&d/ml", model="gpt-4o")
        await write_cost(store, "gw", "b", T0 + timedelta(days=1), "3.30", team="r&d/ml", provider="bedrock",
                         model="claude-3-haiku")
        await rollup(store, "gw", FakeClock(T0 + timedelta(days=2)))
        team = await aggregate(store, "gw", budget.team_pk("r&d/ml"), "month|202603")
        assert (team.spend, team.requests, team.tokens) == (Decimal("6.60"), 3, 30)
        day = await aggregate(store, "gw", budget.model_pk("azure_openai", "gpt-4o"), "day|20260310")
        assert (day.spend, day.requests) == (Decimal("3.30"), 2)

    run(go())


def test_team_budget_alert_is_raised_once_for_the_team() -> None:
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        await prepare(store, "gw")
        await set_budget(store, "gw", "ml", day="4", kind="team")
        await write_cost(store, "gw", "a", T0, "1", team="ml")
        await write_cost(store, "gw", "b", T0, "1.5", team="ml")
        await rollup(store, "gw", FakeClock(T0 + timedelta(hours=1)), [sink])
        assert [(a.scope, a.subject, a.threshold) for a in sink.sent] == [("team", "ml", 50)]

    run(go())


class CrashingStore:
    """Delegates to a real store and raises once the ``crash_at``-th write is attempted."""

    def __init__(self, inner: TableStore, crash_at: int) -> None:
        self.inner, self.crash_at, self.writes = inner, crash_at, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("insert", "update", "upsert", "delete", "transact"):
            return attr

        async def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes == self.crash_at:
                raise RuntimeError(f"injected crash at write {self.writes}")
            return await attr(*args, **kwargs)

        return write


async def scenario_crash_then_resume(store: TableStore, prefix: str, crash_at: int) -> None:
    """Crash the first run at its ``crash_at``-th write; a clean second run must land on exact totals."""
    sink = FakeSink()
    await prepare(store, prefix)
    await set_budget(store, prefix, caller_key("a"), day="10")
    await set_budget(store, prefix, "ml", month="10", kind="team")
    for i in range(4):
        await write_cost(store, prefix, "a", T0 + timedelta(minutes=i), "2", team="ml")
        await write_cost(store, prefix, "b", T0 + timedelta(minutes=i), "1", team="ml")
    clock = FakeClock(T0 + timedelta(hours=1))
    crashing = CrashingStore(store, crash_at)
    with contextlib.suppress(RuntimeError):  # a crash in alert delivery is contained: the run goes on
        await rollup(crashing, prefix, clock, [sink])  # type: ignore[arg-type]
    crashed = crashing.writes >= crash_at
    clock.advance(minutes=5)
    await rollup(store, prefix, clock, [sink])
    assert await caller_month_spend(store, prefix, "a") == Decimal("8")
    assert await caller_month_spend(store, prefix, "b") == Decimal("4")
    team = await aggregate(store, prefix, budget.team_pk("ml"), "month|202603")
    assert (team.spend, team.requests) == (Decimal("12"), 8)
    raised = sorted((a.scope, a.threshold) for a in await stored_alerts(store, prefix))
    assert raised == [("caller", 50), ("caller", 80), ("team", 50), ("team", 80), ("team", 100)]
    assert len({a.row_key for a in sink.sent}) == 5  # nothing lost
    # Delivery is at-least-once: only a crash between a successful post and recording it repeats one.
    assert len(sink.sent) <= 5 + crashed


@pytest.mark.parametrize("crash_at", range(1, 42))  # a clean run of this scenario makes 40 writes
def test_a_crash_at_any_write_resumes_without_double_counting(crash_at: int) -> None:
    run(scenario_crash_then_resume(MemoryTableStore(), "gw", crash_at))


def test_the_deadline_stops_a_run_cleanly_and_the_next_run_resumes() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        for app in ("a", "b", "c", "d"):
            await write_cost(store, "gw", app, T0, "1")
        clock = FakeClock(T0 + timedelta(hours=1), step=timedelta(seconds=1))
        first = await rollup(store, "gw", clock, deadline=clock.now + timedelta(seconds=3))
        assert first.stopped_early and first.backlog and first.rows_applied < 4
        second = await rollup(store, "gw", clock)
        assert first.rows_applied + second.rows_applied == 4 and not second.backlog
        for app in ("a", "b", "c", "d"):
            assert await caller_month_spend(store, "gw", app) == Decimal("1")

    run(go())


@pytest.mark.parametrize(("mode", "status", "alias"), [("block", "blocked", None),
                                                       ("downgrade", "downgraded", "gpt-4o-mini")])
def test_enforcement_restricts_at_100_percent_and_lifts_next_period(mode: str, status: str,
                                                                    alias: str | None) -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        key = caller_key("a")
        await set_budget(store, "gw", key, day="5")
        await write_cost(store, "gw", "a", T0 + timedelta(hours=1), "5")
        clock, cfg = FakeClock(T0 + timedelta(hours=2)), settings(enforcement=mode, downgrade_alias=alias)
        report = await rollup(store, "gw", clock, cfg=cfg)
        override = await overrides.get_override(store, "gw", key)
        assert report.restricted == [key] and override is not None
        assert (override.status, override.alias, override.limits["usd_per_day"]) == (status, alias, Decimal(5))
        clock.advance(hours=23)  # the next day: the daily restriction ends
        assert (await rollup(store, "gw", clock, cfg=cfg)).lifted == 1
        lifted = await overrides.get_override(store, "gw", key)
        assert lifted is not None and lifted.status == "active" and lifted.limits["usd_per_day"] == Decimal(5)

    run(go())


def test_enforcement_never_lifts_a_block_an_admin_set() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        key = caller_key("a")
        await overrides.put_override(store, "gw", key, overrides.Override({"usd_per_day": Decimal(1)}, "blocked",
                                                                  reason="abuse"))
        await write_cost(store, "gw", "a", T0, "2")
        clock, cfg = FakeClock(T0 + timedelta(hours=1)), settings(enforcement="block")
        await rollup(store, "gw", clock, cfg=cfg)
        clock.advance(days=1)
        await rollup(store, "gw", clock, cfg=cfg)
        override = await overrides.get_override(store, "gw", key)
        assert override is not None and (override.status, override.reason) == ("blocked", "abuse")
        assert override.updated_by is None

    run(go())


def test_enforcement_none_only_alerts() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), day="1")
        await write_cost(store, "gw", "a", T0, "2")
        report = await rollup(store, "gw", FakeClock(T0 + timedelta(hours=1)))
        override = await overrides.get_override(store, "gw", caller_key("a"))
        assert report.restricted == [] and override is not None and override.status == "active"

    run(go())


def test_tier_budget_applies_when_the_directory_knows_the_tier() -> None:
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        await prepare(store, "gw")
        await write_cost(store, "gw", "a", T0, "0.6", tier="basic")  # basic: 1.00 USD per day
        await rollup(store, "gw", FakeClock(T0 + timedelta(hours=1)), [sink])
        thresholds = [(a.period, a.threshold, a.budget) for a in sink.sent if a.kind == "threshold"]
        assert thresholds == [("day|20260310", 50, Decimal("1.00"))]

    run(go())


def test_list_alerts_is_newest_first_and_honours_since_and_limit() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        for day in (1, 5, 9):
            created = datetime(2026, 2, day, tzinfo=UTC)
            alert = Alert("threshold", "caller", "x", f"day|202602{day:02d}", 50, Decimal(1), Decimal(2), created)
            assert await alerts.claim_alert(store, "gw", alert)
            assert not await alerts.claim_alert(store, "gw", alert)  # the claim is the dedupe
        now = datetime(2026, 3, 2, tzinfo=UTC)
        found = await alerts.list_alerts(store, "gw", datetime(2026, 2, 4, tzinfo=UTC), 10, now=now)
        assert [a.created.day for a in found] == [9, 5]
        assert len(await alerts.list_alerts(store, "gw", datetime(2026, 1, 1, tzinfo=UTC), 1, now=now)) == 1

    run(go())


def test_alert_round_trips_through_its_entity_and_renders_a_webhook_body() -> None:
    alert = Alert("forecast", "team", "r&d/#1", "month|202603", None, Decimal("12.5"), Decimal("20"), T0,
                  forecast_at=T0 + timedelta(days=3), delivery={"webhook": None})
    back = Alert.from_entity(dataclasses.replace(alert.to_entity(), etag="e"))
    assert dataclasses.replace(back, etag=None) == alert
    body = alert.payload()
    assert "exhaust its month budget on 2026-03-13 00:00 UTC" in body["text"]
    assert body["alert"]["spend_usd"] == "12.5" and body["alert"]["threshold"] is None
    assert "/" not in alert.row_key and "#" not in alert.row_key


def test_transact_marker_and_alert_are_claimed_together() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        alert = Alert("threshold", "caller", "x", "month|202603", 80, Decimal(8), Decimal(10), T0,
                      delivery={"webhook": None})
        # Someone holds only the marker (cannot happen through claim_alert): the claim fails as a whole.
        marker = Entity(alert.partition_key, f"pending|{alert.row_key}", {"alert": alert.row_key})
        await store.transact(alerts.alerts_table("gw"), [Op("insert", marker)])
        assert not await alerts.claim_alert(store, "gw", alert)
        assert await store.get(alerts.alerts_table("gw"), alert.partition_key, alert.row_key) is None

    run(go())


def test_budget_for_period_picks_day_or_month() -> None:
    b = Budget(Decimal(1), Decimal(30))
    assert (b.for_period("day|20260310"), b.for_period("month|202603")) == (Decimal(1), Decimal(30))


def test_a_dead_sink_is_tried_once_per_run_not_once_per_alert() -> None:
    async def go() -> None:
        store, sink = MemoryTableStore(), FakeSink()
        calls = 0
        original = sink.send

        async def counting(alert: Alert) -> None:
            nonlocal calls
            calls += 1
            await original(alert)

        sink.send = counting  # type: ignore[method-assign]
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), day="1")
        await write_cost(store, "gw", "a", T0, "2")  # three thresholds at once
        sink.failing = True
        report = await rollup(store, "gw", FakeClock(T0 + timedelta(hours=1)), [sink])
        assert (len(report.alerts_raised), report.alerts_pending, calls) == (3, 3, 1)

    run(go())


def test_the_timer_entry_builds_its_dependencies_from_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from gateway_lib import runtime
    from gateway_lib.config.settings import Settings

    env = {"GATEWAY_STORAGE_MODE": "memory", "AUTH_TENANT_IDS": TENANT, "AUTH_AUDIENCES": "api://gw",
           "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9", "GATEWAY_TABLE_PREFIX": "gw",
           "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"}
    events: list[tuple[str, Any, Any]] = []
    store = MemoryTableStore()
    fake = SimpleNamespace(settings=Settings.from_env(env), store=store,
                           telemetry=SimpleNamespace(track_event=lambda *event: events.append(event)))
    monkeypatch.setattr(runtime, "get_runtime", lambda: fake)

    async def go() -> RollupReport:
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), day="1")
        await write_cost(store, "gw", "a", datetime.now(UTC) - timedelta(minutes=10), "0.6")
        from gateway_lib.billing import rollup_timer

        return await rollup_timer.rollup_timer_entry(timer_past_due=False)

    report = run(go())
    assert report.rows_applied == 1 and report.alerts_delivered >= 1
    assert events[0][0] == "BudgetAlert" and events[0][2]["spend_usd"] == 0.6


def test_a_rollup_schedule_that_is_not_ncrontab_is_a_configuration_problem() -> None:
    from gateway_lib.config.settings import ConfigError, Settings

    env = {"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
           "GATEWAY_STORAGE_MODE": "memory", "GATEWAY_ENVIRONMENT": "test", "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9",
           "AZURE_OPENAI_AUTH": "api_key", "AZURE_OPENAI_API_KEY": "k"}
    assert Settings.from_env(env | {"BUDGET_ROLLUP_SCHEDULE": "0 0 * * * *"}).budget.rollup_schedule == "0 0 * * * *"
    with pytest.raises(ConfigError, match="BUDGET_ROLLUP_SCHEDULE"):
        Settings.from_env(env | {"BUDGET_ROLLUP_SCHEDULE": "*/5 * * * *"})  # five-field cron: the host wants six


# ---- found by review: arithmetic edges, admin edits, period edges, a run's time ----------------------------

def test_a_tiny_burn_rate_forecasts_nothing_instead_of_overflowing() -> None:
    # $0.000001 in an hour against $100 would run out in ~11 million years: past datetime's range.
    from gateway_lib.billing.spend import forecast_exhaustion

    tiny = Decimal("0.000001")
    assert forecast_exhaustion(tiny, Decimal(100), tiny, T0 + timedelta(hours=1), T0 + timedelta(hours=2)) is None

    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        for app in ("a", "b", "c"):
            await set_budget(store, "gw", caller_key(app), month="100")
        await write_cost(store, "gw", "b", T0 + timedelta(hours=1), "0.000001")
        await write_cost(store, "gw", "c", T0 + timedelta(hours=1), "80")
        report = await rollup(store, "gw", FakeClock(T0 + timedelta(hours=2)))
        assert await caller_month_spend(store, "gw", "c") == Decimal(80), "callers after the tiny one rolled up"
        assert len([r for r in report.alerts_raised if ":c:" in r and "|threshold|" in r]) == 2  # 50 % and 80 %
        assert not [r for r in report.alerts_raised if ":b:" in r], "the tiny spender: no alert, no crash"

    run(go())


def test_a_sink_down_for_days_never_stops_the_rollup_nor_the_other_sinks() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("b"), day="10")  # no forecast: the stuck alert is delivered first
        dead, healthy = FakeSink("webhook"), FakeSink("telemetry")
        dead.failing = True
        clock = FakeClock(T0 + timedelta(hours=12))
        await write_cost(store, "gw", "a", clock.now - timedelta(minutes=10), "1")
        await rollup(store, "gw", clock, [healthy, dead])
        alert = Alert("threshold", "caller", caller_key("a"), "month|202603", 50, Decimal(6), Decimal(10), clock.now,
                      delivery={"webhook": None, "telemetry": clock.now.isoformat()})
        assert await alerts.claim_alert(store, "gw", alert)
        stored = await store.get(alerts.alerts_table("gw"), "202603", alert.row_key)
        assert stored is not None  # 60 failed attempts so far: 2**59 minutes is past timedelta's range
        await store.update(alerts.alerts_table("gw"), Entity(stored.partition_key, stored.row_key,
                                                             {**stored.properties, "attempts": 60}), stored.etag or "*")
        await write_cost(store, "gw", "b", clock.now - timedelta(minutes=5), "6")
        clock.advance(minutes=5)
        await rollup(store, "gw", clock, [healthy, dead])  # must not raise
        assert 50 in [a.threshold for a in healthy.sent if ":b:" in a.subject], "the healthy sink still served"

    run(go())


def test_an_admin_changing_a_limit_leaves_the_budget_block_to_be_lifted_by_the_budget() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        key = caller_key("a")
        await set_budget(store, "gw", key, day="5")
        await write_cost(store, "gw", "a", T0 + timedelta(hours=1), "6")
        clock, cfg = FakeClock(T0 + timedelta(hours=2)), settings(enforcement="block")
        assert (await rollup(store, "gw", clock, cfg=cfg)).restricted == [key]
        blocked = await overrides.get_override(store, "gw", key)
        merged = overrides.merge_override(blocked, {"limits": {"requests_per_minute": 600}}, "admin-key", clock.now,
                                          aliases=())
        await overrides.put_override(store, "gw", key, merged)
        clock.now = T0 + timedelta(days=1, hours=1)
        assert (await rollup(store, "gw", clock, cfg=cfg)).lifted == 1
        lifted = await overrides.get_override(store, "gw", key)
        assert lifted is not None and lifted.status == "active" and lifted.limits["requests_per_minute"] == 600
        # A status an admin set is the admin's: the budget does not lift it.
        admin_block = overrides.merge_override(lifted, {"status": "blocked"}, "admin-key", clock.now, aliases=())
        assert admin_block.status_by == "admin-key"

    run(go())


def test_an_admin_letting_a_blocked_caller_through_is_not_overruled_until_the_period_ends() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        key = caller_key("a")
        await set_budget(store, "gw", key, day="5")
        await write_cost(store, "gw", "a", T0 + timedelta(hours=1), "6")
        clock, cfg = FakeClock(T0 + timedelta(hours=2)), settings(enforcement="block")
        assert (await rollup(store, "gw", clock, cfg=cfg)).restricted == [key]
        blocked = await overrides.get_override(store, "gw", key)
        let_through = overrides.merge_override(blocked, {"status": "active", "reason": "let them finish"},
                                               "admin-key", clock.now, aliases=())
        await overrides.put_override(store, "gw", key, let_through)
        await write_cost(store, "gw", "a", clock.now + timedelta(minutes=1), "0.10")  # the caller carries on
        clock.advance(minutes=10)
        assert (await rollup(store, "gw", clock, cfg=cfg)).restricted == [], "the admin's call, for today"
        after = await overrides.get_override(store, "gw", key)
        assert after is not None and (after.status, after.status_by) == ("active", "admin-key")
        clock.now = T0 + timedelta(days=1, hours=2)  # a new day, a new budget: enforcement applies again
        await write_cost(store, "gw", "a", T0 + timedelta(days=1, hours=1), "6")
        assert (await rollup(store, "gw", clock, cfg=cfg)).restricted == [key]

    run(go())


def test_an_admin_who_only_changed_a_limit_does_not_hold_off_enforcement() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        key = caller_key("a")
        await set_budget(store, "gw", key, day="5")
        clock, cfg = FakeClock(T0 + timedelta(hours=2)), settings(enforcement="block")
        current = await overrides.get_override(store, "gw", key)
        edited = overrides.merge_override(current, {"limits": {"requests_per_minute": 600}}, "admin-key", clock.now,
                                          aliases=())
        await overrides.put_override(store, "gw", key, edited)
        await write_cost(store, "gw", "a", T0 + timedelta(hours=1), "6")
        assert (await rollup(store, "gw", clock, cfg=cfg)).restricted == [key]

    run(go())


def test_spend_of_a_period_already_over_restricts_nobody() -> None:
    # The 00:01 run rolls up 23:59's rows: yesterday's budget is spent, but yesterday is over.
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        key = caller_key("a")
        await set_budget(store, "gw", key, day="5")
        await write_cost(store, "gw", "a", T0 + timedelta(hours=23, minutes=57), "6")
        clock = FakeClock(T0 + timedelta(days=1, minutes=1))
        report = await rollup(store, "gw", clock, cfg=settings(enforcement="block"))
        assert report.restricted == []
        override = await overrides.get_override(store, "gw", key)
        assert override is None or override.status == "active"

    run(go())


def test_alerts_raised_in_a_new_month_for_the_last_one_are_listed() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        await set_budget(store, "gw", caller_key("a"), day="5")
        last_day = datetime(2026, 3, 31, 23, 55, tzinfo=UTC)
        await write_cost(store, "gw", "a", last_day, "6")
        clock = FakeClock(datetime(2026, 4, 1, 0, 5, tzinfo=UTC))
        raised = (await rollup(store, "gw", clock)).alerts_raised
        listed = await alerts.list_alerts(store, "gw", since=datetime(2026, 4, 1, tzinfo=UTC), now=clock.now)
        assert raised and sorted(a.row_key for a in listed) == sorted(raised)

    run(go())


def test_a_run_keeps_time_to_lift_restrictions_and_deliver_alerts() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        await prepare(store, "gw")
        for i in range(40):  # a backlog: more callers than a run gets through
            await write_cost(store, "gw", f"busy{i}", T0 + timedelta(hours=1), "1")
        clock = FakeClock(T0 + timedelta(hours=2), step=timedelta(seconds=1))
        report = await rollup(store, "gw", clock, deadline=clock.now + timedelta(seconds=40))
        assert report.stopped_early
        assert clock.now < report.started + timedelta(seconds=40), "aggregation left the last quarter free"

    run(go())

"""Spend reports on the memory store: every group_by, callers and chargeback equal sums taken straight from the
cost rows, whether the budget rollup has folded the rows in, is halfway, lost its checkpoint or is behind.

The scenarios (``scenario_*``) take any ``TableStore``; tests/integration/test_reports_azurite.py runs them on
Azurite. Rows are settled through the admission path (reserve, then settle), as requests leave them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing import budget, ledger, reports
from gateway_lib.billing import report_views as views
from gateway_lib.billing.ledger import CostRow
from gateway_lib.billing.spend_index import SpendKey
from gateway_lib.errors import InvalidRequest
from gateway_lib.quota.admission import Admission
from gateway_lib.storage.base import TableStore
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit import test_quota
from tests.unit.test_budget import FakeClock, prepare, rollup, settings, write_cost

DAY1 = datetime(2026, 3, 10, tzinfo=UTC)
DAYS = [DAY1 + timedelta(days=n) for n in range(3)]
TARGETS = (("azure_openai", "gpt-4o-mini"), ("bedrock", "claude-3-haiku"))


def callers() -> list[Caller]:
    tier = test_quota.make_tier()
    return [test_quota.make_caller(tier, "app-red-1", "red"), test_quota.make_caller(tier, "app-red-2", "red"),
            test_quota.make_caller(tier, "app-blue-1", "blue"), test_quota.make_caller(tier, "app-none")]


@dataclass
class Seeder:
    store: TableStore
    prefix: str
    clock: test_quota.Clock
    admission: Admission

    @classmethod
    async def of(cls, store: TableStore, prefix: str) -> Seeder:
        clock = test_quota.Clock(DAY1)
        _, admission = await test_quota.new_admission(store, clock, prefix)
        await prepare(store, prefix)
        return cls(store, prefix, clock, admission)

    async def settle(self, caller: Caller, when: datetime, route: str, target: tuple[str, str] | None,
                     prompt: int, completion: int, usd: str) -> None:
        """Reserve then settle one request at ``when``, as the pipeline does."""
        self.clock.now = when
        res = await self.admission.reserve(caller, tokens=prompt + completion, usd=Decimal(usd) + 1,
                                           request_id=uuid.uuid4().hex)
        provider, model = target or (None, None)
        row = CostRow.for_caller(
            caller, request_id=res.request_id, time=when, route=route, task=None, alias=model, provider=provider,
            model=model, deployment=None, region=None, prompt_tokens_estimated=prompt,
            completion_tokens_estimated=completion, prompt_tokens=prompt, completion_tokens=completion,
            cost_usd=Decimal(usd), price_version="2026-03" if when < DAYS[1] else "2026-03b", latency_ms=3.0,
            status="ok" if target else "error", http_status=200 if target else 503)
        await self.admission.settle(res, row)

    async def day(self, day: datetime) -> None:
        """Each caller: chat and generate on both providers, and a request that reached no provider."""
        for n, (caller, route, target) in enumerate(itertools.product(callers(), ("chat", "generate"), TARGETS)):
            when = day + timedelta(hours=1, minutes=7 * n, seconds=n)
            await self.settle(caller, when, route, target, 100 + n, 10 + n, f"0.{n + 1:02d}0317")
        for n, caller in enumerate(callers()):
            await self.settle(caller, day + timedelta(hours=9, seconds=n), "chat", None, 50, 0, "0")


# --- the independent side: straight from the cost rows -------------------------------------------------------


async def ledger_rows(store: TableStore, prefix: str) -> list[CostRow]:
    """Every cost row in the usage table (a scan: no directory, no rollup, no checkpoint)."""
    found = await store.query(ledger.usage_table(prefix))
    return [CostRow.from_entity(e) for e in found if e.row_key.startswith(ledger.LEDGER_PREFIX)]


def value(row: CostRow, dim: str) -> str | None:
    return {"team": row.team, "caller": row.caller_key, "model": row.model, "provider": row.provider,
            "operation": row.route, "day": row.time.date().isoformat()}[dim]


def expected(rows: Sequence[CostRow], first: date, last: date, dims: Sequence[str],
             team: str | None = None) -> dict[tuple[str | None, ...], tuple[int, int, int, Decimal]]:
    sums: dict[tuple[str | None, ...], tuple[int, int, int, Decimal]] = {}
    for row in rows:
        if first <= row.time.date() <= last and (team is None or row.team == team):
            key = tuple(value(row, d) for d in dims)
            r, i, o, u = sums.get(key, (0, 0, 0, Decimal(0)))
            sums[key] = (r + 1, i + row.prompt_tokens, o + row.completion_tokens, u + row.cost_usd)
    return sums


async def reported(store: TableStore, prefix: str, first: date, last: date, dims: Sequence[str],
                   team: str | None = None, page: int = 500) -> dict[tuple[str | None, ...], tuple[int, int, int, Decimal]]:
    """The report's rows, pages added up by their dimensions (as the dashboard does)."""
    sums: dict[tuple[str | None, ...], tuple[int, int, int, Decimal]] = {}
    after: str | None = None
    while True:
        got = await reports.collect(store, prefix, first, last, after=after, callers=page, team=team)
        for key, t in views.group(got.facts, dims):
            r, i, o, u = sums.get(key, (0, 0, 0, Decimal(0)))
            sums[key] = (r + t.requests, i + t.input_tokens, o + t.output_tokens, u + t.usd)
        if (after := got.after) is None:
            return sums


ALL_GROUPINGS = [(d,) for d in views.DIMENSIONS] + [("team", "model"), ("day", "team"), ("day", "model"),
                                                     ("caller", "provider"), ("operation", "day")]


async def assert_reports_match(store: TableStore, prefix: str, first: date, last: date, **kw: Any) -> int:
    rows = await ledger_rows(store, prefix)
    for dims in ALL_GROUPINGS:
        want = expected(rows, first, last, dims, kw.get("team"))
        got = await reported(store, prefix, first, last, dims, **kw)
        assert got == want, dims
    return sum(r for r, *_ in expected(rows, first, last, ["day"], kw.get("team")).values())


# --- scenarios ---------------------------------------------------------------------------------------------


async def scenario_reports_equal_the_ledger_through_every_rollup_state(store: TableStore, prefix: str) -> None:
    seed = await Seeder.of(store, prefix)
    for day in DAYS:
        await seed.day(day)
    first, last = DAYS[0].date(), DAYS[-1].date()
    count = await assert_reports_match(store, prefix, first, last)  # nothing rolled up: the ledger only
    assert count == 3 * (len(callers()) * 5)
    clock = FakeClock(DAYS[1] + timedelta(hours=4))
    halfway = await rollup(store, prefix, clock, cfg=settings(rollup_max_rows=20))  # some callers part-way
    assert halfway.rows_applied > 0 and halfway.backlog
    await assert_reports_match(store, prefix, first, last)
    await assert_reports_match(store, prefix, DAYS[1].date(), DAYS[1].date(), team="red")
    # Late rows on the first day, committed after the rollup passed it (a leased journal after an outage).
    for n in range(3):
        await write_cost(store, prefix, "late-app", DAYS[0] + timedelta(hours=2, minutes=n), f"1.2{n}", team="blue",
                         provider="bedrock", model="claude-3-haiku", committed_late_at=clock.now)
    await assert_reports_match(store, prefix, first, last)
    clock.advance(days=3)
    assert (await rollup(store, prefix, clock)).rows_applied > 0
    assert (await rollup(store, prefix, clock)).late_rows_applied == 0  # all in: the next report reads rows only
    await assert_reports_match(store, prefix, first, last)
    await assert_reports_match(store, prefix, first, last, team="blue", page=1)
    # A crash after the aggregates were written but before the checkpoint moved: the report's tail
    # re-reads rows the daily rows already hold, and must not count them twice.
    await store.delete(budget.rollup_table(prefix), budget.CHECKPOINTS, budget.key_part(callers()[0].key))
    await store.delete(budget.rollup_table(prefix), budget.LATE_CHECKPOINTS, budget.key_part(callers()[0].key))
    await assert_reports_match(store, prefix, first, last)
    # Rows after the last rollup: daily rows plus the tail, on one day.
    await seed.settle(callers()[2], DAYS[2] + timedelta(hours=20), "chat", TARGETS[1], 5, 5, "0.5")
    await assert_reports_match(store, prefix, DAYS[2].date(), DAYS[2].date())


async def scenario_pages_of_callers_add_up_to_the_whole(store: TableStore, prefix: str) -> None:
    seed = await Seeder.of(store, prefix)
    await seed.day(DAYS[0])
    await rollup(store, prefix, FakeClock(DAYS[0] + timedelta(hours=2)))  # part of the day rolled up
    day = DAYS[0].date()
    pages = []
    after: str | None = None
    while True:
        got = await reports.collect(store, prefix, day, day, after=after, callers=1)
        pages.append(got)
        if (after := got.after) is None:
            break
    assert len(pages) == len(callers()) + 1  # the last page is the empty one past the last caller
    assert [c.caller_key for p in pages for c in p.callers] == sorted(c.key for c in callers())
    whole = await reports.collect(store, prefix, day, day)
    assert views.total(f for p in pages for f in p.facts) == views.total(whole.facts)
    assert await reported(store, prefix, day, day, ["caller"], page=2) == expected(
        await ledger_rows(store, prefix), day, day, ["caller"])


async def scenario_chargeback_is_reproducible_and_exact(store: TableStore, prefix: str) -> None:
    seed = await Seeder.of(store, prefix)
    for day in DAYS:
        await seed.day(day)
    await rollup(store, prefix, FakeClock(DAYS[1] + timedelta(hours=3)))
    first, last = views.parse_month("2026-03")
    csvs = []
    for _ in range(2):
        facts = (await reports.collect(store, prefix, first, last)).facts
        csvs.append(views.chargeback_csv("2026-03", facts))
    assert csvs[0] == csvs[1]
    lines = list(csv.DictReader(io.StringIO(csvs[0])))
    want = expected(await ledger_rows(store, prefix), first, last, ["team", "provider", "model"])
    got = {(ln["team"] or None, ln["provider"] or None, ln["model"] or None):
           (int(ln["requests"]), int(ln["input_tokens"]), int(ln["output_tokens"]), Decimal(ln["usd"]))
           for ln in lines if ln["provider"] != "*"}
    assert got == want
    for team in ("red", "blue", None):
        line = next(ln for ln in lines if (ln["team"] or None) == team and ln["provider"] == "*")
        team_rows = expected(await ledger_rows(store, prefix), first, last, ["team"])[(team,)]
        assert (int(line["requests"]), Decimal(line["usd"])) == (team_rows[0], team_rows[3])
    assert {ln["catalogue_versions"] for ln in lines if ln["provider"] == "*"} == {"2026-03 2026-03b"}


# --- memory-store runs ----------------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_reports_equal_the_ledger_through_every_rollup_state() -> None:
    run(scenario_reports_equal_the_ledger_through_every_rollup_state(MemoryTableStore(), "t"))


def test_pages_of_callers_add_up_to_the_whole() -> None:
    run(scenario_pages_of_callers_add_up_to_the_whole(MemoryTableStore(), "t"))


def test_chargeback_is_reproducible_and_exact() -> None:
    run(scenario_chargeback_is_reproducible_and_exact(MemoryTableStore(), "t"))


def test_spend_rows_keep_the_dimensions_apart() -> None:
    """key_part escapes '|': a team named like a key's tail never shares a row with another key."""
    a = SpendKey("t:a:-", "x|y", "p", "m", "chat")
    b = SpendKey("t:a:-", "x", "y|p", "m", "chat")
    assert a.row_key != b.row_key and a.row_key.startswith("t:a:-|")
    long_team = SpendKey("t:a:-", "é" * 2000, "p", "m", "chat")
    assert len(long_team.row_key.encode()) <= 1024 and long_team.row_key.startswith("t:a:-|")


@pytest.mark.parametrize(("first", "last", "param"), [
    ("2026-03-10", "2026-03-09", "from"), ("2026-3-1", "2026-03-09", "from"), ("2026-02-30", "2026-03-01", "from"),
    ("2025-01-01", "2026-03-01", "to"), (None, "2026-03-01", "from"), ("2026-03-01", "", "to"),
])
def test_a_bad_range_is_a_400_naming_the_parameter(first: str | None, last: str | None, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        views.parse_range(first, last)
    assert caught.value.param == param


@pytest.mark.parametrize("group_by", ["", "team,team", "team,model,day", "tenant", "team;model", None])
def test_a_bad_group_by_is_a_400(group_by: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        views.parse_group_by(group_by)
    assert caught.value.param == "group_by"


def test_a_continuation_token_only_resumes_its_own_query() -> None:
    token = views.encode_token("after-key", "spend|a")
    assert views.decode_token(token, "spend|a") == "after-key"
    for other, query in ((token, "spend|b"), ("not-base64!", "spend|a"), ("e30", "spend|a")):
        with pytest.raises(InvalidRequest):
            views.decode_token(other, query)


def test_usd_renders_as_an_exact_decimal_string() -> None:
    total = reports.Totals()
    for usd in ("0.1", "0.2", "1E-8"):
        total.usd += Decimal(usd)
    assert views.usd(total.usd) == "0.30000001"


def test_the_directory_keeps_the_names_a_caller_was_first_listed_with() -> None:
    async def go() -> ledger.CallerEntry:
        store = MemoryTableStore()
        await store.ensure_tables([ledger.callers_table("t")])
        await ledger.CallerDirectory(store, "t").register("k", "red", "standard", DAY1, tenant="tid",
                                                          names=("Billing bot", None))
        # Another instance, a later token: a new name does not replace the first; a missing one is filled in.
        await ledger.CallerDirectory(store, "t").register("k", "red", "standard", DAY1, tenant="tid",
                                                          names=("Renamed bot", "Ada"))
        [entry] = await ledger.list_callers(store, "t")
        return entry

    entry = run(go())
    assert (entry.app_name, entry.user_name, entry.tenant_id, entry.team) == ("Billing bot", "Ada", "tid", "red")


def test_one_callers_report_reads_only_that_caller_and_equals_its_rows() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        seed = await Seeder.of(store, "t")
        for day in DAYS[:2]:
            await seed.day(day)
        await rollup(store, "t", FakeClock(DAYS[1] + timedelta(hours=2)))
        first, last = DAYS[0].date(), DAYS[1].date()
        rows = await ledger_rows(store, "t")
        for who in callers():
            got = await reports.collect(store, "t", first, last, caller_key=who.key)
            assert got.after is None and [c.caller_key for c in got.callers] == [who.key]
            want = expected([r for r in rows if r.caller_key == who.key], first, last, ["day", "model"])
            assert {k: (t.requests, t.input_tokens, t.output_tokens, t.usd)
                    for k, t in views.group(got.facts, ["day", "model"])} == want
        unknown = await reports.collect(store, "t", first, last, caller_key="tid:nobody:-")
        assert unknown.facts == []

    run(go())


class RollupMidRead:
    """A store that runs a whole rollup right after the report's first read of the rollup table: the race of a
    report and a timer run, at its worst point."""

    def __init__(self, inner: TableStore, prefix: str, clock: FakeClock) -> None:
        self.inner, self.prefix, self.clock, self.fired = inner, prefix, clock, False

    async def query(self, table: str, *args: Any, **kwargs: Any) -> Any:
        found = await self.inner.query(table, *args, **kwargs)
        if table == budget.rollup_table(self.prefix) and not self.fired:
            self.fired = True
            assert (await rollup(self.inner, self.prefix, self.clock)).rows_applied > 0
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_rollup_run_during_a_report_neither_loses_nor_doubles_a_row() -> None:
    async def go() -> None:
        store = MemoryTableStore()
        seed = await Seeder.of(store, "t")
        await seed.day(DAYS[0])
        await rollup(store, "t", FakeClock(DAYS[0] + timedelta(hours=1, minutes=40)))  # part of the day
        day = DAYS[0].date()
        want = expected(await ledger_rows(store, "t"), day, day, ["caller", "model"])
        racing = RollupMidRead(store, "t", FakeClock(DAYS[1]))
        got = await reports.collect(racing, "t", day, day)  # type: ignore[arg-type]
        assert racing.fired
        assert {k: (t.requests, t.input_tokens, t.output_tokens, t.usd)
                for k, t in views.group(got.facts, ["caller", "model"])} == want

    run(go())

"""Budget enforcement against an admin's edits: sending back an unchanged "active" is no decision about the
status, while an explicit block (even one repeating the budget's) is the admin's and never lifted by the rollup."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from gateway_lib.billing import budget
from gateway_lib.billing.enforcement import OverrideEnforcer
from gateway_lib.quota import admission as quota
from gateway_lib.quota import overrides
from gateway_lib.storage.memory import MemoryTableStore

PREFIX = "t"
CALLER = "tid:app1:-"
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 4, 1, tzinfo=UTC)


async def _store() -> MemoryTableStore:
    store = MemoryTableStore()
    await store.ensure_tables([*quota.tables(PREFIX), budget.rollup_table(PREFIX)])
    return store


async def _admin_put(store: MemoryTableStore, body: dict[str, Any], at: datetime) -> None:
    current = await overrides.get_override(store, PREFIX, CALLER)
    merged = overrides.merge_override(current, body, "admin-key", at)
    await overrides.put_override(store, PREFIX, CALLER, merged)


def test_a_put_that_repeats_status_active_does_not_switch_enforcement_off_for_the_month() -> None:
    # A caller never blocked; an admin raises a limit with a full-object PUT that repeats "status": "active"
    # (what GET /overrides returns). merge_override stamps status_by/status_at since "status" is in the body,
    # and the caller is then exempt from enforcement of every period running at that moment.
    async def scenario() -> None:
        store = await _store()
        enforcer = OverrideEnforcer(store, PREFIX, "block", None, lambda: datetime(2026, 3, 20, tzinfo=UTC))
        await _admin_put(store, {"limits": {"usd_per_month": "100"}, "status": "active"},
                         datetime(2026, 3, 2, tzinfo=UTC))
        restricted = await enforcer.restrict(CALLER, MONTH_START, MONTH_END)  # the month's budget spent on 3/20
        assert restricted, "a caller that spent its month budget is not blocked: an unchanged 'active' held it off"

    asyncio.run(scenario())


def test_an_admin_reblocking_a_budget_blocked_caller_is_not_lifted_at_period_end() -> None:
    async def scenario() -> None:
        store = await _store()
        enforcer = OverrideEnforcer(store, PREFIX, "block", None, lambda: datetime(2026, 3, 20, tzinfo=UTC))
        assert await enforcer.restrict(CALLER, MONTH_START, MONTH_END)  # budget blocks on 3/20
        # The admin decides the caller stays blocked (e.g. abuse), and says so explicitly.
        await _admin_put(store, {"status": "blocked", "reason": "SEC-42 abuse investigation"},
                         datetime(2026, 3, 21, tzinfo=UTC))
        after = await overrides.get_override(store, PREFIX, CALLER)
        assert after is not None
        lifted = await enforcer.lift_expired(datetime(2026, 4, 1, 0, 5, tzinfo=UTC))
        final = await overrides.get_override(store, PREFIX, CALLER)
        assert final is not None
        assert (lifted, final.status) == (0, "blocked"), (
            f"the admin's explicit block was lifted by the rollup (status_by stayed {after.status_by!r})")

    asyncio.run(scenario())

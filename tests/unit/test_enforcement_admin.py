"""Budget enforcement against an admin's edits: sending back the status read unchanged is no decision about it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from gateway_lib import budget, overrides, quota
from gateway_lib.enforcement import OverrideEnforcer
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

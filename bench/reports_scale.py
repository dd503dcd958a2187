"""The spend reports' cost at scale, on a private Azurite: ``python -m bench.reports_scale [callers]``.

Seeds a month of daily spend rows for N callers (two provider/model combinations a day, default 1,000)
with their checkpoints, plus one busy caller's 3,000 cost rows past its checkpoint, then reads the
month across every caller (pages of 500 and 1,000) and for the busy caller alone. Prints Table
transactions (queries of up to 1,000 entities, and point reads), entities read and wall time
(docs/budgets.md, "Query plan and its cost").
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway_lib.billing import budget, ledger, reports
from gateway_lib.billing.alerts import key_part
from gateway_lib.billing.spend_index import SpendKey, spend_pk
from gateway_lib.quota import admission
from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import Entity, Op, TableStore
from tools.azurite import Azurite, free_port

PREFIX = "bench"
FIRST, LAST = date(2026, 3, 1), date(2026, 3, 31)
CHECKPOINT = "led|2026-03-31T23:50:00.000000Z|x"  # everything before it is in the daily rows
TARGETS = (("azure_openai", "gpt-4o-mini"), ("bedrock", "claude-3-haiku"))


class Counting:
    """A store that counts what a report reads."""

    def __init__(self, inner: TableStore) -> None:
        self.inner, self.queries, self.gets, self.entities = inner, 0, 0, 0

    async def query(self, *args: Any, **kwargs: Any) -> Any:
        rows = await self.inner.query(*args, **kwargs)
        self.queries += max(1, -(-len(rows) // 1000))
        self.entities += len(rows)
        return rows

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        self.gets += 1
        return await self.inner.get(*args, **kwargs)


async def seed(store: TableStore, callers: int) -> list[str]:
    await store.ensure_tables([*admission.tables(PREFIX), budget.rollup_table(PREFIX)])
    keys = [f"00000000-0000-4000-8000-000000000de0:{i:08x}-app:-" for i in range(callers)]
    for start in range(0, callers, 100):
        chunk = list(enumerate(keys[start:start + 100], start))
        await store.transact(ledger.callers_table(PREFIX), [Op("insert", Entity(
            ledger.CALLERS_PARTITION, ledger.table_key(k), {"caller_key": k, "team": f"team{i % 10}", "tier": "standard"}))
            for i, k in chunk])
        await store.transact(budget.rollup_table(PREFIX), [Op("insert", Entity(
            budget.CHECKPOINTS, key_part(k), {"after": CHECKPOINT})) for _, k in chunk])
    for n in range((LAST - FIRST).days + 1):
        rows = [_daily(FIRST + timedelta(days=n), SpendKey(k, f"team{i % 10}", p, m, "chat"))
                for i, k in enumerate(keys) for p, m in TARGETS]
        for start in range(0, len(rows), 100):
            await store.transact(budget.rollup_table(PREFIX), [Op("insert", e) for e in rows[start:start + 100]])
    return keys


def _daily(day: date, key: SpendKey) -> Entity:
    return Entity(spend_pk(day), key.row_key, {**key.props(), "spend": "1.5", "requests": 10, "tokens": 100,
                                               "input_tokens": 60, "output_tokens": 40, "applied_to": CHECKPOINT})


async def busy_tail(store: TableStore, caller_key: str, count: int) -> None:
    start = datetime(2026, 3, 31, 23, 50, 1, tzinfo=UTC)
    rows = [ledger.CostRow(
        request_id=f"r{i}", time=start + timedelta(milliseconds=100 * i), caller_key=caller_key, app_id="a",
        tenant_id="t", user_id=None, team="team0", label=None, route="chat", task=None, alias=None,
        provider=TARGETS[0][0], model=TARGETS[0][1], deployment=None, region=None, prompt_tokens_estimated=1,
        completion_tokens_estimated=1, prompt_tokens=1, completion_tokens=1, cost_usd=Decimal("0.001"),
        price_version="v1", latency_ms=1.0, status="ok", http_status=200) for i in range(count)]
    for first in range(0, count, 100):
        await store.transact(ledger.usage_table(PREFIX), [Op("insert", r.to_entity()) for r in rows[first:first + 100]])


async def measure(store: Counting, **kwargs: Any) -> dict[str, Any]:
    store.queries = store.gets = store.entities = 0
    began, after, calls, facts = time.monotonic(), None, 0, 0
    while True:
        page = await reports.collect(store, PREFIX, FIRST, LAST, after=after, **kwargs)  # type: ignore[arg-type]
        calls, facts = calls + 1, facts + len(page.facts)
        if (after := page.after) is None:
            break
    return {"calls": calls, "queries": store.queries, "point_reads": store.gets, "entities": store.entities,
            "facts": facts, "seconds": round(time.monotonic() - began, 2)}


async def main(callers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, Azurite(free_port(), Path(tmp)) as azurite:
        raw = AzureTableStore.from_connection_string(azurite.connection_string)
        try:
            keys = await seed(raw, callers)
            await busy_tail(raw, keys[0], 3000)
            store = Counting(raw)
            print(json.dumps({
                f"month, {callers} callers, page_size=500": await measure(store, callers=500),
                f"month, {callers} callers, page_size=1000": await measure(store, callers=1000),
                "month, one busy caller": await measure(store, caller_key=keys[0]),
            }, indent=1))
        finally:
            await raw.aclose()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))

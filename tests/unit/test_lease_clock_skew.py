"""Leases and clock skew between instances: a lease of a minute the row already turned to (another instance's clock
runs ahead) still serves this instance's requests, instead of a grant per request until its clock turns too."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_leases import leased
from tests.unit.test_quota import T0, Clock, make_caller, make_row, run


class CountingStore(MemoryTableStore):
    def __init__(self) -> None:
        super().__init__()
        self.updates = 0

    async def update(self, table: str, entity: Any, etag: str) -> Any:
        self.updates += 1
        return await super().update(table, entity, etag)


def test_a_caller_served_by_an_instance_a_second_behind_the_rows_writer_keeps_its_lease() -> None:
    async def scenario() -> None:
        store = CountingStore()
        ahead = Clock(T0.replace(second=59, microsecond=600_000) + timedelta(seconds=1))  # 12:01:00.6
        behind = Clock(T0.replace(second=59, microsecond=0))  # 12:00:59.0: 1.6 s of skew
        a, b = leased(store, ahead), leased(store, behind)
        caller = make_caller()
        res = await a.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a0")  # the row is in 12:01
        await a.settle(res, make_row(caller, "a0", ahead.now, 3, 4, Decimal("0.0007")))
        b._lease_size = lambda old: 10  # type: ignore[method-assign]  # a busy caller's block
        before = store.updates
        for i in range(10):
            r = await b.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"b{i}")
            await b.settle(r, make_row(caller, f"b{i}", behind.now, 3, 4, Decimal("0.0007")))
            behind.advance(milliseconds=50)
        writes = store.updates - before
        assert writes <= 2, f"{writes} counters writes for 10 requests that one lease of 10 holds room for"

    run(scenario())

"""Leased admission under random interleavings: the accounting invariants hold whatever the order.

The three-host load test once caught a budget passed by leased mode (a lease being replaced still
admitted requests). That took real processes and luck; here a seeded store makes every call take a
random number of event-loop turns before and after it acts, so concurrent requests of mixed sizes,
grants, background renewals, idle returns, flushes and minute turns interleave differently per seed.

Invariants, checked while requests are in flight and at the end:

* the row holds exactly what is out: the reservations of admitted requests whose settlement is not
  yet committed, plus every instance's unused lease room (nothing admitted on room the row lacks,
  nothing given back twice);
* afterwards nothing is in flight, the counters equal the sum of the cost rows, every admitted
  request has exactly one row, and the spend never passes the budget (every request costs at most
  its reservation, so the documented overspend bound is zero here).
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib import leases
from gateway_lib.errors import QuotaExceeded, RateLimited
from gateway_lib.leases import LeasedAdmission
from gateway_lib.ledger import table_key
from gateway_lib.quota import Reservation
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_quota import Clock, _no_sleep, cost_rows, counters_of, make_caller, make_row, make_settings, make_tier, run

BUDGET = Decimal("0.060")
SIZES = (Decimal("0.001"), Decimal("0.002"), Decimal("0.005"))


class JitterStore(MemoryTableStore):
    """Each call lets the event loop turn a random number of times before and after it takes effect."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng

    async def _turns(self) -> None:
        for _ in range(self._rng.randrange(4)):
            await asyncio.sleep(0)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        await self._turns()
        found = await super().get(*args, **kwargs)
        await self._turns()
        return found

    async def insert(self, *args: Any, **kwargs: Any) -> Any:
        await self._turns()
        written = await super().insert(*args, **kwargs)
        await self._turns()
        return written

    async def update(self, *args: Any, **kwargs: Any) -> Any:
        await self._turns()
        written = await super().update(*args, **kwargs)
        await self._turns()
        return written

    async def transact(self, *args: Any, **kwargs: Any) -> Any:
        await self._turns()
        written = await super().transact(*args, **kwargs)
        await self._turns()
        return written


@pytest.mark.parametrize("seed", range(30))
def test_leased_accounting_holds_under_random_interleavings(seed: int) -> None:
    async def scenario() -> None:
        rng = random.Random(seed)
        clock, store, now = Clock(), JitterStore(rng), [0.0]
        instances = [LeasedAdmission(store, make_settings(), clock=clock, monotonic=lambda: now[0], sleep=_no_sleep,
                                     rng=random.Random(seed + i), flush_interval=3600) for i in range(3)]
        caller = make_caller(make_tier(requests_per_minute=100_000, usd_per_day=BUDGET))
        pk = table_key(caller.key)
        out: dict[str, Reservation] = {}  # admitted, settlement not yet committed
        settled: dict[str, tuple[LeasedAdmission, Reservation]] = {}
        spent: dict[str, Decimal] = {}
        background: set[asyncio.Task[Any]] = set()

        async def request(name: str) -> None:
            adm = rng.choice(instances)
            try:
                res = await adm.reserve(caller, tokens=10, usd=rng.choice(SIZES), request_id=name)
            except (QuotaExceeded, RateLimited):
                return
            out[name] = res
            for _ in range(rng.randrange(6)):  # the upstream call
                await asyncio.sleep(0)
            cost = (res.usd * Decimal(rng.randint(50, 100)) / 100).quantize(Decimal("0.000001"))
            spent[name] = cost
            await adm.settle(res, make_row(caller, name, clock.now, 3, 4, cost))
            settled[name] = (adm, res)

        def stir() -> None:
            """What the background tick and time do meanwhile, at random moments."""
            roll = rng.random()
            adm = rng.choice(instances)
            if roll < 0.10:
                now[0] += leases.LEASE_IDLE_SECONDS  # everything held goes idle
            elif roll < 0.25:
                background.add(asyncio.ensure_future(adm._return_leases(idle_for=leases.LEASE_IDLE_SECONDS)))
            elif roll < 0.40:
                background.add(asyncio.ensure_future(adm.flush()))
            elif roll < 0.43:
                clock.advance(seconds=60)  # the minute turns: leases stop fitting, remainders go back
            else:
                now[0] += rng.choice((0.001, 0.01, 0.1))

        async def wave(first: int, size: int) -> None:
            tasks = [asyncio.ensure_future(request(f"r{first + i}")) for i in range(size)]
            while not all(t.done() for t in tasks):
                stir()
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            while background or any(adm._tasks for adm in instances):  # renewals, returns, flushes
                await asyncio.gather(*background, *(t for adm in instances for t in adm._tasks))
                background.clear()

        async def assert_row_holds_what_is_out() -> None:
            owed = {name for adm in instances for journal in adm._journals.values() if not journal.team
                    for _, row in journal.entries for name in [row.request_id]}
            uncommitted = [res for name, res in out.items() if name not in settled or name in owed]
            held = sum((lease.usd for adm in instances if (lease := adm._leases.get(pk)) is not None), Decimal(0))
            c = await counters_of(store, caller.key)
            assert c.in_flight_usd == sum((r.usd for r in uncommitted), Decimal(0)) + held, (
                f"seed {seed}: the row holds {c.in_flight_usd}, but {len(uncommitted)} requests and the leases hold "
                f"{sum((r.usd for r in uncommitted), Decimal(0))} + {held}")

        for n in range(4):
            await wave(40 * n, 40)
            await assert_row_holds_what_is_out()
        for adm in instances:
            await adm.aclose()
        c = await counters_of(store, caller.key)
        rows = await cost_rows(store, caller.key)
        assert sorted(r.request_id for r in rows) == sorted(out), "every admitted request has exactly one cost row"
        assert c.in_flight_usd == 0 and c.in_flight_tokens == 0
        total = sum(spent.values(), Decimal(0))
        assert sum((r.cost_usd for r in rows), Decimal(0)) == total
        assert total <= BUDGET, f"seed {seed}: spent {total} of {BUDGET}"
        assert len(out) < 160, "the budget must have refused some requests, or the test proves nothing"

    run(scenario())

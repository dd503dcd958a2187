"""Quota admission, strict and leased, under random interleavings: the accounting holds whatever the order.

The three-host load test once caught a budget passed by leased mode (a lease being replaced still
admitted requests). That took real processes and luck; here a seeded store makes every call take a
random number of event-loop turns before and after it acts, so concurrent requests of mixed sizes from
two callers of one team, on three instances, interleave differently per seed with grants, background
renewals, idle returns, flushes, team refusals and minute and epoch turns; the "lost-replies" cases
also make 8 % of store calls fail, half of them after the write landed; in the "clocks-120s-apart"
cases the second and third instances' clocks run 60 s ahead of and behind the first's. Before the fixes to lease
replacement and to reservation generations, 30 of 30 leased seeds and 1 of 30 strict seeds failed
here. An earlier version, whose clock ran faster against the store's turns, also found the stale
writer marker that ``test_lost_replies.py`` now pins.

Invariants, checked between waves of requests and at the end:

* every caller's row and the team's row hold exactly what is out: the reservations of admitted
  requests whose settlement is not yet committed, plus every instance's unused lease room (nothing
  admitted on room the row lacks, nothing given back twice); with lost replies, never less than that
  (a doubtful reservation may hold its room until it is found to have landed, or its epoch ends);
* afterwards the counters equal the sum of the cost rows, every admitted request has exactly one
  row, the spend never passes a budget (every request costs at most its reservation, so the
  documented overspend bound is zero here), and without faults nothing is left in flight.
"""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.billing.ledger import table_key, usage_table
from gateway_lib.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway_lib.quota import leases
from gateway_lib.quota.admission import Admission, Reservation, tables, team_partition
from gateway_lib.quota.counters import Counters
from gateway_lib.quota.leases import LeasedAdmission
from gateway_lib.quota.overrides import Override, put_override
from gateway_lib.storage.base import StorageUnavailable
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_quota import Clock, _no_sleep, cost_rows, counters_of, make_caller, make_row, make_settings, make_tier, run

BUDGET = Decimal("0.060")  # each caller's daily budget
TEAM_BUDGET = Decimal("0.100")  # both callers' team: less than their budgets together, so it refuses too
SIZES = (Decimal("0.001"), Decimal("0.002"), Decimal("0.005"))


class JitterStore(MemoryTableStore):
    """Each call lets the event loop turn a random number of times before and after it takes effect, and
    with probability ``faults`` fails as unreachable: half of those before acting, half after (a write
    that landed but whose reply was lost)."""

    def __init__(self, rng: random.Random, faults: float = 0.0) -> None:
        super().__init__()
        self._rng, self.faults = rng, faults

    async def _call(self, act: Any, *args: Any, **kwargs: Any) -> Any:
        for _ in range(self._rng.randrange(4)):
            await asyncio.sleep(0)
        roll = self._rng.random()
        if roll < self.faults / 2:
            raise StorageUnavailable("injected: not reached")
        result = await act(*args, **kwargs)
        for _ in range(self._rng.randrange(4)):
            await asyncio.sleep(0)
        if roll < self.faults:
            raise StorageUnavailable("injected: reply lost")
        return result

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call(super().get, *args, **kwargs)

    async def insert(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call(super().insert, *args, **kwargs)

    async def update(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call(super().update, *args, **kwargs)

    async def transact(self, *args: Any, **kwargs: Any) -> Any:
        return await self._call(super().transact, *args, **kwargs)


@pytest.mark.parametrize("skew", [0, 60], ids=["one-clock", "clocks-120s-apart"])
@pytest.mark.parametrize("faults", [0.0, 0.08], ids=["clean", "lost-replies"])
@pytest.mark.parametrize("mode", ["strict", "leased"])
@pytest.mark.parametrize("seed", range(30))
def test_accounting_holds_under_random_interleavings(mode: str, seed: int, faults: float, skew: int) -> None:
    async def scenario() -> None:
        rng = random.Random(seed)
        clock, store, now = Clock(), JitterStore(rng), [0.0]
        await store.ensure_tables(tables("t"))
        await put_override(store, "t", "blue", Override(limits={"usd_per_day": TEAM_BUDGET}), kind="team")
        store.faults = faults
        kind = LeasedAdmission if mode == "leased" else Admission
        extra: dict[str, Any] = {"flush_interval": 3600} if mode == "leased" else {}
        # The instances' clocks: one clock, or three up to 120 s apart (windows and epochs turn at different
        # moments on each; the row only ever rolls forward).
        clocks = [lambda offset=timedelta(seconds=offset): clock.now + offset for offset in (0, skew, -skew)]
        instances = [kind(store, make_settings(), clock=clocks[i], monotonic=lambda: now[0], sleep=_no_sleep,
                          rng=random.Random(seed + i), **extra) for i in range(3)]
        tier = make_tier(requests_per_minute=100_000, usd_per_day=BUDGET)
        callers = [make_caller(tier, app=f"app{i}", team="blue") for i in range(2)]
        out: dict[str, Reservation] = {}  # admitted
        settled: set[str] = set()  # settle() returned
        spent: dict[str, Decimal] = {}
        background: set[asyncio.Task[Any]] = set()

        async def request(name: str) -> None:
            adm, caller = rng.choice(instances), rng.choice(callers)
            try:
                res = await adm.reserve(caller, tokens=10, usd=rng.choice(SIZES), request_id=name)
            except (QuotaExceeded, RateLimited, ServiceUnavailable):
                return
            out[name] = res
            for _ in range(rng.randrange(6)):  # the upstream call
                await asyncio.sleep(0)
            cost = (res.usd * Decimal(rng.randint(50, 100)) / 100).quantize(Decimal("0.000001"))
            spent[name] = cost
            await adm.settle(res, make_row(caller, name, clock.now, 3, 4, cost))
            settled.add(name)

        def stir() -> None:
            """What the background tick and time do meanwhile, at random moments."""
            roll = rng.random()
            adm = rng.choice(instances)
            if roll < 0.25 and isinstance(adm, LeasedAdmission):  # the tick returns idle leases (all, at times)
                idle_for = 0.0 if roll < 0.10 else leases.LEASE_IDLE_SECONDS
                background.add(asyncio.ensure_future(adm._return_leases(idle_for=idle_for)))
            elif roll < 0.40:
                background.add(asyncio.ensure_future(adm.flush()))
            elif roll < 0.43:
                clock.advance(seconds=60)  # the minute turns (and every 15th time the reservation epoch)
            else:
                # Time moves slowly against the store's turns: the 10 s a settle rides out an outage must
                # stay long against the few turns each call takes, as it is against real round trips.
                now[0] += rng.choice((0.0005, 0.001, 0.005))

        def tasks_of(adm: Admission) -> set[asyncio.Task[None]]:
            return adm._tasks if isinstance(adm, LeasedAdmission) else set()

        async def wave(first: int, size: int) -> None:
            tasks = [asyncio.ensure_future(request(f"r{first + i}")) for i in range(size)]
            while not all(t.done() for t in tasks):
                stir()
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            while background or any(tasks_of(adm) for adm in instances):  # renewals, returns, flushes
                await asyncio.gather(*background, *(t for adm in instances for t in tasks_of(adm)))
                background.clear()

        async def assert_row_holds_what_is_out(pk: str, admitted: dict[str, Reservation]) -> None:
            owed = {row.request_id for adm in instances if isinstance(adm, LeasedAdmission)
                    for journal in [adm._journals.get(pk)] if journal is not None for _, row in journal.entries}
            uncommitted = sum((r.usd for name, r in admitted.items() if name not in settled or name in owed),
                              Decimal(0))
            held = sum((lease.usd for adm in instances if isinstance(adm, LeasedAdmission)
                        for lease in [adm._leases.get(pk)] if lease is not None), Decimal(0))
            c = Counters.from_entity(await MemoryTableStore.get(store, usage_table("t"), pk, "counters"))
            # A reserving write whose reply was lost may hold its room until a later read shows it landed
            # (or until its epoch ends): with faults the row may hold more than is out, never less.
            assert c.in_flight_usd == uncommitted + held if not faults else c.in_flight_usd >= uncommitted + held, (
                f"{mode} seed {seed}, row {pk}: it holds {c.in_flight_usd}, but the requests not yet committed "
                f"hold {uncommitted} and the leases {held}")

        for n in range(4):
            await wave(40 * n, 40)
            for caller in callers:
                await assert_row_holds_what_is_out(table_key(caller.key), {
                    name: r for name, r in out.items() if r.caller_key == caller.key})
            await assert_row_holds_what_is_out(team_partition("blue"), out)
        for adm in instances:
            await adm.aclose()
        store.faults = 0.0
        for caller in callers:
            c = await counters_of(store, caller.key)
            rows = await cost_rows(store, caller.key)
            mine = {name for name, r in out.items() if r.caller_key == caller.key}
            assert sorted(r.request_id for r in rows) == sorted(mine), "every admitted request has exactly one row"
            assert faults or (c.in_flight_usd == 0 and c.in_flight_tokens == 0), "nothing left in flight"
            total = sum((spent[name] for name in mine), Decimal(0))
            assert c.day_usd == sum((r.cost_usd for r in rows), Decimal(0)) == total
            assert total <= BUDGET, f"{mode} seed {seed}: {caller.key} spent {total} of {BUDGET}"
        team = await counters_of(store, team_partition("blue"))
        assert faults or team.in_flight_usd == 0
        assert team.day_usd == sum(spent.values(), Decimal(0)) <= TEAM_BUDGET
        assert len(out) < 160, "the budgets must have refused some requests, or the test proves nothing"

    run(scenario())

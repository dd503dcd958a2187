"""Leased mode's lease lifecycle at its edges: a minute turning while a grant or renewal waits for the row, a
graceful shutdown in the middle of a write, a request cancelled during its grant, a team row out of reach, and
a lost reply whose marker later writes pushed out of the row's history. Each test failed before its fix."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

from gateway_lib.billing.ledger import table_key
from gateway_lib.errors import ServiceUnavailable
from gateway_lib.quota import leases
from gateway_lib.quota.admission import team_partition
from gateway_lib.quota.leases import LeasedAdmission
from gateway_lib.storage.base import StorageUnavailable
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_leases import GatedStore, leased, serve
from tests.unit.test_quota import (
    Clock,
    _no_sleep,
    cost_rows,
    counters_of,
    make_caller,
    make_row,
    make_settings,
    make_tier,
    run,
)

# ---- 1. a lease written after its minute turned counts its whole block in the new minute, for good ----------

def test_a_grant_that_lands_after_the_minute_turned_leaves_no_phantom_requests_in_the_new_minute() -> None:
    # A grant waits for the row lock (a journal commit holds it: the documented cause of grant latency) while
    # the minute turns. The block is stamped with the request's old minute but added to the row's new one;
    # given back later, ``released`` skips the minute counts (minute mismatch): the new minute keeps them.
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]  # a busy caller's block
        caller = make_caller(make_tier(requests_per_minute=20))
        pk = table_key(caller.key)
        lock = adm._rows.lock(pk)
        await lock.acquire()  # e.g. a journal commit on the row
        first = asyncio.create_task(adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="r0"))
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(seconds=55)  # 12:00:10 -> 12:01:05 while the grant waits for the row
        lock.release()
        res = await first
        await adm.settle(res, make_row(caller, "r0", clock.now, 3, 4, Decimal("0.0007")))
        served = [await serve(adm, caller, clock, i) for i in range(1, 40)]
        await adm.aclose()
        c = await counters_of(store, caller.key)
        # Strict mode counts r0 in 12:01 (its write landed then) and admits 19 more in 12:01.
        assert 1 + sum(served) == 20, f"only {1 + sum(served)} of 20 requests admitted in the minute"
        assert c.minute_requests == 1 + sum(served), f"row says {c.minute_requests} requests this minute"

    run(scenario())


def test_a_renewal_that_lands_after_the_minute_turned_leaves_no_phantom_requests_in_the_new_minute() -> None:
    # Same, through a background renewal (the usual path for a busy caller at the turn of a minute).
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller(make_tier(requests_per_minute=100))
        pk = table_key(caller.key)
        for i in range(2):  # a lease of 10, 8 left
            assert await serve(adm, caller, clock, i)
        lock = adm._rows.lock(pk)  # e.g. a journal commit on the row
        await lock.acquire()
        assert await serve(adm, caller, clock, 2)  # a quarter used: the renewal waits for the row
        assert adm._leases[pk].renewing
        clock.advance(seconds=55)  # the minute turns before the renewal writes
        lock.release()
        await asyncio.gather(*adm._tasks)
        served = [await serve(adm, caller, clock, i) for i in range(10, 20)]
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert all(served) and len(await cost_rows(store, caller.key)) == 13
        assert c.minute_requests == 10, f"row says {c.minute_requests} requests in a minute that admitted 10"
        assert c.in_flight_tokens == 0

    run(scenario())


# ---- 2. aclose cancels the flusher mid-write ------------------------------------------------------------------

class ReplyLatencyStore(MemoryTableStore):
    """Conditional updates of ``slow_pk`` land, then their reply takes a while (a network round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.slow_pk: str | None = None
        self.in_flight = asyncio.Event()

    async def update(self, table: str, entity: Any, etag: str) -> Any:
        result = await super().update(table, entity, etag)
        if entity.partition_key == self.slow_pk:
            self.slow_pk = None
            self.in_flight.set()
            await asyncio.sleep(0.05)  # the reply is on its way
        return result


def test_a_shutdown_during_a_team_commit_counts_the_team_once() -> None:
    async def scenario() -> None:
        clock, store = Clock(), ReplyLatencyStore()
        adm = LeasedAdmission(store, make_settings(), clock=clock, sleep=_no_sleep, rng=random.Random(7),
                              flush_interval=0.001)
        caller = make_caller(team="blue")
        for i in range(4):
            assert await serve(adm, caller, clock, i)
        store.slow_pk = team_partition("blue")  # the tick's team commit lands; its reply is under way
        await asyncio.wait_for(store.in_flight.wait(), 5)
        await adm.aclose()  # graceful shutdown at that moment
        team = await counters_of(store, team_partition("blue"))
        c = await counters_of(store, caller.key)
        assert c.day_tokens == 28
        assert team.day_tokens == 28, f"team counted {team.day_tokens} tokens for 28 used"

    run(scenario())


def test_a_shutdown_during_an_idle_lease_return_still_gives_the_room_back() -> None:
    async def scenario() -> None:
        clock, store = Clock(), GatedStore()
        now = [0.0]
        adm = LeasedAdmission(store, make_settings(), clock=clock, monotonic=lambda: now[0], sleep=_no_sleep,
                              rng=random.Random(7), flush_interval=0.001)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller()
        assert await serve(adm, caller, clock, 0)
        await adm.flush()
        store.gate = asyncio.Event()
        now[0] += leases.LEASE_IDLE_SECONDS  # the tick finds the lease idle and gives it back
        await asyncio.wait_for(store.held.wait(), 5)  # its write is on the wire
        store.gate.set()
        store.gate = None
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert len(await cost_rows(store, caller.key)) == 1
        assert c.in_flight_tokens == 0, f"{c.in_flight_tokens} tokens left in flight after a graceful shutdown"

    run(scenario())


# ---- 3. a request cancelled (client gone) while its grant is being written --------------------------------------

def test_a_request_cancelled_during_its_grant_does_not_strand_the_old_leases_room() -> None:
    async def scenario() -> None:
        clock, store = Clock(), GatedStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller()
        first = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")  # a lease of 10
        store.gate = asyncio.Event()
        big = asyncio.create_task(adm.reserve(caller, tokens=10, usd=Decimal("0.05"), request_id="b"))
        await store.held.wait()  # the grant's write (giving back the old lease's 9) is under way
        big.cancel()  # the client hung up: Accounting.reserve is not shielded
        await asyncio.gather(big, return_exceptions=True)
        store.gate.set()
        store.gate = None
        await adm.settle(first, make_row(caller, "a", clock.now, 3, 4, Decimal("0.0007")))
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.day_usd == Decimal("0.0007")
        assert (c.in_flight_tokens, c.in_flight_usd) == (0, 0), (
            f"{c.in_flight_tokens} tokens / {c.in_flight_usd} USD stay reserved after every request settled")

    run(scenario())


# ---- 4. a team's storage error leaves the caller's room taken from its lease --------------------------------------

class TeamDownStore(MemoryTableStore):
    def __init__(self) -> None:
        super().__init__()
        self.team_down: str | None = None

    async def get(self, table: str, partition_key: str, row_key: str) -> Any:
        if partition_key == self.team_down:
            raise StorageUnavailable("team row unreachable")
        return await super().get(table, partition_key, row_key)

    async def update(self, table: str, entity: Any, etag: str) -> Any:
        if entity.partition_key == self.team_down:
            raise StorageUnavailable("connection refused")  # not reached: nothing landed
        return await super().update(table, entity, etag)


def test_a_team_storage_error_gives_the_callers_room_back() -> None:
    async def scenario() -> None:
        clock, store = Clock(), TeamDownStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller(team="blue")
        first = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")  # caller and team leases
        adm._leases.pop(team_partition("blue"))  # the team's lease ran out / went back (returned idle)
        store.team_down = team_partition("blue")
        refused = 0
        for i in range(5):
            try:
                await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"x{i}")
            except ServiceUnavailable:
                refused += 1
        assert refused == 5
        store.team_down = None
        await adm.settle(first, make_row(caller, "a", clock.now, 3, 4, Decimal("0.0007")))
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.day_usd == Decimal("0.0007")
        assert c.in_flight_tokens == 0 and c.minute_requests == 1, (
            f"caller row: {c.in_flight_tokens} tokens in flight, {c.minute_requests} requests this minute, "
            "for one admitted request, all settled")

    run(scenario())


# ---- 5. a lease return whose reply was lost, its marker pushed out by other instances' writes ---------------

class CallerReplyLostStore(MemoryTableStore):
    """The next conditional update of ``pk`` lands; before its reply comes back (lost), ``meanwhile`` runs."""

    def __init__(self) -> None:
        super().__init__()
        self.pk: str | None = None
        self.meanwhile: Any = None

    async def update(self, table: str, entity: Any, etag: str) -> Any:
        result = await super().update(table, entity, etag)
        if entity.partition_key == self.pk and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
            raise StorageUnavailable("connection reset after commit")
        return result


def test_a_lease_return_whose_reply_was_lost_is_not_given_back_twice_on_a_busy_row() -> None:
    async def scenario() -> None:
        clock, store = Clock(), CallerReplyLostStore()
        first, second = leased(store, clock), leased(store, clock)
        first._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller()
        pk = table_key(caller.key)
        a = await first.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")  # a lease of 10, 9 left
        second_out: list[Any] = []

        async def busy_row() -> None:  # the caller's traffic on another instance
            for i in range(20):
                res = await second.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"b{i}")
                second_out.append(res)
                await second._return_leases(idle_for=0.0)  # a write per round: grant, then return

        store.pk, store.meanwhile = pk, busy_row
        await first._return_leases(idle_for=0.0)  # gives the 9 back: lands, reply lost, retried
        c = await counters_of(store, caller.key)
        out = a.tokens + sum(r.tokens for r in second_out)
        assert c.in_flight_tokens == out, (
            f"the row holds {c.in_flight_tokens} tokens in flight; the {1 + len(second_out)} admitted, unsettled "
            f"requests hold {out}: the lease's remainder was given back twice")

    run(scenario())

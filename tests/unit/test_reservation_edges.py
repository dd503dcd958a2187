"""Reservations at their edges: a team override read that fails gives the caller's room back, in either mode;
a graceful shutdown waits for the reservation writes of requests the host cancelled, and returns their leases."""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from typing import Any

from gateway_lib.errors import ServiceUnavailable
from gateway_lib.quota.overrides import overrides_table
from gateway_lib.storage.base import StorageUnavailable
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_leases import GatedStore, leased
from tests.unit.test_quota import Clock, counters_of, make_caller, make_row, new_admission, run


class TeamOverrideDownStore(MemoryTableStore):
    """The team's override read fails (the overrides table out of reach), everything else answers."""

    def __init__(self) -> None:
        super().__init__()
        self.override_down = False

    async def get(self, table: str, partition_key: str, row_key: str) -> Any:
        if self.override_down and table == overrides_table("t") and partition_key == "team":
            raise StorageUnavailable("overrides table unreachable")
        return await super().get(table, partition_key, row_key)


def test_strict_a_team_override_read_failure_gives_the_callers_reservation_back() -> None:
    # ce3e44c: "a team row out of reach gives the caller's reservation back". The team's override is read
    # (every OVERRIDE_TTL_SECONDS) before the try in _admit_team: a StorageError there skips the undo.
    async def scenario() -> None:
        clock = Clock()
        store = TeamOverrideDownStore()
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller(team="blue")
        store.override_down = True
        with contextlib.suppress(ServiceUnavailable):
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="x")
        store.override_down = False
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.minute_requests) == (0, 0), (
            f"caller row: {c.in_flight_tokens} tokens in flight, {c.minute_requests} requests this minute "
            "for a request refused 503 (nothing admitted)")

    run(scenario())


def test_leased_a_team_override_read_failure_gives_the_callers_room_back() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = TeamOverrideDownStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller(team="blue")
        first = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")
        adm._overrides.clear()  # the team override's cache entry expired (OVERRIDE_TTL_SECONDS)
        store.override_down = True
        refused = 0
        for i in range(5):
            try:
                await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"x{i}")
            except ServiceUnavailable:
                refused += 1
        assert refused == 5
        store.override_down = False
        await adm.settle(first, make_row(caller, "a", clock.now, 3, 4, Decimal("0.0007")))
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.in_flight_tokens == 0 and c.minute_requests == 1, (
            f"caller row: {c.in_flight_tokens} tokens in flight, {c.minute_requests} requests this minute, "
            "for one admitted request, all settled")

    run(scenario())


def test_a_graceful_shutdown_waits_for_a_cancelled_requests_grant_and_returns_its_lease() -> None:
    # ce3e44c shields the reservation write of a cancelled request and gives its room back when it lands,
    # but aclose() does not wait for that write (nor for _detached give-backs): a host cancels in-flight
    # requests and then runs its shutdown hook, so the grant lands after every lease was returned.
    async def scenario() -> None:
        clock, store = Clock(), GatedStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller()
        first = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")  # a lease of 10
        await adm.settle(first, make_row(caller, "a", clock.now, 3, 4, Decimal("0.0007")))
        await adm.flush()  # a tick committed it
        store.gate = asyncio.Event()
        big = asyncio.create_task(adm.reserve(caller, tokens=10, usd=Decimal("0.05"), request_id="b"))
        await store.held.wait()  # its grant (giving back the old lease's 9) is on the wire
        big.cancel()  # the host cancels the request at shutdown
        await asyncio.gather(big, return_exceptions=True)
        closing = asyncio.create_task(adm.aclose())  # then runs its shutdown hook
        for _ in range(20):
            await asyncio.sleep(0)
        store.gate.set()  # the write's reply arrives
        store.gate = None
        await closing
        for _ in range(20):
            await asyncio.sleep(0)
        c = await counters_of(store, caller.key)
        assert c.day_usd == Decimal("0.0007")
        assert (c.in_flight_tokens, c.in_flight_usd) == (0, 0), (
            f"after a graceful shutdown {c.in_flight_tokens} tokens / {c.in_flight_usd} USD stay reserved; "
            f"leases still held in memory: {adm._leases}")

    run(scenario())


def test_a_give_back_the_outage_outlasts_is_made_once_storage_answers() -> None:
    # The caller's room is given back when its team cannot be admitted; storage goes down just then, for longer
    # than the give-back rides out. Left alone, the room would stay reserved until its epoch ends (up to 30 min).
    class DownAfterTeamRead(TeamOverrideDownStore):
        async def get(self, table: str, partition_key: str, row_key: str) -> Any:
            if self.override_down and table == overrides_table("t") and partition_key == "team":
                self.down = True  # everything, from here on, until the test brings it back
            return await super().get(table, partition_key, row_key)

    async def scenario() -> None:
        store = DownAfterTeamRead()
        ticks = iter(range(10**6))  # each look at the clock a second later: the ride-out gives up in a few tries
        _, adm = await new_admission(store=store, monotonic=lambda: float(next(ticks)))
        caller = make_caller(team="blue")
        store.override_down = True
        with contextlib.suppress(ServiceUnavailable):
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="x")
        store.override_down, store.down = False, False
        assert (await counters_of(store, caller.key)).in_flight_tokens == 10, "the give-back could not be written"
        res = await adm.reserve(make_caller(), tokens=7, usd=Decimal("0.001"), request_id="y")  # reads the row
        assert (await counters_of(store, caller.key)).in_flight_tokens == 7, "only the new request's room is held"
        await adm.settle(res, make_row(make_caller(), "y", Clock().now, 3, 2, Decimal("0.0001")))
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.day_tokens) == (0, 5)
        await adm.aclose()

    run(scenario())

"""Counters writes whose reply is lost: the write may have landed or not, and the row's writer markers tell.

A reserving write that landed while its request was refused (503) must give its room back; a write
retried after a lost reply must not be applied twice.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import table_key, usage_table
from gateway_lib.errors import ServiceUnavailable
from gateway_lib.quota.admission import Admission, Reservation, team_partition
from gateway_lib.quota.counters import WRITERS_KEPT
from gateway_lib.quota.leases import LeasedAdmission
from gateway_lib.storage.base import Entity, StorageUnavailable
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_leases import leased, serve
from tests.unit.test_quota import Clock, counters_of, make_caller, make_row, new_admission, run


class LosesReplies(MemoryTableStore):
    """``lose`` = "after": the next counters update commits, then its reply is lost;
    "before": it fails before reaching the table."""

    def __init__(self) -> None:
        super().__init__()
        self.lose: str | None = None

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        mode, self.lose = self.lose, None
        if mode == "before":
            raise StorageUnavailable("connection refused")
        written = await super().update(table, entity, etag)
        if mode == "after":
            raise StorageUnavailable("connection reset after the write")
        return written


async def _resolved(adm: Admission) -> None:
    for _ in range(200):  # the resolver's first look is 0.5 s after the loss
        if not adm._rows._doubts:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the doubt was never settled")


@pytest.mark.parametrize("lost", ["after", "before"])
def test_a_refused_reservation_whose_write_landed_is_given_back(lost: str) -> None:
    async def scenario() -> None:
        clock, store = Clock(), LosesReplies()
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller()
        first = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="r1")
        store.lose = lost
        with pytest.raises(ServiceUnavailable):
            await adm.reserve(caller, tokens=50, usd=Decimal("0.005"), request_id="r2")
        landed = await counters_of(store, caller.key)
        assert landed.in_flight_tokens == (150 if lost == "after" else 100)
        await _resolved(adm)
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.in_flight_usd, c.minute_requests) == (100, Decimal("0.01"), 1), \
            "only the admitted request stays reserved"
        assert first.accounted
        await adm.aclose()

    run(scenario())


def test_an_undo_retried_after_a_lost_reply_is_applied_once() -> None:
    async def scenario() -> None:
        clock, store = Clock(), LosesReplies()
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller()
        await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="r1")
        res = await adm.reserve(caller, tokens=40, usd=Decimal("0.004"), request_id="r2")
        store.lose = "after"
        await adm._undo(res)
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.minute_requests) == (100, 1), "undone once, not twice"
        await adm.aclose()

    run(scenario())


def test_a_lease_whose_grant_reply_was_lost_is_given_back() -> None:
    async def scenario() -> None:
        clock, store = Clock(), LosesReplies()
        adm: LeasedAdmission = leased(store, clock)
        caller = make_caller()
        assert await serve(adm, caller, clock, 0)  # tables, override, first lease
        adm._leases.clear()  # forget the lease (its room stays on the row): the next request must ask
        store.lose = "after"
        with pytest.raises(ServiceUnavailable):
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="lost")
        await _resolved(adm)
        c = await counters_of(store, caller.key)
        assert c.minute_requests == 1, "the refused request's landed grant was given back"
        await adm.aclose()

    run(scenario())


def test_a_background_renewal_whose_reply_was_lost_leaks_nothing() -> None:
    async def scenario() -> None:
        clock, store = Clock(), LosesReplies()
        adm: LeasedAdmission = leased(store, clock)
        caller = make_caller()
        for i in range(3):  # quick succession: the third request's lease is several requests deep
            assert await serve(adm, caller, clock, i)
        store.lose = "after"  # the next counters write is the renewal, reserved in the background
        served = 3
        while store.lose is not None:
            assert await serve(adm, caller, clock, served)
            served += 1
        for i in range(served, served + 20):
            assert await serve(adm, caller, clock, i)
        await _resolved(adm)
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.in_flight_tokens == 0 and c.in_flight_usd == 0 and c.minute_requests == served + 20

    run(scenario())


class Scripted(MemoryTableStore):
    """Calls on one partition follow a script of (method, action): "lost" (lands, reply lost), "down" (never
    reaches the table), "raced" (another instance writes the row first: the call meets a 412). Calls not
    at the head of the script, or on other partitions, go through."""

    def __init__(self) -> None:
        super().__init__()
        self.partition = ""
        self.script: list[tuple[str, str]] = []

    async def _scripted(self, method: str, pk: str, call: Any) -> Any:
        action = self.script.pop(0)[1] if pk == self.partition and self.script and self.script[0][0] == method else ""
        if action == "down":
            raise StorageUnavailable("injected: not reached")
        if action == "raced":
            row = await super().get(usage_table("t"), pk, "counters")
            assert row is not None
            await super().upsert(usage_table("t"), row)  # same values, new ETag
        result = await call()
        if action == "lost":
            raise StorageUnavailable("injected: reply lost")
        return result

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        return await self._scripted("get", partition_key, lambda: super(Scripted, self).get(table, partition_key, row_key))

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        return await self._scripted("update", entity.partition_key,
                                    lambda: super(Scripted, self).update(table, entity, etag))

    async def transact(self, table: str, ops: Any) -> Any:
        return await self._scripted("transact", ops[0].entity.partition_key,
                                    lambda: super(Scripted, self).transact(table, ops))


async def _team_caller_with_a_reservation() -> tuple[Clock, Scripted, Admission, Caller, Reservation]:
    """A caller of team "blue" with request r1 admitted; the store's script applies to the caller's row."""
    clock, store = Clock(), Scripted()
    _, adm = await new_admission(store=store, clock=clock)
    caller = make_caller(team="blue")
    store.partition = table_key(caller.key)
    return clock, store, adm, caller, await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="r1")


def test_a_settle_whose_reply_was_lost_is_recognised_although_a_give_back_failed_meanwhile() -> None:
    # The settle's re-read also gives back an earlier doubtful reservation; that write met a 412 and the
    # read after it failed. The give-back's marker was left behind and taken for the settle's: the settle
    # was applied again, refused as already done, and the team's counters were never settled.
    async def scenario() -> None:
        clock, store, adm, caller, res = await _team_caller_with_a_reservation()
        store.script = [("update", "lost")]
        with pytest.raises(ServiceUnavailable):  # landed: a doubt to give back on the next read
            await adm.reserve(caller, tokens=50, usd=Decimal("0.005"), request_id="r2")
        adm._rows.remember(store.partition, None)
        store.script = [("get", ""), ("update", "raced"),  # the first read: the give-back meets a 412
                        ("transact", "lost"),  # the settle lands, its reply is lost
                        ("get", ""), ("update", "raced"), ("get", "down")]  # the re-read fails the same way
        done = await adm.settle(res, make_row(caller, "r1", clock.now, 3, 4, Decimal("0.0007")))
        assert not done.already_settled and store.script == []
        c = await counters_of(store, caller.key)
        team = await counters_of(store, team_partition("blue"))
        assert c.day_usd == team.day_usd == Decimal("0.0007"), "settled once, caller and team"
        assert c.in_flight_usd == 0 and c.minute_requests == 1, "the doubtful reservation was given back"
        await adm.aclose()

    run(scenario())


def test_a_settle_whose_landing_was_pushed_out_of_the_rows_history_still_settles_the_team() -> None:
    async def scenario() -> None:
        clock, store, adm, caller, res = await _team_caller_with_a_reservation()
        store.script = [("transact", "lost")]
        real_get = adm._rows.get

        async def get_after_many_writes(pk: str, r: Any) -> Any:  # other instances wrote the row 16 times since
            if pk == store.partition:
                for _ in range(WRITERS_KEPT):
                    await adm._rows.write(await store.get(usage_table("t"), pk, "counters"),
                                           (await counters_of(store, caller.key)).to_entity(pk), r)
            return await real_get(pk, r)

        adm._rows.get = get_after_many_writes  # type: ignore[method-assign,assignment]
        done = await adm.settle(res, make_row(caller, "r1", clock.now, 3, 4, Decimal("0.0007")))
        assert not done.already_settled, "this call's own transaction landed: not a settle made before"
        team = await counters_of(store, team_partition("blue"))
        assert team.day_usd == Decimal("0.0007") and team.in_flight_usd == 0, "the team's counters were settled"
        await adm.aclose()

    run(scenario())


def test_writer_markers_stay_few(monkeypatch: Any) -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller()
        for i in range(40):
            await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id=f"r{i}")
        from gateway_lib.billing import ledger
        from gateway_lib.billing.ledger import usage_table

        row = await store.get(usage_table("t"), ledger.table_key(caller.key), "counters")
        assert row is not None and len(str(row.properties["writers"]).split(",")) == 16

    run(scenario())

"""A write whose reply was lost can land late, after the row was read again: every lost try is looked for.

Two tries of one give-back lose their replies in a row: the first lands only after the re-read, so the second
meets a 412 that nobody sees. The row then shows the first try's marker, not the second's.
"""

from __future__ import annotations

from decimal import Decimal

from gateway_lib.billing.ledger import table_key
from gateway_lib.quota.admission import team_partition
from gateway_lib.storage.base import Entity, PreconditionFailed, StorageUnavailable
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_quota import Clock, counters_of, make_caller, make_row, new_admission, run


class LandsLate(MemoryTableStore):
    """On ``partition``: the first counters update is held and its reply lost; it lands right after the next read
    returns. The second update's 412 (the late landing changed the row) is lost as well."""

    def __init__(self) -> None:
        super().__init__()
        self.partition = ""
        self.held: tuple[str, Entity, str] | None = None
        self.updates = 0

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        found = await super().get(table, partition_key, row_key)
        if self.held is not None and partition_key == self.partition:
            held, self.held = self.held, None
            await super().update(*held)
        return found

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        if entity.partition_key != self.partition:
            return await super().update(table, entity, etag)
        self.updates += 1
        if self.updates == 1:
            self.held = (table, entity, etag)
            raise StorageUnavailable("injected: reply lost, the write still on its way")
        try:
            return await super().update(table, entity, etag)
        except PreconditionFailed:
            if self.updates == 2:
                raise StorageUnavailable("injected: the 412's reply lost") from None
            raise


def test_a_give_back_whose_first_try_landed_late_is_not_applied_again() -> None:
    async def scenario() -> None:
        store = LandsLate()
        _, adm = await new_admission(store=store)
        caller = make_caller()
        await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="r1")
        r2 = await adm.reserve(caller, tokens=40, usd=Decimal("0.004"), request_id="r2")
        store.partition = table_key(caller.key)
        await adm._undo(r2)
        assert store.updates >= 2, "the scenario did not happen"
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.minute_requests) == (100, 1), "r2 given back once, not twice"
        await adm.aclose()

    run(scenario())


def test_a_team_settle_whose_first_try_landed_late_counts_once() -> None:
    async def scenario() -> None:
        store, clock = LandsLate(), Clock()
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller(team="blue")
        res = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="r1")
        store.partition = team_partition("blue")
        await adm.settle(res, make_row(caller, "r1", clock.now, 3, 4, Decimal("0.0007")))
        team = await counters_of(store, team_partition("blue"))
        assert store.updates >= 2, "the scenario did not happen"
        assert (team.day_usd, team.in_flight_usd) == (Decimal("0.0007"), 0), "the team settled once"
        await adm.aclose()

    run(scenario())

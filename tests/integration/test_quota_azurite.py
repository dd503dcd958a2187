"""Admission on Azurite: round trips, idempotent settle, and an outage in the middle of a run."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from gateway_lib.errors import ServiceUnavailable
from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import StorageError
from tests.unit.test_quota import Clock, cost_rows, counters_of, make_caller, make_row, new_admission
from tools.azurite import Azurite

pytestmark = pytest.mark.integration


def test_steady_state_request_costs_two_round_trips_and_settle_is_idempotent(
        azurite_connection_string: str, table_prefix: str) -> None:
    async def scenario() -> None:
        store = AzureTableStore.from_connection_string(azurite_connection_string)
        try:
            clock = Clock()
            _, adm = await new_admission(store, clock, prefix=table_prefix)
            caller = make_caller()
            for i in range(3):
                res = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id=f"r{i}")
                row = make_row(caller, f"r{i}", clock.now, 10, 20, Decimal("0.003"))
                done = await adm.settle(res, row)
            assert done.round_trips == 2 and not done.already_settled  # conditional update + transaction
            assert (await adm.settle(res, row)).already_settled
            c = await counters_of(store, caller.key, table_prefix)
            rows = await cost_rows(store, caller.key, table_prefix)
            assert (c.day_tokens, c.day_usd, c.in_flight_tokens, len(rows)) == (90, Decimal("0.009"), 0, 3)
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_outage_mid_run_refuses_fast_corrupts_nothing_and_recovers(own_azurite: Azurite, table_prefix: str) -> None:
    async def scenario() -> None:
        store = AzureTableStore.from_connection_string(own_azurite.connection_string)
        try:
            clock = Clock()
            ticks = iter(range(10**6))  # each look at the monotonic clock is a second later: the
            # settle below rides out SETTLE_OUTAGE_SECONDS of "time" in a few tries, then gives up
            _, adm = await new_admission(store, clock, prefix=table_prefix, monotonic=lambda: float(next(ticks)))
            caller = make_caller()
            first = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="before")
            await adm.settle(first, make_row(caller, "before", clock.now, 10, 10, Decimal("0.002")))
            in_flight = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="in-flight")

            own_azurite.stop()
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable) as down:
                await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="during")
            assert down.value.status == 503 and time.monotonic() - started < 3
            in_flight_row = make_row(caller, "in-flight", clock.now, 10, 10, Decimal("0.002"))
            with pytest.raises(StorageError):
                await adm.settle(in_flight, in_flight_row)

            own_azurite.start()
            c = await counters_of(store, caller.key, table_prefix)
            assert (c.day_tokens, c.in_flight_tokens) == (20, 100)  # the unsettled reservation is still held
            await adm.settle(in_flight, in_flight_row)  # a retry after recovery counts it exactly once
            after = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="after")
            await adm.settle(after, make_row(caller, "after", clock.now, 10, 10, Decimal("0.002")))
            c = await counters_of(store, caller.key, table_prefix)
            rows = await cost_rows(store, caller.key, table_prefix)
            assert sorted(r.request_id for r in rows) == ["after", "before", "in-flight"]
            assert (c.day_tokens, c.day_usd, c.in_flight_tokens) == (60, Decimal("0.006"), 0)
        finally:
            await store.aclose()

    asyncio.run(scenario())

"""A request's admission ends within its storage deadline even when it must give room back on the way out."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from gateway_lib.errors import ServiceUnavailable
from gateway_lib.quota.admission import team_partition
from gateway_lib.storage import circuit
from gateway_lib.storage.circuit import GuardedStore
from gateway_lib.storage.memory import MemoryTableStore
from tests.unit.test_quota import counters_of, make_caller, new_admission, run

DEADLINE = 0.3


def test_a_team_row_wait_cut_by_the_deadline_answers_in_time_and_still_gives_the_callers_room_back() -> None:
    async def scenario() -> None:
        inner = MemoryTableStore()
        _, adm = await new_admission(store=GuardedStore(inner))
        caller = make_caller(team="red")
        await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="first")
        team_row = adm._rows.lock(team_partition("red"))
        await team_row.acquire()  # another request of the team holds its counters row
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable), circuit.deadline(DEADLINE):
            await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="second")
        took = time.monotonic() - started
        team_row.release()
        assert took < DEADLINE + 0.5, f"answered after {took:.1f} s, past its {DEADLINE} s deadline"
        for _ in range(100):  # the caller's room comes back (in the background if the deadline is spent)
            if (await counters_of(inner, caller.key)).in_flight_tokens == 10:
                break
            await asyncio.sleep(0.02)
        assert (await counters_of(inner, caller.key)).in_flight_tokens == 10, "only the first request stays reserved"
        await adm.aclose()

    run(scenario())

"""Azurite frozen with SIGSTOP for 45 s under one caller's concurrent requests, in strict and leased mode at once.

Each request is answered (served, or 503 storage_unavailable with Retry-After) within the documented bound
(``circuit.REQUEST_SECONDS``, 8 s, plus scheduling slack for a loaded 2-core machine), whatever its place in the
queue for its counters row; both runtimes serve again after the thaw without help, and the ledger balances:
counters equal the sum of the cost rows, nothing left in flight. The scenario: tests/unit/test_storage_outage.py.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.threaded import StorageThread
from tests.unit.test_storage_outage import runtime, scenario_frozen_storage
from tools.azurite import Azurite

pytestmark = pytest.mark.integration

FROZEN_FOR = 45.0
BOUND = 8.0 + 2.0  # circuit.REQUEST_SECONDS, then event-loop scheduling slack on a busy machine


def test_a_45_s_azurite_freeze_answers_every_queued_request_within_the_bound(own_azurite: Azurite,
                                                                             table_prefix: str) -> None:
    async def go() -> None:
        runtimes = {mode: runtime({"GATEWAY_STORAGE_MODE": "table", "GATEWAY_QUOTA_MODE": mode,
                                   "GATEWAY_TABLE_PREFIX": f"{table_prefix}{mode[0]}",
                                   "GATEWAY_STORAGE_CONNECTION_STRING": own_azurite.connection_string})
                    for mode in ("strict", "leased")}
        inner = [getattr(rt.store, "inner", rt.store) for rt in runtimes.values()]
        assert [type(s) for s in inner] == [AzureTableStore, StorageThread]  # the stores production builds
        try:
            await scenario_frozen_storage(runtimes, own_azurite.freeze, own_azurite.thaw, FROZEN_FOR,
                                          bound=BOUND)
        finally:
            for rt in runtimes.values():
                await rt.aclose()

    asyncio.run(go())

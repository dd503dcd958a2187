"""The TableStore contract (tests/unit/test_memory_store.py) against both the fake and Azurite."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import Entity, StorageError, TableStore
from gateway_lib.storage.memory import MemoryTableStore
from gateway_lib.storage.threaded import StorageThread
from tests.unit.test_memory_store import CONTRACT, Scenario
from tools.azurite import connection_string, free_port

pytestmark = pytest.mark.integration


async def _run(scenario: Scenario, store: TableStore, table: str) -> None:
    try:
        await store.ensure_tables([table])
        await scenario(store, table)
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", ["memory", "azurite", "azurite-on-storage-thread"])
@pytest.mark.parametrize("scenario", CONTRACT, ids=[f.__name__ for f in CONTRACT])
def test_contract(scenario: Scenario, backend: str, request: pytest.FixtureRequest, table_prefix: str) -> None:
    if backend == "memory":
        store: TableStore = MemoryTableStore()
    else:
        store = AzureTableStore.from_connection_string(request.getfixturevalue("azurite_connection_string"))
        if backend == "azurite-on-storage-thread":  # leased mode's store: the same contract across the thread
            store = StorageThread(store)
    asyncio.run(_run(scenario, store, table_prefix + "contract"))


def test_refused_connection_fails_fast_as_storage_error() -> None:
    async def scenario() -> float:
        store = AzureTableStore.from_connection_string(connection_string(free_port()))
        started = time.monotonic()
        try:
            with pytest.raises(StorageError):
                await store.get("anytable", "p", "r")
        finally:
            await store.aclose()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 3


def test_unresponsive_storage_times_out_within_the_read_timeout() -> None:
    """A server that accepts but never answers (a hung dependency) must not hang the hot path."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)

        async def scenario() -> float:
            store = AzureTableStore.from_connection_string(connection_string(silent.getsockname()[1]),
                                                           read_timeout=0.5)
            started = time.monotonic()
            try:
                with pytest.raises(StorageError):
                    await store.insert("anytable", Entity("p", "r", {}))
            finally:
                await store.aclose()
            return time.monotonic() - started

        assert asyncio.run(scenario()) < 5  # two attempts (retry_total=1) of 0.5 s plus backoff


def test_round_trips_are_counted_per_request(azurite_connection_string: str, table_prefix: str) -> None:
    async def scenario() -> int:
        store = AzureTableStore.from_connection_string(azurite_connection_string)
        try:
            await store.ensure_tables([table_prefix + "rt"])
            before = store.round_trips
            await store.insert(table_prefix + "rt", Entity("p", "r", {}))
            await store.get(table_prefix + "rt", "p", "r")
            return store.round_trips - before
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == 2

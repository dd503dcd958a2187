"""``bench.azurite_inserts``, the measurement behind docs/benchmarks.md "Table cells and Azurite", runs
against a real Azurite: it inserts what it says and reads Azurite's own CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.azurite_inserts import ROWS_PER_BATCH, measure
from gateway_lib.storage.azure_tables import AzureTableStore
from tools.azurite import Azurite, free_port


def test_it_fills_one_partition_batch_by_batch_and_charges_azurite_cpu(azurite: Azurite, table_prefix: str) -> None:
    table = f"{table_prefix}ins"
    slices = asyncio.run(measure(azurite, batches=10, every=5, table=table))

    assert [rows for rows, _, _ in slices] == [5 * ROWS_PER_BATCH, 10 * ROWS_PER_BATCH]
    assert all(wall > 0 for _, _, wall in slices)
    assert sum(cpu for _, cpu, _ in slices) > 0, "990 inserts cost Azurite no CPU: the /proc reading is wrong"

    async def stored() -> int:
        store = AzureTableStore.from_connection_string(azurite.connection_string)
        try:
            return len(await store.query(table, "caller"))
        finally:
            await store.aclose()

    assert asyncio.run(stored()) == 10 * ROWS_PER_BATCH


def test_the_benchmarks_in_memory_azurite_serves_tables_and_leaves_no_database_behind(tmp_path: Path) -> None:
    with Azurite(free_port(), tmp_path, in_memory=True) as server:
        slices = asyncio.run(measure(server, batches=2, every=2, table="benchinmemory"))
        assert [rows for rows, _, _ in slices] == [2 * ROWS_PER_BATCH]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["azurite.log"], "in memory: no database files saved"

"""Azurite's CPU per inserted row as one partition grows: whether the emulator skews the table cells.

``python -m bench.azurite_inserts [--batches 300] [--every 100]`` starts the project's Azurite in a temporary
folder, commits entity-group transactions of 99 cost-row-sized inserts into one partition (as a leased
journal does for one caller), and prints Azurite's own CPU (its process tree, from /proc) and the wall time
per row for each slice of ``--every`` batches. Azure's Table Storage does not slow with partition size;
Azurite 3.35 did (its insert looked the key up through the PartitionKey index), 3.37 does not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import Entity, Op
from tools.azurite import Azurite, free_port

ROWS_PER_BATCH = 99
TABLE = "benchinserts"


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its direct children (the azurite-table shim runs node)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ticks = 0
    for each in [pid, *map(int, children)]:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def measure(azurite: Azurite, batches: int, every: int, table: str = TABLE) -> list[tuple[int, float, float]]:
    """(rows in the partition after the slice, Azurite CPU µs per row, wall µs per row) per slice."""
    assert azurite.pid is not None, "start Azurite first"
    pid = azurite.pid
    store = AzureTableStore.from_connection_string(azurite.connection_string)
    await store.ensure_tables([table])
    slices, cpu0, wall0 = [], tree_cpu_seconds(pid), time.perf_counter()
    try:
        for batch in range(batches):
            await store.transact(table, [
                Op("insert", Entity("caller", f"led|{batch:06d}|{i:03d}", {"usd": "0.0007", "note": "x" * 200}))
                for i in range(ROWS_PER_BATCH)])
            if (batch + 1) % every == 0:
                cpu1, wall1, rows = tree_cpu_seconds(pid), time.perf_counter(), every * ROWS_PER_BATCH
                slices.append(((batch + 1) * ROWS_PER_BATCH, (cpu1 - cpu0) / rows * 1e6, (wall1 - wall0) / rows * 1e6))
                cpu0, wall0 = cpu1, wall1
    finally:
        await store.aclose()
    return slices


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, Azurite(free_port(), Path(folder)) as azurite:
        slices = asyncio.run(measure(azurite, args.batches, args.every))
    print("rows in the partition | Azurite CPU per row | wall per row")
    for rows, cpu_us, wall_us in slices:
        print(f"{rows:>21,} | {cpu_us:>16.0f} µs | {wall_us:>9.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

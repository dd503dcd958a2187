"""StorageThread: every call runs on the storage loop's thread, and behaves as on the store itself."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from gateway_lib.storage.base import Entity, EntityExists, Op, PreconditionFailed, TableNotFound
from gateway_lib.storage.memory import MemoryTableStore
from gateway_lib.storage.threaded import StorageThread


class Spy(MemoryTableStore):
    """Records the thread of every call; ``hold`` makes ``get`` wait until released or cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()
        self.hold: asyncio.Event | None = None
        self.cancelled = threading.Event()
        self.closed = False

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        self.threads.add(threading.current_thread().name)
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return await super().get(table, partition_key, row_key)

    async def transact(self, table: str, ops: Any) -> list[Entity]:
        self.threads.add(threading.current_thread().name)
        return await super().transact(table, ops)

    async def aclose(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.closed = True


def test_calls_run_on_the_storage_thread_and_answer_as_the_store_does() -> None:
    async def scenario() -> None:
        inner = Spy()
        store = StorageThread(inner)
        await store.ensure_tables(["t"])
        written = await store.insert("t", Entity("p", "r", {"n": 1}))
        assert (await store.get("t", "p", "r")) == written
        with pytest.raises(EntityExists):
            await store.insert("t", Entity("p", "r", {"n": 2}))
        with pytest.raises(PreconditionFailed):
            await store.update("t", Entity("p", "r", {"n": 3}), etag="stale")
        with pytest.raises(TableNotFound):
            await store.get("missing", "p", "r")
        rows = await store.transact("t", [Op("insert", Entity("p", "a", {})), Op("update", written, written.etag)])
        assert [r.row_key for r in rows] == ["a", "r"]
        assert [e.row_key for e in await store.query("t", "p")] == ["a", "r"]
        assert store.round_trips == inner.round_trips > 0
        await store.aclose()
        assert inner.threads == {"table-storage"} and inner.closed
        assert not any(t.name == "table-storage" for t in threading.enumerate()), "the thread ends with the store"
        await store.aclose()  # twice is harmless

    asyncio.run(scenario())


def test_cancelling_a_call_cancels_it_on_the_storage_loop() -> None:
    async def scenario() -> None:
        inner = Spy()
        store = StorageThread(inner)
        await store.ensure_tables(["t"])
        inner.hold = asyncio.Event()  # never set: the call waits on the storage loop
        call = asyncio.ensure_future(store.get("t", "p", "r"))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await asyncio.to_thread(inner.cancelled.wait, 5), "the call on the storage loop was cancelled too"
        inner.hold = None
        await store.aclose()

    asyncio.run(scenario())

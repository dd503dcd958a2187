"""``StorageThread``: a ``TableStore`` whose calls run on an event loop of their own, in a thread.

Leased quota mode writes usage behind the requests: one transaction of up to 100 rows per caller
every 50 ms. On the request loop every step of such a commit would wait its turn behind every request
in flight, and a busy loop would let the journal fall behind. Here the table client lives on a loop
that serves storage only; the request loop just awaits a future. The calls take the same CPU (the GIL
is shared), but a commit no longer waits for a turn among the requests (ADR 0009 has the measurements).

Used in leased mode, where storage calls are background work. Strict mode keeps the store on the
request loop: there every call is on a request's path, and crossing threads would only add to it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from gateway_lib.storage.base import Entity, Op, TableStore

T = TypeVar("T")


class StorageThread:
    """Forwards every ``TableStore`` call to ``inner`` on a dedicated event loop thread.

    ``inner`` must open its connections lazily (the Azure clients do, on the first request), so that
    they belong to the storage loop. Cancelling an awaiting call cancels it on the storage loop too.
    """

    def __init__(self, inner: TableStore, name: str = "table-storage") -> None:
        self._inner = inner
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def round_trips(self) -> int:  # benchmarks read the inner store's count
        return int(getattr(self._inner, "round_trips", 0))

    async def _on_storage_loop(self, call: Awaitable[T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(call), self._loop))

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        return await self._on_storage_loop(self._inner.get(table, partition_key, row_key))

    async def insert(self, table: str, entity: Entity) -> Entity:
        return await self._on_storage_loop(self._inner.insert(table, entity))

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        return await self._on_storage_loop(self._inner.update(table, entity, etag))

    async def upsert(self, table: str, entity: Entity) -> Entity:
        return await self._on_storage_loop(self._inner.upsert(table, entity))

    async def delete(self, table: str, partition_key: str, row_key: str, etag: str | None = None) -> None:
        await self._on_storage_loop(self._inner.delete(table, partition_key, row_key, etag))

    async def query(
        self, table: str, partition_key: str | None = None, *, row_key_from: str | None = None,
        row_key_to: str | None = None, limit: int | None = None,
    ) -> list[Entity]:
        return await self._on_storage_loop(self._inner.query(
            table, partition_key, row_key_from=row_key_from, row_key_to=row_key_to, limit=limit))

    async def transact(self, table: str, ops: Sequence[Op]) -> list[Entity]:
        return await self._on_storage_loop(self._inner.transact(table, ops))

    async def ensure_tables(self, tables: Sequence[str]) -> None:
        await self._on_storage_loop(self._inner.ensure_tables(tables))

    async def ping(self) -> None:
        await self._on_storage_loop(self._inner.ping())

    async def aclose(self) -> None:
        """Close the inner store on its loop, then stop the loop and its thread."""
        if not self._thread.is_alive():
            return
        try:
            await self._on_storage_loop(self._inner.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)
            if not self._thread.is_alive():
                self._loop.close()


async def _awaited(call: Awaitable[T]) -> T:
    """``run_coroutine_threadsafe`` wants a coroutine; the store's methods are declared as awaitables."""
    return await call

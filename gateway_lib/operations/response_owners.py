"""Who made each response a target keeps, and which target keeps it: the ``{prefix}responses`` table.

A target that keeps responses (Azure OpenAI's Responses API) keeps them per resource, not per caller:
anyone holding an id could read or continue it there. The gateway records each kept response's owner
and answers another caller as if the id did not exist. One row per response, its PartitionKey the id
(key-safe, capped at Azure's 1 KiB), RowKey ``owner``. The table is created on first use, so requests
that keep nothing never touch it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway_lib.billing.ledger import capped, table_key
from gateway_lib.storage.base import Entity, EntityExists, TableStore

ROW = "owner"


def responses_table(prefix: str) -> str:
    return f"{prefix}responses"


@dataclass(frozen=True)
class Owner:
    response_id: str
    caller_key: str
    target_id: str
    created: datetime


class ResponseOwners:
    """Records owners and answers "is this caller's" lookups; one per process (it remembers the table exists)."""

    def __init__(self, store: TableStore, prefix: str, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store, self._table, self._clock = store, responses_table(prefix), clock
        self._ready = False

    async def record(self, response_id: str, caller_key: str, target_id: str) -> None:
        """Record a kept response's owner. The first record stands: ids are the upstream's, never the caller's."""
        row = {"response_id": response_id, "caller_key": caller_key, "target_id": target_id, "created": self._clock().isoformat()}
        with suppress(EntityExists):
            await self._store.insert(await self._ensured(), Entity(_key(response_id), ROW, row))

    async def find(self, response_id: str, caller_key: str) -> Owner | None:
        """The response's record if ``caller_key`` made it; None for an unknown id and for another's alike."""
        row = await self._store.get(await self._ensured(), _key(response_id), ROW)
        if row is None or row.properties.get("caller_key") != caller_key:
            return None
        p = row.properties
        return Owner(str(p["response_id"]), str(p["caller_key"]), str(p["target_id"]),
                     datetime.fromisoformat(str(p["created"])))

    async def forget(self, response_id: str) -> None:
        await self._store.delete(await self._ensured(), _key(response_id), ROW)

    async def _ensured(self) -> str:
        if not self._ready:
            await self._store.ensure_tables([self._table])
            self._ready = True
        return self._table


def _key(response_id: str) -> str:
    return capped(table_key(response_id), response_id)

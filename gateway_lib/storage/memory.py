"""``MemoryTableStore``: the reference semantics of ``TableStore``, in process memory.

It behaves like Azure Table Storage where the gateway depends on it: every write gives
the row a new ETag, a conditional update or delete with a stale ETag fails with
``PreconditionFailed``, inserting an existing row fails with ``EntityExists``, an
entity-group transaction is all-or-nothing over <= 100 ops of one partition, and
operations on a table that was never created fail. Each call yields to the event loop
once (as a network call would), so concurrent tasks interleave and the ETag races the
quota code defends against really happen in unit tests.

For tests and benchmarks only: counters in one process's memory would multiply every
limit by the number of Function instances.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal

from gateway_lib.storage.base import (
    Entity,
    EntityExists,
    EntityNotFound,
    Op,
    PreconditionFailed,
    StorageError,
    StorageUnreachable,
    TableNotFound,
    TransactionFailed,
)

MAX_TRANSACTION_OPS = 100
_INT64 = (-(2**63), 2**63 - 1)
# Characters Azure Table keys forbid: / \ # ? and control characters.
_FORBIDDEN_KEY_CHARS = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")
_RESERVED = frozenset(("PartitionKey", "RowKey", "Timestamp", "etag"))

Rows = dict[tuple[str, str], Entity]


def check_key(value: str, what: str) -> None:
    """Reject a key Azure would reject (a 400 there, a ValueError in both stores)."""
    if not isinstance(value, str) or len(value.encode("utf-8")) > 1024 or _FORBIDDEN_KEY_CHARS.search(value):
        raise ValueError(f"invalid {what} {value!r}: at most 1 KiB, no / \\ # ? or control characters")


def normalise_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """The value rules both stores apply: Decimal is stored as a string, None is not stored, ints are Int64."""
    if not _RESERVED.isdisjoint(properties):
        raise ValueError(f"property names {sorted(_RESERVED.intersection(properties))} are reserved")
    out: dict[str, Any] = {}
    for name, value in properties.items():
        kind = type(value)
        # Exact type first: this runs for every property of every row written or read (~30 per counters row).
        if kind is str or kind is bool:
            pass
        elif isinstance(value, int):  # bool is handled above
            if not _INT64[0] <= value <= _INT64[1]:
                raise ValueError(f"property {name!r}: {value} does not fit Edm.Int64")
        elif value is None:
            continue
        elif isinstance(value, Decimal):
            value = format(value, "f")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"property {name!r}: non-finite floats are not stored")
        elif not isinstance(value, str):
            raise TypeError(f"property {name!r}: {type(value).__name__} is not a supported value type")
        out[name] = value
    return out


def check_transaction(ops: Sequence[Op]) -> None:
    """Azure's entity-group rules, checked before anything is sent (programming errors, not storage errors)."""
    if not ops or len(ops) > MAX_TRANSACTION_OPS:
        raise ValueError(f"a transaction holds 1..{MAX_TRANSACTION_OPS} operations, got {len(ops)}")
    if len({op.entity.partition_key for op in ops}) != 1:
        raise ValueError("all operations of a transaction must share one partition key")
    if len({op.entity.row_key for op in ops}) != len(ops):
        raise ValueError("a transaction may touch each row only once")


class MemoryTableStore:
    """In-memory ``TableStore`` with Azure's ETag and transaction semantics."""

    def __init__(self) -> None:
        self._tables: dict[str, Rows] = {}
        self._etags = itertools.count(1)
        self.round_trips = 0  # every call counts as one, like one HTTP request to Azure
        self.down = False  # set True to simulate an outage: every call raises StorageError
        self._thawed: asyncio.Event | None = None  # set by freeze(): calls wait for it

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        rows = await self._rows(table)
        return rows.get((partition_key, row_key))

    async def insert(self, table: str, entity: Entity) -> Entity:
        return self._commit(await self._rows(table), Op("insert", entity))

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        return self._commit(await self._rows(table), Op("update", entity, etag))

    async def upsert(self, table: str, entity: Entity) -> Entity:
        return self._commit(await self._rows(table), Op("upsert", entity))

    async def delete(self, table: str, partition_key: str, row_key: str, etag: str | None = None) -> None:
        """Deleting a missing row is a no-op (as the Azure SDK does); a stale ETag fails with 412."""
        rows = await self._rows(table)
        if (partition_key, row_key) in rows:
            self._commit(rows, Op("delete", Entity(partition_key, row_key), etag))

    async def query(
        self, table: str, partition_key: str | None = None, *, row_key_from: str | None = None,
        row_key_to: str | None = None, limit: int | None = None,
    ) -> list[Entity]:
        rows = await self._rows(table)
        found = [
            e for (pk, rk), e in sorted(rows.items())
            if (partition_key is None or pk == partition_key)
            and (row_key_from is None or rk >= row_key_from) and (row_key_to is None or rk < row_key_to)
        ]
        return found[:limit] if limit is not None else found

    async def transact(self, table: str, ops: Sequence[Op]) -> list[Entity]:
        check_transaction(ops)
        rows = await self._rows(table)
        # Each op touches its own row (check_transaction), so each is checked against the rows as they
        # stand and nothing is written until all have passed: all-or-nothing without copying the table.
        staged = []
        for index, op in enumerate(ops):
            try:
                staged.append(self._staged(rows, op))
            except StorageError as exc:
                raise TransactionFailed(f"{index}: {exc}", index=index, reason=_reason(exc)) from exc
        return [self._write(rows, op, stored) for op, stored in zip(ops, staged, strict=True)]

    async def ensure_tables(self, tables: Sequence[str]) -> None:
        await self._enter()
        for name in tables:
            self._tables.setdefault(name, {})

    async def ping(self) -> None:
        await self._enter()

    async def aclose(self) -> None:
        return None

    def freeze(self) -> None:
        """A frozen server (a stopped process, a node failing over): calls hang until ``thaw``."""
        self._thawed = asyncio.Event()

    def thaw(self) -> None:
        if self._thawed is not None:
            self._thawed.set()
            self._thawed = None

    async def _enter(self) -> None:
        self.round_trips += 1
        await asyncio.sleep(0)  # a real call suspends here: let other tasks run so races interleave
        if self._thawed is not None:
            await self._thawed.wait()
        if self.down:
            raise StorageUnreachable("table storage is unreachable (simulated outage)")

    async def _rows(self, table: str) -> Rows:
        await self._enter()
        if table not in self._tables:
            raise TableNotFound(f"table {table!r} does not exist (TableNotFound)")
        return self._tables[table]

    def _commit(self, rows: Rows, op: Op) -> Entity:
        return self._write(rows, op, self._staged(rows, op))

    def _staged(self, rows: Rows, op: Op) -> Entity | None:
        """Check ``op`` against the stored rows; returns the row it would store (None for a delete)."""
        key = (op.entity.partition_key, op.entity.row_key)
        if op.kind == "insert" and key in rows:
            raise EntityExists(f"entity {key[0]}/{key[1]} already exists")
        if op.kind in ("update", "delete"):
            current = rows.get(key)
            if current is None:
                raise EntityNotFound(f"entity {key[0]}/{key[1]} not found")
            if op.etag is not None and op.etag != "*" and op.etag != current.etag:
                raise PreconditionFailed(f"entity {key[0]}/{key[1]} changed since it was read (412)")
        if op.kind == "delete":
            return None
        check_key(key[0], "PartitionKey")
        check_key(key[1], "RowKey")
        # Read-only view: a caller mutating a returned entity must not change the "stored" row.
        props = MappingProxyType(normalise_properties(op.entity.properties))
        return Entity(key[0], key[1], props, etag=f'W/"{next(self._etags)}"')

    @staticmethod
    def _write(rows: Rows, op: Op, stored: Entity | None) -> Entity:
        key = (op.entity.partition_key, op.entity.row_key)
        if stored is None:
            del rows[key]
            return op.entity
        rows[key] = stored
        return stored


def _reason(exc: StorageError) -> Literal["exists", "precondition", "not_found", "other"]:
    if isinstance(exc, EntityExists):
        return "exists"
    if isinstance(exc, PreconditionFailed):
        return "precondition"
    return "not_found" if isinstance(exc, EntityNotFound) else "other"

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

from .base import (
    Entity,
    EntityExists,
    EntityNotFound,
    Op,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
    TableNotFound,
    TransactionFailed,
)

MAX_TRANSACTION_OPS = 100
_INT64 = (-(2**63), 2**63 - 1)
# Characters Azure Table keys forbid: / \ # ? and control characters.
_FORBIDDEN_KEY_CHARS = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")

Rows = dict[tuple[str, str], Entity]


def check_key(value: str, what: str) -> None:
    """Reject a key Azure would reject (a 400 there, a ValueError in both stores)."""
    if not isinstance(value, str) or len(value.encode("utf-8")) > 1024 or _FORBIDDEN_KEY_CHARS.search(value):
        raise ValueError(f"invalid {what} {value!r}: at most 1 KiB, no / \\ # ? or control characters")


def normalise_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """The value rules both stores apply: Decimal is stored as a string, None is not stored, ints are Int64."""
    out: dict[str, Any] = {}
    for name, value in properties.items():
        if name in ("PartitionKey", "RowKey", "Timestamp", "etag"):
            raise ValueError(f"property name {name!r} is reserved")
        if value is None:
            continue
        if isinstance(value, Decimal):
            value = format(value, "f")
        elif isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"property {name!r}: {value} does not fit Edm.Int64")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"property {name!r}: non-finite floats are not stored")
        elif not isinstance(value, str | int | float | bool):
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

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        rows = await self._rows(table)
        return rows.get((partition_key, row_key))

    async def insert(self, table: str, entity: Entity) -> Entity:
        rows = await self._rows(table)
        return self._insert(rows, entity)

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        rows = await self._rows(table)
        return self._update(rows, entity, etag)

    async def upsert(self, table: str, entity: Entity) -> Entity:
        rows = await self._rows(table)
        return self._write(rows, entity)

    async def delete(self, table: str, partition_key: str, row_key: str, etag: str | None = None) -> None:
        """Deleting a missing row is a no-op (as the Azure SDK does); a stale ETag fails with 412."""
        rows = await self._rows(table)
        if (partition_key, row_key) in rows:
            self._delete(rows, partition_key, row_key, etag)

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
        staged = dict(rows)  # applied to a copy, committed only if every op succeeds: all-or-nothing
        results = []
        for index, op in enumerate(ops):
            try:
                results.append(self._apply(staged, op))
            except StorageError as exc:
                raise TransactionFailed(f"{index}: {exc}", index=index, reason=_reason(exc)) from exc
        rows.clear()
        rows.update(staged)
        return results

    async def ensure_tables(self, tables: Sequence[str]) -> None:
        await self._enter()
        for name in tables:
            self._tables.setdefault(name, {})

    async def ping(self) -> None:
        await self._enter()

    async def aclose(self) -> None:
        return None

    async def _enter(self) -> None:
        self.round_trips += 1
        await asyncio.sleep(0)  # a real call suspends here: let other tasks run so races interleave
        if self.down:
            raise StorageUnavailable("table storage is unreachable (simulated outage)")

    async def _rows(self, table: str) -> Rows:
        await self._enter()
        if table not in self._tables:
            raise TableNotFound(f"table {table!r} does not exist (TableNotFound)")
        return self._tables[table]

    def _apply(self, rows: Rows, op: Op) -> Entity:
        if op.kind == "insert":
            return self._insert(rows, op.entity)
        if op.kind == "update":
            return self._update(rows, op.entity, op.etag)
        if op.kind == "upsert":
            return self._write(rows, op.entity)
        self._delete(rows, op.entity.partition_key, op.entity.row_key, op.etag)
        return op.entity

    def _insert(self, rows: Rows, entity: Entity) -> Entity:
        if (entity.partition_key, entity.row_key) in rows:
            raise EntityExists(f"entity {entity.partition_key}/{entity.row_key} already exists")
        return self._write(rows, entity)

    def _update(self, rows: Rows, entity: Entity, etag: str | None) -> Entity:
        self._check_etag(rows, entity.partition_key, entity.row_key, etag)
        return self._write(rows, entity)

    def _delete(self, rows: Rows, partition_key: str, row_key: str, etag: str | None) -> None:
        self._check_etag(rows, partition_key, row_key, etag)
        del rows[(partition_key, row_key)]

    @staticmethod
    def _check_etag(rows: Rows, partition_key: str, row_key: str, etag: str | None) -> None:
        current = rows.get((partition_key, row_key))
        if current is None:
            raise EntityNotFound(f"entity {partition_key}/{row_key} not found")
        if etag is not None and etag != "*" and etag != current.etag:
            raise PreconditionFailed(f"entity {partition_key}/{row_key} changed since it was read (412)")

    def _write(self, rows: Rows, entity: Entity) -> Entity:
        check_key(entity.partition_key, "PartitionKey")
        check_key(entity.row_key, "RowKey")
        # Read-only view: a caller mutating a returned entity must not change the "stored" row.
        props = MappingProxyType(normalise_properties(entity.properties))
        stored = Entity(entity.partition_key, entity.row_key, props, etag=f'W/"{next(self._etags)}"')
        rows[(entity.partition_key, entity.row_key)] = stored
        return stored


def _reason(exc: StorageError) -> Literal["exists", "precondition", "not_found", "other"]:
    if isinstance(exc, EntityExists):
        return "exists"
    if isinstance(exc, PreconditionFailed):
        return "precondition"
    return "not_found" if isinstance(exc, EntityNotFound) else "other"

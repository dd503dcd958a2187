"""Table storage behind a small protocol.

Two implementations share the exact same semantics: ``AzureTableStore`` (Azure Table
Storage / Azurite through azure-data-tables) and ``MemoryTableStore`` (unit tests and
benchmarks). Every write that changes a counter is conditional on an ETag or is an
insert that fails when the row exists: read-modify-write without a condition loses
updates when many Function instances race.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class StorageError(Exception):
    """Storage unreachable or failing (maps to 503 unless the tier fails open)."""


class StorageUnavailable(StorageError):
    """Storage could not be reached (connection refused, timeout): transient, worth retrying briefly."""


class StorageUnreachable(StorageUnavailable):
    """No connection, or no answer in time: unlike a 5xx answer, a sign that storage itself is down."""


class EntityNotFound(StorageError):
    pass


class TableNotFound(StorageError):
    """The table does not exist: a deployment fault on the hot path, "nothing yet" for readers of optional tables."""


class EntityExists(StorageError):
    """Insert of a row that is already there (the idempotency signal for ledger rows and alert claims)."""


class PreconditionFailed(StorageError):
    """The row's ETag changed since it was read (HTTP 412): re-read and retry."""


class TransactionFailed(StorageError):
    """An entity-group transaction was rejected as a whole; ``index`` is the failing op, ``reason`` its cause."""

    def __init__(self, message: str, *, index: int | None, reason: Literal["exists", "precondition", "not_found", "other"]):
        super().__init__(message)
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class Entity:
    partition_key: str
    row_key: str
    properties: Mapping[str, Any] = field(default_factory=dict)
    etag: str | None = None


@dataclass(frozen=True)
class Op:
    """One operation of an entity-group transaction (all ops share one partition key)."""

    kind: Literal["insert", "update", "upsert", "delete"]
    entity: Entity
    etag: str | None = None  # for update/delete: required match; None = unconditional ("*")


class TableStore(Protocol):
    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None: ...

    async def insert(self, table: str, entity: Entity) -> Entity:
        """Create; raises ``EntityExists`` if the row exists. Returns the entity with its new ETag."""
        ...

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        """Replace iff the stored ETag equals ``etag``; raises ``PreconditionFailed`` / ``EntityNotFound``."""
        ...

    async def upsert(self, table: str, entity: Entity) -> Entity:
        """Insert or replace unconditionally (only for rows no one races on: checkpoints, config)."""
        ...

    async def delete(self, table: str, partition_key: str, row_key: str, etag: str | None = None) -> None: ...

    async def query(
        self, table: str, partition_key: str | None = None, *, row_key_from: str | None = None,
        row_key_to: str | None = None, limit: int | None = None,
    ) -> list[Entity]:
        """Rows of one partition (or all), row keys in [from, to), ascending."""
        ...

    async def transact(self, table: str, ops: Sequence[Op]) -> list[Entity]:
        """Entity-group transaction: all ops (same partition, <= 100) succeed or none does."""
        ...

    async def ensure_tables(self, tables: Sequence[str]) -> None: ...

    async def ping(self) -> None:
        """Cheap reachability check for /api/health; raises ``StorageError``."""
        ...

    async def aclose(self) -> None: ...

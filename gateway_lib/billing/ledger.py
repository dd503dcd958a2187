"""The cost ledger: exactly one ``CostRow`` per request, never any prompt or completion text.

Cost rows live in the caller's partition of ``{prefix}usage``, next to the caller's
counters, so that settling a request (counters + cost row) is one entity-group
transaction. Row keys sort by settle time: ``led|{settled_at}|{request_id}``. The
``{prefix}callers`` directory lists every caller partition, so the budget rollup reads
partitions by key and never scans the table.

A row committed more than ``LATE_AFTER`` after its settle time (a leased journal that
waited out a storage outage) may land behind the budget rollup's checkpoint. It is
written with ``late = True`` and, in the same transaction, a twin under
``lat|{committed_at}|{settled_at}|{request_id}``: keys in commit order, which the rollup reads after a
checkpoint of their own (docs/budgets.md). The twin is an index entry, not a second cost row.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from gateway_lib.auth.identity import Caller
from gateway_lib.storage.base import Entity, TableStore

LEDGER_PREFIX = "led|"
_LEDGER_END = "led}"  # "}" sorts right after "|": the end of the ledger key range
LATE_PREFIX = "lat|"
_LATE_END = "lat}"
# A row committed later than this after its settle time goes through the late index. Must stay well
# under the rollup's settle lag (2 minutes), which covers every row committed on time.
LATE_AFTER = timedelta(seconds=60)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # fixed width (27 chars), so keys sort by time
_KEY_UNSAFE = re.compile(r"[%/\\#?\x00-\x1f\x7f-\x9f]")
_PAGE = 1000
CALLERS_PARTITION = "callers"


def usage_table(prefix: str) -> str:
    return f"{prefix}usage"


def callers_table(prefix: str) -> str:
    return f"{prefix}callers"


def table_key(value: str) -> str:
    """A PartitionKey/RowKey-safe form of ``value``: percent-encodes / \\ # ? % and control characters.

    Injective (``%`` itself is encoded), so two callers never share a partition.
    """
    return _KEY_UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", value)


def capped(key: str, whole: str, limit: int = 1024) -> str:
    """``key`` if it has at most ``limit`` bytes of UTF-8, else its start and a hash of ``whole``: Azure refuses
    a key over 1 KiB, and one built from a token claim (a team name) could pass it. Every key that fits is
    kept as it is, so rows written before the cap keep their keys."""
    raw = key.encode()
    if len(raw) <= limit:
        return key
    return f"{raw[:limit - 17].decode(errors='ignore')}~{hashlib.sha256(whole.encode()).hexdigest()[:16]}"


def ledger_row_key(settled_at: datetime, request_id: str) -> str:
    return f"{LEDGER_PREFIX}{settled_at.astimezone(UTC).strftime(_TIME_FORMAT)}|{table_key(request_id)}"


def late_row_key(committed_at: datetime, ledger_key: str) -> str:
    """``lat|{committed_at}|{settled_at}|{request_id}``: in commit order, and one per cost row even when a client
    reuses its request id (it may send its own ``x-request-id``) within one commit."""
    return f"{LATE_PREFIX}{committed_at.astimezone(UTC).strftime(_TIME_FORMAT)}|{ledger_key.removeprefix(LEDGER_PREFIX)}"


@dataclass(frozen=True)
class CostRow:
    """What one request cost and how it went. Token counts and money only: no content."""

    request_id: str
    time: datetime  # settled_at, UTC; part of the row key
    caller_key: str
    app_id: str
    tenant_id: str
    user_id: str | None
    team: str | None
    label: str | None
    route: str  # e.g. chat.completions
    task: str | None
    alias: str | None  # the model alias served (after any budget downgrade)
    provider: str | None  # who served it; on an error the last provider it was sent to; None: not sent
    model: str | None
    deployment: str | None
    region: str | None
    prompt_tokens_estimated: int
    completion_tokens_estimated: int  # the max_tokens reserved
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    price_version: str  # the catalogue version whose prices were applied
    latency_ms: float
    status: str  # ok | error | cancelled
    http_status: int
    attempts: int = 0  # provider attempts, fallbacks included
    error_code: str | None = None
    accounted: bool = True  # False: admitted fail-open while quota storage was down (not in the counters)
    late: bool = False  # committed over LATE_AFTER after ``time``: the rollup counts it through its twin

    @classmethod
    def for_caller(cls, caller: Caller, **values: Any) -> CostRow:
        """A row with the caller's identity fields filled in."""
        return cls(caller_key=caller.key, app_id=caller.app_id, tenant_id=caller.tenant_id,
                   user_id=caller.user_id, team=caller.team, label=caller.label, **values)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def total_tokens_estimated(self) -> int:
        return self.prompt_tokens_estimated + self.completion_tokens_estimated

    @property
    def partition_key(self) -> str:
        return table_key(self.caller_key)

    @property
    def row_key(self) -> str:
        return ledger_row_key(self.time, self.request_id)

    def to_entity(self) -> Entity:
        props = dict(vars(self))  # shallow: asdict deep-copies
        props["time"] = self.time.astimezone(UTC).strftime(_TIME_FORMAT)
        props["cost_usd"] = format(self.cost_usd, "f")
        props["total_tokens"] = self.total_tokens  # denormalised for ad-hoc queries in Storage Explorer
        if not self.late:
            del props["late"]  # the rare case carries the column; absent reads back as False
        return Entity(self.partition_key, self.row_key, props)

    @classmethod
    def from_entity(cls, entity: Entity) -> CostRow:
        props: Mapping[str, Any] = entity.properties
        # Azure does not store None: an absent optional column reads back as None or its default.
        values: dict[str, Any] = {f.name: props.get(f.name) for f in fields(cls)
                                  if f.name in props or f.default is MISSING}
        values["time"] = datetime.strptime(str(props["time"]), _TIME_FORMAT).replace(tzinfo=UTC)
        values["cost_usd"] = Decimal(str(props["cost_usd"]))
        return cls(**values)


def is_late(row: CostRow, committed_at: datetime) -> bool:
    return row.time < committed_at - LATE_AFTER


def as_committed(rows: Sequence[CostRow], committed_at: datetime) -> tuple[list[CostRow], list[Entity]]:
    """The rows as a transaction at ``committed_at`` writes them: a row settled over ``LATE_AFTER`` before is
    marked late, and its twin in the late index goes into the same transaction. Decide it at each attempt,
    under the row's lock: a wait for the lock must not let a row judged on time land late."""
    marked = [replace(row, late=True) if is_late(row, committed_at) else row for row in rows]
    return marked, [late_twin(row, committed_at) for row in marked if row.late]


def late_twin(row: CostRow, committed_at: datetime) -> Entity:
    """The late index's entry for ``row``: the row's columns under a key in commit order."""
    entity = row.to_entity()
    return Entity(entity.partition_key, late_row_key(committed_at, entity.row_key),
                  {**entity.properties, "ledger_key": entity.row_key,
                   "committed_at": committed_at.astimezone(UTC).strftime(_TIME_FORMAT)})


@dataclass(frozen=True)
class LateRow:
    key: str  # the twin's RowKey: the late index's checkpoint
    committed_at: datetime
    row: CostRow


async def iter_cost_rows(
    store: TableStore, prefix: str, caller_key: str, after_row_key: str | None = None, limit: int = _PAGE,
) -> AsyncIterator[CostRow]:
    """Cost rows of one caller in settle order, strictly after ``after_row_key``, at most ``limit``.

    A rollup checkpoints the last ``row_key`` it processed and passes it back next run.
    """
    async for entity in _range(store, prefix, caller_key, LEDGER_PREFIX, _LEDGER_END, after_row_key, limit):
        yield CostRow.from_entity(entity)


async def iter_late_rows(
    store: TableStore, prefix: str, caller_key: str, after_key: str | None = None, limit: int = _PAGE,
) -> AsyncIterator[LateRow]:
    """The caller's late index in commit order, strictly after ``after_key``, at most ``limit``."""
    async for entity in _range(store, prefix, caller_key, LATE_PREFIX, _LATE_END, after_key, limit):
        committed = datetime.strptime(str(entity.properties["committed_at"]), _TIME_FORMAT).replace(tzinfo=UTC)
        yield LateRow(entity.row_key, committed, CostRow.from_entity(entity))


async def _range(store: TableStore, prefix: str, caller_key: str, first: str, end: str, after: str | None,
                 limit: int) -> AsyncIterator[Entity]:
    start = f"{after} " if after else first  # keys cannot hold control chars: " " is next
    remaining = limit
    while remaining > 0:
        page = await store.query(usage_table(prefix), table_key(caller_key), row_key_from=start,
                                 row_key_to=end, limit=min(remaining, _PAGE))
        for entity in page:
            yield entity
        if len(page) < min(remaining, _PAGE):
            return
        remaining -= len(page)
        start = f"{page[-1].row_key} "


@dataclass(frozen=True)
class CallerEntry:
    partition_key: str
    caller_key: str
    team: str | None
    tier: str | None  # the tier seen first; the rollup uses it for default budgets
    first_seen: str
    tenant_id: str | None = None
    app_name: str | None = None  # readable names from the token that listed the caller (spend reports)
    user_name: str | None = None

    @classmethod
    def of(cls, entity: Entity) -> CallerEntry:
        p = entity.properties
        return cls(entity.row_key, str(p.get("caller_key", entity.row_key)), p.get("team"), p.get("tier"),
                   str(p.get("first_seen", "")), p.get("tenant_id"), p.get("app_name"), p.get("user_name"))


async def list_callers(
    store: TableStore, prefix: str, after: str | None = None, limit: int = _PAGE,
) -> list[CallerEntry]:
    """Caller partitions that have (or may have) cost rows, by partition key, strictly after ``after``."""
    rows = await store.query(callers_table(prefix), CALLERS_PARTITION,
                             row_key_from=f"{after} " if after else None, limit=limit)
    return [CallerEntry.of(e) for e in rows]


class CallerDirectory:
    """``{prefix}callers``: every caller with its current team and tier, remembered per process (~1 round trip
    per caller per process). The rollup budgets a caller by the tier listed here, so a caller that moved to
    another tier or team is listed anew: a caller upgraded from basic must not be blocked at basic's budget.
    Readable names are kept from when the caller was first listed with them (spend reports)."""

    def __init__(self, store: TableStore, prefix: str, max_remembered: int = 100_000) -> None:
        self._store, self._table = store, callers_table(prefix)
        self._seen: dict[str, tuple[str | None, str]] = {}
        self._max = max_remembered

    async def register(self, caller_key: str, team: str | None, tier: str, now: datetime, *,
                       tenant: str | None = None, names: tuple[str | None, str | None] = (None, None)) -> int:
        """List the caller as it is now; returns the storage round trips spent (0 when remembered)."""
        if self._seen.get(caller_key) == (team, tier):
            return 0
        key = table_key(caller_key)
        listed = await self._store.get(self._table, CALLERS_PARTITION, key)
        trips = 1
        old = listed.properties if listed else {}
        named = {"tenant_id": old.get("tenant_id") or tenant, "app_name": old.get("app_name") or names[0],
                 "user_name": old.get("user_name") or names[1]}
        if listed is None or (old.get("team"), old.get("tier")) != (team, tier) or any(
                named[k] != old.get(k) for k in named):
            first_seen = old.get("first_seen") or now.astimezone(UTC).isoformat()
            entity = Entity(CALLERS_PARTITION, key, {"caller_key": caller_key, "team": team, "tier": tier,
                                                     "first_seen": first_seen, **named})
            # Unconditional: instances racing here write what their callers' tokens say; the newest wins.
            await self._store.upsert(self._table, entity)
            trips += 1
        if len(self._seen) >= self._max:
            self._seen.clear()  # bounded memory; the cost is one more read per caller
        self._seen[caller_key] = (team, tier)
        return trips

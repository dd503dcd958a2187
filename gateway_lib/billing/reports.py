"""Spend facts for a date range: the rollup's daily spend rows plus the ledger rows they have not folded in.

A page covers a slice of the callers directory. Per caller it reads the ledger after the rollup's
checkpoint (usually the last few minutes) and the late index after its own checkpoint; a row counts
from there only when its spend row's watermark is below it, so every cost row counts exactly once
whether or not the rollup is halfway through it. Query plan and costs: docs/budgets.md; the choice:
docs/adr/0011-spend-reports-from-daily-rows.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TypeVar

from gateway_lib.billing import ledger
from gateway_lib.billing.alerts import key_part
from gateway_lib.billing.budget import CHECKPOINTS, LATE_CHECKPOINTS
from gateway_lib.billing.rollup_rows import Aggregate, rollup_table
from gateway_lib.billing.spend_index import SpendKey, caller_prefix, settle_day, spend_pk
from gateway_lib.errors import ServiceUnavailable
from gateway_lib.storage.base import Entity, TableStore

T = TypeVar("T")
CONCURRENCY = 16  # storage reads in flight per call
TAIL_LIMIT = 50_000  # ledger rows per caller a call reads past the rollup (50 queries)
_PAGE = 1000


@dataclass(frozen=True)
class Fact:
    """Requests, tokens and USD of one spend key on one day: a spend row, or one ledger row."""

    day: date
    key: SpendKey
    requests: int
    input_tokens: int
    output_tokens: int
    usd: Decimal
    versions: frozenset[str]


@dataclass
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: Decimal = Decimal(0)
    versions: set[str] = field(default_factory=set)

    def add(self, fact: Fact) -> None:
        self.requests += fact.requests
        self.input_tokens += fact.input_tokens
        self.output_tokens += fact.output_tokens
        self.usd += fact.usd
        self.versions |= fact.versions


@dataclass(frozen=True)
class FactPage:
    facts: list[Fact]
    callers: list[ledger.CallerEntry]
    after: str | None  # the directory key to continue after; None: the last page


async def collect(store: TableStore, prefix: str, first: date, last: date, *, after: str | None = None,
                  callers: int = 500, team: str | None = None, caller_key: str | None = None) -> FactPage:
    """The facts of ``first``..``last`` (UTC days, inclusive) for the next ``callers`` callers of the directory
    (or for ``caller_key`` alone); with ``team``, only the facts of that team's cost rows."""
    if caller_key is not None:
        listed, more = [await _entry(store, prefix, caller_key)], False
    else:
        listed = await ledger.list_callers(store, prefix, after=after, limit=callers)
        more = len(listed) == callers
    facts = await _slice_facts(store, prefix, first, last, listed) if listed else []
    if team is not None:
        facts = [f for f in facts if f.key.team == team]
    return FactPage(facts, listed, listed[-1].partition_key if more else None)


async def _entry(store: TableStore, prefix: str, caller_key: str) -> ledger.CallerEntry:
    """The caller's directory entry; its ledger is read even when it is not listed (yet)."""
    key = ledger.table_key(caller_key)
    found = await store.get(ledger.callers_table(prefix), ledger.CALLERS_PARTITION, key)
    return ledger.CallerEntry.of(found) if found else ledger.CallerEntry(key, caller_key, None, None, "")


async def _slice_facts(store: TableStore, prefix: str, first: date, last: date,
                       callers: Sequence[ledger.CallerEntry]) -> list[Fact]:
    keys = {c.caller_key for c in callers}
    parts = sorted(key_part(k) for k in keys)
    gate = asyncio.Semaphore(CONCURRENCY)
    # Checkpoints before daily rows: the rollup writes a batch's daily rows before it moves the checkpoint, so
    # a checkpoint read first never runs ahead of the daily rows read after it (a row is then in one or the
    # other, judged by the watermark the daily row had when it was read).
    checkpoints, late_checkpoints = await asyncio.gather(
        _rollup_range(store, prefix, CHECKPOINTS, parts[0], parts[-1] + "~"),
        _rollup_range(store, prefix, LATE_CHECKPOINTS, parts[0], parts[-1] + "~"))
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    start, end = min(caller_prefix(k) for k in keys), _range_end(keys)
    rows = await _gathered(gate, [_reader(store, prefix, spend_pk(d), start, end) for d in days])
    spend: dict[tuple[date, str], Aggregate] = {}
    facts: list[Fact] = []
    for day, found in zip(days, rows, strict=True):
        for entity in found.values():
            key = SpendKey.from_entity(entity)
            if key.caller_key in keys:
                agg = spend[(day, entity.row_key)] = Aggregate.of(entity)
                facts.append(Fact(day, key, agg.requests, agg.input_tokens, agg.output_tokens, agg.spend,
                                  agg.versions))
    tails = await _gathered(gate, [_tail_reader(store, prefix, c.caller_key, first, last,
                                                _after(checkpoints.get(key_part(c.caller_key))),
                                                _after(late_checkpoints.get(key_part(c.caller_key))))
                                   for c in callers])
    for tail in tails:
        facts.extend(_unapplied(tail, spend))
    return facts


def _reader(store: TableStore, prefix: str, partition: str, start: str, end: str
            ) -> Callable[[], Awaitable[dict[str, Entity]]]:
    return lambda: _rollup_range(store, prefix, partition, start, end)


def _range_end(keys: set[str]) -> str:
    # Callers' spend rows sort by key_part, whose order is not the directory's: read from the least caller
    # prefix to past the greatest, and keep only the slice's callers.
    return max(caller_prefix(k) for k in keys)[:-1] + "}"


async def _rollup_range(store: TableStore, prefix: str, partition: str, start: str, end: str) -> dict[str, Entity]:
    """Entities of one rollup partition with ``start <= RowKey < end``, by RowKey (paged: 1 query per 1,000)."""
    found: dict[str, Entity] = {}
    while True:
        page = await store.query(rollup_table(prefix), partition, row_key_from=start, row_key_to=end, limit=_PAGE)
        found.update((e.row_key, e) for e in page)
        if len(page) < _PAGE:
            return found
        start = f"{page[-1].row_key} "


@dataclass(frozen=True)
class _Pending:
    key: str  # ledger RowKey, or the late index's key
    late: bool
    row: ledger.CostRow


def _tail_reader(store: TableStore, prefix: str, caller_key: str, first: date, last: date, after: str,
                 late_after: str) -> Callable[[], Awaitable[list[_Pending]]]:
    return lambda: _tail(store, prefix, caller_key, first, last, after, late_after)


async def _tail(store: TableStore, prefix: str, caller_key: str, first: date, last: date, after: str,
                late_after: str) -> list[_Pending]:
    """The caller's cost rows in the range the rollup may not have folded in yet: the ledger after its
    checkpoint, and the late index after its own."""
    start = ledger.ledger_row_key(datetime.combine(first, time(), UTC), "")[:-1]  # sorts before that day's rows
    end = ledger.ledger_row_key(datetime.combine(last + timedelta(days=1), time(), UTC), "")
    pending: list[_Pending] = []
    read = 0
    async for row in ledger.iter_cost_rows(store, prefix, caller_key, max(after, start), TAIL_LIMIT):
        read += 1
        if row.row_key >= end:
            break
        if not row.late:  # a late row counts through its twin in the late index, as in the rollup
            pending.append(_Pending(row.row_key, False, row))
    else:
        if read >= TAIL_LIMIT:
            raise _behind()
    late = [r async for r in ledger.iter_late_rows(store, prefix, caller_key, late_after or None, TAIL_LIMIT)]
    if len(late) >= TAIL_LIMIT:
        raise _behind()
    pending += [_Pending(r.key, True, r.row) for r in late if first <= settle_day(r.row.time) <= last]
    return pending


def _after(checkpoint: Entity | None) -> str:
    return str(checkpoint.properties.get("after", "")) if checkpoint else ""


def _behind() -> ServiceUnavailable:
    return ServiceUnavailable("The budget rollup is far behind the ledger; the report would read too many raw cost "
                              "rows. Retry after the next rollup run.", code="rollup_behind", retry_after=300)


def _unapplied(tail: Sequence[_Pending], spend: dict[tuple[date, str], Aggregate]) -> list[Fact]:
    """The tail's rows that their day's spend row has not folded in (judged by its watermark, as the rollup does)."""
    facts = []
    for p in tail:
        key = SpendKey.of(p.row)
        day = settle_day(p.row.time)
        agg = spend.get((day, key.row_key)) or Aggregate()
        if p.key > (agg.late_applied_to if p.late else agg.applied_to):
            versions = frozenset({p.row.price_version} if p.row.price_version else ())
            facts.append(Fact(day, key, 1, p.row.prompt_tokens, p.row.completion_tokens, p.row.cost_usd, versions))
    return facts


async def _gathered(gate: asyncio.Semaphore, calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))

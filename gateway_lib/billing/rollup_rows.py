"""The budget rollup's rows and values: aggregate keys, budgets, callers, cost rows as the rollup reads them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from gateway_lib.billing import ledger
from gateway_lib.billing.alerts import key_part
from gateway_lib.billing.spend_index import SpendKey
from gateway_lib.storage.base import Entity

Clock = Callable[[], datetime]


def rollup_table(prefix: str) -> str:
    return f"{prefix}rollup"


def caller_pk(caller_key: str) -> str:
    return f"caller|{key_part(caller_key)}"


def team_pk(team: str) -> str:
    return f"team|{key_part(team)}"


def model_pk(provider: str, model: str) -> str:
    return f"model|{key_part(provider)}|{key_part(model)}"


@dataclass(frozen=True)
class Budget:
    usd_per_day: Decimal | None = None
    usd_per_month: Decimal | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def for_period(self, period: str) -> Decimal | None:
        return self.usd_per_day if period.startswith("day|") else self.usd_per_month

    def tokens_for_period(self, period: str) -> Decimal | None:
        tokens = self.tokens_per_day if period.startswith("day|") else self.tokens_per_month
        return None if tokens is None else Decimal(tokens)


@dataclass(frozen=True)
class CallerInfo:
    key: str
    tier: str | None = None
    team: str | None = None


class BudgetLookup(Protocol):
    async def caller_budget(self, caller: CallerInfo) -> Budget: ...

    async def team_budget(self, team: str) -> Budget: ...


class Enforcer(Protocol):
    async def restrict(self, caller_key: str, since: datetime, until: datetime) -> bool:
        """Mark the caller blocked/downgraded for the period ``since``..``until``; True if this call changed it."""
        ...

    async def lift_expired(self, now: datetime) -> int:
        """Clear budget restrictions whose period has ended; returns how many were lifted."""
        ...


@dataclass(frozen=True)
class CostRow:
    """What the rollup needs from one ledger row."""

    row_key: str  # the ledger RowKey, or the late index's key for a row that came through it
    settled_at: datetime
    cost: Decimal
    tokens: int
    team: str | None
    provider: str | None
    model: str | None
    late: bool = False  # from the late index: ``row_key`` is measured against ``late_applied_to``
    input_tokens: int = 0
    output_tokens: int = 0
    price_version: str = ""
    spend_key: SpendKey | None = None  # the daily spend row it belongs to (spend_index)

    @classmethod
    def of(cls, row: ledger.CostRow, late_key: str | None = None) -> CostRow:
        return cls(late_key or row.row_key, row.time, row.cost_usd, row.total_tokens, row.team, row.provider,
                   row.model, late=late_key is not None, input_tokens=row.prompt_tokens,
                   output_tokens=row.completion_tokens, price_version=row.price_version, spend_key=SpendKey.of(row))

    @classmethod
    def of_late(cls, late: ledger.LateRow) -> CostRow:
        return cls.of(late.row, late.key)


@dataclass
class RollupReport:
    started: datetime
    callers: int = 0
    callers_processed: int = 0
    rows_applied: int = 0
    late_rows_applied: int = 0  # through the late index
    backlog: bool = False  # the run ended (row budget or deadline) before every caller was drained
    stopped_early: bool = False  # the deadline ended the run; the next one resumes
    alerts_raised: list[str] = field(default_factory=list)
    alerts_delivered: int = 0
    alerts_pending: int = 0
    restricted: list[str] = field(default_factory=list)
    lifted: int = 0
    callers_failed: list[str] = field(default_factory=list)  # skipped this run on an error of their own


@dataclass
class Aggregate:
    spend: Decimal = Decimal(0)
    tokens: int = 0
    requests: int = 0
    first_at: datetime | None = None
    applied_to: str = ""  # last ledger RowKey folded in: the idempotency watermark
    late_applied_to: str = ""  # the same for the late index (its keys are in commit order)
    input_tokens: int = 0
    output_tokens: int = 0
    versions: frozenset[str] = frozenset()  # catalogue versions whose prices the rows carry

    def fresh(self, rows: Sequence[CostRow]) -> list[CostRow]:
        """The rows this aggregate has not folded in yet, each judged by its own watermark."""
        return [r for r in rows if r.row_key > (self.late_applied_to if r.late else self.applied_to)]

    def plus(self, rows: Sequence[CostRow]) -> Aggregate:
        return Aggregate(
            spend=self.spend + sum((r.cost for r in rows), Decimal(0)),
            tokens=self.tokens + sum(r.tokens for r in rows), requests=self.requests + len(rows),
            first_at=min(filter(None, (self.first_at, *(r.settled_at for r in rows)))),
            applied_to=max([self.applied_to, *(r.row_key for r in rows if not r.late)]),
            late_applied_to=max([self.late_applied_to, *(r.row_key for r in rows if r.late)]),
            input_tokens=self.input_tokens + sum(r.input_tokens for r in rows),
            output_tokens=self.output_tokens + sum(r.output_tokens for r in rows),
            versions=self.versions | {r.price_version for r in rows if r.price_version},
        )

    def props(self) -> dict[str, Any]:
        props = {"spend": str(self.spend), "tokens": self.tokens, "requests": self.requests,
                 "first_at": self.first_at.isoformat() if self.first_at else None, "applied_to": self.applied_to,
                 "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        props |= {"versions": json.dumps(sorted(self.versions))} if self.versions else {}
        return props | ({"late_applied_to": self.late_applied_to} if self.late_applied_to else {})

    @classmethod
    def of(cls, entity: Entity | None) -> Aggregate:
        if entity is None:
            return cls()
        p = entity.properties
        first = p.get("first_at")
        return cls(Decimal(p.get("spend", "0")), int(p.get("tokens", 0)), int(p.get("requests", 0)),
                   datetime.fromisoformat(first) if first else None, p.get("applied_to", ""),
                   p.get("late_applied_to", ""), int(p.get("input_tokens", 0)), int(p.get("output_tokens", 0)),
                   frozenset(json.loads(p.get("versions") or "[]")))

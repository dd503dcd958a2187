"""Daily spend rows: what the spend reports read instead of the ledger.

The budget rollup folds every cost row it applies into one row per UTC day x caller x team x
provider x model x operation, in ``{prefix}rollup`` under PK ``spend|YYYYMMDD`` (one partition per
day, so a month across every caller is 31 partition reads). The RowKey starts with the caller, so one
caller's day is a key-range read. These rows carry the same ``applied_to`` watermarks as every other
rollup aggregate: a report adds a ledger row only when its spend row has not folded it in yet
(docs/adr/0011-spend-reports-from-daily-rows.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from gateway_lib.billing import ledger
from gateway_lib.billing.alerts import key_part
from gateway_lib.storage.base import Entity

SPEND_PREFIX = "spend|"
_DIMENSIONS = ("caller_key", "team", "provider", "model", "operation")


def spend_pk(day: date) -> str:
    return f"{SPEND_PREFIX}{day:%Y%m%d}"


def caller_prefix(caller_key: str) -> str:
    """The start every spend RowKey of this caller shares; ``prefix + "}"`` ends its key range."""
    return f"{key_part(caller_key)}|"


def operation_of(row: ledger.CostRow) -> str:
    """The row's operation (chat, generate, embeddings...): its ``operation`` field where rows carry one,
    else the route it came in on."""
    return str(getattr(row, "operation", None) or row.route)


@dataclass(frozen=True)
class SpendKey:
    """The dimensions a spend row is kept by (its day is the partition)."""

    caller_key: str
    team: str | None
    provider: str | None
    model: str | None
    operation: str

    @classmethod
    def of(cls, row: ledger.CostRow) -> SpendKey:
        return cls(row.caller_key, row.team, row.provider, row.model, operation_of(row))

    @classmethod
    def from_entity(cls, entity: Entity) -> SpendKey:
        p = entity.properties
        return cls(str(p["caller_key"]), p.get("team"), p.get("provider"), p.get("model"), str(p["operation"]))

    @property
    def row_key(self) -> str:
        # key_part escapes "|", so the parts never blur into each other; a None part is empty.
        parts = [key_part(self.caller_key)] + [key_part(v or "") for v in
                                               (self.team, self.provider, self.model, self.operation)]
        whole = "|".join(parts)
        return ledger.capped(whole, whole)  # the caller part stays first: its key range still holds

    def props(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _DIMENSIONS}


def settle_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()

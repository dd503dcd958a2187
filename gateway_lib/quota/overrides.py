"""Per-caller (and per-team) overrides: limits that replace the tier's, and the budget status.

Table ``{prefix}overrides``; written by the admin route and by budget enforcement, both
ETag-conditional so neither silently undoes the other. The hot path reads them through
a short per-process cache (see ``quota.OVERRIDE_TTL_SECONDS``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway_lib.billing.ledger import capped, table_key
from gateway_lib.errors import InvalidRequest
from gateway_lib.storage.base import Entity, TableStore

LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month",
               "usd_per_day", "usd_per_month")
STATUSES = ("active", "blocked", "downgraded")
REASON_MAX_CHARS = 500
LIMIT_MAX = 10**15  # far above any real limit; keeps a typo from storing a number no counter compares well with


def overrides_table(prefix: str) -> str:
    return f"{prefix}overrides"


@dataclass(frozen=True)
class Override:
    """Per-caller (or per-team) limits replacing any subset of the tier's, plus the budget status."""

    limits: Mapping[str, int | Decimal] = field(default_factory=dict)
    status: str = "active"  # active | blocked | downgraded (set by budget enforcement)
    alias: str | None = None  # downgraded: the alias requests are routed to instead
    reason: str | None = None
    updated_at: str | None = None
    etag: str | None = None
    updated_by: str | None = None  # caller key of the admin (or "budget" for enforcement)
    status_by: str | None = None  # who set ``status``: only a status the budget set is lifted by it
    status_at: str | None = None  # when ``status`` was set: an admin's "active" holds for the periods then running

    def __post_init__(self) -> None:
        unknown = set(self.limits) - set(LIMIT_NAMES)
        if unknown or self.status not in STATUSES or (self.status == "downgraded" and not self.alias):
            raise ValueError(f"invalid override: unknown limits {sorted(unknown)} or status {self.status!r}")

    def properties(self) -> dict[str, Any]:
        return {**self.limits, "status": self.status, "alias": self.alias, "reason": self.reason,
                # "" rather than None, which Azure does not store: an absent column means a row from before it
                "updated_at": self.updated_at, "updated_by": self.updated_by, "status_by": self.status_by or "",
                "status_at": self.status_at or ""}

    @classmethod
    def from_entity(cls, entity: Entity) -> Override:
        p = entity.properties
        limits = {n: (Decimal(str(p[n])) if n.startswith("usd") else int(p[n])) for n in LIMIT_NAMES if n in p}
        # Rows written before status_by / status_at existed: whoever wrote last set the status, then.
        status_by = p["status_by"] if "status_by" in p else p.get("updated_by")
        status_at = p["status_at"] if "status_at" in p else p.get("updated_at")
        return cls(limits, str(p.get("status", "active")), p.get("alias"), p.get("reason"), p.get("updated_at"),
                   entity.etag, p.get("updated_by"), status_by or None, status_at or None)


def override_key(subject: str, kind: str) -> tuple[str, str]:
    if kind not in ("caller", "team"):
        raise ValueError("override kind is 'caller' or 'team'")
    return kind, capped(table_key(subject), subject)  # a team name from a token claim may pass 1 KiB


async def get_override(store: TableStore, prefix: str, subject: str, kind: str = "caller") -> Override | None:
    """The stored override for a caller key (or team name), uncached: for the admin route."""
    entity = await store.get(overrides_table(prefix), *override_key(subject, kind))
    return Override.from_entity(entity) if entity else None


async def put_override(
    store: TableStore, prefix: str, subject: str, override: Override, kind: str = "caller",
) -> Override:
    """Write an override. With ``override.etag`` the write is conditional: the admin route and budget
    enforcement both edit this row, and the ETag stops one silently undoing the other's change."""
    pk, rk = override_key(subject, kind)
    entity = Entity(pk, rk, override.properties())
    table = overrides_table(prefix)
    written = await (store.update(table, entity, override.etag) if override.etag else store.upsert(table, entity))
    return replace(override, etag=written.etag)


def money_json(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def override_json(subject: str, override: Override | None) -> dict[str, Any]:
    o = override or Override()
    return {"caller": subject, "limits": {k: money_json(v) for k, v in o.limits.items()}, "status": o.status,
            "alias": o.alias, "reason": o.reason, "updated_at": o.updated_at, "updated_by": o.updated_by,
            "status_by": o.status_by, "status_at": o.status_at}


def merge_override(current: Override | None, body: Mapping[str, Any], changed_by: str, now: datetime,
                   aliases: Collection[str] = ()) -> Override:
    """Apply an admin PUT: limits present are set (null removes one), absent fields are kept.

    Keeping absent fields means an admin changing a limit never lifts a budget block by accident.
    ``aliases``: the catalogue's model aliases, one of which a downgrade must name.
    """
    if not isinstance(body, Mapping) or set(body) - {"limits", "status", "alias", "reason"}:
        raise InvalidRequest("Body must be an object with 'limits', 'status', 'alias' and/or 'reason'.")
    changes = body.get("limits") or {}
    if not isinstance(changes, Mapping):
        raise InvalidRequest("'limits' must be an object of limit names to values (null removes one).",
                             param="limits")
    base = current or Override()
    limits = dict(base.limits)
    for name, value in changes.items():
        if value is None:
            limits.pop(name, None)
        else:
            limits[name] = _limit_value(name, value)
    status = body.get("status", base.status)
    alias = body.get("alias", base.alias if status == "downgraded" else None)
    reason = body.get("reason", base.reason)
    if status not in STATUSES or (status == "downgraded" and not alias):
        raise InvalidRequest(f"Invalid override: status must be one of {', '.join(STATUSES)} "
                             "('downgraded' needs an 'alias').", param="status")
    if alias is not None and (not isinstance(alias, str) or alias not in aliases):
        raise InvalidRequest(f"'alias' must name one of the catalogue's model aliases: {', '.join(sorted(aliases))}.",
                             param="alias")
    if reason is not None and (not isinstance(reason, str) or len(reason) > REASON_MAX_CHARS):
        raise InvalidRequest(f"'reason' must be a string of at most {REASON_MAX_CHARS} characters.", param="reason")
    # An admin changing a limit leaves a budget block the budget's to lift; one setting the status owns it.
    # A client sending the whole override back to change a limit repeats the "active" it read: no decision
    # about the status (it must not hold enforcement off). A block or downgrade sent is always the admin's,
    # even when it repeats the budget's: the rollup never lifts a status an admin set.
    changed = "status" in body and (status != base.status or alias != base.alias or status != "active")
    status_by, status_at = (changed_by, now.isoformat()) if changed else (base.status_by, base.status_at)
    return Override(limits, status, alias, reason, now.isoformat(), base.etag, changed_by, status_by, status_at)


def _limit_value(name: str, value: Any) -> int | Decimal:
    if name not in LIMIT_NAMES:
        raise InvalidRequest(f"Unknown limit '{name}'; known: {', '.join(LIMIT_NAMES)}.", param=f"limits.{name}")
    parsed: int | Decimal = -1
    if isinstance(value, bool):
        pass  # True is an int to Python, not a limit to anyone
    elif name.startswith("usd"):
        if isinstance(value, (str, int, float)):
            with contextlib.suppress(InvalidOperation):
                parsed = Decimal(str(value))
    elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):  # 1e6 is an integer too
        parsed = int(value)
    finite = not isinstance(parsed, Decimal) or parsed.is_finite()
    if not finite or not parsed > 0 or parsed > LIMIT_MAX:
        kind = "decimal string" if name.startswith("usd") else "integer"
        raise InvalidRequest(f"Limit '{name}' must be a positive {kind}.", param=f"limits.{name}")
    return parsed

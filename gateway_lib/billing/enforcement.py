"""Budgets and enforcement backed by the overrides table.

``OverrideBudgets`` answers "what is this caller's (team's) budget" for the rollup: the
tier's defaults with the caller's override on top. ``OverrideEnforcer`` writes the
caller's status (blocked / downgraded) when a budget is spent and lifts it when the
period rolls over, never undoing a block an admin set.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import replace
from datetime import datetime

from gateway_lib.billing import ledger
from gateway_lib.billing.alerts import key_part
from gateway_lib.billing.budget import CONFLICT_RETRIES, query_all
from gateway_lib.billing.rollup_rows import Budget, CallerInfo, Clock, rollup_table
from gateway_lib.config.tiers import Tier, TierPolicy
from gateway_lib.quota import counters, overrides
from gateway_lib.storage.base import Entity, EntityExists, EntityNotFound, PreconditionFailed, TableStore

log = logging.getLogger("gateway.budget")


class OverrideBudgets:
    """Caller budget = tier default overlaid by the caller's override; team budget = the team's override."""

    def __init__(self, store: TableStore, prefix: str, tiers: TierPolicy) -> None:
        self._store, self._prefix, self._tiers = store, prefix, tiers
        self._cache: dict[tuple[str, str], Budget] = {}  # one run: a caller is read once, not per slice

    async def caller_budget(self, caller: CallerInfo) -> Budget:
        tier = self._tiers.tiers.get(caller.tier) if caller.tier else None
        return await self._budget(caller.key, "caller", tier)

    async def team_budget(self, team: str) -> Budget:
        return await self._budget(team, "team", None)

    async def _budget(self, subject: str, kind: str, tier: Tier | None) -> Budget:
        if (kind, subject) not in self._cache:
            limits = counters.Limits.of(tier, await overrides.get_override(self._store, self._prefix, subject, kind))
            self._cache[(kind, subject)] = Budget(limits.usd_per_day, limits.usd_per_month, limits.tokens_per_day,
                                                  limits.tokens_per_month)
        return self._cache[(kind, subject)]


class OverrideEnforcer:
    """Sets ``status`` blocked/downgraded in the caller's override at 100 %, and clears it when the period ends.

    Every change is ETag-conditional (or an insert), so an admin editing the same override is never
    silently overwritten. Our restrictions carry ``updated_by="budget"`` and are indexed in
    ``{prefix}rollup`` (PK ``enforced``), which is how the next period finds them to lift; a block an
    admin set (or re-set) is never lifted by us.
    """

    BY = "budget"

    def __init__(self, store: TableStore, prefix: str, mode: str, alias: str | None, clock: Clock) -> None:
        self._store, self._prefix, self._mode, self._alias, self._clock = store, prefix, mode, alias, clock

    async def restrict(self, caller_key: str, since: datetime, until: datetime) -> bool:
        """Restrict the caller for the period ``since``..``until`` its budget is spent in; False when it is
        restricted already, or an admin set it active during that period (the admin's call, until it ends)."""
        await self._index(caller_key, until)  # first: a crash after it leaves a harmless entry, never a stuck block
        status = "downgraded" if self._mode == "downgrade" else "blocked"
        for _ in range(CONFLICT_RETRIES):
            current = await overrides.get_override(self._store, self._prefix, caller_key)
            if current is not None and current.status != "active":
                return False  # already restricted, by us or by an admin
            if current is not None and _let_through_by_an_admin(current, since):
                return False
            now = self._clock().isoformat()
            changed = replace(current or overrides.Override(), status=status,
                              alias=self._alias if status == "downgraded" else None,
                              reason=f"budget spent; until {until.isoformat()}",
                              updated_at=now, updated_by=self.BY, status_by=self.BY, status_at=now)
            try:
                await self._write(caller_key, changed)
                return True
            except (EntityExists, PreconditionFailed):
                continue
        return False

    async def lift_expired(self, now: datetime) -> int:
        lifted = 0
        for mark in await query_all(self._store, rollup_table(self._prefix), "enforced"):
            if datetime.fromisoformat(mark.properties["until"]) > now:
                continue
            lifted += await self._lift(str(mark.properties["caller_key"]))
            with suppress(EntityNotFound, PreconditionFailed):  # a concurrent run lifted or re-indexed it
                await self._store.delete(rollup_table(self._prefix), "enforced", mark.row_key, mark.etag)
        return lifted

    async def _index(self, caller_key: str, until: datetime) -> None:
        table = rollup_table(self._prefix)
        mark = await self._store.get(table, "enforced", key_part(caller_key))
        later = max(until, datetime.fromisoformat(mark.properties["until"])) if mark else until
        await self._store.upsert(table, Entity("enforced", key_part(caller_key),
                                               {"caller_key": caller_key, "until": later.isoformat()}))

    async def _lift(self, caller_key: str) -> int:
        for _ in range(CONFLICT_RETRIES):
            current = await overrides.get_override(self._store, self._prefix, caller_key)
            if current is None or current.status == "active" or current.status_by != self.BY:
                return 0
            now = self._clock().isoformat()
            lifted = replace(current, status="active", alias=None, reason="budget period ended",
                             updated_at=now, updated_by=self.BY, status_by=self.BY, status_at=now)
            try:
                await overrides.put_override(self._store, self._prefix, caller_key, lifted)
                return 1
            except PreconditionFailed:
                continue
        return 0

    async def _write(self, caller_key: str, override: overrides.Override) -> None:
        if override.etag:
            await overrides.put_override(self._store, self._prefix, caller_key, override)
        else:  # no row yet: insert, so a concurrent admin create is not overwritten by an upsert
            entity = Entity("caller", ledger.table_key(caller_key), override.properties())
            await self._store.insert(overrides.overrides_table(self._prefix), entity)


def _let_through_by_an_admin(override: overrides.Override, since: datetime) -> bool:
    """An admin set the caller active while the period was running: enforcement leaves it be until it ends."""
    if override.status_by in (None, OverrideEnforcer.BY) or not override.status_at:
        return False
    return datetime.fromisoformat(override.status_at) >= since

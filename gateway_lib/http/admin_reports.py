"""Spend report routes: /api/admin/spend, /api/admin/callers and /api/admin/chargeback.

Admins see every caller; a caller with the team lead role sees its own team's cost rows and callers only.
The numbers come from ``billing.reports`` (exact: every cost row once) and render in ``report_views``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

from starlette.requests import Request
from starlette.responses import Response

from gateway_lib.auth.identity import Caller
from gateway_lib.billing import ledger, reports
from gateway_lib.billing import report_views as views
from gateway_lib.billing.rollup_rows import rollup_table
from gateway_lib.errors import InvalidRequest, PermissionDenied
from gateway_lib.http import edge
from gateway_lib.http.api import _caller, _int_param, _serve
from gateway_lib.http.edge import Scope
from gateway_lib.quota import admission, counters, overrides
from gateway_lib.runtime import Runtime

DEFAULT_PAGE, MAX_PAGE = 500, 1000  # callers per call: bounded work (docs/budgets.md)


def viewer_team(caller: Caller) -> str | None:
    """None: the caller sees every team (admin); else the one team it leads. 403 for anyone else."""
    if caller.is_admin:
        return None
    if caller.is_team_lead and caller.lead_team:
        return caller.lead_team
    if caller.is_team_lead:
        raise PermissionDenied("The team lead role needs a team in the token (or the tier policy's teams map).")
    raise PermissionDenied("This route needs the gateway admin or team lead app role.")


async def _ready(rt: Runtime) -> None:
    prefix = rt.settings.storage.table_prefix
    await rt.store.ensure_tables([*admission.tables(prefix), rollup_table(prefix)])


async def spend(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        team = viewer_team(await _caller(rt, request, scope))
        q = request.query_params
        first, last = views.parse_range(q.get("from"), q.get("to"))
        dims = views.parse_group_by(q.get("group_by"))
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidRequest("Query parameter 'format' must be json or csv.", param="format")
        query = f"spend|{first}|{last}|{team}"
        await _ready(rt)
        page = await reports.collect(rt.store, rt.settings.storage.table_prefix, first, last, team=team,
                                     after=views.decode_token(q.get("continuation"), query),
                                     callers=_int_param(request, "page_size", DEFAULT_PAGE, 1, MAX_PAGE),
                                     caller_key=q.get("caller") or None)
        token = views.encode_token(page.after, query) if page.after else None
        if fmt == "csv":
            headers = scope.headers() | ({"x-continuation": token} if token else {}) | {
                "content-disposition": f'attachment; filename="spend-{first}-{last}.csv"'}
            return Response(views.spend_csv(dims, page.facts), media_type="text/csv; charset=utf-8",
                            headers=headers)
        return edge.json_response(views.spend_json(first, last, dims, page.facts, token), scope)

    return await _serve(request, "admin_spend", handle, answers=True)


async def callers(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        team = viewer_team(await _caller(rt, request, scope))
        q = request.query_params
        wanted_team, wanted_status = q.get("team"), q.get("status")
        if wanted_status not in (None, "active", "blocked", "downgraded"):
            raise InvalidRequest("Query parameter 'status' must be active, blocked or downgraded.", param="status")
        now = datetime.now(UTC)
        first = date(now.year, now.month, 1)
        query = f"callers|{first}|{team}"
        await _ready(rt)
        prefix = rt.settings.storage.table_prefix
        # A team lead's callers show their spend for its team only: a caller now in the team may have spent
        # for another one earlier in the month (its token named another team then).
        page = await reports.collect(rt.store, prefix, first, now.date(), team=team,
                                     after=views.decode_token(q.get("continuation"), query),
                                     callers=_int_param(request, "page_size", DEFAULT_PAGE, 1, MAX_PAGE))
        shown = [c for c in page.callers if (team is None or c.team == team)
                 and (wanted_team is None or c.team == wanted_team)]
        statuses = await _statuses(rt, shown)
        shown = [c for c in shown if wanted_status is None or statuses[c.caller_key].status == wanted_status]
        data = views.callers_json(shown, statuses, page.facts, rt.settings.budget.alert_thresholds,
                                  f"{first:%Y-%m}")
        token = views.encode_token(page.after, query) if page.after else None
        viewer = {"scope": "all"} if team is None else {"scope": "team", "team": team}
        return edge.json_response({"object": "list", "data": data, "viewer": viewer, "continuation": token}, scope)

    return await _serve(request, "admin_callers", handle, answers=True)


async def _statuses(rt: Runtime, entries: list[ledger.CallerEntry]) -> dict[str, views.CallerStatus]:
    """Each caller's override status and monthly budget (its tier's, overlaid by its override)."""
    prefix, tiers = rt.settings.storage.table_prefix, rt.settings.tiers.tiers
    gate = asyncio.Semaphore(reports.CONCURRENCY)

    async def one(entry: ledger.CallerEntry) -> views.CallerStatus:
        async with gate:
            override = await overrides.get_override(rt.store, prefix, entry.caller_key)
        limits = counters.Limits.of(tiers.get(entry.tier) if entry.tier else None, override)
        return views.CallerStatus(override.status if override else "active", limits.usd_per_month)

    found = await asyncio.gather(*(one(e) for e in entries))
    return {e.caller_key: s for e, s in zip(entries, found, strict=True)}


async def chargeback(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        team = viewer_team(await _caller(rt, request, scope))
        month = request.query_params.get("month")
        first, last = views.parse_month(month)
        await _ready(rt)
        facts: list[reports.Fact] = []
        after: str | None = None
        while True:  # the whole month, a page of callers at a time; a chargeback file is never partial
            page = await reports.collect(rt.store, rt.settings.storage.table_prefix, first, last, after=after,
                                         callers=MAX_PAGE, team=team)
            facts += page.facts
            if (after := page.after) is None:
                break
        body = views.chargeback_csv(str(month), facts)
        return Response(body, media_type="text/csv; charset=utf-8", headers=scope.headers() | {
            "content-disposition": f'attachment; filename="chargeback-{month}.csv"'})

    return await _serve(request, "admin_chargeback", handle, answers=True)


__all__ = ["callers", "chargeback", "spend", "viewer_team"]

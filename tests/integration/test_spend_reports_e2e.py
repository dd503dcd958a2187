"""Spend reports and the dashboard through the whole local stack: callers in two teams call both providers
through the gateway, then the report routes (over real HTTP, real dev tokens) are compared with sums taken
straight from the cost rows in Azurite, and the dashboard is loaded in headless Chromium.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway_lib.billing import alerts, ledger
from gateway_lib.billing.ledger import CostRow
from gateway_lib.config.tiers import default_tiers_json
from gateway_lib.storage.azure_tables import AzureTableStore
from tests.unit.test_reports import expected
from tools.azurite import connection_string as azurite_connection_string
from tools.dev_issuer import DevIssuer, app_id_for
from tools.stack import Ports, Stack

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".local" / "artifacts"
PREFIX = "gw"  # local.settings.example.json's GATEWAY_TABLE_PREFIX
TEAMS = {"rep-red-1": "red", "rep-red-2": "red", "rep-lead-red": "red", "rep-blue-1": "blue", "rep-blue-2": "blue"}
DIMENSIONS = ("team", "caller", "model", "provider", "operation", "day")


def report_tiers() -> str:
    doc = json.loads(default_tiers_json())
    doc["teams"] = {app_id_for(name): team for name, team in TEAMS.items()}
    return json.dumps(doc)


@dataclass
class Seeded:
    stack: Stack
    tokens: dict[str, str]
    today: str

    @property
    def base(self) -> str:
        return self.stack.base_url

    def get(self, path: str, who: str = "admin", **params: Any) -> requests.Response:
        return requests.get(f"{self.base}/{path}", params=params, timeout=60,
                            headers={"Authorization": f"Bearer {self.tokens[who]}"})

    def cost_rows(self) -> list[CostRow]:
        return asyncio.run(_cost_rows(self.stack))


async def _cost_rows(stack: Stack) -> list[CostRow]:
    store = AzureTableStore.from_connection_string(azurite_connection_string(stack.ports.azurite))
    try:
        found = await store.query(ledger.usage_table(PREFIX))
    finally:
        await store.aclose()
    return [CostRow.from_entity(e) for e in found if e.row_key.startswith(ledger.LEDGER_PREFIX)]


async def _raise_alert(stack: Stack, subject: str) -> None:
    store = AzureTableStore.from_connection_string(azurite_connection_string(stack.ports.azurite))
    try:
        await store.ensure_tables([alerts.alerts_table(PREFIX)])
        now = datetime.now(UTC)
        await alerts.claim_alert(store, PREFIX, alerts.Alert("threshold", "caller", subject, f"month|{now:%Y%m}", 50,
                                                             Decimal("1.25"), Decimal("2.00"), now))
        await alerts.claim_alert(store, PREFIX, alerts.Alert("token_threshold", "caller", subject, f"day|{now:%Y%m%d}",
                                                             80, Decimal(81234), Decimal(100000), now))
    finally:
        await store.aclose()


def _tokens(stack: Stack) -> dict[str, str]:
    assert stack.data_dir is not None
    issuer = DevIssuer(stack.data_dir / "dev-issuer")
    user = "5f1c2b4e-0000-4000-8000-00000000a11c"
    return {
        "rep-red-1": issuer.token(caller="rep-red-1", roles=["Gateway.Standard"], version=1),
        "rep-red-2": issuer.token(caller="rep-red-2", scopes=["Gateway.Invoke"], user=user),
        "rep-blue-1": issuer.token(caller="rep-blue-1", roles=["Gateway.Premium"]),
        "rep-blue-2": issuer.token(caller="rep-blue-2", roles=["Gateway.Standard"]),
        "admin": issuer.token(caller="rep-admin", roles=["Gateway.Admin"]),
        "lead": issuer.token(caller="rep-lead-red", roles=["Gateway.Standard", "Gateway.TeamLead"]),
        "plain": issuer.token(caller="rep-plain", roles=["Gateway.Standard"]),
    }


@pytest.fixture(scope="module")
def seeded() -> Iterator[Seeded]:
    stack = Stack(ports=Ports.free(), extra_env={"GATEWAY_TIERS": report_tiers()}).start()
    try:
        tokens = _tokens(stack)
        for n, name in enumerate(["rep-red-1", "rep-red-2", "rep-blue-1", "rep-blue-2"]):
            headers = {"Authorization": f"Bearer {tokens[name]}"}
            for model in ("gpt-4o-mini", "claude-3-haiku")[: 2 if n < 3 else 1]:  # both providers
                for k in range(n + 1):
                    body = {"model": model, "messages": [{"role": "user", "content": f"hello {k} " * (n + 1)}],
                            "max_tokens": 20 + k}
                    r = requests.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
                    assert r.status_code == 200, r.text
            r = requests.post(f"{stack.base_url}/generate", json={"prompt": "Summarise: reports", "task": "summarise"},
                              headers=headers, timeout=60)
            assert r.status_code == 200, r.text
        blue2 = requests.get(f"{stack.base_url}/v1/usage", headers={"Authorization": f"Bearer {tokens['rep-blue-2']}"},
                             timeout=30).json()["caller"]
        r = requests.put(f"{stack.base_url}/admin/limits", params={"caller": blue2}, json={"status": "blocked"},
                         headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=30)
        assert r.status_code == 200, r.text
        asyncio.run(_raise_alert(stack, blue2))
        yield Seeded(stack, tokens, datetime.now(UTC).date().isoformat())
    finally:
        stack.stop()


def _as_sums(rows: list[dict[str, Any]], dims: list[str]) -> dict[tuple[Any, ...], tuple[int, int, int, Decimal]]:
    return {tuple(r[d] for d in dims): (r["requests"], r["input_tokens"], r["output_tokens"], Decimal(r["usd"]))
            for r in rows}


@pytest.mark.parametrize("group_by", [*DIMENSIONS, "team,model", "day,provider", "caller,operation"])
def test_spend_equals_the_cost_rows_for_each_group_by(seeded: Seeded, group_by: str) -> None:
    r = seeded.get("admin/spend", **{"from": seeded.today, "to": seeded.today, "group_by": group_by})
    assert r.status_code == 200, r.text
    body = r.json()
    dims = group_by.split(",")
    rows = seeded.cost_rows()
    day = datetime.now(UTC).date()
    assert (body["from"], body["to"], body["group_by"], body["continuation"]) == (seeded.today, seeded.today, dims, None)
    assert _as_sums(body["rows"], dims) == expected(rows, day, day, dims)
    whole = expected(rows, day, day, [])[()]
    totals = body["totals"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"], Decimal(totals["usd"])) == whole
    assert whole[0] >= 17 and {r.provider for r in rows} >= {"azure_openai", "bedrock"}
    assert {r["team"] for r in seeded.get("admin/spend", **{"from": seeded.today, "to": seeded.today,
                                                             "group_by": "team"}).json()["rows"]} == {"red", "blue"}


def test_the_caller_dimension_is_the_usage_routes_caller_key(seeded: Seeded) -> None:
    key = seeded.get("v1/usage", "rep-red-2").json()["caller"]
    rows = seeded.get("admin/spend", **{"from": seeded.today, "to": seeded.today, "group_by": "caller"}).json()["rows"]
    assert key in {r["caller"] for r in rows}
    one = seeded.get("admin/spend", caller=key, **{"from": seeded.today, "to": seeded.today, "group_by": "model"})
    day = datetime.now(UTC).date()
    mine = [r for r in seeded.cost_rows() if r.caller_key == key]
    assert mine and _as_sums(one.json()["rows"], ["model"]) == expected(mine, day, day, ["model"])


def test_spend_as_csv_has_the_same_numbers(seeded: Seeded) -> None:
    params = {"from": seeded.today, "to": seeded.today, "group_by": "team,provider"}
    as_json = seeded.get("admin/spend", **params).json()["rows"]
    r = seeded.get("admin/spend", **params, format="csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(r.text)))
    assert [(ln["team"], ln["provider"], int(ln["requests"]), ln["usd"]) for ln in lines] == [
        (j["team"] or "", j["provider"] or "", j["requests"], j["usd"]) for j in as_json]


def test_paging_with_a_continuation_token_adds_up_to_the_whole(seeded: Seeded) -> None:
    params = {"from": seeded.today, "to": seeded.today, "group_by": "caller", "page_size": "2"}
    seen: dict[str, int] = {}
    token: str | None = None
    pages = 0
    while True:
        body = seeded.get("admin/spend", **params, **({"continuation": token} if token else {})).json()
        pages += 1
        for row in body["rows"]:
            seen[row["caller"]] = seen.get(row["caller"], 0) + row["requests"]
        if not (token := body["continuation"]):
            break
    assert pages >= 3
    day = datetime.now(UTC).date()
    assert seen == {k[0]: v[0] for k, v in expected(seeded.cost_rows(), day, day, ["caller"]).items()}


@pytest.mark.parametrize(("params", "param"), [
    ({"from": "2026-13-01", "to": "2026-12-01", "group_by": "team"}, "from"),
    ({"from": "2026-03-02", "to": "2026-03-01", "group_by": "team"}, "from"),
    ({"from": "2026-03-01", "to": "2026-03-02", "group_by": "colour"}, "group_by"),
    ({"from": "2026-03-01", "to": "2026-03-02", "group_by": "team,model,day"}, "group_by"),
])
def test_a_bad_range_or_dimension_is_an_openai_shaped_400(seeded: Seeded, params: dict[str, str], param: str) -> None:
    r = seeded.get("admin/spend", **params)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize("path", ["admin/spend?group_by=team&from=2026-03-01&to=2026-03-01", "admin/callers",
                                  "admin/chargeback?month=2026-03"])
def test_a_caller_with_neither_role_gets_403(seeded: Seeded, path: str) -> None:
    r = requests.get(f"{seeded.base}/{path}", headers={"Authorization": f"Bearer {seeded.tokens['plain']}"}, timeout=30)
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


def test_a_team_lead_sees_only_its_team(seeded: Seeded) -> None:
    day = datetime.now(UTC).date()
    body = seeded.get("admin/spend", "lead", **{"from": seeded.today, "to": seeded.today,
                                                 "group_by": "caller"}).json()
    assert _as_sums(body["rows"], ["caller"]) == expected(seeded.cost_rows(), day, day, ["caller"], team="red")
    listed = seeded.get("admin/callers", "lead").json()
    assert listed["data"] and {c["team"] for c in listed["data"]} == {"red"}
    assert listed["viewer"] == {"scope": "team", "team": "red"}
    lines = list(csv.DictReader(io.StringIO(seeded.get("admin/chargeback", "lead", month=seeded.today[:7]).text)))
    assert lines and {ln["team"] for ln in lines} == {"red"}


async def _write_row(stack: Stack, row: CostRow, delete: bool = False) -> None:
    store = AzureTableStore.from_connection_string(azurite_connection_string(stack.ports.azurite))
    try:
        entity = row.to_entity()
        if delete:
            await store.delete(ledger.usage_table(PREFIX), entity.partition_key, entity.row_key)
        else:
            await store.insert(ledger.usage_table(PREFIX), entity)
    finally:
        await store.aclose()


def test_a_team_lead_sees_none_of_another_teams_spend_through_a_caller_that_moved(seeded: Seeded) -> None:
    red1 = next(c for c in seeded.get("admin/callers").json()["data"] if c["app_name"] == "rep-red-1")["caller"]
    mine = next(r for r in seeded.cost_rows() if r.caller_key == red1)
    # Earlier this month the caller's token named team blue: that row is blue's spend, not red's.
    moved = dataclasses.replace(mine, request_id="moved-" + mine.request_id, team="blue", cost_usd=Decimal("7.000001"))
    asyncio.run(_write_row(seeded.stack, moved))
    try:
        month, today = datetime.now(UTC).date().replace(day=1), datetime.now(UTC).date()
        shown = next(c for c in seeded.get("admin/callers", "lead").json()["data"] if c["caller"] == red1)
        requests_, _, _, usd = expected(seeded.cost_rows(), month, today, ["caller"], team="red")[(red1,)]
        assert (shown["month_requests"], Decimal(shown["month_usd"])) == (requests_, usd)
        whole = next(c for c in seeded.get("admin/callers").json()["data"] if c["caller"] == red1)
        assert Decimal(whole["month_usd"]) == usd + moved.cost_usd  # an admin sees all of it
    finally:
        asyncio.run(_write_row(seeded.stack, moved, delete=True))


def test_callers_lists_names_team_tier_status_and_this_months_spend(seeded: Seeded) -> None:
    body = seeded.get("admin/callers").json()
    by_key = {c["caller"]: c for c in body["data"]}
    month = datetime.now(UTC).date().replace(day=1)
    spent = expected(seeded.cost_rows(), month, datetime.now(UTC).date(), ["caller"])
    for (key,), (requests_, _, _, usd) in spent.items():
        assert (by_key[key]["month_requests"], Decimal(by_key[key]["month_usd"])) == (requests_, usd)
    red1 = next(c for c in body["data"] if c["app_name"] == "rep-red-1")  # v1 token: the app's display name
    assert (red1["team"], red1["tier"], red1["status"], red1["user_name"]) == ("red", "standard", "active", None)
    red2 = next(c for c in body["data"] if c["user_name"] == "rep-red-2")  # delegated: the user's name
    assert red2["app_name"] == app_id_for("rep-red-2") and red2["tenant_id"] == red2["caller"].split(":")[0]
    blocked = seeded.get("admin/callers", status="blocked").json()["data"]
    assert [c["team"] for c in blocked] == ["blue"] and blocked[0]["status"] == "blocked"
    assert {c["team"] for c in seeded.get("admin/callers", team="blue").json()["data"]} == {"blue"}


def test_chargeback_is_per_team_exact_reproducible_and_stamped(seeded: Seeded) -> None:
    month = seeded.today[:7]
    first = seeded.get("admin/chargeback", month=month)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/csv")
    assert seeded.get("admin/chargeback", month=month).content == first.content
    lines = list(csv.DictReader(io.StringIO(first.text)))
    day = datetime.now(UTC).date()
    want = expected(seeded.cost_rows(), day.replace(day=1), day, ["team", "provider", "model"])
    got = {(ln["team"] or None, ln["provider"] or None, ln["model"] or None):
           (int(ln["requests"]), int(ln["input_tokens"]), int(ln["output_tokens"]), Decimal(ln["usd"]))
           for ln in lines if ln["provider"] != "*"}
    assert got == want
    versions = {r.price_version for r in seeded.cost_rows()}
    assert all(set(ln["catalogue_versions"].split()) <= versions and ln["catalogue_versions"] for ln in lines
               if ln["provider"] == "*")


# --- the dashboard in a real browser ----------------------------------------------------------------------

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,2400"]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()) or shutil.which("chromedriver") is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium and chromium-driver are required under CI (make browser installs them)")
        pytest.skip("Chromium/chromium-driver not installed (make browser installs them with apt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _table(driver: Any, table_id: str) -> list[dict[str, str]]:
    from selenium.webdriver.common.by import By

    return [{td.get_attribute("data-key"): td.text for td in tr.find_elements(By.TAG_NAME, "td")}
            for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]


def test_dashboard_in_headless_chromium_shows_the_apis_numbers(seeded: Seeded, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{seeded.base}/admin/dashboard")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "dev-sign-in").is_displayed())
    browser.find_element(By.ID, "dev-token").send_keys(seeded.tokens["admin"])
    browser.find_element(By.ID, "use-token").click()
    WebDriverWait(browser, 60).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true"
        or "Could not" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true", \
        browser.find_element(By.ID, "status").text
    first = browser.find_element(By.ID, "from").get_attribute("value")
    last = browser.find_element(By.ID, "to").get_attribute("value")
    rng = {"from": first, "to": last}

    def spend(group_by: str) -> dict[str, Any]:
        r = seeded.get("admin/spend", **rng, group_by=group_by)
        assert r.status_code == 200, r.text
        return r.json()

    totals = spend("team")["totals"]
    shown = [browser.find_element(By.ID, i).text for i in ("total-requests", "total-input", "total-output", "total-usd")]
    assert shown == [str(totals["requests"]), str(totals["input_tokens"]), str(totals["output_tokens"]), totals["usd"]]
    for table, dim in (("by-team", "team"), ("by-model", "model")):
        api = [{dim: r[dim] or "", "requests": str(r["requests"]), "usd": r["usd"]} for r in spend(dim)["rows"]]
        assert _table(browser, table) == api, table
    by_caller = sorted(spend("caller")["rows"], key=lambda r: (-Decimal(r["usd"]), r["caller"]))[:10]
    top = _table(browser, "top-callers")
    assert [(t["caller"], t["requests"], t["input_tokens"], t["output_tokens"], t["usd"]) for t in top] == [
        (r["caller"], str(r["requests"]), str(r["input_tokens"]), str(r["output_tokens"]), r["usd"]) for r in by_caller]
    callers = seeded.get("admin/callers", page_size="1000").json()["data"]
    budgets = _table(browser, "budgets")
    assert [(b["caller"], b["status"], b["month_usd"], b["budget_usd_per_month"], b["budget_used_percent"])
            for b in budgets] == [
        (c["caller"], c["status"], c["month_usd"], c["budget_usd_per_month"] or "",
         "" if c["budget_used_percent"] is None else _js_number(c["budget_used_percent"])) for c in callers]
    assert "blocked" in {b["status"] for b in budgets}
    alerts_api = seeded.get("admin/alerts", limit="20").json()["data"]
    shown_alerts = _table(browser, "alerts")
    assert {a["unit"] for a in alerts_api} == {"usd", "tokens"}  # a token alert says tokens, not USD
    assert [(a["subject"], a["kind"], a["spent"], a["budget"], a["unit"], a["threshold"]) for a in shown_alerts] == [
        (a["subject"], a["kind"], a.get("spend_usd", a.get("tokens")), a.get("budget_usd", a.get("budget_tokens")),
         a["unit"], str(a["threshold"])) for a in alerts_api]
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-team svg rect") and \
        browser.find_elements(By.CSS_SELECTOR, "#chart-model svg rect")
    by_day = spend("day")["rows"]
    peak = max(by_day, key=lambda r: Decimal(r["usd"]))["usd"]  # the charts' scale: the busiest day's total
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".chart svg text.peak")]
    assert len(labels) == 2 and all(Decimal(x.removeprefix("$")) == Decimal(peak) for x in labels), (labels, peak)
    bars = [e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, "#chart-team svg rect title")]
    assert sorted(bars) == sorted(f"{r['day']} {r['team'] or '(none)'}: ${r['usd']}" for r in spend("day,team")["rows"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


# Every request the page makes asks for pages of one caller, and the blob the download saves is kept.
_ONE_CALLER_PAGES = """
const fetched = window.fetch;
window.fetch = (url, options) => fetched(url + "&page_size=1", options);
const objectUrl = URL.createObjectURL;
URL.createObjectURL = (blob) => { window.savedBlob = blob; return objectUrl(blob); };
"""


def test_dashboard_download_holds_every_page_of_the_report(seeded: Seeded, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{seeded.base}/admin/dashboard")
    browser.execute_script("sessionStorage.setItem('gateway.devToken', arguments[0])", seeded.tokens["admin"])
    browser.refresh()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    browser.execute_script(_ONE_CALLER_PAGES)
    browser.find_element(By.ID, "download").click()
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return !!window.savedBlob"))
    text = browser.execute_async_script("window.savedBlob.text().then(arguments[arguments.length - 1])")
    lines = list(csv.DictReader(io.StringIO(text)))
    day = datetime.now(UTC).date()
    got = {(ln["day"], ln["caller"]): (int(ln["requests"]), int(ln["input_tokens"]), int(ln["output_tokens"]),
                                       Decimal(ln["usd"])) for ln in lines}
    assert len(got) == len(lines), "a line repeated across pages"
    assert got == {(d.isoformat(), c): v for (d, c), v in _by_day_caller(seeded.cost_rows(), day).items()}


def _by_day_caller(rows: list[CostRow], day: Any) -> dict[tuple[Any, str], tuple[int, int, int, Decimal]]:
    return {(day, caller): v for (caller,), v in expected(rows, day, day, ["caller"]).items()}


def _js_number(value: float) -> str:
    """How the page's String(n) renders a JSON number."""
    return str(int(value)) if value == int(value) else repr(value)


def test_the_dashboard_and_its_assets_come_from_the_app_itself(seeded: Seeded) -> None:
    page = requests.get(f"{seeded.base}/admin/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp.replace("https://login.microsoftonline.com", "")
    assert '"mode": "dev-token"' in page.text  # the local audience names no Entra client id
    msal = requests.get(f"{seeded.base}/admin/dashboard/assets/msal-browser.min.js", timeout=30)
    assert msal.status_code == 200 and msal.headers["content-type"].startswith("text/javascript")
    assert msal.content.startswith(b"/*! @azure/msal-browser")
    for name in ("dashboard.js", "dashboard.css"):
        assert requests.get(f"{seeded.base}/admin/dashboard/assets/{name}", timeout=30).status_code == 200
    for name in ("index.html", "..%2Fdashboard_page.py", "LICENSE", "nope.js"):
        assert requests.get(f"{seeded.base}/admin/dashboard/assets/{name}", timeout=30).status_code == 404, name

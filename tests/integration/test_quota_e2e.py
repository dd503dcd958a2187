"""Quotas over real HTTP: rate limits, budgets, the usage view, admin overrides, settlement of
failed, cut and abandoned requests, and a quota-storage outage (fail closed, then recover).

Own stacks: tiny test tiers (``GATEWAY_TIERS``) and an Azurite that gets stopped must never
touch the shared session stack. Every test uses its own caller, so counters never mix.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import requests

from gateway_lib.billing.ledger import CostRow, iter_cost_rows, table_key, usage_table
from gateway_lib.config.tiers import default_tiers_json
from gateway_lib.quota.counters import COUNTERS_ROW, Counters
from gateway_lib.storage.azure_tables import AzureTableStore
from tests.stack_fixture import Sim, cleared_sim
from tools.dev_issuer import DevIssuer
from tools.stack import Ports, Stack, azurite_connection_string

pytestmark = pytest.mark.integration

PREFIX = "gw"  # GATEWAY_TABLE_PREFIX of local.settings.example.json
TINY_BUDGET = Decimal("0.00003")  # ~2 gpt-4o-mini requests at max_tokens=16


def quota_tiers() -> str:
    """The default tiers plus a 3-requests-per-minute tier and a tiny-USD-budget tier."""
    doc = json.loads(default_tiers_json())
    standard = doc["tiers"]["standard"]
    doc["tiers"]["rate3"] = {**standard, "requests_per_minute": 3}
    doc["tiers"]["tiny"] = {**standard, "requests_per_minute": 1000, "usd_per_day": str(TINY_BUDGET)}
    doc["role_tiers"] |= {"Test.Rate3": "rate3", "Test.Tiny": "tiny"}
    doc["tier_order"] += ["rate3", "tiny"]
    return json.dumps(doc)


@pytest.fixture(scope="module")
def q_stack() -> Iterator[Stack]:
    running = Stack(ports=Ports.free(), extra_env={"GATEWAY_TIERS": quota_tiers()}).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture()
def qsim(q_stack: Stack) -> Iterator[Sim]:
    with cleared_sim(q_stack) as driver:
        yield driver


def token(stack: Stack, caller: str, *roles: str) -> str:
    assert stack.data_dir is not None
    return DevIssuer(stack.data_dir / "dev-issuer").token(caller=caller, roles=list(roles or ["Gateway.Standard"]))


def chat(stack: Stack, tok: str, model: str = "gpt-4o-mini", *, stream: bool = False, content: str = "Hello quota",
         request_id: str | None = None, **extra: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {tok}"} | ({"x-request-id": request_id} if request_id else {})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}
    return requests.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30,
                         stream=stream)


def usage(stack: Stack, tok: str, caller: str | None = None) -> requests.Response:
    return requests.get(f"{stack.base_url}/v1/usage", headers={"Authorization": f"Bearer {tok}"}, timeout=10,
                        params={"caller": caller} if caller else None)


def caller_key(stack: Stack, tok: str) -> str:
    response = usage(stack, tok)
    assert response.status_code == 200, response.text
    return str(response.json()["caller"])


def assert_openai_error(response: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    assert response.headers["x-request-id"]
    return dict(error)


def ledger_state(stack: Stack, key: str) -> tuple[Counters, list[CostRow]]:
    """The caller's counters row and cost rows, read straight from the stack's Azurite."""
    async def read() -> tuple[Counters, list[CostRow]]:
        store = AzureTableStore.from_connection_string(azurite_connection_string(stack.ports.azurite))
        try:
            entity = await store.get(usage_table(PREFIX), table_key(key), COUNTERS_ROW)
            rows = [row async for row in iter_cost_rows(store, PREFIX, key, limit=100_000)]
        finally:
            await store.aclose()
        return Counters.from_entity(entity), rows

    return asyncio.run(read())


def assert_counters_match_rows(counters: Counters, rows: list[CostRow]) -> None:
    """No lost or double-counted update: the counters are exactly the sum of the accounted cost rows."""
    accounted = [r for r in rows if r.accounted]
    assert counters.day_usd == sum((r.cost_usd for r in accounted), Decimal(0))
    assert counters.day_tokens == sum(r.total_tokens for r in accounted)
    assert len({r.request_id for r in rows}) == len(rows), "a request with two cost rows"


def not_near_minute_end(margin: float = 6.0) -> None:
    """Rate-limit tests count within one UTC minute: start them clear of a minute boundary."""
    second = datetime.now(UTC).second + datetime.now(UTC).microsecond / 1e6
    if second > 60 - margin:
        time.sleep(60 - second + 0.2)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ---- rate limits and budgets ---------------------------------------------------------------------

def test_rate_limit_is_429_with_retry_after_and_ratelimit_headers(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-rate", "Test.Rate3")
    not_near_minute_end()
    remaining = []
    for _ in range(3):
        ok = chat(q_stack, tok)
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(ok.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    refused = chat(q_stack, tok)
    error = assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert qsim.total() == 3, "a rate-limited request must never reach a provider"


def test_spent_budget_is_429_insufficient_quota_and_spend_stays_within_it(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-tiny", "Test.Tiny")
    statuses = []
    for _ in range(8):
        response = chat(q_stack, tok, max_tokens=16)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    error = assert_openai_error(response, 429, "insufficient_quota")
    assert "daily USD budget" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    counters, rows = ledger_state(q_stack, caller_key(q_stack, tok))
    assert_counters_match_rows(counters, rows)
    assert counters.day_usd <= TINY_BUDGET
    assert len(rows) == statuses.count(200) == qsim.total()


def test_usage_view_shows_the_callers_counts_and_what_remains(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-usage")
    not_near_minute_end()
    tokens = 0
    for _ in range(2):
        response = chat(q_stack, tok)
        assert response.status_code == 200
        tokens += response.json()["usage"]["total_tokens"]
    view = usage(q_stack, tok).json()
    assert view["tier"] == "standard" and view["status"] == "active"
    assert view["minute"]["used"]["requests"] == 2
    assert view["minute"]["remaining"]["requests"] == view["minute"]["limit"]["requests"] - 2 == 118
    assert view["day"]["used"]["tokens"] == tokens
    assert view["day"]["remaining"]["tokens"] == view["day"]["limit"]["tokens"] - tokens
    assert Decimal(view["day"]["used"]["usd"]) > 0
    assert Decimal(view["day"]["remaining"]["usd"]) == Decimal(view["day"]["limit"]["usd"]) - Decimal(
        view["day"]["used"]["usd"])
    assert view["in_flight"]["tokens"] == 0 and Decimal(view["in_flight"]["usd"]) == 0


def test_only_admins_read_others_usage_and_edit_limits(q_stack: Stack) -> None:
    tok = token(q_stack, "q-nosy")
    other = caller_key(q_stack, token(q_stack, "q-victim"))
    assert_openai_error(usage(q_stack, tok, other), 403)
    url = f"{q_stack.base_url}/admin/limits"
    headers = {"Authorization": f"Bearer {tok}"}
    assert_openai_error(requests.get(url, params={"caller": other}, headers=headers, timeout=10), 403)
    put = requests.put(url, params={"caller": other}, headers=headers, timeout=10,
                       json={"limits": {"requests_per_minute": 100000}})
    assert_openai_error(put, 403)
    admin = token(q_stack, "q-admin", "Gateway.Admin")
    assert requests.get(url, params={"caller": other}, headers={"Authorization": f"Bearer {admin}"},
                        timeout=10).json()["limits"] == {}, "the refused PUT must not have written anything"
    stranger = usage(q_stack, admin, "tid:never-seen:-").json()  # a caller the directory does not know
    assert stranger["tier"] is None and stranger["day"]["limit"] == {"tokens": None, "usd": None}, \
        "never the asking admin's own tier"


def test_a_number_too_long_to_read_is_a_400_not_a_500(q_stack: Stack) -> None:
    admin = {"Authorization": f"Bearer {token(q_stack, 'q-admin', 'Gateway.Admin')}",
             "Content-Type": "application/json"}
    body = b'{"limits": {"tokens_per_day": ' + b"9" * 5000 + b"}}"  # past Python's 4,300-digit int limit
    response = requests.put(f"{q_stack.base_url}/admin/limits", params={"caller": "x"}, data=body, headers=admin,
                            timeout=10)
    assert_openai_error(response, 400)
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(("path", "params", "body", "param"), [
    ("/admin/alerts", {"limit": "\u00b2"}, None, "limit"),  # "²".isdigit() is true; int("²") is not a number
    ("/admin/alerts", {"days": "\u2460"}, None, "days"),
    ("/admin/limits", {"caller": "x"}, {"limits": [1, 2]}, "limits"),
    ("/admin/limits", {"caller": "x"}, {"limits": {"tokens_per_day": 1.9}}, "limits.tokens_per_day"),
    ("/admin/limits", {"caller": "x"}, {"reason": {"a": 1}}, "reason"),
    ("/admin/limits", {"caller": "x"}, {"status": "downgraded", "alias": "no-such-model"}, "alias"),
])
def test_admin_routes_answer_bad_input_with_a_400_naming_it(q_stack: Stack, path: str, params: dict,
                                                             body: dict | None, param: str) -> None:
    admin = {"Authorization": f"Bearer {token(q_stack, 'q-admin', 'Gateway.Admin')}"}
    call = requests.put if body is not None else requests.get
    response = call(f"{q_stack.base_url}{path}", params=params, json=body, headers=admin, timeout=10)
    assert_openai_error(response, 400)
    assert response.json()["error"]["param"] == param
    if body is not None:
        assert requests.get(f"{q_stack.base_url}/admin/limits", params={"caller": "x"}, headers=admin,
                            timeout=10).json()["status"] == "active", "nothing was stored"


def test_admin_raising_a_callers_limit_takes_effect(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-raised", "Test.Rate3")
    key = caller_key(q_stack, tok)
    admin = {"Authorization": f"Bearer {token(q_stack, 'q-admin', 'Gateway.Admin')}"}
    url = f"{q_stack.base_url}/admin/limits"
    not_near_minute_end()
    assert [chat(q_stack, tok).status_code for _ in range(4)] == [200, 200, 200, 429]
    put = requests.put(url, params={"caller": key}, headers=admin, timeout=10,
                       json={"limits": {"requests_per_minute": 6}, "reason": "e2e raise"})
    assert put.status_code == 200, put.text
    assert put.json()["limits"] == {"requests_per_minute": 6}
    got = requests.get(url, params={"caller": key}, headers=admin, timeout=10).json()
    assert got["limits"] == {"requests_per_minute": 6} and got["reason"] == "e2e raise"
    # One host process: the admin's own instance drops its override cache at once (others within the TTL).
    after = chat(q_stack, tok)
    assert after.status_code == 200, after.text
    assert after.headers["x-ratelimit-limit-requests"] == "6"
    assert usage(q_stack, tok).json()["minute"]["limit"]["requests"] == 6


# ---- settlement of failed, cut and abandoned requests ----------------------------------------------

def test_provider_error_after_reserve_releases_the_reservation(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-provider-error")
    qsim.fault(mode="status", status=500, target="anthropic.claude-3-haiku-20240307-v1:0")
    response = chat(q_stack, tok, "claude-3-haiku", request_id="q-provider-error-1")
    assert_openai_error(response, 503, "service_unavailable")
    view = usage(q_stack, tok).json()
    assert view["in_flight"]["tokens"] == 0 and Decimal(view["in_flight"]["usd"]) == 0
    counters, rows = ledger_state(q_stack, view["caller"])
    [row] = rows
    assert (row.request_id, row.status, row.http_status, row.cost_usd) == ("q-provider-error-1", "error", 503, 0)
    assert row.attempts >= 1
    assert counters.in_flight_tokens == 0
    assert_counters_match_rows(counters, rows)


def test_stream_cut_mid_way_is_settled_from_the_streamed_tokens(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-cut")
    qsim.fault(mode="cut", after_chunks=5, target="gpt-4o-mini", count=1)
    with chat(q_stack, tok, stream=True, request_id="q-cut-1") as response:
        assert response.status_code == 200
        frames = [f for f in response.text.split("\n\n") if f]
    assert "error" in json.loads(frames[-1][6:])
    counters, rows = ledger_state(q_stack, caller_key(q_stack, tok))
    [row] = rows
    assert row.status == "upstream_cut"
    assert row.completion_tokens > 0 and row.prompt_tokens > 0 and row.cost_usd > 0
    assert counters.in_flight_tokens == 0 and counters.day_tokens == row.total_tokens
    assert_counters_match_rows(counters, rows)


def test_client_hanging_up_mid_stream_is_still_settled(q_stack: Stack, qsim: Sim) -> None:
    tok = token(q_stack, "q-hangup")
    key = caller_key(q_stack, tok)
    requests.post(f"http://127.0.0.1:{q_stack.ports.simulator}/_sim/config", json={"chunk_delay_ms": 50},
                  timeout=5).raise_for_status()
    try:
        with chat(q_stack, tok, stream=True, content="Please ramble SIM_REPLY_WORDS=400",
                  request_id="q-hangup-1") as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith(b"data: ")
        # The response is closed after one frame; the upstream would have streamed for ~20 s.
        rows = wait_for(lambda: ledger_state(q_stack, key)[1], timeout=10)
    finally:
        requests.post(f"http://127.0.0.1:{q_stack.ports.simulator}/_sim/config", json={"chunk_delay_ms": 0},
                      timeout=5).raise_for_status()
    assert rows, "an abandoned stream left no cost row"
    [row] = rows
    assert row.request_id == "q-hangup-1" and row.status == "client_disconnected"
    assert row.prompt_tokens > 0 and row.cost_usd > 0
    counters, rows = ledger_state(q_stack, key)
    assert counters.in_flight_tokens == 0
    assert_counters_match_rows(counters, rows)


# ---- quota storage outage ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def outage_stack() -> Iterator[Stack]:
    running = Stack(ports=Ports.free()).start()
    try:
        yield running
    finally:
        running.stop()


def test_storage_outage_fails_closed_with_a_clear_503_and_recovers(outage_stack: Stack) -> None:
    stack = outage_stack
    tok = token(stack, "q-outage")
    key = caller_key(stack, tok)
    assert chat(stack, tok, request_id="q-outage-before").status_code == 200
    sim = Sim.of(stack)
    sim.fault(mode="slow", delay_ms=1500, target="gpt-4o-mini", count=1)
    in_flight: dict[str, requests.Response] = {}
    before = sim.total()
    caught = threading.Thread(target=lambda: in_flight.setdefault(
        "r", chat(stack, tok, request_id="q-outage-inflight")))
    caught.start()
    assert wait_for(lambda: sim.total() > before, timeout=10, interval=0.02), "admitted, now at the slow provider"
    stack.stop_process("azurite")
    try:
        caught.join(30)
        # The caller still gets its answer; the settle that could not be written is logged, not raised.
        assert in_flight["r"].status_code == 200, in_flight["r"].text
        calls = sim.total()
        started = time.monotonic()
        refused = chat(stack, tok, request_id="q-outage-during")
        assert time.monotonic() - started < 15, "an outage must cost seconds, not minutes"
        error = assert_openai_error(refused, 503, "storage_unavailable")
        assert "storage" in error["message"].lower()
        assert int(refused.headers["retry-after"]) >= 1
        assert usage(stack, tok).status_code == 503, "the usage view must fail as clearly"
        assert requests.get(f"{stack.base_url}/health", timeout=15).status_code == 503
        assert sim.total() == calls, "fail-closed: no provider call without admission"
    finally:
        stack.restart("azurite")
    recovered = wait_for(lambda: chat(stack, tok, request_id=f"q-outage-after-{time.monotonic_ns()}").status_code
                         == 200, timeout=20, interval=0.5)
    assert recovered, "the gateway did not recover when storage came back"
    counters, rows = ledger_state(stack, key)
    assert_counters_match_rows(counters, rows)
    ids = [r.request_id for r in rows]
    assert "q-outage-before" in ids and "q-outage-during" not in ids
    assert all(r.status == "ok" for r in rows)
    # The answer did not wait past 8 s for its settle, which rode the outage out in the background: its row
    # landed if storage came back within SETTLE_OUTAGE_SECONDS; if not, its reservation (an over-estimate)
    # stays until its epoch ends (docs/storage.md). Either way it is counted once, never lost and freed.
    if "q-outage-inflight" in ids:
        assert counters.in_flight_tokens == 0
    else:
        assert counters.in_flight_tokens > 0, "its reservation stays (an over-estimate) until its epoch ends"

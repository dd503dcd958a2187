"""Load over real HTTP on three gateway processes sharing one Azurite, one simulator and one issuer.

One hot caller with a tiny USD budget and many ordinary callers send concurrent requests
(plain and streamed) round-robin across the hosts. Afterwards, read straight from Azurite:

* no lost counter update: each caller's counters == the sum of its cost rows;
* exactly one cost row per admitted request (by x-request-id), none for a request refused at admission;
* the hot caller's spend stays within its budget plus the bound of docs/storage.md
  (``spend ≤ B + Σ max(0, actual_i - reserved_i)``).

A second phase repeats the load under faults: a 429 storm on the primary target, cut streams, and
the JWKS endpoint down (keys cached by every host keep validating tokens). A third stops Table
Storage for two seconds mid-load and restarts it: no ledger row lost, recovery without help.

Everything runs twice: strict quota mode, and leased mode (blocks of quota, usage written behind),
whose invariants are checked once the hosts have been quiet for a flush interval and a lease's idle time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

import pytest
import requests

from gateway_lib.billing.ledger import CostRow
from gateway_lib.billing.pricing import cost
from gateway_lib.config.catalog import Price, default_catalogue_json
from gateway_lib.config.tiers import default_tiers_json
from gateway_lib.quota.leases import FLUSH_INTERVAL_SECONDS, LEASE_IDLE_SECONDS
from tests.integration.test_quota_e2e import assert_counters_match_rows, ledger_state
from tests.stack_fixture import Sim
from tools.azurite import free_port
from tools.dev_issuer import DEFAULT_TENANT, DevIssuer, app_id_for
from tools.stack import ROOT, Ports, Stack, stop_group, wait_for_port

pytestmark = pytest.mark.integration

EXTRA_HOSTS = 2  # plus the stack's own host: three gateway processes
WORKERS = 12
HOT_BUDGET = Decimal("0.0003")  # ~25 requests at max_tokens=16 on gpt-4o-mini
CALLERS = [f"load-c{i}" for i in range(10)]
HOT = "load-hot"
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
ADMISSION_REFUSALS = ("rate_limit_exceeded", "insufficient_quota")  # refused before reserve: no cost row
_PRICES = json.loads(default_catalogue_json())["targets"]


def load_tiers() -> str:
    doc = json.loads(default_tiers_json())
    doc["tiers"]["hot"] = {**doc["tiers"]["standard"], "requests_per_minute": 100_000, "usd_per_day": str(HOT_BUDGET)}
    doc["role_tiers"]["Test.Hot"] = "hot"
    doc["tier_order"].append("hot")
    return json.dumps(doc)


@dataclass(frozen=True)
class Sent:
    caller: str
    request_id: str
    stream: bool
    status: int
    code: str | None = None  # error code for >= 400
    cut: bool = False  # a 200 stream that ended with an error event
    target: str | None = None


@pytest.fixture(scope="module", params=["strict", "leased"])
def load_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    env = {"GATEWAY_TIERS": load_tiers(), "GATEWAY_QUOTA_MODE": request.param}
    running = Stack(ports=Ports.free(), extra_env=env).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def hosts(load_stack: Stack) -> Iterator[list[str]]:
    """Base URLs of three gateway processes: the stack's host and two more with the same settings."""
    assert load_stack.log_dir is not None and load_stack.data_dir is not None
    procs: list[subprocess.Popen] = []
    urls = [load_stack.base_url]
    try:
        for i in range(EXTRA_HOSTS):
            port = free_port()
            with open(load_stack.log_dir / f"host-extra{i}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tools.local_host", "--port", str(port),
                     "--settings", str(load_stack.data_dir / "no-local-settings.json")],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, **load_stack.gateway_env()})
            procs.append(proc)
            wait_for_port(port, 30, proc)
            urls.append(f"http://127.0.0.1:{port}/api")
        yield urls
    finally:
        for proc in procs:
            stop_group(proc)


def caller_key(name: str) -> str:
    return f"{DEFAULT_TENANT}:{app_id_for(name)}:-"  # app-only dev tokens: no user part


def send(url: str, tok: str, caller: str, request_id: str, stream: bool) -> Sent:
    # Streams go to Bedrock (chat-default, hinted), plain requests to Azure OpenAI: each fault hits one kind.
    route = {"model": "chat-default", "provider_hint": "bedrock"} if stream else {"model": "gpt-4o-mini"}
    body = {**route, "messages": [{"role": "user", "content": f"Load test {request_id}"}], "max_tokens": 16,
            "stream": stream}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=stream, timeout=60,
                       headers={"Authorization": f"Bearer {tok}", "x-request-id": request_id}) as response:
        text = response.text
    assert response.headers.get("x-request-id") == request_id, (response.status_code, text[:300])
    if response.status_code >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, text
        return Sent(caller, request_id, stream, response.status_code, error["code"])
    target = response.headers.get("x-gateway-target")
    if not stream:
        return Sent(caller, request_id, stream, response.status_code, target=target)
    frames = [f for f in text.split("\n\n") if f]
    cut = frames[-1] != "data: [DONE]"
    if cut:
        assert "error" in json.loads(frames[-1].removeprefix("data: ")), frames[-1]
    return Sent(caller, request_id, stream, response.status_code, cut=cut, target=target)


def run_load(hosts: list[str], tokens: dict[str, str], phase: str, total: int) -> list[Sent]:
    """``total`` requests, ~40% from the hot caller, every 4th streamed (Bedrock), round-robin across hosts."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda i: send(*job(hosts, tokens, phase, i)), range(total)))


def run_load_until(hosts: list[str], tokens: dict[str, str], phase: str, done: threading.Event,
                   most: int) -> list[Sent]:
    """Requests as ``run_load`` makes them, from workers that each keep sending until ``done`` (or ``most``
    in all): unlike rounds, no one slow request holds the others back."""
    numbers = iter(range(most))  # shared: next() on a range iterator is atomic under the GIL

    def worker() -> list[Sent]:
        return [send(*job(hosts, tokens, phase, i)) for i in numbers if not done.is_set()]

    with ThreadPoolExecutor(WORKERS) as pool:
        return [sent for part in pool.map(lambda _: worker(), range(WORKERS)) for sent in part]


def job(hosts: list[str], tokens: dict[str, str], phase: str, i: int) -> tuple[str, str, str, str, bool]:
    caller = HOT if i % 5 in (0, 2) else CALLERS[i % len(CALLERS)]
    return hosts[i % len(hosts)], tokens[caller], caller, f"{phase}-{i:04d}", i % 4 == 3


def check_ledger(stack: Stack, sent: list[Sent],
                 refusals: tuple[str, ...] = ADMISSION_REFUSALS) -> dict[str, list[CostRow]]:
    """Counters == Σ rows per caller, and exactly one row per admitted request; returns the rows."""
    if stack.extra_env.get("GATEWAY_QUOTA_MODE") == "leased":
        # Written behind: journals commit within a flush interval, idle lease remainders go back after
        # LEASE_IDLE_SECONDS; the invariants hold once the hosts are quiet that long.
        time.sleep(LEASE_IDLE_SECONDS + 4 * FLUSH_INTERVAL_SECONDS + 0.3)
    by_caller: dict[str, list[CostRow]] = {}
    for caller in {s.caller for s in sent}:
        counters, rows = ledger_state(stack, caller_key(caller))
        assert_counters_match_rows(counters, rows)
        assert counters.in_flight_tokens == 0 and counters.in_flight_usd == 0, f"{caller}: reservation left over"
        admitted = {s.request_id for s in sent if s.caller == caller and s.code not in refusals}
        row_ids = [r.request_id for r in rows]
        assert sorted(row_ids) == sorted(admitted), (
            f"{caller}: rows without an admitted request {[s for s in sent if s.request_id in set(row_ids) - admitted]}"
            f" {[(r.request_id, r.status, r.http_status, r.error_code) for r in rows if r.request_id not in admitted]}"
            ", admitted requests "
            f"without a row {[s for s in sent if s.request_id in admitted - set(row_ids)]}")
        by_caller[caller] = rows
    rows_by_id = {r.request_id: r for rows in by_caller.values() for r in rows}
    for s in sent:
        row = rows_by_id.get(s.request_id)
        if s.status == 200:
            assert row is not None and row.status == ("upstream_cut" if s.cut else "ok"), (s, row)
        elif row is not None:
            assert row.status == "error" and row.http_status == s.status and row.cost_usd == 0, (s, row)
    return by_caller


def overspend_bound(rows: list[CostRow]) -> Decimal:
    """Σ max(0, actual - reserved) (docs/storage.md); the reservation is priced at the dearest target."""
    excess = Decimal(0)
    for row in rows:
        if row.deployment is None:  # no target answered (e.g. all failed): nothing was spent
            assert row.cost_usd == 0, row
            continue
        price = _price(row.deployment)
        reserved = cost(price, row.prompt_tokens_estimated, row.completion_tokens_estimated)
        excess += max(Decimal(0), row.cost_usd - reserved)
    return excess


def _price(deployment: str | None) -> Price:
    spec = next(t["price"] for t in _PRICES.values() if t["deployment"] == deployment)
    return Price(Decimal(spec["input_per_1k"]), Decimal(spec["output_per_1k"]))


def _tally(sent: list[Sent]) -> dict[str, int]:
    tally: dict[str, int] = {}
    for s in sent:
        key = f"{s.status}:{s.code or ('cut' if s.cut else 'ok')}"
        tally[key] = tally.get(key, 0) + 1
    return tally


def test_three_hosts_under_load_then_under_faults_lose_nothing(load_stack: Stack, hosts: list[str]) -> None:
    assert load_stack.data_dir is not None
    issuer = DevIssuer(load_stack.data_dir / "dev-issuer")
    tokens = {name: issuer.token(caller=name, roles=["Gateway.Standard"]) for name in CALLERS}
    tokens[HOT] = issuer.token(caller=HOT, roles=["Test.Hot"])
    sim = Sim.of(load_stack)
    sim.clear()

    # Phase 1: clean load, 150 requests.
    calm = run_load(hosts, tokens, "calm", 150)
    statuses = {(s.status, s.code) for s in calm}
    assert statuses <= {(200, None), (429, "insufficient_quota"), (429, "rate_limit_exceeded")}, statuses
    assert not any(s.cut for s in calm)
    assert all(s.status == 200 for s in calm if s.caller != HOT), (
        "ordinary callers are far from their limits", [s for s in calm if s.caller != HOT and s.status != 200])
    assert any(s.code == "insufficient_quota" for s in calm), "the hot caller's budget must have run out"
    assert sim.total() == sum(s.status == 200 for s in calm), "every refused request stayed off the providers"
    rows = check_ledger(load_stack, calm)
    hot_spend = sum((r.cost_usd for r in rows[HOT]), Decimal(0))
    assert hot_spend <= HOT_BUDGET + overspend_bound(rows[HOT]), f"hot caller spent {hot_spend} of {HOT_BUDGET}"

    # Phase 2: the same load under faults, with the JWKS endpoint gone.
    load_stack.stop_process("issuer")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{load_stack.ports.issuer}/keys", timeout=2)
    tokens |= {name: issuer.token(caller=name, roles=["Gateway.Standard"]) for name in CALLERS[:3]}  # fresh tokens
    sim.fault(mode="status", status=429, retry_after=1, target="gpt-4o-mini", count=30)
    sim.fault(mode="cut", after_chunks=3, target=HAIKU, provider="bedrock", count=4)
    sim.fault(mode="status", status=500, target="gpt-4o-mini-swc", count=6)  # the fallback region fails too
    sim.fault(mode="slow", delay_ms=400, target=HAIKU, provider="bedrock", count=6)
    try:
        stormy = run_load(hosts, tokens, "storm", 120)
    finally:
        sim.clear()
    allowed = {(200, None), (429, "insufficient_quota"), (429, "rate_limit_exceeded"),
               (429, "upstream_rate_limited"), (503, "service_unavailable")}
    statuses = {(s.status, s.code) for s in stormy}
    assert statuses <= allowed, statuses - allowed
    assert not any(s.status == 401 for s in stormy), "cached signing keys must outlive the JWKS endpoint"
    served = [s for s in stormy if s.status == 200]
    # The hot caller's budget is spent by now (~40 % of the load is refused by design): of the rest,
    # a healthy fallback must still serve most.
    admissible = [s for s in stormy if s.code != "insufficient_quota"]
    assert len(served) > len(admissible) // 2, ("with a healthy fallback most requests must still be served",
                                                 _tally(stormy))
    assert any(s.target == "aoai-gpt-4o-mini-swedencentral" for s in served), "the storm must have forced fallbacks"
    assert any(s.cut for s in stormy if s.stream), "the cut faults must have struck a stream"
    print(f"\ncalm: {_tally(calm)} hot spend {hot_spend}/{HOT_BUDGET}\nstorm: {_tally(stormy)}")
    everything = calm + stormy
    rows = check_ledger(load_stack, everything)
    hot_spend = sum((r.cost_usd for r in rows[HOT]), Decimal(0))
    assert hot_spend <= HOT_BUDGET + overspend_bound(rows[HOT])

    # Phase 3: Table Storage goes away for two seconds in the middle of a load, then comes back.
    # Admissions during the outage are refused (503, fail-closed, no row); requests admitted before it
    # ride out the blip at settle, so none loses its cost row or leaves its reservation behind.
    storage_back = threading.Event()

    # Workers sending until storage is back. A fixed count of requests could finish before the outage
    # starts (it did, once the hot path got faster). Rounds of requests could too: one request riding out
    # the outage at settle held its round, and with it any new admission, until storage was back.
    with ThreadPoolExecutor(1) as background:
        running = background.submit(run_load_until, hosts, tokens, "outage", storage_back, 12 * 30)
        time.sleep(0.5)
        load_stack.stop_process("azurite")
        with pytest.raises(requests.ConnectionError):  # really gone, whatever the hosts make of it
            requests.get(f"http://127.0.0.1:{load_stack.ports.azurite}/", timeout=2)
        time.sleep(2.0)
        load_stack.restart("azurite")
        storage_back.set()
        during = running.result(timeout=180)
    after = run_load(hosts, tokens, "recovered", 30)
    storage_refusals = ("storage_unavailable",)
    statuses = {(s.status, s.code) for s in during}
    allowed = {(200, None), (429, "insufficient_quota"), (429, "rate_limit_exceeded")}
    assert statuses <= allowed | {(503, code) for code in storage_refusals}, statuses
    if load_stack.extra_env.get("GATEWAY_QUOTA_MODE") != "leased":
        # Leased hosts keep admitting from their leases through a short outage and commit the journal
        # once storage is back (the ledger check below); strict hosts refuse what they cannot reserve.
        assert any(s.status == 503 for s in during), "the outage must have been felt"
    assert all(s.status == 200 for s in after if s.caller != HOT), ("the gateway recovers by itself", _tally(after))
    print(f"outage: {_tally(during)} recovered: {_tally(after)}")
    check_ledger(load_stack, everything + during + after, ADMISSION_REFUSALS + storage_refusals)

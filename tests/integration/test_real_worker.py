"""The app under the real Azure Functions Python worker (tools/worker_host.py), on the local stack.

Two hosts share one Azurite, simulator and dev issuer: one with the worker's packages first on sys.path
(Core Tools' order) and one with the app's first (PYTHON_ISOLATE_WORKER_DEPENDENCIES=1, the order Flex
Consumption uses once specialised). Each exports telemetry to its own loopback collector. Skipped, with the
reason, when the worker source is not beside the repository; under CI it must run.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from tests.integration.test_function_app_host import EXPECTED_HTTP
from tests.integration.test_quota_e2e import assert_counters_match_rows, ledger_state, wait_for
from tests.integration.test_telemetry_export import Collector
from tools import worker_setup
from tools.stack import Ports
from tools.worker_stack import WorkerStack

pytestmark = pytest.mark.integration
HOSTS = ("host", "isolated")  # Core Tools' sys.path order, then the app's packages first


@pytest.fixture(scope="module")
def worker_dir() -> Any:
    worker, reason = worker_setup.ensure()
    if worker is None:
        if os.environ.get("CI"):
            pytest.fail(f"the real-worker tier must run under CI: {reason}")
        pytest.skip(f"real Functions worker not available: {reason}")
    return worker.directory


@pytest.fixture(scope="module")
def collectors() -> Iterator[dict[str, Collector]]:
    made = {name: Collector() for name in HOSTS}
    for collector in made.values():
        threading.Thread(target=collector.server.serve_forever, daemon=True).start()
    try:
        yield made
    finally:
        for collector in made.values():
            collector.server.shutdown()
            collector.server.server_close()


@pytest.fixture(scope="module")
def wstack(worker_dir: Any, collectors: dict[str, Collector]) -> Iterator[WorkerStack]:
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": collectors["host"].connection_string}
    running = WorkerStack(ports=Ports.free(), worker_dir=worker_dir, extra_env=env)
    running.start()
    try:
        running.add_host("isolated", env={"PYTHON_ISOLATE_WORKER_DEPENDENCIES": "1",
                                          "APPLICATIONINSIGHTS_CONNECTION_STRING": collectors["isolated"].connection_string})
        yield running
        for host in running.hosts:
            assert "netguard:" not in host_log(running, host), f"{host}: the app tried to leave loopback"
    finally:
        running.stop()


def url(stack: WorkerStack, path: str, host: str = "host") -> str:
    return f"http://127.0.0.1:{stack.hosts[host]}{path}"


def keyed(stack: WorkerStack, token: str | None = None) -> dict[str, str]:
    return {"x-functions-key": stack.function_key} | ({"Authorization": f"Bearer {token}"} if token else {})


def host_log(stack: WorkerStack, host: str) -> str:
    assert stack.log_dir is not None
    return (stack.log_dir / f"{host}.log").read_text(errors="replace")


def chat(stack: WorkerStack, token: str, model: str, host: str = "host", **extra: Any) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello from the real worker"}], **extra}
    return requests.post(url(stack, "/api/v1/chat/completions", host), json=body, headers=keyed(stack, token),
                         timeout=60, stream=bool(extra.get("stream")))


@contextmanager
def slow_simulator(stack: WorkerStack, delay_ms: int = 50) -> Iterator[None]:
    """The simulator spaces its stream chunks, so streaming (or hanging up mid-stream) can be seen."""
    config = f"http://127.0.0.1:{stack.ports.simulator}/_sim/config"
    requests.post(config, json={"chunk_delay_ms": delay_ms}, timeout=5).raise_for_status()
    try:
        yield
    finally:
        requests.post(config, json={"chunk_delay_ms": 0}, timeout=5).raise_for_status()


def test_the_worker_reports_exactly_the_declared_functions(wstack: WorkerStack) -> None:
    listed = requests.get(url(wstack, "/admin/functions"), headers={"x-functions-key": wstack.master_key}, timeout=10)
    assert listed.status_code == 200
    functions = {f["name"]: f for f in listed.json()}
    assert all(f["error"] is None for f in functions.values()), functions
    http = {}
    for name, function in functions.items():
        trigger = next(b for b in function["config"]["bindings"] if b["type"].endswith("Trigger"))
        if trigger["type"] == "httpTrigger":
            http[name] = (trigger["route"], {m.upper() for m in trigger["methods"]}, trigger["authLevel"].lower())
    assert http == EXPECTED_HTTP
    timer = next(b for b in functions["budget_rollup"]["config"]["bindings"] if b["type"] == "timerTrigger")
    example = json.loads((worker_setup.ROOT / "local.settings.example.json").read_text())["Values"]
    assert timer["schedule"] == example["BUDGET_ROLLUP_SCHEDULE"], "%BUDGET_ROLLUP_SCHEDULE% resolved by the host"


@pytest.mark.parametrize("host", HOSTS)
def test_health_is_anonymous_and_routes_ignore_case(wstack: WorkerStack, host: str) -> None:
    response = requests.get(url(wstack, "/api/health", host), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
    assert requests.get(url(wstack, "/API/Health/", host), timeout=30).status_code == 200


def test_route_values_reach_the_function(wstack: WorkerStack) -> None:
    # {name} travels as a route value in the InvocationRequest and on to the Starlette request's path_params.
    css = requests.get(url(wstack, "/api/admin/dashboard/assets/dashboard.css"), timeout=30)
    assert css.status_code == 200, css.text
    assert css.headers["content-type"].startswith("text/css")
    assert css.content == (worker_setup.ROOT / "gateway_lib/http/dashboard/dashboard.css").read_bytes()
    assert requests.get(url(wstack, "/api/admin/dashboard/assets/nothing.js"), timeout=30).status_code == 404


def test_the_deployment_and_model_route_values_reach_the_functions(wstack: WorkerStack) -> None:
    token = wstack.token("rw-azure")
    body = {"model": None, "messages": [{"role": "user", "content": "hello from Azure's path"}]}
    azure = requests.post(url(wstack, "/api/openai/deployments/claude-3-haiku/chat/completions"), json=body,
                          params={"api-version": "2024-10-21"}, headers=keyed(wstack, token), timeout=60)
    assert azure.status_code == 200, azure.text
    assert azure.headers["x-gateway-model"] == "claude-3-haiku"
    model = requests.get(url(wstack, "/api/v1/models/titan-embed-text-v2"), headers=keyed(wstack, token), timeout=30)
    assert model.status_code == 200 and model.json()["operations"] == ["embeddings"]


def test_the_response_id_route_value_reaches_the_function(wstack: WorkerStack) -> None:
    token = wstack.token("rw-stored")
    made = requests.post(url(wstack, "/api/v1/responses"), json={"model": "gpt-4o-mini", "input": "keep this"},
                         headers=keyed(wstack, token), timeout=60)
    assert made.status_code == 200, made.text
    kept = requests.get(url(wstack, f"/api/v1/responses/{made.json()['id']}"), headers=keyed(wstack, token), timeout=30)
    assert kept.status_code == 200, kept.text
    assert kept.json()["id"] == made.json()["id"]


def test_models_need_the_function_key_and_then_the_token(wstack: WorkerStack) -> None:
    token = wstack.token("rw-models")
    no_key = requests.get(url(wstack, "/api/v1/models"), headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert (no_key.status_code, no_key.content) == (401, b"")
    no_token = requests.get(url(wstack, "/api/v1/models"), headers=keyed(wstack), timeout=30)
    assert no_token.status_code == 401 and no_token.json()["error"]
    models = requests.get(url(wstack, "/api/v1/models"), params={"code": wstack.function_key}, timeout=30,
                          headers={"Authorization": f"Bearer {token}"})
    assert models.status_code == 200
    assert {m["id"] for m in models.json()["data"]} >= {"gpt-4o-mini", "claude-3-haiku"}


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(("model", "provider"), [("gpt-4o-mini", "azure_openai"), ("claude-3-haiku", "bedrock")])
def test_chat_answers_whole_and_streamed_on_both_providers(wstack: WorkerStack, host: str, model: str,
                                                           provider: str) -> None:
    token = wstack.token("rw-chat")
    whole = chat(wstack, token, model, host)
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-gateway-provider"] == provider
    assert whole.json()["choices"][0]["message"]["content"]
    with slow_simulator(wstack), chat(wstack, token, model, host, stream=True) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        chunks = list(streamed.iter_content(chunk_size=None))
    body = b"".join(chunks)
    assert body.endswith(b"data: [DONE]\n\n")
    assert len(chunks) > 1, "SSE arrives as the worker writes it, not buffered whole"


def test_a_client_hanging_up_mid_stream_settles_with_one_cost_row(wstack: WorkerStack) -> None:
    token = wstack.token("rw-hangup")
    key = caller_key_keyed(wstack, token)
    with slow_simulator(wstack):
        body = {"model": "gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "Please ramble SIM_REPLY_WORDS=400"}]}
        with requests.post(url(wstack, "/api/v1/chat/completions"), json=body, stream=True, timeout=30,
                           headers=keyed(wstack, token) | {"x-request-id": "rw-hangup-1"}) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith(b"data: ")
        rows = wait_for(lambda: ledger_state(wstack, key)[1], timeout=15)  # type: ignore[arg-type]
    assert [(r.request_id, r.status) for r in rows] == [("rw-hangup-1", "client_disconnected")]
    counters, rows = ledger_state(wstack, key)  # type: ignore[arg-type]
    assert counters.in_flight_tokens == 0
    assert_counters_match_rows(counters, rows)


def caller_key_keyed(stack: WorkerStack, token: str) -> str:
    response = requests.get(url(stack, "/api/v1/usage"), headers=keyed(stack, token), timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["caller"])


def test_the_timer_runs_the_rollup(wstack: WorkerStack) -> None:
    token = wstack.token("rw-timer")
    assert chat(wstack, token, "gpt-4o-mini").status_code == 200
    no_key = requests.post(url(wstack, "/admin/functions/budget_rollup"), json={"input": ""}, timeout=60)
    assert no_key.status_code == 401
    ran = requests.post(url(wstack, "/admin/functions/budget_rollup"), json={"input": ""}, timeout=120,
                        headers={"x-functions-key": wstack.master_key})
    assert ran.status_code == 202, ran.text
    assert "budget rollup finished" in host_log(wstack, "host")


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/v1/chat/completions"), ("DELETE", "/api/health"),
                                               ("HEAD", "/api/v1/models"), ("GET", "/api/v1/nothing-here"),
                                               ("GET", "/v1/models")])
def test_a_wrong_method_or_an_unknown_route_is_an_empty_404(wstack: WorkerStack, method: str, path: str) -> None:
    response = requests.request(method, url(wstack, path), headers=keyed(wstack), timeout=30)
    assert (response.status_code, response.content) == (404, b"")


def test_the_two_hosts_load_packages_in_their_own_order(wstack: WorkerStack) -> None:
    assert "Finished prioritize_customer_dependencies" in host_log(wstack, "isolated")
    assert "Finished prioritize_customer_dependencies" not in host_log(wstack, "host")


def test_without_init_indexing_the_app_fails_loudly_by_name(wstack: WorkerStack) -> None:
    base = wstack.add_host("no-init-indexing", without=("PYTHON_ENABLE_INIT_INDEXING",))
    status = requests.get(f"{base}/admin/host/status", headers={"x-functions-key": wstack.master_key}, timeout=10)
    assert status.json()["state"] == "Error"
    assert any("PYTHON_ENABLE_INIT_INDEXING must be '1'" in e for e in status.json()["errors"]), status.json()
    assert "PYTHON_ENABLE_INIT_INDEXING must be '1'" in host_log(wstack, "no-init-indexing")


def test_telemetry_is_exported_in_both_sys_path_orders(wstack: WorkerStack, collectors: dict[str, Collector]) -> None:
    # With the worker's protobuf first, an app protobuf newer than it failed the exporter's import and the gateway
    # served without telemetry; requirements.txt pins protobuf to the worker's major version. Runs last: stopping
    # a host ends its worker, whose exit flushes the exporters (they send every 60 s otherwise).
    token = wstack.token("rw-telemetry")
    for host in HOSTS:
        assert chat(wstack, token, "gpt-4o-mini", host).status_code == 200
        wstack.stop_process(host)
    for host in HOSTS:
        log = host_log(wstack, host)
        assert "Application Insights export disabled" not in log, log[-3000:]
        assert wait_for(lambda h=host: collectors[h].envelopes, timeout=15), f"{host}: nothing reached the collector"

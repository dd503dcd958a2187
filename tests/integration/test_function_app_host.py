"""function_app.py as the Functions host sees it: indexed once, user functions invoked directly.

The local host is a stand-in for ``func start``; these tests call the registered user
functions with the Starlette request the HTTP-streams worker builds, so a difference
between the local host and the v2 indexing shows up here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.functions.timer import TimerRequest
from starlette.requests import Request
from starlette.responses import Response

from gateway_lib.config.settings import Settings
from gateway_lib.runtime import build_runtime, set_runtime
from tests.host_invoke import invoke, make_request, registered_functions
from tools import local_host
from tools.dev_issuer import DevIssuer, JwksServer
from tools.provider_simulator import start_in_thread

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

EXPECTED_HTTP = {
    "chat_completions": ("api/v1/chat/completions", {"POST"}, "function"),
    "embeddings": ("api/v1/embeddings", {"POST"}, "function"),
    "responses": ("api/v1/responses", {"POST"}, "function"),
    "stored_response": ("api/v1/responses/{response_id}", {"GET", "DELETE"}, "function"),
    "azure_v1_responses": ("api/openai/v1/responses", {"POST"}, "function"),
    "azure_responses": ("api/openai/responses", {"POST"}, "function"),
    "azure_v1_stored_response": ("api/openai/v1/responses/{response_id}", {"GET", "DELETE"}, "function"),
    "azure_stored_response": ("api/openai/responses/{response_id}", {"GET", "DELETE"}, "function"),
    "messages": ("api/v1/messages", {"POST"}, "function"),
    "count_tokens": ("api/v1/messages/count_tokens", {"POST"}, "function"),
    "list_models": ("api/v1/models", {"GET"}, "function"),
    "retrieve_model": ("api/v1/models/{model}", {"GET"}, "function"),
    "azure_chat_completions": ("api/openai/deployments/{deployment}/chat/completions", {"POST"}, "function"),
    "azure_embeddings": ("api/openai/deployments/{deployment}/embeddings", {"POST"}, "function"),
    "azure_v1_chat_completions": ("api/openai/v1/chat/completions", {"POST"}, "function"),
    "azure_v1_embeddings": ("api/openai/v1/embeddings", {"POST"}, "function"),
    "generate": ("api/generate", {"POST"}, "function"),
    "usage": ("api/v1/usage", {"GET"}, "function"),
    "admin_limits": ("api/admin/limits", {"GET", "PUT"}, "function"),
    # The dashboard's routes: a browser holds no function key; each data route authenticates its Entra token.
    "admin_alerts": ("api/admin/alerts", {"GET"}, "anonymous"),
    "admin_spend": ("api/admin/spend", {"GET"}, "anonymous"),
    "admin_callers": ("api/admin/callers", {"GET"}, "anonymous"),
    "admin_chargeback": ("api/admin/chargeback", {"GET"}, "anonymous"),
    "admin_dashboard": ("api/admin/dashboard", {"GET"}, "anonymous"),
    "admin_dashboard_asset": ("api/admin/dashboard/assets/{name}", {"GET"}, "anonymous"),
    "health": ("api/health", {"GET"}, "anonymous"),
}


@pytest.fixture(scope="module")
def functions() -> dict[str, Any]:
    return registered_functions()


def test_the_app_registers_exactly_the_documented_functions(functions: dict[str, Any]) -> None:
    http = {}
    for name, fn in functions.items():
        trigger = fn.get_trigger()
        if trigger.type == "httpTrigger":
            level = trigger.auth_level.value if hasattr(trigger.auth_level, "value") else str(trigger.auth_level)
            http[name] = (trigger.route, {m.value for m in trigger.methods}, str(level).lower())
    assert http == EXPECTED_HTTP
    timer = functions["budget_rollup"].get_trigger()
    assert timer.type == "timerTrigger"
    assert timer.schedule == "%BUDGET_ROLLUP_SCHEDULE%"  # the schedule is an app setting


def test_local_host_serves_the_same_routes_as_the_index(functions: dict[str, Any]) -> None:
    import function_app

    app = local_host.build_app(function_app.app, functions=list(functions.values()))  # routePrefix from host.json
    served = {(r.path, frozenset(r.methods or ())) for r in app.routes if not r.path.startswith("/admin/f")}
    indexed = {(f"/{route}", frozenset(methods)) for route, methods, _ in EXPECTED_HTTP.values()}
    assert served == indexed
    assert all(path.startswith("/api/") for path, _ in served)


@pytest.mark.parametrize("route", ["admin/limits", "Admin/x", "administration/y", "/runtime/z"])
def test_the_local_host_refuses_a_route_the_functions_host_reserves(route: str) -> None:
    # The real host fails such a function at startup ("The specified route conflicts with one or more built
    # in routes"), whatever the routePrefix; the stand-in must not serve it either, or no test would notice.
    import azure.functions as func

    reserved = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @reserved.route(route=route, methods=["GET"])
    async def handler(req: Any) -> Any:  # never called
        raise AssertionError

    with pytest.raises(ValueError, match="conflicts with the Functions host's built-in routes"):
        local_host.build_app(reserved, functions=local_host.indexed(reserved))


def test_importing_the_app_does_no_io_and_needs_no_settings() -> None:
    # Any socket connect (even to loopback) fails the import; no app settings are present.
    probe = (
        "import socket\n"
        "def deny(*a, **k): raise AssertionError('I/O at import time')\n"
        "socket.socket.connect = deny\nsocket.create_connection = deny\n"
        "import function_app\n"
        "names = sorted(f.get_function_name() for f in function_app.app.get_functions())\n"
        "import sys; heavy = [m for m in ('openai', 'boto3', 'azure.identity') if m in sys.modules]\n"
        "print(len(names), heavy)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "27 []", "27 functions, and no heavy SDK imported at import time"


@pytest.fixture(scope="module")
def wired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIssuer]:
    """An in-process runtime: memory store, simulator for both providers, the dev issuer's JWKS."""
    issuer = DevIssuer(tmp_path_factory.mktemp("issuer"))
    with start_in_thread() as simulator, JwksServer(issuer) as jwks:
        values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
        values.update({"AUTH_JWKS_URL": jwks.jwks_url, "AZURE_OPENAI_ENDPOINT": simulator.url,
                       "BEDROCK_ENDPOINT_URL": simulator.url, "GATEWAY_STORAGE_MODE": "memory"})
        settings = Settings.from_env(values)
        yield_value = issuer
        _state["settings"] = settings
        yield yield_value


_state: dict[str, Any] = {}


def _invoke(functions: dict[str, Any], name: str, request: Request) -> tuple[Response, bytes]:
    return invoke(lambda: build_runtime(_state["settings"]), functions[name].get_user_function(), request)


_request = make_request


def test_chat_function_invoked_like_the_host_streams_and_answers(functions: dict[str, Any], wired: DevIssuer) -> None:
    token = wired.token(roles=["Gateway.Standard"])
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi from the host test"}]}
    response, body = _invoke(functions, "chat_completions", _request("POST", "/api/v1/chat/completions", token, chat))
    assert response.status_code == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"]
    response, body = _invoke(functions, "chat_completions",
                             _request("POST", "/api/v1/chat/completions", token, chat | {"stream": True}))
    assert response.status_code == 200
    assert body.endswith(b"data: [DONE]\n\n")


def test_other_http_functions_invoked_like_the_host(functions: dict[str, Any], wired: DevIssuer) -> None:
    token = wired.token(roles=["Gateway.Admin"])
    assert _invoke(functions, "health", _request("GET", "/api/health", None))[0].status_code == 200
    models = json.loads(_invoke(functions, "list_models", _request("GET", "/api/v1/models", token))[1])
    assert {m["id"] for m in models["data"]} >= {"gpt-4o-mini", "claude-3-haiku"}
    response, body = _invoke(functions, "generate", _request("POST", "/api/generate", token,
                                                             {"prompt": "Classify me", "task": "classify",
                                                              "labels": ["a", "b"]}))
    assert response.status_code == 200, body
    assert _invoke(functions, "usage", _request("GET", "/api/v1/usage", token))[0].status_code == 200
    assert _invoke(functions, "admin_alerts", _request("GET", "/api/admin/alerts", token))[0].status_code == 200
    unauthorised = _invoke(functions, "list_models", _request("GET", "/api/v1/models", None))[0]
    assert unauthorised.status_code == 401


@pytest.mark.parametrize("synced", [True, False])
def test_route_parameters_reach_the_azure_and_model_functions(functions: dict[str, Any], wired: DevIssuer,
                                                              synced: bool) -> None:
    # The worker copies route parameters into the request's path_params (the extension's RequestSynchronizer);
    # without them the handlers read the path itself.
    token = wired.token(roles=["Gateway.Standard"])

    def request(method: str, path: str, params: dict[str, str], body: Any = None, query: str = "") -> Request:
        built = _request(method, path, token, body, query=query)
        if synced:
            built.scope["path_params"] = {}
            built.path_params.update(params)
        return built

    chat = {"model": None, "messages": [{"role": "user", "content": "hi from Azure's path"}]}
    response, body = _invoke(functions, "azure_chat_completions",
                             request("POST", "/api/openai/deployments/gpt-4o-mini/chat/completions",
                                     {"deployment": "gpt-4o-mini"}, chat, query="api-version=2024-10-21"))
    assert response.status_code == 200, body
    assert response.headers["x-gateway-model"] == "gpt-4o-mini"
    response, body = _invoke(functions, "retrieve_model",
                             request("GET", "/api/v1/models/claude-3-haiku", {"model": "claude-3-haiku"}))
    assert response.status_code == 200 and json.loads(body)["id"] == "claude-3-haiku"


def test_timer_function_invoked_like_the_host(functions: dict[str, Any], wired: DevIssuer) -> None:
    timer = TimerRequest(past_due=False)  # the concrete type the worker builds

    async def run() -> None:
        set_runtime(build_runtime(_state["settings"]))
        try:
            await functions["budget_rollup"].get_user_function()(timer)
        finally:
            from gateway_lib import runtime

            assert runtime._runtime is not None
            await runtime._runtime.aclose()
            set_runtime(None)

    asyncio.run(run())


def test_health_names_the_settings_at_fault_without_their_values(functions: dict[str, Any],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # /api/health is anonymous: a misconfigured webhook URL (its secret is in the path) must not be echoed.
    from gateway_lib.config import settings as settings_module

    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values |= {"GATEWAY_STORAGE_MODE": "memory", "ALERT_WEBHOOK_URL": "hooks.example.com/services/T0/B0/S3CR3T",
               "AUTH_JWKS_URL": "http://127.0.0.1:9/keys"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings_module.get_settings.cache_clear()
    set_runtime(None)
    try:
        response = asyncio.run(functions["health"].get_user_function()(_request("GET", "/api/health", None)))
    finally:
        settings_module.get_settings.cache_clear()
    body = bytes(response.body).decode()
    assert response.status_code == 503
    assert json.loads(body)["checks"]["configuration"] == {"status": "error", "settings": ["ALERT_WEBHOOK_URL"]}
    assert "S3CR3T" not in body and "hooks.example.com" not in body

"""Prompts, completions and tokens never reach logs, metrics, events or cost rows.

Canary strings ride in the prompt (and the ``user`` field) through every path: success,
stream, validation error, content filter, provider error echoing the prompt, and a stream
cut mid-way. Every log record (all attributes, at DEBUG), every exported metric and
event, and every stored table row is searched for the canaries and for the bearer token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.config.settings import Settings
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.memory import MemoryTableStore
from gateway_lib.telemetry import Telemetry
from tests.host_invoke import invoke, make_request, registered_functions
from tools.dev_issuer import DevIssuer, JwksServer
from tools.provider_simulator import start_in_thread

ROOT = Path(__file__).resolve().parents[2]
CANARY = "CANARY-7f3a9-prompt-text"
REPLY_CANARY_WORD = "CANARYREPLY"  # the simulator echoes words of the prompt into its reply
pytestmark = pytest.mark.integration


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {k: v for k, v in record.__dict__.items() if k not in ("exc_info",)}
        self.records.append(repr(fields) + " " + record.getMessage())


class _Exporter:
    def __init__(self) -> None:
        self.exported: list[str] = []

    def export_metrics(self, metrics: Any) -> None:
        self.exported.append(repr(list(metrics)))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    issuer = DevIssuer(tmp_path_factory.mktemp("issuer"))
    with start_in_thread() as simulator, JwksServer(issuer) as jwks, pytest.MonkeyPatch.context() as env:
        # The simulator's static keys through the standard AWS chain (nothing may fall through to IMDS).
        env.setenv("AWS_ACCESS_KEY_ID", "local-simulator")
        env.setenv("AWS_SECRET_ACCESS_KEY", "local-simulator-secret")
        values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
        values.update({"AUTH_JWKS_URL": jwks.jwks_url, "AZURE_OPENAI_ENDPOINT": simulator.url,
                       "BEDROCK_ENDPOINT_URL": simulator.url, "GATEWAY_STORAGE_MODE": "memory",
                       "GATEWAY_DENY_PATTERNS": json.dumps(["forbidden-topic"])})
        yield {"settings": Settings.from_env(values), "issuer": issuer, "simulator": simulator,
               "store": MemoryTableStore(), "exporter": _Exporter(), "events": _Capture()}


@pytest.fixture()
def captured() -> Iterator[_Capture]:
    handler, root = _Capture(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _build(world: dict[str, Any]) -> Runtime:
    telemetry = Telemetry(metrics_exporter=world["exporter"], event_handler=world["events"], export_interval=0.05)
    rt = build_runtime(world["settings"], store=world["store"])
    rt.telemetry = telemetry
    return rt


def _chat(world: dict[str, Any], token: str, body: dict[str, Any]) -> tuple[int, bytes]:
    fn = registered_functions()["chat_completions"]
    response, payload = invoke(lambda: _build(world), fn.get_user_function(),
                               make_request("POST", "/api/v1/chat/completions", token, body))
    return response.status_code, payload


def _prompt(extra: str = "") -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "user": f"{CANARY}-user",
            "messages": [{"role": "system", "content": f"system {CANARY}"},
                         {"role": "user", "content": f"{extra} {REPLY_CANARY_WORD} {CANARY} please"}]}


def test_no_prompt_completion_or_token_reaches_logs_metrics_events_or_rows(world: dict[str, Any],
                                                                          captured: _Capture) -> None:
    token = world["issuer"].token(roles=["Gateway.Standard"])
    faults = world["simulator"].state.faults
    statuses = {
        "success": _chat(world, token, _prompt())[0],
        "stream": _chat(world, token, _prompt() | {"stream": True})[0],
        "validation": _chat(world, token, _prompt() | {"temperature": 9})[0],
        "content_filter": _chat(world, token, _prompt("forbidden-topic"))[0],
        # botocore logs whole request and response bodies at DEBUG: the runtime must keep it quiet.
        "bedrock": _chat(world, token, _prompt() | {"model": "claude-3-haiku"})[0],
        "bedrock_stream": _chat(world, token, _prompt() | {"model": "claude-3-haiku", "stream": True})[0],
    }
    faults.add({"mode": "status", "status": 400, "message": f"bad prompt: {CANARY}", "count": 1})
    statuses["provider_400"] = _chat(world, token, _prompt())[0]
    faults.add({"mode": "status", "status": 500, "message": f"upstream failed on {CANARY}", "count": 2})
    statuses["provider_500"] = _chat(world, token, _prompt())[0]
    faults.add({"mode": "cut", "after_chunks": 3, "count": 1})
    statuses["stream_cut"] = _chat(world, token, _prompt() | {"stream": True})[0]
    assert statuses == {"success": 200, "stream": 200, "validation": 400, "content_filter": 400, "bedrock": 200,
                        "bedrock_stream": 200, "provider_400": 400, "provider_500": 503, "stream_cut": 200}

    rows = [repr(dict(e.properties)) for table in world["store"]._tables.values() for e in table.values()]
    assert any('"status": "ok"' in r or "'status': 'ok'" in r for r in rows), "cost rows were written"
    haystacks = {"logs": captured.records, "events": world["events"].records,
                 "metrics": world["exporter"].exported, "rows": rows}
    assert captured.records, "the request log was captured"
    for where, items in haystacks.items():
        text = "\n".join(items)
        for secret in (CANARY, REPLY_CANARY_WORD, token, token.split(".")[2]):
            assert secret not in text, f"{secret[:20]}... leaked into {where}"

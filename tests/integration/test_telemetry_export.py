"""Telemetry export over real HTTP to a loopback Application Insights collector.

The collector records what opencensus-ext-azure actually POSTs to ``/v2.1/track``, so
these tests pin the envelope names, metric names, dimensions and values App Insights
will store in customMetrics, customEvents and traces.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway_lib import telemetry
from gateway_lib.telemetry import RequestRecord, Telemetry

pytestmark = pytest.mark.integration

IKEY = "00000000-0000-0000-0000-000000000000"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
FAST = {"enable_local_storage": False, "timeout": 1.0}


class Collector:
    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        self.paths: list[str] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                collector.paths.append(self.path)
                collector.envelopes.extend(body)
                reply = json.dumps({"itemsReceived": len(body), "itemsAccepted": len(body), "errors": []}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.connection_string = f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{self.server.server_port}/"

    def of(self, envelope_name: str) -> list[dict[str, Any]]:
        return [e["data"]["baseData"] for e in self.envelopes if e["name"] == envelope_name]

    def metric(self, name: str) -> list[tuple[float, dict[str, str]]]:
        return [(d["metrics"][0]["value"], d["properties"]) for d in self.of("Microsoft.ApplicationInsights.Metric")
                if d["metrics"][0]["name"] == name]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    thread = threading.Thread(target=c.server.serve_forever, daemon=True)
    thread.start()
    yield c
    c.server.shutdown()
    c.server.server_close()


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "collector did not receive the expected telemetry in time"
        time.sleep(0.05)


def record(**changes: Any) -> RequestRecord:
    values: dict[str, Any] = dict(
        request_id="req-1", route="chat", caller_app="app-1", team="search", tier="standard", model="chat-default",
        provider="bedrock", target_model="claude-3-haiku", prompt_tokens=100, completion_tokens=20,
        cost_usd="0.0005", latency_ms=900.0, upstream_ms=880.0, overhead_ms=20.0, fallbacks=1, trace_id=TRACE,
        attempts=[{"target": "aoai-east", "provider": "azure_openai", "outcome": "server_error", "status": 503},
                  {"target": "bedrock-haiku", "provider": "bedrock", "outcome": "ok", "status": 200}],
    )
    return RequestRecord(**(values | changes))


def test_metrics_events_and_request_log_arrive_with_names_and_dimensions(collector: Collector) -> None:
    tel = Telemetry(collector.connection_string, export_interval=0.2, options=FAST)
    try:
        tel.request(record())
        tel.request(record(request_id="req-2", fallbacks=0, attempts=[]))
        tel.track_event("BudgetAlert", {"team": "search", "threshold": "80"}, {"spend_usd": 80.5})
        eventually(lambda: bool(collector.metric("gateway/requests"))
                   and len(collector.of("Microsoft.ApplicationInsights.Message")) >= 2
                   and len(collector.of("Microsoft.ApplicationInsights.Event")) >= 2)
    finally:
        tel.close()

    assert set(collector.paths) == {"/v2.1/track"}
    assert {e["iKey"] for e in collector.envelopes} == {IKEY}
    tags = {"provider": "bedrock", "model": "claude-3-haiku", "tier": "standard", "status": "200", "route": "chat"}
    assert sum(v for v, t in collector.metric("gateway/requests") if t == tags) == 2
    assert sum(v for v, _ in collector.metric("gateway/tokens_prompt")) == 200
    assert sum(v for v, _ in collector.metric("gateway/cost_usd")) == pytest.approx(0.001)
    assert sum(v for v, _ in collector.metric("gateway/fallbacks")) == 1
    failed = {"provider": "azure_openai", "model": "aoai-east", "tier": "standard", "status": "503", "route": "chat"}
    assert collector.metric("gateway/upstream_errors") == [(1.0, failed)]

    events = {e["name"]: e for e in collector.of("Microsoft.ApplicationInsights.Event")}
    assert events["BudgetAlert"]["properties"] == {"team": "search", "threshold": "80"}
    assert events["BudgetAlert"]["measurements"] == {"spend_usd": 80.5}
    assert events["GatewayFallback"]["properties"]["request_id"] == "req-1"

    traces = {m["properties"]["request_id"]: m for m in collector.of("Microsoft.ApplicationInsights.Message")}
    dims = traces["req-1"]["properties"]
    assert (dims["team"], dims["cost_usd"], dims["prompt_tokens"], dims["target_model"]) == (
        "search", "0.0005", "100", "claude-3-haiku")
    assert json.loads(dims["attempts"])[0]["outcome"] == "server_error"
    operation_ids = {e["tags"]["ai.operation.id"] for e in collector.envelopes
                     if e["name"] == "Microsoft.ApplicationInsights.Message"}
    assert operation_ids == {TRACE}


def test_only_the_configured_endpoint_is_contacted(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> None:
    from opencensus.ext.azure.statsbeat import statsbeat

    contacted: list[Any] = []
    connect = socket.socket.connect

    def recording_connect(self: socket.socket, address: Any) -> None:
        contacted.append(address)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    tel = Telemetry(collector.connection_string, export_interval=0.2, options=FAST)
    tel.request(record())
    tel.track_event("BudgetAlert", {}, {})
    eventually(lambda: bool(collector.metric("gateway/requests")) and bool(collector.of(
        "Microsoft.ApplicationInsights.Event")))
    tel.close()
    # Statsbeat (the SDK's own telemetry to Microsoft endpoints) never started, and nothing else was dialled.
    assert statsbeat._STATSBEAT_EXPORTER is None
    assert contacted and {a[:2] for a in contacted} == {("127.0.0.1", collector.server.server_port)}


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _time_calls(tel: Telemetry) -> float:
    started = time.perf_counter()
    for i in range(100):
        tel.request(record(request_id=f"r{i}"))
        tel.track_event("BudgetAlert", {"i": str(i)}, {"v": 1.0})
    return (time.perf_counter() - started) / 100


def test_dead_collector_never_raises_and_never_blocks_the_caller() -> None:
    dead = f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{_dead_port()}/"
    tel = Telemetry(dead, export_interval=0.1, options=FAST)
    assert tel.enabled
    per_call = _time_calls(tel)
    time.sleep(0.3)  # let the exporter threads fail a few times
    tel.flush(timeout=1.0)
    tel.close(timeout=1.0)
    assert per_call < 0.05  # a hang check, not a speed target: the export runs on its own thread


def test_hanging_collector_does_not_block_the_caller() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        tel = Telemetry(f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{port}/",
                        export_interval=0.1, options=FAST | {"timeout": 0.5})
        per_call = _time_calls(tel)
        started = time.perf_counter()
        tel.close(timeout=1.0)
        closing = time.perf_counter() - started
    # Hang checks, not speed targets: a call that waited for the collector would take its 0.5 s timeout (10x
    # this bound), and close() must give up on a collector that never answers.
    assert per_call < 0.05
    assert closing < 10.0


def test_exporters_authenticate_with_the_given_entra_credential() -> None:
    # App Insights with local auth disabled only accepts Entra tokens: the exporters must carry one.
    class FakeCredential:
        def get_token(self, *scopes: str, **kwargs: object) -> object:
            raise AssertionError("not called in this test")

    from types import SimpleNamespace

    credential = FakeCredential()
    settings = SimpleNamespace(
        appinsights_connection_string="InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                                      "IngestionEndpoint=http://127.0.0.1:9/",
        providers=SimpleNamespace(azure_client_id=None))
    exporting = telemetry.Telemetry.from_settings(settings, credential=credential)
    try:
        assert exporting.enabled
        assert exporting._exporter.options.credential is credential
        assert exporting._events.options.credential is credential
    finally:
        exporting.close(timeout=1)
    quiet = telemetry.Telemetry.from_settings(SimpleNamespace(appinsights_connection_string=None,
                                                              providers=settings.providers))
    assert not quiet.enabled

"""Telemetry without I/O: the request record, metrics and events through fakes, privacy, trace context."""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from gateway_lib import privacy, telemetry
from gateway_lib.privacy import PrivacyFilter
from gateway_lib.telemetry import RequestRecord, Telemetry, TraceContext

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def record(**changes: Any) -> RequestRecord:
    values: dict[str, Any] = dict(
        request_id="req-1", route="chat", caller_app="app-1", caller_user="oid-1", tenant="tid-1", team="search",
        tier="standard", model="chat-default", provider="azure_openai", target_model="gpt-4o-mini",
        deployment="gpt-4o-mini", region="eastus", prompt_tokens=120, completion_tokens=30, cost_usd="0.000038",
        latency_ms=812.456, upstream_ms=800.1, overhead_ms=12.356, trace_id=TRACE,
        attempts=[{"target": "aoai-east", "provider": "azure_openai", "outcome": "rate_limited", "status": 429,
                   "latency_ms": 20.0, "error": "upstream said: <the user's prompt>"},
                  {"target": "aoai-swc", "provider": "azure_openai", "outcome": "ok", "status": 200,
                   "latency_ms": 780.0}],
        fallbacks=1,
    )
    return RequestRecord(**(values | changes))


class FakeExporter:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.points: list[tuple[str, dict[str, str], float]] = []

    def export_metrics(self, metrics: Any) -> None:
        if self.fail:
            raise ConnectionError("collector down")
        for metric in metrics:
            keys = [k.key for k in metric.descriptor.label_keys]
            for ts in metric.time_series:
                tags = dict(zip(keys, [v.value for v in ts.label_values], strict=True))
                self.points.append((metric.descriptor.name, tags, ts.points[0].value.value))

    def total(self, name: str, **tags: str) -> float:
        return sum(v for n, t, v in self.points if n == name and tags.items() <= t.items())


class FakeEvents(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def events(self) -> list[tuple[str, dict[str, str], dict[str, float]]]:
        return [(r.getMessage(), getattr(r, "custom_dimensions", {}), getattr(r, "custom_measurements", {}))
                for r in self.records]


@pytest.fixture
def fakes() -> Any:
    exporter, events = FakeExporter(), FakeEvents()
    tel = Telemetry(metrics_exporter=exporter, event_handler=events, export_interval=3600)
    yield tel, exporter, events
    tel.close()


# --- the record ----------------------------------------------------------------------------------


def test_dimensions_are_strings_and_carry_every_field() -> None:
    dims = record().dimensions()
    assert all(isinstance(v, str) for v in dims.values())
    assert dims["cost_usd"] == "0.000038" and dims["prompt_tokens"] == "120" and dims["latency_ms"] == "812.46"
    assert dims["stream"] == "false" and dims["fallbacks"] == "1" and dims["status"] == "200"
    assert {"caller_app", "caller_user", "tenant", "team", "tier", "route", "model", "provider", "target_model",
            "deployment", "region", "upstream_ms", "overhead_ms", "completion_tokens"} <= dims.keys()
    assert "trace_id" not in dims and "task" not in dims  # trace id travels as operation_Id; None is left out


def test_every_field_that_is_not_text_is_rendered_by_its_kind() -> None:
    from dataclasses import fields

    from gateway_lib.telemetry import _COUNTS, _FLAGS, _MILLISECONDS

    kinds = {f.name: f.type for f in fields(telemetry.RequestRecord)}
    assert {n for n, t in kinds.items() if t == "int"} == set(_COUNTS)
    assert {n for n, t in kinds.items() if t == "float"} == set(_MILLISECONDS)
    assert {n for n, t in kinds.items() if t == "bool"} == set(_FLAGS)
    assert {n for n, t in kinds.items() if not t.startswith("str")} == {*_COUNTS, *_MILLISECONDS, *_FLAGS, "attempts"}
    assert record().dimensions().keys() == {n for n, v in vars(record()).items() if v is not None} - {"trace_id"}


def test_attempts_keep_only_known_fields_so_upstream_text_never_leaks() -> None:
    attempts = json.loads(record().dimensions()["attempts"])
    assert attempts[0] == {"target": "aoai-east", "provider": "azure_openai", "outcome": "rate_limited",
                           "status": 429, "latency_ms": 20.0}
    assert "prompt" not in record().dimensions()["attempts"]


def test_log_request_emits_one_record_with_custom_dimensions(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        telemetry.log_request(record())
    [entry] = caplog.records
    assert entry.name == "gateway.request"
    assert entry.custom_dimensions["request_id"] == "req-1"  # type: ignore[attr-defined]
    assert entry.custom_dimensions["record"] == "gateway.request"  # type: ignore[attr-defined]
    assert entry.traceId == TRACE  # type: ignore[attr-defined]
    assert entry.getMessage() == ("chat 200 ok chat-default->gpt-4o-mini 812ms tokens=120/30 cost=0.000038 "
                                  "request_id=req-1 attempts=aoai-east:rate_limited/429,aoai-swc:ok/200")
    assert "<the user's prompt>" not in entry.getMessage()


def test_a_record_that_cannot_be_rendered_is_dropped_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        telemetry.log_request(record(attempts=[object()]))  # type: ignore[list-item]
    assert not [r for r in caplog.records if r.name == "gateway.request"]


# --- Telemetry: disabled, metrics, events ------------------------------------------------------


def test_without_a_connection_string_nothing_exports(caplog: pytest.LogCaptureFixture) -> None:
    tel = Telemetry(None)
    assert not tel.enabled
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        tel.request(record())
        tel.track_event("BudgetAlert", {"team": "x"}, {"spend_usd": 1.0})
    assert tel.meter.get_metrics() == []  # no metric bookkeeping either
    assert [r.name for r in caplog.records] == ["gateway.request"]  # the log line still goes to the host


def test_from_settings_without_app_insights_is_disabled() -> None:
    @dataclass
    class Settings:
        appinsights_connection_string: str | None = None

    assert not Telemetry.from_settings(Settings()).enabled


def test_bad_connection_string_disables_export_instead_of_failing() -> None:
    tel = Telemetry("not a connection string")
    assert not tel.enabled
    tel.request(record())
    tel.close()


def test_request_metrics_have_names_tags_and_values(fakes: Any) -> None:
    tel, exporter, _ = fakes
    tel.request(record())
    tel.request(record(prompt_tokens=80, cost_usd="0.000012", fallbacks=0, attempts=[]))
    tel.flush()
    tags = {"provider": "azure_openai", "model": "gpt-4o-mini", "tier": "standard", "status": "200", "route": "chat"}
    assert exporter.total("gateway/requests", **tags) == 2
    assert exporter.total("gateway/tokens_prompt") == 200
    assert exporter.total("gateway/tokens_completion") == 60
    assert exporter.total("gateway/cost_usd") == pytest.approx(0.00005)
    assert exporter.total("gateway/latency_ms") == pytest.approx(2 * 812.456)
    assert exporter.total("gateway/overhead_ms") == pytest.approx(2 * 12.356)
    assert exporter.total("gateway/fallbacks") == 1
    assert exporter.total("gateway/upstream_errors", model="aoai-east", status="429") == 1
    assert {n for n, _, _ in exporter.points} <= set(telemetry.METRICS)
    assert all(set(t) == set(telemetry.TAG_KEYS) for _, t, _ in exporter.points)


def test_metrics_are_deltas_per_export(fakes: Any) -> None:
    tel, exporter, _ = fakes
    tel.request(record())
    tel.flush()
    tel.flush()  # nothing new: nothing re-sent
    tel.request(record())
    tel.flush()
    assert [v for n, _, v in exporter.points if n == "gateway/requests"] == [1, 1]


def test_rejections_count_by_reason_and_emit_an_event(fakes: Any) -> None:
    tel, exporter, events = fakes
    tel.request(record(status=429, error_code="rate_limit_exceeded", outcome="rejected", fallbacks=0, attempts=[]))
    tel.request(record(status=429, error_code="insufficient_quota", outcome="rejected", fallbacks=0, attempts=[]))
    tel.request(record(status=429, error_code="rate_limited", outcome="error", fallbacks=0, attempts=[]))  # upstream
    tel.flush()
    assert exporter.total("gateway/rate_limit_rejections") == 1
    assert exporter.total("gateway/budget_rejections") == 1
    assert [(name, props["reason"]) for name, props, _ in events.events] == [
        ("GatewayRejected", "rate_limit_exceeded"), ("GatewayRejected", "insufficient_quota")]


def test_fallback_emits_an_event_with_properties_and_measurements(fakes: Any) -> None:
    tel, _, events = fakes
    tel.request(record())
    [(name, props, measurements)] = events.events
    assert name == "GatewayFallback" and measurements == {"fallbacks": 1.0}
    assert props["request_id"] == "req-1" and props["target_model"] == "gpt-4o-mini" and props["team"] == "search"


def test_track_event_passes_properties_and_measurements(fakes: Any) -> None:
    tel, _, events = fakes
    tel.track_event("BudgetAlert", {"team": "search", "threshold": 80}, {"spend_usd": 8.5})
    assert events.events == [("BudgetAlert", {"team": "search", "threshold": "80"}, {"spend_usd": 8.5})]


def test_a_failing_exporter_never_raises_into_the_caller() -> None:
    tel = Telemetry(metrics_exporter=FakeExporter(fail=True), export_interval=3600)
    tel.request(record())
    tel.flush()
    tel.close()


@dataclass
class FakeScope:
    request_id: str = "req-9"
    route: str = "chat"
    trace_id: str = TRACE
    caller: Any = None
    model: str | None = None

    def elapsed_ms(self) -> float:
        return 4.0


def test_rejection_before_the_pipeline_leaves_a_record(fakes: Any, caplog: pytest.LogCaptureFixture) -> None:
    tel, exporter, _ = fakes
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        tel.rejection(FakeScope(), 401, "invalid_token")
    tel.flush()
    dims = caplog.records[-1].custom_dimensions  # type: ignore[attr-defined]
    assert (dims["status"], dims["outcome"], dims["error_code"], dims["latency_ms"]) == ("401", "rejected",
                                                                                         "invalid_token", "4.00")
    assert exporter.total("gateway/requests", status="401", provider="none", route="chat") == 1


def test_a_route_answered_at_the_edge_leaves_an_ok_record_naming_its_model(fakes: Any,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    tel, exporter, _ = fakes
    with caplog.at_level(logging.INFO, logger=telemetry.REQUEST_LOGGER):
        tel.answered(FakeScope(route="models", model="gpt-4o-mini"), 200)
    tel.flush()
    dims = caplog.records[-1].custom_dimensions  # type: ignore[attr-defined]
    assert (dims["status"], dims["outcome"], dims["model"], dims["route"]) == ("200", "ok", "gpt-4o-mini", "models")
    assert exporter.total("gateway/requests", status="200", provider="none", route="models") == 1


# --- privacy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "sensitive"), [
    ("authorization", True), ("Authorization", True), ("x-api-key", True), ("api_key", True), ("apikey", True),
    ("access_token", True), ("token", True), ("prompt", True), ("content", True), ("messages", True),
    ("completion", True), ("client_secret", True), ("set-cookie", True), ("Ocp-Apim-Subscription-Key", True),
    ("prompt_tokens", False), ("completion_tokens", False), ("max_tokens", False), ("prompt_chars", False),
    ("request_id", False), ("tokenizer", False), ("model", False), ("status", False), ("content_type", False),
    ("content-length", False), ("id_token", True), ("sig", True),
    ("x-functions-key", True), ("private_key", True), ("credential", True), ("client_assertion", True),
    ("output", True), ("answer", True), ("output_tokens", False),
])
def test_sensitive_names(name: str, sensitive: bool) -> None:
    assert privacy.is_sensitive(name) is sensitive


def test_privacy_filter_blanks_sensitive_attributes_and_dimension_keys() -> None:
    logger = logging.Logger("privacy-test")
    handler = FakeEvents()
    seen = handler.records
    handler.addFilter(PrivacyFilter())
    logger.addHandler(handler)
    dims = {"content": "hello", "prompt_tokens": 5, "x-api-key": "k-123", "request_id": "r"}
    logger.warning("m", extra={"authorization": "Bearer eyJ", "prompt": "my secret", "route": "chat",
                               "custom_dimensions": dims})
    [entry] = seen
    assert entry.authorization == entry.prompt == privacy.REDACTED  # type: ignore[attr-defined]
    assert entry.route == "chat"  # type: ignore[attr-defined]
    assert entry.custom_dimensions == {"content": "[redacted]", "prompt_tokens": 5,  # type: ignore[attr-defined]
                                       "x-api-key": "[redacted]", "request_id": "r"}
    assert dims["content"] == "hello"  # the caller's dict is not mutated


def test_install_privacy_filter_covers_every_handler_once() -> None:
    logger = logging.Logger("install-test")
    handlers = [logging.NullHandler(), logging.NullHandler()]
    for h in handlers:
        logger.addHandler(h)
    privacy.install_privacy_filter(logger)
    privacy.install_privacy_filter(logger)
    assert [len([f for f in h.filters if isinstance(f, PrivacyFilter)]) for h in handlers] == [1, 1]


def test_redact_helpers() -> None:
    assert privacy.redact("sk-live-123") == "[redacted]" and privacy.redact(None) == privacy.redact("") == ""
    assert privacy.redact_mapping({"Authorization": "Bearer x", "accept": "json"}) == {
        "Authorization": "[redacted]", "accept": "json"}


# --- W3C trace context and request ids ----------------------------------------------------------

VALID = f"00-{TRACE}-00f067aa0ba902b7-01"


def test_parse_valid_traceparent() -> None:
    ctx = telemetry.parse_traceparent(VALID)
    assert ctx == TraceContext(TRACE, "00f067aa0ba902b7", 1)
    assert ctx.sampled and ctx.traceparent == VALID


@pytest.mark.parametrize("header", [
    None, "", "garbage", VALID.upper(), f"00-{'0' * 32}-00f067aa0ba902b7-01", f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-00f067aa0ba902b7-01", f"00-{TRACE}-00f067aa0ba902b7-01-extra", f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",
    f"00-{TRACE}-00f067aa0ba902b7-1", f"0-{TRACE}-00f067aa0ba902b7-01", f"00-{TRACE}-00f067aa0ba902bg-01",
])
def test_invalid_traceparent_is_ignored(header: str | None) -> None:
    assert telemetry.parse_traceparent(header) is None


def test_future_versions_may_append_fields() -> None:
    ctx = telemetry.parse_traceparent(f"01-{TRACE}-00f067aa0ba902b7-00-whatever")
    assert ctx == TraceContext(TRACE, "00f067aa0ba902b7", 0) and not ctx.sampled


def test_a_child_sends_only_the_flags_its_version_defines() -> None:
    parent = telemetry.parse_traceparent(f"00-{TRACE}-00f067aa0ba902b7-fd")
    assert parent is not None and telemetry.child_traceparent(parent).traceparent.endswith("-01")


def test_child_keeps_trace_and_flags_with_a_new_span() -> None:
    parent = telemetry.parse_traceparent(f"00-{TRACE}-00f067aa0ba902b7-00")
    child = telemetry.child_traceparent(parent)
    assert (child.trace_id, child.flags) == (TRACE, 0) and child.span_id != parent.span_id  # type: ignore[union-attr]
    assert telemetry.parse_traceparent(child.traceparent) == child


def test_new_trace_is_valid_sampled_and_unique() -> None:
    first, second = telemetry.new_traceparent(), telemetry.child_traceparent(None)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", first.traceparent)
    assert telemetry.parse_traceparent(first.traceparent) == first and first.trace_id != second.trace_id


@pytest.mark.parametrize("value", ["abc-123", "A.b_c:d-e", "x" * 128, "0HN6:00000001"])
def test_well_formed_request_ids_are_kept(value: str) -> None:
    assert telemetry.accept_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "has space", "x" * 129, "naïve", "a/b", "a\nb", "<script>"])
def test_other_request_ids_are_replaced_with_uuid4(value: str | None) -> None:
    assert uuid.UUID(telemetry.accept_request_id(value)).version == 4

"""Structured telemetry: one record per request, metrics, custom events. Never prompt or completion text.

* ``log_request`` writes the request's record through ``logging`` (logger ``gateway.request``)
  with its fields in ``extra={"custom_dimensions": ...}``, the convention opencensus'
  ``AzureLogHandler`` turns into ``traces.customDimensions``.
* ``Telemetry`` adds Application Insights export when a connection string is set: metrics
  (``customMetrics``), custom events (``customEvents``) and the request log (``traces``).
  Without one it exports nothing and costs nothing. Export runs on opencensus' background
  threads; every call into it is guarded, so telemetry can never fail or slow a request.
* ``PrivacyFilter`` blanks log attributes named like credentials or content (defence in depth).
* W3C ``traceparent`` and ``x-request-id`` helpers.

The catalogue of names, dimensions and KQL lives in docs/telemetry.md.
"""

from __future__ import annotations

import atexit
import inspect
import json
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from gateway_lib.privacy import PrivacyFilter

REQUEST_LOGGER = "gateway.request"
log = logging.getLogger(REQUEST_LOGGER)
_debug = logging.getLogger("gateway.telemetry")

# Metric names (customMetrics.name) and the dimensions every one of them carries.
METRICS = (
    "gateway/requests", "gateway/latency_ms", "gateway/overhead_ms", "gateway/tokens_prompt",
    "gateway/tokens_completion", "gateway/cost_usd", "gateway/fallbacks", "gateway/rate_limit_rejections",
    "gateway/budget_rejections", "gateway/upstream_errors",
)
TAG_KEYS = ("provider", "model", "tier", "status", "route")
EVENT_FALLBACK = "GatewayFallback"
EVENT_REJECTED = "GatewayRejected"
RATE_LIMIT_CODES = frozenset({"rate_limit_exceeded"})  # the gateway's own 429; upstream 429s are "rate_limited"
BUDGET_CODES = frozenset({"insufficient_quota"})  # spent token/USD caps and callers blocked by budget enforcement
REJECTION_EVENT_CODES = RATE_LIMIT_CODES | BUDGET_CODES | {"content_filter"}
_ATTEMPT_KEYS = ("target", "provider", "outcome", "status", "latency_ms")  # upstream error text never passes
# RequestRecord's fields that are not text, by how they are rendered (a test holds these to the dataclass).
_COUNTS = ("status", "prompt_tokens", "completion_tokens", "fallbacks")
_MILLISECONDS = ("latency_ms", "upstream_ms", "overhead_ms")
_FLAGS = ("stream", "upstream_error")
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps builds an encoder per call when given options


# --- the request record ------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """Everything worth knowing about one request, and nothing a caller typed."""

    request_id: str
    route: str
    status: int = 200
    outcome: str = "ok"  # ok | error | rejected | upstream_cut | client_disconnected
    caller_app: str | None = None
    caller_user: str | None = None  # Entra object id (a GUID), never a UPN or e-mail
    tenant: str | None = None
    team: str | None = None
    tier: str | None = None
    task: str | None = None
    model: str | None = None  # the alias the caller asked for
    provider: str | None = None
    target_model: str | None = None
    deployment: str | None = None
    region: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {target, provider, outcome, status, latency_ms}
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: str = "0"  # decimal string: exact, summed with todecimal() in KQL
    latency_ms: float = 0.0
    upstream_ms: float = 0.0
    overhead_ms: float = 0.0
    stream: bool = False
    fallbacks: int = 0
    upstream_error: bool = False
    trace_id: str | None = None  # W3C trace id: becomes operation_Id, joining the host's request telemetry

    def dimensions(self) -> dict[str, str]:
        """customDimensions: App Insights properties are strings, so numbers are rendered here."""
        values = vars(self)  # not asdict, which deep-copies; built field by kind, once per request
        out = {name: value for name, value in values.items() if type(value) is str and name != "trace_id"}
        for name in _COUNTS:
            out[name] = str(values[name])
        for name in _MILLISECONDS:
            out[name] = f"{values[name]:.2f}"
        for name in _FLAGS:
            out[name] = "true" if values[name] else "false"
        out["attempts"] = _attempts_json(self.attempts)
        return out

    def message(self) -> str:
        """The one-line human form (what the Functions log stream shows, App Insights or not)."""
        served = self.target_model or "-"
        line = (f"{self.route} {self.status} {self.outcome} {self.model or '-'}->{served} "
                f"{self.latency_ms:.0f}ms tokens={self.prompt_tokens}/{self.completion_tokens} "
                f"cost={self.cost_usd} request_id={self.request_id}")
        if len(self.attempts) > 1:  # a fallback happened: say which targets were tried and how each ended
            line += " attempts=" + ",".join(f"{a.get('target')}:{a.get('outcome')}/{a.get('status') or '-'}"
                                            for a in self.attempts)
        return line


def log_request(record: RequestRecord) -> None:
    """Emit the request's single log record on ``gateway.request``."""
    if not log.isEnabledFor(logging.INFO):  # nothing would take the record: do not build it
        return
    try:
        # "record" tells request rows apart from other gateway traces in KQL.
        extra: dict[str, Any] = {"custom_dimensions": {"record": "gateway.request"} | record.dimensions()}
        if record.trace_id:
            extra["traceId"] = record.trace_id  # AzureLogHandler maps it to operation_Id
        log.info(record.message(), extra=extra)
    except Exception:  # a malformed record must not fail the request it describes
        _debug.debug("request record not logged", exc_info=True)


def _attempts_json(attempts: Sequence[Mapping[str, Any]]) -> str:
    return _COMPACT.encode([{k: a.get(k) for k in _ATTEMPT_KEYS if k in a} for a in attempts])


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


# --- metrics: a delta accumulator opencensus' Azure exporter can export -------------------------


class Meter:
    """Sums per (metric, tags) since the last export; ``get_metrics`` hands them over and starts afresh.

    Not opencensus' stats views: they export cumulative totals since process start (every
    interval re-sends the running total, so customMetrics cannot simply be summed) and
    deep-copy every view on each record, which grows with the tag combinations seen
    (docs/telemetry.md). Deltas sum correctly across instances and restarts.
    """

    def __init__(self) -> None:
        self._sums: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()  # the exporter thread swaps the dict while requests add to it

    def add(self, name: str, tags: tuple[str, ...], value: float) -> None:
        if value:
            with self._lock:
                key = (name, tags)
                self._sums[key] = self._sums.get(key, 0.0) + value

    def get_metrics(self) -> list[Any]:
        """The opencensus ``MetricProducer`` interface: one gauge per metric, one series per tag set."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return _to_opencensus(sums) if sums else []


def _to_opencensus(sums: Mapping[tuple[str, tuple[str, ...]], float]) -> list[Any]:
    from opencensus.metrics import label_key, label_value
    from opencensus.metrics.export import metric, metric_descriptor, point, time_series, value

    now = datetime.now(UTC).replace(tzinfo=None)  # opencensus' own convention: naive UTC
    keys = [label_key.LabelKey(k, k) for k in TAG_KEYS]
    series: dict[str, list[Any]] = {}
    for (name, tags), total in sums.items():
        series.setdefault(name, []).append(time_series.TimeSeries(
            [label_value.LabelValue(t) for t in tags], [point.Point(value.ValueDouble(total), now)], now))
    gauge = metric_descriptor.MetricDescriptorType.GAUGE_DOUBLE
    return [metric.Metric(metric_descriptor.MetricDescriptor(name, name, "1", gauge, keys), ts)
            for name, ts in series.items()]


def _tag(value: object) -> str:
    text = "none" if value is None or value == "" else str(value)
    return "".join(ch if 32 <= ord(ch) <= 126 else "?" for ch in text)[:255]


def _measure(meter: Meter, record: RequestRecord) -> None:
    tags = tuple(_tag(v) for v in (record.provider, record.target_model or record.model, record.tier,
                                   record.status, record.route))
    meter.add("gateway/requests", tags, 1)
    meter.add("gateway/latency_ms", tags, record.latency_ms)
    meter.add("gateway/overhead_ms", tags, record.overhead_ms)
    meter.add("gateway/tokens_prompt", tags, record.prompt_tokens)
    meter.add("gateway/tokens_completion", tags, record.completion_tokens)
    meter.add("gateway/cost_usd", tags, _usd(record.cost_usd))
    meter.add("gateway/fallbacks", tags, record.fallbacks)
    if record.error_code in RATE_LIMIT_CODES:
        meter.add("gateway/rate_limit_rejections", tags, 1)
    if record.error_code in BUDGET_CODES:
        meter.add("gateway/budget_rejections", tags, 1)
    for attempt in record.attempts:
        if attempt.get("outcome") not in (None, "ok"):
            meter.add("gateway/upstream_errors", tuple(_tag(v) for v in (
                attempt.get("provider") or record.provider, attempt.get("target"), record.tier,
                attempt.get("status") or attempt.get("outcome"), record.route)), 1)


def _usd(cost: str) -> float:
    try:
        return float(Decimal(cost))
    except (InvalidOperation, ValueError, TypeError):
        return 0.0


# --- Application Insights export ---------------------------------------------------------------


class MetricsSink(Protocol):
    def export_metrics(self, metrics: Any) -> None: ...


class _Scope(Protocol):  # the slice of edge.Scope a record made at the edge needs
    request_id: str
    route: str
    trace_id: str
    caller: Any
    model: str | None

    def elapsed_ms(self) -> float: ...


class Telemetry:
    """Application Insights export of metrics, events and the request log; a no-op without a connection string.

    ``options`` go to the opencensus exporters (``storage_path``, ``enable_local_storage``,
    ``timeout``...). Tests may inject ``metrics_exporter`` / ``event_handler`` fakes instead.
    """

    def __init__(self, connection_string: str | None = None, *, export_interval: float = 60.0,
                 options: Mapping[str, Any] | None = None, metrics_exporter: MetricsSink | None = None,
                 event_handler: logging.Handler | None = None) -> None:
        self.meter = Meter()
        self._exporter: Any = metrics_exporter
        self._events: logging.Handler | None = event_handler
        self._logs: logging.Handler | None = None
        self._thread: Any = None
        if metrics_exporter is None and event_handler is None and connection_string:
            self._start(connection_string, export_interval, dict(options or {}))
        elif metrics_exporter is not None:
            self._thread = _export_thread(self.meter, metrics_exporter, export_interval)
        self.enabled = self._exporter is not None or self._events is not None
        self._event_log = _private_logger("gateway.events", self._events)

    @classmethod
    def from_settings(cls, settings: Any, credential: Any = None) -> Telemetry:
        """The process's telemetry: exporting when ``appinsights_connection_string`` is set.

        The infra disables local (key) auth on Application Insights, so ingestion needs an Entra
        token, and opencensus reads no APPLICATIONINSIGHTS_AUTHENTICATION_STRING: it is handed the
        user-assigned managed identity (``AZURE_CLIENT_ID``) instead, or an injected credential.
        """
        connection_string = settings.appinsights_connection_string
        client_id = settings.providers.azure_client_id if connection_string else None
        if connection_string and credential is None and client_id:
            from azure.identity import ManagedIdentityCredential  # no I/O until the first export

            credential = ManagedIdentityCredential(client_id=client_id)
        options = {"credential": credential} if connection_string and credential is not None else {}
        return cls(connection_string, options=options)

    def _start(self, connection_string: str, interval: float, options: dict[str, Any]) -> None:
        try:
            exporters = _azure_exporters(connection_string, interval, options)
        except Exception as exc:  # a bad connection string must not stop the gateway serving
            _debug.warning("Application Insights export disabled: %s: %s", type(exc).__name__, exc)
            return
        self._exporter, self._events, self._logs = exporters
        self._thread = _export_thread(self.meter, self._exporter, interval)
        _attach_request_log(self._logs)

    def request(self, record: RequestRecord) -> None:
        """Log the request's record and, when exporting, count it and emit its events."""
        log_request(record)
        if not self.enabled:
            return
        try:
            _measure(self.meter, record)
            if record.fallbacks:
                self._event(EVENT_FALLBACK, _event_props(record), {"fallbacks": float(record.fallbacks)},
                            record.trace_id)
            if record.error_code in REJECTION_EVENT_CODES:
                self._event(EVENT_REJECTED, _event_props(record) | {"reason": record.error_code or ""}, {},
                            record.trace_id)
        except Exception:
            _debug.debug("request metrics not recorded", exc_info=True)

    def rejection(self, scope: _Scope, status: int, error_code: str | None = None) -> None:
        """The record of a request refused before the pipeline (auth, parsing, limits)."""
        self._at_edge(scope, status, "rejected", error_code)

    def answered(self, scope: _Scope, status: int) -> None:
        """The record of a request its route answered without the pipeline (models, usage, counted tokens)."""
        self._at_edge(scope, status, "ok", None)

    def _at_edge(self, scope: _Scope, status: int, outcome: str, error_code: str | None) -> None:
        caller = scope.caller
        self.request(RequestRecord(
            request_id=scope.request_id, route=scope.route, status=status, outcome=outcome, error_code=error_code,
            caller_app=getattr(caller, "app_id", None), caller_user=getattr(caller, "user_id", None),
            tenant=getattr(caller, "tenant_id", None), team=getattr(caller, "team", None),
            tier=getattr(getattr(caller, "tier", None), "name", None), model=scope.model,
            latency_ms=round(scope.elapsed_ms(), 2), overhead_ms=round(scope.elapsed_ms(), 2), trace_id=scope.trace_id,
        ))

    def track_event(self, name: str, properties: Mapping[str, str] | None = None,
                    measurements: Mapping[str, float] | None = None) -> None:
        """A customEvents row. Queued for the exporter thread: returns in microseconds, never raises."""
        self._event(name, properties or {}, measurements or {}, None)

    def _event(self, name: str, properties: Mapping[str, Any], measurements: Mapping[str, float],
               trace_id: str | None) -> None:
        if self._events is None:
            return
        try:
            extra: dict[str, Any] = {"custom_dimensions": {k: _text(v) for k, v in properties.items()},
                                     "custom_measurements": dict(measurements)}
            if trace_id:
                extra["traceId"] = trace_id
            self._event_log.info(name, extra=extra)
        except Exception:
            _debug.debug("event %s not queued", name, exc_info=True)

    def flush(self, timeout: float = 5.0) -> None:
        """Export what is pending now (tests, shutdown)."""
        try:
            if self._exporter is not None:
                metrics = self.meter.get_metrics()
                if metrics:
                    self._exporter.export_metrics(metrics)
            for handler in (self._events, self._logs):
                if handler is not None:
                    _flush(handler, timeout)
        except Exception:
            _debug.debug("telemetry flush failed", exc_info=True)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the exporter threads and detach the log handler."""
        self.flush(timeout)
        try:
            if self._thread is not None:
                self._thread.cancel()
            shutdown = getattr(self._exporter, "shutdown", None)
            if shutdown is not None:
                atexit.unregister(shutdown)  # already flushed; the exit hook would export to a closed sink
            _detach_request_log(self._logs)
            for handler in (self._events, self._logs):
                if handler is not None:
                    handler.close()
        except Exception:
            _debug.debug("telemetry close failed", exc_info=True)
        self.enabled = False


def _event_props(record: RequestRecord) -> dict[str, str]:
    keys = ("request_id", "caller_app", "team", "tier", "route", "model", "provider", "target_model", "status")
    dims = record.dimensions()
    return {k: dims[k] for k in keys if k in dims}


def _flush(handler: logging.Handler, timeout: float) -> None:
    # opencensus' handlers wait for their queue up to `timeout`; a plain Handler.flush takes no arguments.
    if "timeout" in inspect.signature(handler.flush).parameters:
        handler.flush(timeout=timeout)  # type: ignore[call-arg]
    else:
        handler.flush()


def _private_logger(name: str, handler: logging.Handler | None) -> logging.Logger:
    # Outside the logging hierarchy: events reach only their exporter, never the console or the host.
    logger = logging.Logger(name, logging.INFO)
    if handler is not None:
        logger.addHandler(handler)
    return logger


def _azure_exporters(connection_string: str, interval: float, options: dict[str, Any]) -> tuple[Any, Any, Any]:
    # Imported here: ~40 ms of imports a gateway without App Insights never pays. opencensus
    # calls locale.getdefaultlocale() at import (deprecated since 3.11); nothing we can change.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*getdefaultlocale", category=DeprecationWarning)
        from opencensus.ext.azure.log_exporter import AzureEventHandler, AzureLogHandler
        from opencensus.ext.azure.metrics_exporter import MetricsExporter

    class _NoStatsbeat:
        # Statsbeat is the SDK's own usage telemetry, sent to Microsoft-owned endpoints outside
        # the customer's App Insights (and probing the VM metadata service): off in a gateway.
        def _check_stats_collection(self) -> bool:
            return False

    class _Metrics(_NoStatsbeat, MetricsExporter):
        pass

    class _Events(_NoStatsbeat, AzureEventHandler):
        pass

    class _Logs(_NoStatsbeat, AzureLogHandler):
        pass

    common = {"connection_string": connection_string, "export_interval": interval} | options
    metrics = _Metrics(**(common | {"enable_standard_metrics": False}))
    events, logs = _Events(**common), _Logs(**common)
    for handler in (events, logs):
        handler.addFilter(PrivacyFilter())
    logs.setLevel(logging.INFO)
    return metrics, events, logs


def _export_thread(meter: Meter, exporter: MetricsSink, interval: float) -> Any:
    from opencensus.metrics import transport

    return transport.get_exporter_thread([meter], exporter, interval=interval)


def _attach_request_log(handler: logging.Handler | None) -> None:
    if handler is None:
        return
    # The request record goes to App Insights through this handler only: the Functions host
    # would forward a second copy to `traces` without customDimensions.
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)  # the record is INFO; a WARNING root level must not swallow it
    logging.getLogger("gateway").addHandler(handler)  # other gateway warnings keep their dimensions too


def _detach_request_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        log.removeHandler(handler)
        log.propagate = True
        log.setLevel(logging.NOTSET)
        logging.getLogger("gateway").removeHandler(handler)


# Trace context lives in its own module; re-exported for callers that import it from here.
from gateway_lib.http.tracecontext import (  # noqa: E402
    TraceContext,
    accept_request_id,
    child_traceparent,
    new_traceparent,
    parse_traceparent,
)

__all__ = ["TraceContext", "accept_request_id", "child_traceparent", "new_traceparent", "parse_traceparent"]

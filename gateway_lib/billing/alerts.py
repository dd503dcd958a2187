"""Budget alerts: the stored alert, its claim, the sinks, and delivery with retry.

An alert is raised at most once: its RowKey is derived from kind + scope + subject +
period + threshold, and raising it is an insert (``EntityExists`` = someone else, another
instance or an overlapping timer run, already raised it). The alert row is written
*before* any sink is called, together with a ``pending|`` marker in one entity-group
transaction, so a failing webhook or a crash never loses it: the next rollup run finds
the marker and retries the sinks that have no ``sent_at`` yet.

Table ``{prefix}alerts``: PartitionKey = month of the alert's period (``YYYYMM``), so
``list_alerts`` and the retry scan read a handful of partitions instead of the table;
RowKey ``alert|{kind}|{scope}|{subject}|{period}|{threshold}`` and ``pending|{alert rk}``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol
from urllib.parse import quote

from gateway_lib.billing.ledger import capped
from gateway_lib.storage.base import Entity, EntityExists, Op, PreconditionFailed, TableNotFound, TableStore, TransactionFailed

log = logging.getLogger("gateway.alerts")

AlertKind = Literal["threshold", "token_threshold", "forecast"]  # USD, tokens, USD
AlertScope = Literal["caller", "team"]

# A run that starts delivering an alert pushes ``next_attempt_at`` this far ahead first:
# a concurrent run reading the row meanwhile leaves it alone (a lease, not a lock).
DELIVERY_LEASE = timedelta(minutes=2)
KEY_PART_MAX = 900  # bytes: a part this long still fits each key it is put in (the others are short)
MAX_BACKOFF = timedelta(hours=1)


def alerts_table(prefix: str) -> str:
    return f"{prefix}alerts"


def key_part(value: str) -> str:
    """Escape a value for use inside a key: Azure forbids / \\ # ? and controls; '|' is our separator.

    A key holds several parts and Azure caps it at 1 KiB, while a team name comes from a token claim: an
    escaped value over ``KEY_PART_MAX`` bytes keeps its start and a hash of the whole."""
    return capped(quote(value, safe=":@-_.~ "), value, KEY_PART_MAX)


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    scope: AlertScope
    subject: str  # caller key or team name
    period: str  # "day|YYYYMMDD" or "month|YYYYMM" (UTC)
    threshold: int | None  # percent of budget; None for a forecast alert
    spend: Decimal  # USD, or tokens for a token_threshold alert (as is the budget)
    budget: Decimal
    created: datetime
    forecast_at: datetime | None = None  # when the budget is predicted to run out
    delivery: Mapping[str, str | None] = field(default_factory=dict)  # sink name -> sent_at ISO, None = pending
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    etag: str | None = None

    @property
    def partition_key(self) -> str:
        return self.period.split("|", 1)[1][:6]

    @property
    def row_key(self) -> str:
        threshold = "" if self.threshold is None else f"{self.threshold:04d}"
        return f"alert|{self.kind}|{self.scope}|{key_part(self.subject)}|{self.period}|{threshold}"

    @property
    def unit(self) -> Literal["usd", "tokens"]:
        return "tokens" if self.kind == "token_threshold" else "usd"

    @property
    def pending_sinks(self) -> list[str]:
        return [name for name, sent in self.delivery.items() if not sent]

    def text(self) -> str:
        """One human line for chat webhooks."""
        who = f"{self.scope} {self.subject}"
        unit, period = self.period.split("|", 1)
        money = f"USD {self.spend:.2f} of {self.budget:.2f}"
        if self.unit == "tokens":
            return (f"Token budget alert: {who} reached {self.threshold}% of its {unit} token budget "
                    f"({self.spend:,.0f} of {self.budget:,.0f} tokens, {period}).")
        if self.kind == "forecast" and self.forecast_at is not None:
            when = self.forecast_at.strftime("%Y-%m-%d %H:%M UTC")
            return f"Budget forecast: {who} is on track to exhaust its {unit} budget on {when} ({money}, {period})."
        return f"Budget alert: {who} reached {self.threshold}% of its {unit} budget ({money}, {period})."

    def payload(self) -> dict[str, Any]:
        """Teams/Slack incoming-webhook body: ``text`` for people, ``alert`` for machines."""
        return {"text": self.text(), "alert": self.as_json()}

    def as_json(self) -> dict[str, Any]:
        return {
            "id": f"{self.partition_key}/{self.row_key}", "kind": self.kind, "scope": self.scope,
            "subject": self.subject, "period": self.period, "threshold": self.threshold, "unit": self.unit,
            **self._amounts(),
            "forecast_at": _iso(self.forecast_at), "created": _iso(self.created),
            "delivery": dict(self.delivery), "attempts": self.attempts, "last_error": self.last_error,
        }

    def _amounts(self) -> dict[str, str]:
        if self.unit == "tokens":
            return {"tokens": str(self.spend), "budget_tokens": str(self.budget)}
        return {"spend_usd": str(self.spend), "budget_usd": str(self.budget)}

    def to_entity(self) -> Entity:
        props = {
            "kind": self.kind, "scope": self.scope, "subject": self.subject, "period": self.period,
            "threshold": -1 if self.threshold is None else self.threshold,
            "spend": str(self.spend), "budget": str(self.budget), "created": _iso(self.created),
            "forecast_at": _iso(self.forecast_at) or "", "delivery": json.dumps(dict(self.delivery), sort_keys=True),
            "attempts": self.attempts, "next_attempt_at": _iso(self.next_attempt_at) or "",
            "last_error": self.last_error or "",
        }
        return Entity(self.partition_key, self.row_key, props)

    @classmethod
    def from_entity(cls, entity: Entity) -> Alert:
        p = entity.properties
        threshold = int(p["threshold"])
        return cls(
            kind=p["kind"], scope=p["scope"], subject=p["subject"], period=p["period"],
            threshold=None if threshold < 0 else threshold, spend=Decimal(p["spend"]), budget=Decimal(p["budget"]),
            created=_parse(p["created"]) or datetime.min.replace(tzinfo=UTC), forecast_at=_parse(p.get("forecast_at")),
            delivery=json.loads(p.get("delivery") or "{}"), attempts=int(p.get("attempts", 0)),
            next_attempt_at=_parse(p.get("next_attempt_at")), last_error=p.get("last_error") or None,
            etag=entity.etag,
        )


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def _parse(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


# --- sinks ---------------------------------------------------------------------------------------


class AlertSink(Protocol):
    name: str

    async def send(self, alert: Alert) -> None:
        """Deliver the alert or raise; the caller records the outcome and retries later."""
        ...


TrackEvent = Callable[[str, Mapping[str, str], Mapping[str, float]], Any]


@dataclass
class TelemetrySink:
    """Application Insights custom event ``BudgetAlert`` through ``Telemetry.track_event``."""

    track_event: TrackEvent
    name: str = "telemetry"

    async def send(self, alert: Alert) -> None:
        props = {k: "" if v is None else str(v) for k, v in alert.as_json().items() if k != "delivery"}
        measurements = {name: float(value) for name, value in alert._amounts().items()}
        result = self.track_event("BudgetAlert", props, measurements)
        if inspect.isawaitable(result):
            await result


class WebhookError(Exception):
    pass


@dataclass
class WebhookSink:
    """POST to a Teams/Slack-compatible incoming webhook, in a worker thread (``requests`` blocks)."""

    url: str
    timeout: tuple[float, float] = (3.0, 10.0)  # connect, read: a timer run must not hang on a dead endpoint
    retries: int = 2  # within one run; later runs retry again with backoff
    backoff_seconds: float = 0.5
    name: str = "webhook"

    async def send(self, alert: Alert) -> None:
        await asyncio.to_thread(self._post, alert.payload())

    def _post(self, payload: dict[str, Any]) -> None:
        import requests  # imported on first use: only the timer function needs it

        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                response = requests.post(self.url, json=payload, timeout=self.timeout)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}"
                continue
            if response.status_code < 300:
                return
            last = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code != 429:
                break  # the webhook rejected the body: retrying now will not help
        raise WebhookError(last)


# --- claim, delivery, listing --------------------------------------------------------------------


async def claim_alert(store: TableStore, prefix: str, alert: Alert) -> bool:
    """Record the alert and its pending marker atomically; False if it was already raised."""
    entity = alert.to_entity()
    ops = [Op("insert", entity)]
    if alert.pending_sinks:  # no sink configured: nothing to deliver, the row alone is the record
        ops.append(Op("insert", Entity(entity.partition_key, f"pending|{entity.row_key}", {"alert": entity.row_key})))
    try:
        await store.transact(alerts_table(prefix), ops)
    except EntityExists:
        return False
    except TransactionFailed as exc:
        if exc.reason == "exists":
            return False
        raise
    return True


@dataclass
class DeliveryReport:
    delivered: int = 0
    pending: int = 0
    failures: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)  # sinks that failed this run: not retried until the next


async def deliver_pending(
    store: TableStore, prefix: str, sinks: Sequence[AlertSink], now: datetime, *, deadline: datetime | None = None,
    clock: Callable[[], datetime] | None = None,
) -> DeliveryReport:
    """Send every pending alert of this and last month to the sinks it has not reached yet.

    ``clock`` times each lease, delivery and backoff as it happens: after a slow sink, a lease stamped with
    the run's start would already have run out, and another run would post the same alert again."""
    report = DeliveryReport()
    tick = clock or (lambda: now)
    by_name = {sink.name: sink for sink in sinks}
    for month in (_month(now), _month(_previous_month(now))):
        markers = await store.query(alerts_table(prefix), month, row_key_from="pending|", row_key_to="pending}")
        for marker in markers:
            if deadline and clock and clock() >= deadline:
                report.pending += 1
                continue
            try:
                await _deliver_one(store, prefix, month, marker.properties["alert"], by_name, tick, report)
            except Exception as exc:  # one alert's trouble must not hold back the others (nor the rollup)
                report.pending += 1
                report.failures.append(f"{marker.properties.get('alert')}: {type(exc).__name__}")
                log.exception("alert delivery step failed", extra={"alert": marker.properties.get("alert")})
    return report


async def _deliver_one(
    store: TableStore, prefix: str, month: str, row_key: str, sinks: Mapping[str, AlertSink],
    clock: Callable[[], datetime], report: DeliveryReport,
) -> None:
    # A sink that failed once this run is not tried again until the next: a dead webhook costs
    # one timeout per run, not one per pending alert, and the run stays inside the timer's limit.
    usable = {name: sink for name, sink in sinks.items() if name not in report.down}
    alert, waiting = await _lease(store, prefix, month, row_key, clock(), usable)
    if alert is None:
        report.pending += waiting
        return
    delivery = dict(alert.delivery)
    error = None
    for name in alert.pending_sinks:
        if (sink := usable.get(name)) is None:
            continue  # not configured (any more) or down this run: stays pending
        try:
            await sink.send(alert)
            delivery[name] = _iso(clock())
        except Exception as exc:  # any sink failure is recorded and retried, never raised into the rollup
            error = f"{name}: {type(exc).__name__}: {exc}"[:500]
            report.failures.append(error)
            report.down.add(name)
            log.warning("alert delivery failed", extra={"alert": row_key, "sink": name, "error": error})
    try:
        await _finish(store, prefix, replace(alert, delivery=delivery, last_error=error), clock(), report)
    except (PreconditionFailed, TransactionFailed):
        # Our lease ran out mid-delivery and another run took the alert over: it records the outcome.
        log.warning("alert delivery outcome not recorded: lease lost", extra={"alert": row_key})


async def _lease(
    store: TableStore, prefix: str, month: str, row_key: str, now: datetime, usable: Mapping[str, AlertSink],
) -> tuple[Alert | None, bool]:
    """Claim this delivery attempt with an ETag write, so two runs never post the same alert at once.

    Returns the leased alert, or None and whether the alert is still waiting for a sink.
    """
    entity = await store.get(alerts_table(prefix), month, row_key)
    if entity is None:
        await store.delete(alerts_table(prefix), month, f"pending|{row_key}")
        return None, False
    alert = Alert.from_entity(entity)
    if not alert.pending_sinks:  # another run finished it after we listed the marker
        return None, False
    if alert.next_attempt_at and alert.next_attempt_at > now:
        return None, True  # another run holds the lease, or the backoff has not elapsed
    if not set(alert.pending_sinks) & set(usable):
        return None, True
    leased = replace(alert, attempts=alert.attempts + 1, next_attempt_at=now + DELIVERY_LEASE)
    try:
        stored = await store.update(alerts_table(prefix), leased.to_entity(), entity.etag or "*")
    except PreconditionFailed:
        return None, True  # a concurrent run leased it first
    return replace(leased, etag=stored.etag), False


async def _finish(store: TableStore, prefix: str, alert: Alert, now: datetime, report: DeliveryReport) -> None:
    table = alerts_table(prefix)
    if alert.pending_sinks:
        # The exponent is capped before it is used: 2**41 minutes overflows timedelta (a sink down ~36 h).
        backoff = min(timedelta(minutes=1) * 2 ** min(max(alert.attempts - 1, 0), 16), MAX_BACKOFF)
        await store.update(table, replace(alert, next_attempt_at=now + backoff).to_entity(), alert.etag or "*")
        report.pending += 1
        return
    done = replace(alert, next_attempt_at=None).to_entity()
    marker = Entity(done.partition_key, f"pending|{done.row_key}")
    await store.transact(table, [Op("update", done, etag=alert.etag), Op("delete", marker)])
    report.delivered += 1


async def list_alerts(
    store: TableStore, prefix: str, since: datetime, limit: int = 100, *, now: datetime | None = None,
) -> list[Alert]:
    """Alerts created at or after ``since``, newest first (for ``GET /api/admin/alerts``)."""
    now = now or datetime.now(UTC)
    found: list[Alert] = []
    month = _month_start(now)
    # Partitions are months of the alert's period. An alert is created in its period or soon after it (the
    # rollup lags; a backlog run may raise last month's alerts in this one), so the month before ``since``
    # is read too; older months hold nothing created since.
    oldest = _previous_month(_month_start(since))
    for _ in range(14):  # at most a year back: bounded reads for an admin endpoint
        try:
            rows = await store.query(alerts_table(prefix), _month(month), row_key_from="alert|", row_key_to="alert}")
        except TableNotFound:  # the table appears with the first alert the rollup raises
            return []
        found.extend(a for a in map(Alert.from_entity, rows) if a.created >= since)
        if month <= oldest:
            break
        month = _previous_month(month)
    found.sort(key=lambda a: a.created, reverse=True)
    return found[:limit]


def _month(moment: datetime) -> str:
    return moment.strftime("%Y%m")


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _previous_month(moment: datetime) -> datetime:
    return _month_start(_month_start(moment) - timedelta(days=1))

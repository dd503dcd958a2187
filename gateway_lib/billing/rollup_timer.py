"""The budget rollup timer's body: wires the rollup (``budget``) to enforcement, sinks and the runtime."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from gateway_lib.billing import alerts as alerting
from gateway_lib.billing.alerts import AlertSink, TelemetrySink, WebhookSink
from gateway_lib.billing.budget import TIMER_BUDGET, run_rollup
from gateway_lib.billing.enforcement import OverrideBudgets, OverrideEnforcer
from gateway_lib.billing.rollup_rows import Clock, RollupReport, rollup_table
from gateway_lib.quota import admission as quota

log = logging.getLogger("gateway.budget")


async def rollup_timer_entry(timer_past_due: bool) -> RollupReport:
    """The timer function's body: build dependencies from the runtime and run one bounded pass."""
    from gateway_lib.runtime import get_runtime  # the runtime wires this module's callers, not the reverse

    rt = get_runtime()
    settings, prefix = rt.settings, rt.settings.storage.table_prefix
    sinks: list[AlertSink] = []
    if settings.appinsights_connection_string:  # otherwise the event would be dropped yet recorded as sent
        sinks.append(TelemetrySink(rt.telemetry.track_event))
    if settings.budget.alert_webhook_url:
        sinks.append(WebhookSink(settings.budget.alert_webhook_url))
    elif settings.budget.alert_webhook_unresolved:
        log.warning("ALERT_WEBHOOK_URL is a Key Vault reference App Service could not resolve: no webhook alerts")
    clock: Clock = lambda: datetime.now(UTC)  # noqa: E731
    await rt.store.ensure_tables([*quota.tables(prefix), rollup_table(prefix), alerting.alerts_table(prefix)])
    report = await run_rollup(
        rt.store, settings.budget, OverrideBudgets(rt.store, prefix, settings.tiers), clock, sinks, prefix=prefix,
        enforcer=OverrideEnforcer(rt.store, prefix, settings.budget.enforcement, settings.budget.downgrade_alias,
                                  clock),
        deadline=clock() + TIMER_BUDGET,
    )
    log.info("budget rollup finished", extra={"custom_dimensions": {
        "past_due": timer_past_due, "callers": report.callers, "rows": report.rows_applied,
        "late_rows": report.late_rows_applied, "backlog": report.backlog, "stopped_early": report.stopped_early,
        "alerts": len(report.alerts_raised), "pending": report.alerts_pending, "restricted": len(report.restricted),
        "lifted": report.lifted, "callers_failed": len(report.callers_failed)}})
    return report

"""The budget rollup against Azurite: real ETags, real transactions, a real (loopback) webhook.

Also run as a script (``python -m tests.integration.test_budget_azurite ...``) by the
two-process test: each process is one rollup instance, as two Function hosts would be.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.billing import budget
from gateway_lib.billing.alerts import WebhookSink
from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import TableStore
from tests import conftest
from tests.unit.test_budget import (
    T0,
    FakeClock,
    aggregate,
    caller_key,
    caller_month_spend,
    prepare,
    rollup,
    scenario_backlog_across_runs,
    scenario_concurrent_runs,
    scenario_crash_then_resume,
    scenario_failing_sink_retried,
    scenario_late_rows,
    scenario_late_rows_crash_then_resume,
    scenario_leased_outage_then_rollup,
    scenario_thresholds_once,
    scenario_token_thresholds_once,
    set_budget,
    stored_alerts,
    write_cost,
)

if "tests.azurite_fixture" not in getattr(conftest, "pytest_plugins", ()):
    # Until tests/conftest.py registers the Azurite fixtures suite-wide, bring them in here.
    from tests.azurite_fixture import azurite, azurite_connection_string, table_prefix  # noqa: F401

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class Receiver:
    """A loopback incoming-webhook endpoint recording every POST body; ``failing`` answers 500."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.failing = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.failing:
                    self.send_response(500)
                else:
                    receiver.bodies.append(body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def alert_ids(self) -> list[str]:
        return [body["alert"]["id"] for body in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def on_azurite(conn: str, scenario: Callable[[TableStore], Awaitable[None]]) -> None:
    async def go() -> None:
        store = AzureTableStore.from_connection_string(conn)
        try:
            await scenario(store)
        finally:
            await store.aclose()

    asyncio.run(go())


def test_thresholds_are_crossed_exactly_once_across_runs(azurite_connection_string: str, table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_thresholds_once(store, table_prefix))


def test_token_budgets_alert_at_each_threshold_once_per_period(azurite_connection_string: str,
                                                               table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_token_thresholds_once(store, table_prefix))


def test_concurrent_runs_in_one_process_do_not_double_count(azurite_connection_string: str,
                                                            table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_concurrent_runs(store, table_prefix))


def test_backlog_is_bounded_per_run_and_drains_across_runs(azurite_connection_string: str,
                                                           table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_backlog_across_runs(store, table_prefix))


@pytest.mark.parametrize("crash_at", [3, 9, 16, 24, 31])
def test_a_crash_mid_run_resumes_from_the_checkpoint(azurite_connection_string: str, table_prefix: str,
                                                     crash_at: int) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_crash_then_resume(store, table_prefix, crash_at))


def test_rows_committed_late_count_once_through_the_late_index(azurite_connection_string: str,
                                                               table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_late_rows(store, table_prefix))


def test_a_leased_instance_back_from_an_outage_has_its_rows_rolled_up(azurite_connection_string: str,
                                                                      table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_leased_outage_then_rollup(store, table_prefix))


@pytest.mark.parametrize("crash_at", [2, 11, 19, 27, 34])
def test_a_crash_while_folding_late_rows_resumes_exactly(azurite_connection_string: str, table_prefix: str,
                                                         crash_at: int) -> None:
    async def scenario(store: TableStore) -> None:
        assert await scenario_late_rows_crash_then_resume(store, table_prefix, crash_at), "the crash must strike"

    on_azurite(azurite_connection_string, scenario)


def test_a_failing_webhook_is_retried_next_run_then_marked_sent(azurite_connection_string: str, table_prefix: str,
                                                               receiver: Receiver) -> None:
    sink = WebhookSink(receiver.url, timeout=(1.0, 2.0), retries=1, backoff_seconds=0.01)

    def fail(on: bool) -> None:
        receiver.failing = on

    on_azurite(azurite_connection_string, lambda store: scenario_failing_sink_retried(
        store, table_prefix, sink, fail, lambda: len(receiver.bodies)))
    [body] = receiver.bodies
    assert body["text"].startswith("Budget alert: caller ") and body["alert"]["threshold"] == 50


def test_a_steep_burn_posts_one_forecast_to_the_webhook(azurite_connection_string: str, table_prefix: str,
                                                        receiver: Receiver) -> None:
    async def scenario(store: TableStore) -> None:
        await prepare(store, table_prefix)
        await set_budget(store, table_prefix, caller_key("a"), month="500")
        for minute in range(0, 120, 10):
            await write_cost(store, table_prefix, "a", T0 + timedelta(minutes=minute), "8")
        clock = FakeClock(T0 + timedelta(hours=2, minutes=3))
        for _ in range(3):
            await rollup(store, table_prefix, clock, [WebhookSink(receiver.url, backoff_seconds=0.01)])
            clock.advance(minutes=5)

    on_azurite(azurite_connection_string, scenario)
    forecasts = [b for b in receiver.bodies if b["alert"]["kind"] == "forecast"]
    assert len(forecasts) == 1 and "on track to exhaust its month budget" in forecasts[0]["text"]


def test_two_processes_racing_neither_double_count_nor_duplicate_alerts(
    azurite_connection_string: str, table_prefix: str, receiver: Receiver,
) -> None:
    async def seed(store: TableStore) -> None:
        await prepare(store, table_prefix)
        await set_budget(store, table_prefix, "ml", month="30", kind="team")
        for app in ("a", "b", "c", "d"):
            await set_budget(store, table_prefix, caller_key(app), day="5")
            for minute in range(20):
                await write_cost(store, table_prefix, app, T0 + timedelta(minutes=minute), "0.5", team="ml")

    on_azurite(azurite_connection_string, seed)
    start_at = str(time.time() + 3)  # both processes start their run at the same instant
    args = [sys.executable, "-m", "tests.integration.test_budget_azurite", azurite_connection_string, table_prefix,
            receiver.url, start_at]
    children = [subprocess.Popen(args, cwd=ROOT) for _ in range(2)]
    assert [child.wait(timeout=120) for child in children] == [0, 0]

    async def check(store: TableStore) -> None:
        for app in ("a", "b", "c", "d"):
            assert await caller_month_spend(store, table_prefix, app) == Decimal("10.0")
        team = await aggregate(store, table_prefix, budget.team_pk("ml"), "month|202603")
        assert (team.spend, team.requests) == (Decimal("40.0"), 80)
        raised = await stored_alerts(store, table_prefix)
        assert sorted(receiver.alert_ids()) == sorted(f"{a.partition_key}/{a.row_key}" for a in raised)
        assert len(raised) == 4 * 3 + 3  # each caller's day 50/80/100 and the team's month 50/80/100

    on_azurite(azurite_connection_string, check)
    assert len(set(receiver.alert_ids())) == len(receiver.alert_ids())


def _child(conn: str, prefix: str, url: str, start_at: float) -> None:
    from tools import netguard

    netguard.install()

    async def go() -> None:
        store = AzureTableStore.from_connection_string(conn)
        try:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            await rollup(store, prefix, FakeClock(T0 + timedelta(hours=1)),
                         [WebhookSink(url, backoff_seconds=0.01)])
        finally:
            await store.aclose()

    asyncio.run(go())


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))

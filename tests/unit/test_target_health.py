"""Per-process target health: latency EWMA and the circuit breaker, on a fake clock."""

from __future__ import annotations

import pytest

from gateway_lib.providers.base import seconds
from gateway_lib.routing.target_health import MAX_UPSTREAM_HOLD, TargetHealth


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_unknown_targets_are_closed_with_no_latency(clock: FakeClock) -> None:
    status = TargetHealth(clock).view().status("t")
    assert status.circuit == "closed" and status.latency_ms is None


def test_latency_is_an_exponentially_weighted_average(clock: FakeClock) -> None:
    health = TargetHealth(clock, alpha=0.5)
    health.record_success("t", 100)
    health.record_success("t", 300)
    assert health.view().status("t").latency_ms == 200


def test_a_retryable_failure_opens_the_circuit_for_the_retry_after(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t", retry_after=7)
    status = health.view().status("t")
    assert status.circuit == "open" and status.retry_in(clock.now) == 7 and status.upstream_hold
    assert not health.admit("t")


def test_cooldown_without_retry_after_doubles_from_2s_and_caps_at_60s(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    cooldowns = []
    for _ in range(7):
        health.record_failure("t")
        cooldowns.append(health.view().status("t").retry_in(clock.now))
    assert cooldowns == [2, 4, 8, 16, 32, 60, 60]
    assert not health.view().status("t").upstream_hold


def test_after_the_cooldown_exactly_one_probe_is_admitted(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t")
    clock.now += 2
    assert health.view().status("t").circuit_at(clock.now) == "half_open"
    assert health.admit("t")
    assert not health.admit("t")


def test_probe_success_closes_the_circuit_and_resets_the_backoff(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t")
    clock.now += 2
    assert health.admit("t")
    health.record_success("t", 50)
    assert health.admit("t") and health.admit("t")
    health.record_failure("t")
    assert health.view().status("t").retry_in(clock.now) == 2


def test_probe_failure_reopens_for_longer(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t")
    clock.now += 2
    assert health.admit("t")
    health.record_failure("t")
    assert health.view().status("t").retry_in(clock.now) == 4


def test_released_probe_slot_can_be_taken_again(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t")
    clock.now += 2
    assert health.admit("t")
    health.release("t")
    assert health.admit("t")


def test_a_probe_that_never_reports_frees_its_slot_after_the_lease(clock: FakeClock) -> None:
    health = TargetHealth(clock, probe_lease=30)
    health.record_failure("t")
    clock.now += 2
    assert health.admit("t")
    clock.now += 30
    assert health.admit("t")


def test_force_admits_during_the_cooldown_one_call_at_a_time(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t")
    assert health.admit("t", force=True)
    assert not health.admit("t")
    assert not health.admit("t", force=True), "a forced probe is in flight: the next caller must not pile on"
    health.record_failure("t")
    assert health.admit("t", force=True), "its verdict is in: the next forced probe may go"


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e999", "-5", "Wed, 21 Oct 2026 07:28:00 GMT", "", None])
def test_a_retry_after_that_is_not_a_finite_delay_is_ignored(raw: str | None) -> None:
    assert seconds(raw) is None


def test_an_upstream_hold_is_capped(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    health.record_failure("t", retry_after=86_400.0)  # a proxy's idea of a day
    clock.now += MAX_UPSTREAM_HOLD
    assert health.admit("t")


def test_views_are_immutable_snapshots(clock: FakeClock) -> None:
    health = TargetHealth(clock)
    view = health.view()
    health.record_failure("t")
    assert view.status("t").circuit == "closed"
    with pytest.raises(TypeError):
        view.statuses["t"] = view.status("t")  # type: ignore[index]

"""The fallback executor, driven by plain fake providers (no mocks, no network)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.config.catalog import Price, Target
from gateway_lib.errors import InvalidRequest, ProviderError, RateLimited, ServiceUnavailable
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import CallContext, Completion, StreamEvent, Unsupported, Usage
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.routing.fallback import complete_with_fallback, open_stream_with_fallback
from gateway_lib.routing.plan import RoutePlan, RouteStep
from gateway_lib.routing.target_health import TargetHealth

REQUEST = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
CTX = CallContext(request_id="r")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def target(tid: str, provider: str = "fake") -> Target:
    return Target(id=tid, provider=provider, deployment=tid, model="m", region="r", endpoint=None,
                  price=Price(Decimal(0), Decimal(0)), quality=1, context_window=1000, max_output_tokens=100,
                  tokenizer="o200k_base")


def rate_limited(retry_after: float | None = None) -> ProviderError:
    return ProviderError("slow down", provider="fake", kind="rate_limited", retryable=True, upstream_status=429,
                         retry_after=retry_after)


def server_error() -> ProviderError:
    return ProviderError("boom", provider="fake", kind="server_error", retryable=True, upstream_status=500)


def FakeProvider(script: dict[str, Any], clock: FakeClock | None = None, cost_s: float = 0.0) -> MockProvider:
    """Answers per target id from a script: an exception to raise, an ``Unsupported`` refusal, or text to
    return (whole) or stream (a list of deltas, an exception among them raised at that point)."""
    def handler(call: Call) -> Any:
        if clock and not call.stream:
            clock.now += cost_s
        outcome = script[call.target.id]
        if isinstance(outcome, BaseException):
            raise outcome
        if call.stream:
            return [item if isinstance(item, BaseException) else StreamEvent({"delta": item}, text=item)
                    for item in outcome]
        return Completion(body={"text": outcome}, usage=Usage(1, 1))

    def check(request: Any, target: Target) -> Unsupported | None:
        outcome = script.get(target.id)
        return outcome if isinstance(outcome, Unsupported) else None

    provider = MockProvider(handler, check=check, name="fake")
    return provider


def called(provider: MockProvider) -> list[str]:
    return [call.target.id for call in provider.calls]


def make_plan(*tids: str, unavailable: tuple[str, ...] = ()) -> RoutePlan:
    return RoutePlan("chat", None, tuple(RouteStep(target(t), "test", available=t not in unavailable) for t in tids))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def complete(plan: RoutePlan, provider: MockProvider, health: TargetHealth, clock: FakeClock) -> Any:
    return run(complete_with_fallback(plan, {"fake": provider}, REQUEST, CTX, health, clock))


def test_first_healthy_target_answers_and_latency_is_recorded() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    provider = FakeProvider({"a": "hello"}, clock, cost_s=0.25)
    completion, chosen, attempts = complete(make_plan("a", "b"), provider, health, clock)
    assert completion.body == {"text": "hello"} and chosen.id == "a" and called(provider) == ["a"]
    assert [(a.target_id, a.outcome, a.latency_ms) for a in attempts] == [("a", "ok", 250.0)]
    assert health.view().status("a").latency_ms == 250.0


def test_retryable_error_moves_on_at_once_and_opens_the_circuit() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    provider = FakeProvider({"a": rate_limited(9), "b": "from b"})
    _, chosen, attempts = complete(make_plan("a", "b"), provider, health, clock)
    assert chosen.id == "b" and clock.now == 100.0  # no sleeping between targets
    assert [(a.outcome, a.upstream_status, a.retry_after) for a in attempts] == [
        ("rate_limited", 429, 9), ("ok", 200, None)]
    assert health.view().status("a").circuit == "open"


def test_tokens_a_failed_attempt_was_billed_for_stay_on_its_attempt_and_out_of_telemetry() -> None:
    clock = FakeClock()
    part_way = ProviderError("one call of the fan-out failed", provider="fake", kind="server_error", retryable=True,
                             upstream_status=500, consumed=(70, 0))
    _, chosen, attempts = complete(make_plan("a", "b"), FakeProvider({"a": part_way, "b": "from b"}),
                                   TargetHealth(clock), clock)
    assert chosen.id == "b" and [a.consumed for a in attempts] == [(70, 0), (0, 0)]
    assert "consumed" not in attempts[0].as_dict()  # the request record counts them in its tokens


def test_non_retryable_error_is_raised_without_fallback() -> None:
    clock = FakeClock()
    bad = ProviderError("bad", provider="fake", kind="bad_request", retryable=False, upstream_status=400)
    provider = FakeProvider({"a": bad, "b": "never"})
    with pytest.raises(ProviderError) as info:
        complete(make_plan("a", "b"), provider, TargetHealth(clock), clock)
    assert info.value is bad and called(provider) == ["a"]


def test_a_target_that_cannot_take_the_request_is_passed_over() -> None:
    # E.g. Bedrock and a remote image URL: the next target may take it, and the target is not at fault.
    clock = FakeClock()
    health = TargetHealth(clock)
    cannot = Unsupported("Images must be base64 data URLs for this model.", code="unsupported_content")
    provider = FakeProvider({"a": rate_limited(), "b": cannot, "c": "from c"})
    _, chosen, attempts = complete(make_plan("a", "b", "c"), provider, health, clock)
    assert chosen.id == "c" and called(provider) == ["a", "c"], "b was asked whether it can, not called"
    assert [a.outcome for a in attempts] == ["rate_limited", "unsupported", "ok"]
    assert health.view().status("b").circuit == "closed", "no failure counted against b"


def test_the_400_stands_when_no_target_could_take_the_request() -> None:
    clock = FakeClock()
    first = Unsupported("no tools here", code="tools_unsupported", param="tools")
    provider = FakeProvider({"a": first, "b": Unsupported("nor here", code="tools_unsupported")})
    with pytest.raises(InvalidRequest) as info:
        complete(make_plan("a", "b"), provider, TargetHealth(clock), clock)
    assert (info.value.message, info.value.code, info.value.param) == ("no tools here", "tools_unsupported", "tools")
    assert [a.outcome for a in info.value.attempts] == ["unsupported", "unsupported"] and called(provider) == []


def test_unsupported_and_failed_targets_end_in_the_failures_status() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": rate_limited(5), "b": Unsupported("no", code="unsupported_content")})
    with pytest.raises(RateLimited):  # the target that could take it is throttled: back off, as the 429 says
        complete(make_plan("a", "b"), provider, TargetHealth(clock), clock)


def test_all_targets_failing_is_503_naming_the_count_and_last_error() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": server_error(), "b": rate_limited()})
    with pytest.raises(ServiceUnavailable) as info:
        complete(make_plan("a", "b"), provider, TargetHealth(clock), clock)
    assert "all 2 targets for model chat are unavailable" in info.value.message
    assert "last error: rate_limited" in info.value.message
    assert info.value.retry_after == 2  # the shortest cooldown (a: 2s backoff, b: 2s backoff)


def test_all_targets_rate_limited_is_429_with_the_shortest_retry_after() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": rate_limited(30), "b": rate_limited(12)})
    with pytest.raises(RateLimited) as info:
        complete(make_plan("a", "b"), provider, TargetHealth(clock), clock)
    assert info.value.status == 429 and info.value.retry_after == 12
    assert info.value.code == "upstream_rate_limited"


def test_cooling_targets_are_skipped() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a")
    provider = FakeProvider({"a": "never", "b": "from b"})
    _, chosen, attempts = complete(make_plan("a", "b"), provider, health, clock)
    assert chosen.id == "b" and called(provider) == ["b"]
    assert attempts[0].outcome == "circuit_open"


def test_when_everything_cools_down_the_closest_to_recovery_is_tried_once() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a")
    health.record_failure("b")
    provider = FakeProvider({"a": "recovered", "b": "never"})
    _, chosen, _ = complete(make_plan("a", "b", unavailable=("a", "b")), provider, health, clock)
    assert chosen.id == "a" and called(provider) == ["a"]


def test_callers_arriving_while_everything_cools_down_send_one_probe_at_a_time() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a")
    calls = 0

    async def struggling(call: Call) -> Completion:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)  # slow, then failing again
        raise server_error()

    providers = {"fake": MockProvider(struggling, name="fake")}

    async def fifty() -> list[Any]:
        return await asyncio.gather(*(complete_with_fallback(make_plan("a", unavailable=("a",)), providers, REQUEST,
                                                             CTX, health, clock)
                                      for _ in range(50)), return_exceptions=True)

    outcomes = run(fifty())
    assert calls == 1, f"{calls} concurrent calls went to a target that is cooling down"
    assert all(isinstance(o, ServiceUnavailable) for o in outcomes)


def test_a_retry_after_of_infinity_is_a_429_with_a_finite_wait() -> None:
    from gateway_lib.providers.azure_openai.adapter import WIRE

    clock = FakeClock()
    health = TargetHealth(clock)
    provider = FakeProvider({"a": WIRE.status_error(429, {"retry-after": "1e999"}, b'{"error":{"message":"slow down"}}')})
    with pytest.raises(RateLimited) as info:
        complete(make_plan("a"), provider, health, clock)
    assert info.value.retry_after is not None and 1 <= info.value.retry_after <= 60


def test_the_attempts_of_one_request_share_one_time_budget() -> None:
    # Four targets that each time out after 100 s (their own upstream timeout): a fourth try would start after
    # 300 s, past the Functions front end's 230 s. The request stops when its budget is spent.
    clock = FakeClock()
    health = TargetHealth(clock)
    timeout = ProviderError("timed out", provider="fake", kind="timeout", retryable=True)
    provider = FakeProvider({t: timeout for t in "abcd"}, clock=clock, cost_s=100.0)
    with pytest.raises(ServiceUnavailable):
        complete(make_plan("a", "b", "c", "d"), provider, health, clock)
    assert called(provider) == ["a", "b", "c"]
    assert health.admit("d"), "the target never called keeps its slot"


def test_an_attempt_is_cut_when_the_request_has_no_time_left(monkeypatch: Any) -> None:
    from gateway_lib.routing import fallback

    monkeypatch.setattr(fallback, "FALLBACK_BUDGET_SECONDS", 0.05)

    async def hanging(call: Call) -> Completion:
        await asyncio.sleep(30)
        raise AssertionError("not reached")

    health = TargetHealth()
    with pytest.raises(ServiceUnavailable) as info:
        run(complete_with_fallback(make_plan("a"), {"fake": MockProvider(hanging, name="fake")}, REQUEST, CTX, health))
    assert info.value.attempts[0].outcome == "timeout"
    assert health.admit("a"), "the request's deadline is no verdict on the target"


def test_an_upstream_retry_after_is_honoured_even_as_last_resort() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a", retry_after=20)
    provider = FakeProvider({"a": "never"})
    with pytest.raises(ServiceUnavailable) as info:
        complete(RoutePlan("chat", None, (RouteStep(target("a"), "t", False, 20, True),)), provider, health, clock)
    assert called(provider) == [] and info.value.retry_after == 20
    assert "cooling down" in info.value.message


def test_every_target_cooling_down_after_429s_is_a_429_not_a_503() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    provider = FakeProvider({"a": rate_limited(20), "b": rate_limited(30)})
    with pytest.raises(RateLimited):
        complete(make_plan("a", "b"), provider, health, clock)
    assert health.view().status("a").reason == "rate_limited", "the cooldown remembers why it started"
    clock.now += 5  # both still cooling down on the upstream's own Retry-After: nothing is sent
    held = RoutePlan("chat", None, (RouteStep(target("a"), "t", False, 15, True), RouteStep(target("b"), "t", False, 25, True)))
    with pytest.raises(RateLimited) as info:
        complete(held, provider, health, clock)
    assert [c.target.id for c in provider.calls] == ["a", "b"], "no call while both are held"
    assert (info.value.status, info.value.code, info.value.retry_after) == (429, "upstream_rate_limited", 15)


def test_targets_cooling_down_after_failures_of_another_kind_are_a_503() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a", retry_after=20, reason="rate_limited")
    health.record_failure("b", retry_after=20, reason="server_error")
    held = RoutePlan("chat", None, (RouteStep(target("a"), "t", False, 20, True), RouteStep(target("b"), "t", False, 20, True)))
    with pytest.raises(ServiceUnavailable) as info:
        complete(held, FakeProvider({}), health, clock)
    assert "cooling down" in info.value.message


def test_half_open_probe_success_closes_the_circuit() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a")
    clock.now += 2
    complete(make_plan("a"), FakeProvider({"a": "ok"}), health, clock)
    assert health.view().status("a").circuit == "closed"


def test_unconfigured_provider_is_skipped() -> None:
    clock = FakeClock()
    plan = RoutePlan("chat", None, (RouteStep(target("x", "other"), "t"), RouteStep(target("a"), "t")))
    _, chosen, attempts = complete(plan, FakeProvider({"a": "ok"}), TargetHealth(clock), clock)
    assert chosen.id == "a" and attempts[0].outcome == "unconfigured"


def test_cancellation_gives_the_probe_slot_back() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    health.record_failure("a")
    clock.now += 2
    with pytest.raises(asyncio.CancelledError):
        complete(make_plan("a"), FakeProvider({"a": asyncio.CancelledError()}), health, clock)
    assert health.admit("a")


# ---------------------------------------------------------------- streams


async def collect(rest: AsyncIterator[StreamEvent]) -> list[str]:
    return [e.text async for e in rest]


def open_stream(plan: RoutePlan, provider: MockProvider, health: TargetHealth, clock: FakeClock) -> Any:
    return open_stream_with_fallback(plan, {"fake": provider}, REQUEST, CTX, health, clock)


def test_stream_error_before_the_first_event_falls_back() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": server_error(), "b": ["x", "y"]})

    async def scenario() -> tuple[Any, ...]:
        chosen, first, rest, attempts = await open_stream(make_plan("a", "b"), provider, TargetHealth(clock), clock)
        return chosen.id, first.text, await collect(rest), [a.outcome for a in attempts]

    assert run(scenario()) == ("b", "x", ["y"], ["server_error", "ok"])
    assert provider.closed == ["a", "b"]


def test_stream_error_after_the_first_event_is_not_retried() -> None:
    clock = FakeClock()
    health = TargetHealth(clock)
    provider = FakeProvider({"a": ["x", server_error()], "b": ["never"]})

    async def scenario() -> None:
        _, first, rest, _ = await open_stream(make_plan("a", "b"), provider, health, clock)
        assert first.text == "x"
        await collect(rest)

    with pytest.raises(ProviderError):
        run(scenario())
    assert called(provider) == ["a"]
    assert health.view().status("a").circuit == "open"  # the cut still counts against the target


def test_an_empty_stream_counts_as_a_retryable_failure() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": [], "b": ["x"]})

    async def scenario() -> str:
        chosen, _, rest, _ = await open_stream(make_plan("a", "b"), provider, TargetHealth(clock), clock)
        await collect(rest)
        return chosen.id

    assert run(scenario()) == "b"


def test_consumer_stopping_early_closes_the_upstream_stream() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": ["x", "y", "z"]})

    async def scenario() -> None:
        _, _, rest, _ = await open_stream(make_plan("a"), provider, TargetHealth(clock), clock)
        await anext(rest)
        await rest.aclose()  # type: ignore[attr-defined]

    run(scenario())
    assert provider.closed == ["a"]


def test_results_unpack_as_tuples_and_read_by_name() -> None:
    clock = FakeClock()
    provider = FakeProvider({"a": rate_limited(), "b": "ok"}, clock, cost_s=0.1)
    served = complete(make_plan("a", "b"), provider, TargetHealth(clock), clock)
    assert served.target.id == "b" and served.completion.body == {"text": "ok"}
    assert round(served.upstream_ms) == 200
    assert served.attempts[0].as_dict() == {"target": "a", "provider": "fake", "outcome": "rate_limited",
                                            "status": 429, "latency_ms": pytest.approx(100.0), "retry_after": None}


def test_errors_carry_the_attempts_for_accounting() -> None:
    clock = FakeClock()
    with pytest.raises(ServiceUnavailable) as info:
        complete(make_plan("a"), FakeProvider({"a": server_error()}), TargetHealth(clock), clock)
    assert [a.outcome for a in info.value.attempts] == ["server_error"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kind", "status"), [("auth", 502), ("server_error", 502), ("timeout", 504),
                                              ("rate_limited", 429), ("bad_request", 400)])
def test_a_provider_failure_shows_the_caller_its_own_status(kind: str, status: int) -> None:
    # Our credentials failing upstream is not the caller's authentication failing: a 502, never a 401.
    error = ProviderError("x", provider="fake", kind=kind, retryable=kind != "bad_request")
    assert error.status == status

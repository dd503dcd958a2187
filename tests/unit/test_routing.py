"""Pure route planning: aliases, tiers, provider hints, priorities and health."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway_lib.config.catalog import Catalogue, default_catalogue_json, parse_catalogue
from gateway_lib.config.tiers import Tier
from gateway_lib.errors import InvalidRequest, ModelNotFound, PermissionDenied
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers import registry
from gateway_lib.routing.plan import RoutePlan, plan_route
from gateway_lib.routing.target_health import HealthView, TargetHealth, TargetStatus

NOW = 500.0


def catalogue() -> Catalogue:
    problems: list[str] = []
    result = parse_catalogue(default_catalogue_json(), problems, registry.names())
    assert result is not None and not problems
    return result


def tier(*models: str) -> Tier:
    return Tier(name="standard", models=frozenset(models or ("*",)), max_tokens_per_request=4096,
                max_tokens_policy="clamp", requests_per_minute=60, tokens_per_minute=1000, tokens_per_day=10,
                tokens_per_month=10, usd_per_day=Decimal(1), usd_per_month=Decimal(1), fail_open=False)


def plan(alias: str = "chat-default", *, hint: str | None = None, priority: str | None = None,
         view: HealthView | None = None, prompt: int = 1000, max_tokens: int | None = None,
         allowed: tuple[str, ...] = ()) -> RoutePlan:
    return plan_route(alias, catalogue(), tier(*allowed), hint, priority, view or HealthView({}), prompt, max_tokens,
                      NOW)


def ids(p: RoutePlan) -> list[str]:
    return [t.id for t in p.targets]


def test_no_priority_keeps_the_configured_order() -> None:
    assert ids(plan()) == ["aoai-gpt-4o-mini-eastus", "bedrock-claude-3-haiku-us-east-1",
                           "aoai-gpt-4o-mini-swedencentral"]
    assert plan().steps[0].reason == "configured order #1"


def test_unknown_alias_is_404_model_not_found() -> None:
    with pytest.raises(ModelNotFound) as info:
        plan("gpt-9")
    assert info.value.status == 404 and info.value.param == "model"


def test_alias_outside_the_tier_is_403() -> None:
    with pytest.raises(PermissionDenied) as info:
        plan("chat-quality", allowed=("chat-default",))
    assert info.value.status == 403


def test_provider_hint_keeps_only_that_provider() -> None:
    assert ids(plan(hint="bedrock")) == ["bedrock-claude-3-haiku-us-east-1"]


def test_provider_hint_without_a_matching_target_is_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        plan("gpt-4o", hint="bedrock")
    assert info.value.param == "provider_hint" and "no target on provider 'bedrock'" in info.value.message


def test_low_cost_ranks_by_estimated_price_of_prompt_plus_output() -> None:
    # Per 1k: mini 0.000165 in / 0.00066 out; haiku 0.00025 / 0.00125. Mini is cheaper either way.
    p = plan(priority="low_cost", prompt=2000, max_tokens=500)
    assert ids(p)[-1] == "bedrock-claude-3-haiku-us-east-1"
    assert p.steps[0].reason.startswith("low_cost: est. $0.000660")


def test_low_cost_does_not_penalise_a_larger_output_limit() -> None:
    p = plan("chat-quality", priority="low_cost")
    assert ids(p) == ["aoai-gpt-4o-eastus", "bedrock-claude-3-5-sonnet-us-east-1"]


def test_quality_ranks_by_configured_rank() -> None:
    assert ids(plan("chat-quality", priority="quality")) == ["bedrock-claude-3-5-sonnet-us-east-1",
                                                             "aoai-gpt-4o-eastus"]


def test_low_latency_puts_unmeasured_targets_first_then_fastest() -> None:
    view = HealthView({"aoai-gpt-4o-mini-eastus": TargetStatus(latency_ms=900),
                       "bedrock-claude-3-haiku-us-east-1": TargetStatus(latency_ms=300)})
    assert ids(plan(priority="low_latency", view=view)) == [
        "aoai-gpt-4o-mini-swedencentral", "bedrock-claude-3-haiku-us-east-1", "aoai-gpt-4o-mini-eastus"]


def test_open_circuits_go_last_soonest_recovery_first_and_unavailable() -> None:
    view = HealthView({
        "aoai-gpt-4o-mini-eastus": TargetStatus(circuit="open", open_until=NOW + 30),
        "bedrock-claude-3-haiku-us-east-1": TargetStatus(circuit="open", open_until=NOW + 5, upstream_hold=True),
    })
    p = plan(view=view)
    assert ids(p) == ["aoai-gpt-4o-mini-swedencentral", "bedrock-claude-3-haiku-us-east-1",
                      "aoai-gpt-4o-mini-eastus"]
    assert [s.available for s in p.steps] == [True, False, False]
    assert p.steps[1].retry_in == 5 and p.steps[1].upstream_hold


def test_half_open_target_with_a_free_probe_keeps_its_rank() -> None:
    clock = lambda: NOW - 10  # noqa: E731
    health = TargetHealth(clock)
    health.record_failure("aoai-gpt-4o-mini-eastus")  # 2s cooldown, over by NOW
    p = plan(view=health.view())
    assert ids(p)[0] == "aoai-gpt-4o-mini-eastus" and p.steps[0].available
    assert "half-open probe" in p.steps[0].reason


def test_half_open_target_whose_probe_is_out_goes_last() -> None:
    view = HealthView({"aoai-gpt-4o-mini-eastus": TargetStatus(circuit="half_open", probe_taken=True)})
    p = plan(view=view)
    assert ids(p)[-1] == "aoai-gpt-4o-mini-eastus" and not p.steps[-1].available


def test_the_context_window_is_left_to_guardrails_exact_counts() -> None:
    # Routing may only have a 4-characters-a-token guess, which refused prompts that fit (a prompt of long
    # tokens): guardrails drops the targets a prompt does not fit, per tokenizer, on exact counts.
    assert len(ids(plan(prompt=300_000))) == len(ids(plan(prompt=10)))


def test_a_request_can_stand_in_for_the_estimates() -> None:
    chat = ChatRequest.model_validate({"model": "chat-quality", "max_tokens": 100,
                                       "messages": [{"role": "user", "content": "x" * 4000}]})
    p = plan_route("chat-quality", catalogue(), tier(), None, "low_cost", health=HealthView({}), request=chat)
    assert p.steps[0].reason.endswith("for 1000+100 tokens")

"""Input guardrails: sizes, max_tokens policy, context windows per target, content rules."""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.config.catalog import Price, Target
from gateway_lib.config.settings import LimitSettings
from gateway_lib.config.tiers import Tier
from gateway_lib.errors import ContentFiltered, InvalidRequest
from gateway_lib.guardrails import pii, tokens
from gateway_lib.guardrails import screen as guardrails
from gateway_lib.operations.schema import ChatRequest

LIMITS = LimitSettings(max_body_bytes=1_048_576, max_prompt_chars=10_000, max_messages=8, deny_patterns=(),
                       pii_patterns=())
TIER = Tier(name="standard", models=frozenset({"*"}), max_tokens_per_request=2000, max_tokens_policy="clamp",
            requests_per_minute=60, tokens_per_minute=100_000, tokens_per_day=1_000_000, tokens_per_month=10_000_000,
            usd_per_day=Decimal(10), usd_per_month=Decimal(100), fail_open=False)
GPT = Target(id="aoai-mini", provider="azure_openai", deployment="gpt-4o-mini", model="gpt-4o-mini", region="eastus",
             endpoint=None, price=Price(Decimal("0.00015"), Decimal("0.0006")), quality=60, context_window=1000,
             max_output_tokens=16384, tokenizer="o200k_base")
CLAUDE = Target(id="bedrock-haiku", provider="bedrock", deployment="anthropic.claude-3-haiku", model="claude-3-haiku",
                region="us-east-1", endpoint=None, price=Price(Decimal("0.00025"), Decimal("0.00125")), quality=55,
                context_window=5000, max_output_tokens=1000, tokenizer="claude")


def chat(text: str = "hello", **extra: Any) -> ChatRequest:
    body = {"model": "chat-default", "messages": [{"role": "user", "content": text}]}
    return ChatRequest.model_validate(body | extra)


def limits(**changes: Any) -> LimitSettings:
    return replace(LIMITS, **changes)


def raised(fn: Any, *args: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fn(*args)
    return info.value


# --- sizes ---------------------------------------------------------------------------------------


def test_too_many_messages_is_a_400_naming_the_cap() -> None:
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}] * 9})
    error = raised(guardrails.screen, request, TIER, [GPT], LIMITS)
    assert (error.status, error.code, error.param) == (400, "too_many_messages", "messages")
    assert "at most 8" in error.message


def test_prompt_size_counts_text_tool_calls_and_tools() -> None:
    request = ChatRequest.model_validate({"model": "m", "tools": [{"type": "function", "function": {"name": "f"}}],
                                          "messages": [{"role": "user", "content": "abc"}, {
                                              "role": "assistant", "tool_calls": [{"id": "1", "function": {
                                                  "name": "f", "arguments": "{}"}}]}]})
    assert guardrails.check_prompt_size(request, LIMITS) == 3 + 2 + len('[{"type":"function","function":{"name":"f"}}]')


@pytest.mark.parametrize(("properties", "code"), [(250, "context_length_exceeded"), (420, "prompt_too_large")])
def test_a_response_format_schema_counts_towards_the_prompt_cap_and_estimate(properties: int, code: str) -> None:
    # The provider gets the schema as prompt (the Bedrock adapter writes it into the system prompt).
    schema = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(properties)}}
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                          "response_format": {"type": "json_schema",
                                                              "json_schema": {"name": "a", "schema": schema}}})
    error = raised(guardrails.screen, request, TIER, [GPT], LIMITS)  # GPT's window here: 1,000 tokens
    assert (error.status, error.code) == (400, code)


def test_prompt_over_the_character_cap_is_rejected() -> None:
    error = raised(guardrails.screen, chat("x" * 10_001), TIER, [GPT], LIMITS)
    assert (error.status, error.code, error.param) == (400, "prompt_too_large", "messages")


def test_the_caps_themselves_are_allowed() -> None:
    # The limits are "at most": exactly the cap passes, one more does not (above).
    exactly = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}] * 8})
    assert guardrails.screen(exactly, TIER, [GPT], LIMITS).prompt_chars == 8
    assert guardrails.check_prompt_size(chat("x" * 10_000), LIMITS) == 10_000


# --- max_tokens ----------------------------------------------------------------------------------


def test_absent_max_tokens_defaults_to_the_smaller_of_tier_cap_and_target_output() -> None:
    assert guardrails.resolve_max_tokens(chat(), TIER, [GPT]) == guardrails.MaxTokens(2000, defaulted=True)
    assert guardrails.resolve_max_tokens(chat(), TIER, [GPT, CLAUDE]).value == 1000


def test_max_tokens_above_tier_cap_is_clamped_and_reported() -> None:
    screened = guardrails.screen(chat(max_tokens=5000, model="x"), TIER, [replace(GPT, context_window=128_000)], LIMITS)
    assert (screened.max_tokens, screened.clamped, screened.requested_max_tokens) == (2000, True, 5000)


def test_max_tokens_above_tier_cap_is_rejected_under_reject_policy() -> None:
    strict = replace(TIER, max_tokens_policy="reject")
    error = raised(guardrails.resolve_max_tokens, chat(max_completion_tokens=5000), strict, [GPT])
    assert (error.code, error.param) == ("max_tokens_exceeds_tier_limit", "max_completion_tokens")
    assert "'standard' tier allows at most 2000" in error.message


def test_max_tokens_within_the_cap_passes_unchanged() -> None:
    screened = guardrails.screen(chat(max_tokens=300), TIER, [GPT], LIMITS)
    assert (screened.max_tokens, screened.clamped, screened.defaulted) == (300, False, False)


def test_explicit_max_tokens_beyond_every_target_output_limit_is_rejected() -> None:
    error = raised(guardrails.screen, chat(max_tokens=1500), TIER, [CLAUDE], LIMITS)
    assert (error.code, error.param) == ("max_tokens_exceeds_model_limit", "max_tokens")


def test_target_with_too_small_an_output_limit_is_left_out() -> None:
    screened = guardrails.screen(chat(max_tokens=900), TIER, [replace(CLAUDE, max_output_tokens=800), GPT], LIMITS)
    assert screened.eligible == ("aoai-mini",)


# --- context window ------------------------------------------------------------------------------


def test_prompt_that_fits_only_the_larger_window_is_routed_there() -> None:
    text = "word " * 1500  # ~1500 tokens: over GPT's 1000, within Claude's 5000
    screened = guardrails.screen(chat(text, max_tokens=100), TIER, [GPT, CLAUDE], LIMITS)
    assert screened.eligible == ("bedrock-haiku",)
    assert screened.prompt_tokens == guardrails.tokens.count_chat_prompt(chat(text).messages, "claude")


def test_nothing_fits_is_context_length_exceeded_like_openai() -> None:
    error = raised(guardrails.screen, chat("word " * 990, max_tokens=50), TIER, [GPT], LIMITS)
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    assert error.message.startswith("This model's maximum context length is 1000 tokens. However, you requested")
    assert "50 in the completion" in error.message


def test_default_max_tokens_shrinks_to_the_room_left() -> None:
    request = chat("word " * 900)
    prompt = guardrails.tokens.count_chat_prompt(request.messages, "o200k_base")
    screened = guardrails.screen(request, TIER, [GPT], LIMITS)
    assert (screened.max_tokens, screened.defaulted, screened.eligible) == (1000 - prompt, True, ("aoai-mini",))


def test_prompt_tokens_is_the_highest_estimate_among_eligible_targets() -> None:
    wide = replace(GPT, context_window=128_000)
    screened = guardrails.screen(chat("word " * 100), TIER, [wide, CLAUDE], LIMITS)
    messages = chat("word " * 100).messages
    estimates = {t: guardrails.tokens.count_chat_prompt(messages, t) for t in ("o200k_base", "claude")}
    assert screened.prompt_tokens == max(estimates.values()) == estimates["claude"]
    assert screened.eligible == ("aoai-mini", "bedrock-haiku")


# --- content rules -------------------------------------------------------------------------------

SECRET = "Project NIGHTJAR launch"


def test_deny_pattern_blocks_without_echoing_the_text() -> None:
    rules = limits(deny_patterns=("(?i)nightjar",))
    with pytest.raises(ContentFiltered) as info:
        guardrails.screen(chat(SECRET), TIER, [GPT], rules)
    error = info.value
    assert (error.status, error.code, error.param) == (400, "content_filter", "messages")
    assert "deny_patterns[0]" in error.message and "messages[0]" in error.message
    assert "NIGHTJAR" not in error.message.upper().replace("DENY_PATTERNS", "")
    assert "nightjar" not in str(error.body()).lower()


def test_tool_call_arguments_are_screened() -> None:
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '{"to":"a@b.io"}'}}]}]})
    rules = guardrails.content_rules((), ("email",))
    texts = list(guardrails.screened_texts(request))
    assert guardrails.find_violation(texts, rules) == guardrails.Violation("pii.email", "messages[1]")


SCHEMA = {"type": "object", "properties": {"note": {"type": "string", "description": "say NIGHTJAR"}}}


@pytest.mark.parametrize(("extra", "where"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "ok"}},
                {"type": "function", "function": {"name": "g", "description": "mail a@b.io about nightjar"}}]},
     "tools[1]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]}, "tools[0]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi", "name": "nightjar"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "refusal", "refusal": "no NightJar"}]}]}, "messages[1]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "nightjar_lookup", "arguments": "{}"}}]}]}, "messages[1]"),
])
def test_every_text_the_model_reads_is_screened(extra: dict[str, Any], where: str) -> None:
    # Tool descriptions and schemas, names and refusals reach the model as prompt text: a rule that skipped
    # them would be a way round it.
    with pytest.raises(ContentFiltered) as info:
        guardrails.screen(chat("hello", **extra), TIER, [GPT], limits(deny_patterns=("(?i)nightjar",)))
    assert f"matched in {where}" in info.value.message
    assert info.value.param == where.split("[")[0]
    assert "nightjar" not in info.value.message.lower().replace("deny_patterns", "")


PII_CASES = [
    ("email", ["mail jane.doe+x@example.co.uk today", "Üser: ünï@exämple.com? no; a@b.io"],
     ["@handle", "name at example dot com", "a@b", "user@localhost"]),
    ("credit_card", ["card 4111 1111 1111 1111 exp", "4012888888881881", "5555-5555-5555-4444", "amex 378282246310005"],
     ["4111 1111 1111 1112", "order 1234567890123", "0000 0000 0000 0000", "ISBN 978-3-16-148410-0"]),
    ("us_ssn", ["ssn 123-45-6789.", "078-05-1120"],
     ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000", "123456789", "2024-01-1234"]),
    ("iban", ["IBAN DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "pay fr1420041010050500013m02606"],
     ["DE89 3704 0044 0532 0130 01", "AB12 3456 7890 1234", "US12345678901234567"]),
    ("phone", ["call +44 20 7946 0958", "+1 (415) 555-2671", "(415) 555-2671", "415-555-2671", "+33 1 23 45 67 89"],
     ["2024-01-15", "v1.2.3", "call 555-2671", "123-456-7890", "$1,234,567.89", "+12"]),
]


@pytest.mark.parametrize(("name", "hits", "misses"), PII_CASES, ids=[c[0] for c in PII_CASES])
def test_pii_detector(name: str, hits: list[str], misses: list[str]) -> None:
    detect = pii.PII_DETECTORS[name]
    assert [h for h in hits if not detect(h)] == []
    assert [m for m in misses if detect(m)] == []


def test_pii_block_names_the_detector_only() -> None:
    with pytest.raises(ContentFiltered) as info:
        guardrails.screen(chat("my card is 4111 1111 1111 1111"), TIER, [GPT], limits(pii_patterns=("credit_card",)))
    assert "pii.credit_card" in info.value.message and "4111" not in info.value.message


def test_disabled_detectors_do_not_fire() -> None:
    screened = guardrails.screen(chat("jane@example.com"), TIER, [GPT], limits(pii_patterns=("us_ssn",)))
    assert screened.eligible == ("aoai-mini",)


def test_rules_are_compiled_once_per_configuration() -> None:
    assert guardrails.content_rules(("a",), ("email",)) is guardrails.content_rules(("a",), ("email",))


def test_unknown_detector_names_are_configuration_problems() -> None:
    assert pii.pii_problems(["email", "Phone", "passport"]) == [
        "GATEWAY_PII_PATTERNS: unknown detector 'passport'; known: email, credit_card, us_ssn, iban, phone"]
    with pytest.raises(ValueError, match="passport"):
        guardrails.content_rules((), ("passport",))


@pytest.mark.parametrize("text", ["a" * 400_000, "a.a" * 130_000 + "@", "1" * 400_000, "1-" * 200_000,
                                  "+1" + " 1" * 200_000, "AB12" + " A1B2" * 80_000, "x@" + "a." * 200_000])
def test_detectors_stay_linear_on_adversarial_input(text: str) -> None:
    rules = guardrails.content_rules((), pii.PII_DETECTOR_NAMES)
    started = time.perf_counter()
    guardrails.find_violation([("messages[0]", text)], rules)
    # A hang check, not a speed target: a backtracking pattern takes hours on these inputs, a linear one
    # milliseconds.
    assert time.perf_counter() - started < 10.0


def test_a_task_error_names_the_prompt() -> None:
    from gateway_lib.operations import tasks

    error = ContentFiltered("rule 'pii.email' matched in messages[1].", param="messages")
    assert tasks.in_task_terms(error) is error
    assert (error.param, error.message) == ("prompt", "rule 'pii.email' matched in the prompt.")
    untouched = InvalidRequest("bad", param="max_tokens")
    assert tasks.in_task_terms(untouched).param == "max_tokens"


def test_a_cut_stream_is_billed_with_the_served_targets_own_prompt_estimate() -> None:
    # The reservation takes the largest estimate among the route's targets; the bill is the served one's.
    screened = guardrails.screen(chat("Summarise the quarterly report for the board, please. " * 40), TIER,
                                 [GPT, CLAUDE], LIMITS)
    gpt, claude = screened.prompt_tokens_for("o200k_base"), screened.prompt_tokens_for("claude")
    assert gpt < claude == screened.prompt_tokens
    assert gpt == tokens.count_chat_prompt(chat("Summarise the quarterly report for the board, please. " * 40).messages,
                                           "o200k_base")

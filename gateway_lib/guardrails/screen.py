"""Input guardrails: every check a request passes before any provider is called.

Each check is a plain function that returns a value or raises one of our 400s;
``find_violation`` is the one verdict-style check, so output screening can reuse it.
``screen`` runs them all once per request, cheapest first (counts and sizes before
regexes, regexes before tokenizing), and hands the pipeline one ``Screened``.

Content errors name the rule that fired and where (``messages[1]``, ``tools[0]``), never the matched text:
the response, logs and telemetry must not carry the very data the rule protects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from gateway_lib.errors import ContentFiltered, InvalidRequest
from gateway_lib.guardrails import tokens
from gateway_lib.guardrails.pii import PII_DETECTORS, Detector, pii_problems

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.config.settings import LimitSettings
    from gateway_lib.config.tiers import Tier
    from gateway_lib.operations.schema import Message


class Prompt(Protocol):
    """What screening reads from any operation's request: the chat-shaped view of what the model reads."""

    produces_output: ClassVar[bool]  # False for embeddings: no completion to cap or reserve

    @property
    def messages(self) -> Sequence[Message]: ...

    @property
    def tools(self) -> Sequence[Mapping[str, Any]] | None: ...

    @property
    def response_format(self) -> Mapping[str, Any] | None: ...

    @property
    def max_completion_tokens(self) -> int | None: ...

    @property
    def requested_max_tokens(self) -> int | None: ...


@dataclass(frozen=True)
class Screened:
    """What the pipeline needs from screening: estimates for quota, the cap to send, where it fits."""

    prompt_tokens: int  # estimate; the highest among eligible targets (their tokenizers differ)
    max_tokens: int  # effective completion cap to send upstream
    clamped: bool  # the tier's clamp policy lowered the caller's max_tokens
    defaulted: bool  # the caller sent no max_tokens; the gateway chose one
    requested_max_tokens: int | None
    eligible: tuple[str, ...]  # ids of the given targets the request fits, in the given order
    prompt_chars: int
    estimates: Mapping[str, int] = field(default_factory=dict)  # prompt tokens per tokenizer

    def prompt_tokens_for(self, tokenizer: str) -> int:
        """The served target's own estimate (a cut stream is billed with it), else the reserved maximum."""
        return self.estimates.get(tokenizer, self.prompt_tokens)


@dataclass(frozen=True)
class MaxTokens:
    value: int
    clamped: bool = False
    defaulted: bool = False
    param: str = "max_tokens"  # the parameter the caller used, named in errors


@dataclass(frozen=True)
class Violation:
    rule: str  # "deny_patterns[2]" or "pii.email": safe to show, never the matched text
    where: str  # "messages[1]", "tools[0]", "response_format": the part of the request it matched in


def screen(request: Prompt, tier: Tier, targets: Sequence[Target], limits: LimitSettings) -> Screened:
    """Run every input check for one request against the route's candidate targets.

    Context windows are checked per target, not against the smallest one: a prompt that only
    fits the 200k-token target of an alias is still served there. Targets it does not fit are
    left out of ``eligible``; the pipeline should route only to those (a provider would answer
    them with a non-retryable 400). Only when no target fits is the request rejected.
    """
    if not targets:
        raise ValueError("screen() needs at least one candidate target")
    check_message_count(request.messages, limits)
    chars = check_prompt_size(request, limits)
    check_content(request, content_rules(limits.deny_patterns, limits.pii_patterns))
    cap = resolve_max_tokens(request, tier, targets)
    estimates = _estimates(request, targets)
    eligible, max_tokens = fit_targets(targets, estimates, cap)
    return Screened(
        prompt_tokens=max(estimates[t.tokenizer] for t in eligible), max_tokens=max_tokens,
        clamped=cap.clamped, defaulted=cap.defaulted, requested_max_tokens=request.requested_max_tokens,
        eligible=tuple(t.id for t in eligible), prompt_chars=chars, estimates=estimates,
    )


# --- size -------------------------------------------------------------------------------------


def check_message_count(messages: Sequence[Message], limits: LimitSettings) -> None:
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"The request has {len(messages)} messages; this gateway accepts at most {limits.max_messages}.",
            code="too_many_messages", param="messages",
        )


def check_prompt_size(request: Prompt, limits: LimitSettings) -> int:
    """Characters of prompt text (messages, tool calls, tool definitions, a structured response format);
    400 past the cap."""
    chars = sum(len(text) for _, text in _texts(request.messages))
    if request.tools:
        chars += len(json.dumps(request.tools, separators=(",", ":"), ensure_ascii=False))
    if request.response_format:
        chars += len(json.dumps(request.response_format, separators=(",", ":"), ensure_ascii=False))
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(
            f"The prompt is {chars} characters; this gateway accepts at most {limits.max_prompt_chars}.",
            code="prompt_too_large", param="messages",
        )
    return chars


# --- max_tokens and context window -------------------------------------------------------------


def resolve_max_tokens(request: Prompt, tier: Tier, targets: Sequence[Target]) -> MaxTokens:
    """The completion cap after the tier's policy.

    Absent: min(tier cap, smallest max_output_tokens among the targets), so the default is valid
    wherever fallback lands. Above the tier cap: lowered to it (policy "clamp", reported back to
    the caller) or a 400 (policy "reject").
    """
    requested, param = request.requested_max_tokens, _token_param(request)
    if not request.produces_output:
        return MaxTokens(0, param=param)
    if requested is None:
        default = min(tier.max_tokens_per_request, *(t.max_output_tokens for t in targets))
        return MaxTokens(default, defaulted=True, param=param)
    if requested <= tier.max_tokens_per_request:
        return MaxTokens(requested, param=param)
    if tier.max_tokens_policy == "clamp":
        return MaxTokens(tier.max_tokens_per_request, clamped=True, param=param)
    raise InvalidRequest(
        f"{param} is {requested}; the '{tier.name}' tier allows at most {tier.max_tokens_per_request} per request.",
        code="max_tokens_exceeds_tier_limit", param=param,
    )


def fit_targets(targets: Sequence[Target], prompt_tokens: Mapping[str, int],
                cap: MaxTokens) -> tuple[list[Target], int]:
    """Targets whose context window holds prompt + completion, and the max_tokens to send them.

    A gateway-chosen default shrinks to the room every eligible target has left, so an absent
    max_tokens never turns a prompt that fits into a context error.
    """
    if cap.defaulted:
        fits = [t for t in targets if t.context_window - prompt_tokens[t.tokenizer] >= 1]
        if fits:
            return fits, min(cap.value, *(t.context_window - prompt_tokens[t.tokenizer] for t in fits))
    else:
        within_output = [t for t in targets if cap.value <= t.max_output_tokens]
        if not within_output:
            raise InvalidRequest(
                f"{cap.param} is too large: {cap.value}. This model supports at most "
                f"{max(t.max_output_tokens for t in targets)} completion tokens.",
                code="max_tokens_exceeds_model_limit", param=cap.param,
            )
        fits = [t for t in within_output if prompt_tokens[t.tokenizer] + cap.value <= t.context_window]
        if fits:
            return fits, cap.value
    raise _context_error(targets, prompt_tokens, 1 if cap.defaulted else cap.value)


def _context_error(targets: Sequence[Target], prompt_tokens: Mapping[str, int], completion: int) -> InvalidRequest:
    best = max(targets, key=lambda t: t.context_window - prompt_tokens[t.tokenizer])
    prompt = prompt_tokens[best.tokenizer]
    return InvalidRequest(  # OpenAI's wording, so SDK users recognise it
        f"This model's maximum context length is {best.context_window} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
        "Please reduce the length of the messages or completion.",
        code="context_length_exceeded", param="messages",
    )


def _estimates(request: Prompt, targets: Sequence[Target]) -> dict[str, int]:
    """Prompt tokens per tokenizer (at most three distinct ones per route)."""
    return {name: tokens.count_chat_prompt(request.messages, name, tools=request.tools,
                                           response_format=request.response_format)
            for name in {t.tokenizer for t in targets}}


def _token_param(request: Prompt) -> str:
    named = getattr(type(request), "token_param", None)  # a dialect's own name (max_output_tokens, max_tokens)
    if isinstance(named, str):
        return named
    return "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"


# --- content rules -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ContentRules:
    deny: tuple[re.Pattern[str], ...]
    pii: tuple[tuple[str, Detector], ...]


@lru_cache(maxsize=8)
def content_rules(deny_patterns: tuple[str, ...], pii_names: tuple[str, ...]) -> ContentRules:
    """Compile the configured rules once per process (settings are frozen, so the cache key is stable)."""
    problems = pii_problems(pii_names)
    if problems:
        raise ValueError("; ".join(problems))
    return ContentRules(
        deny=tuple(re.compile(p) for p in deny_patterns),
        pii=tuple((n.strip().lower(), PII_DETECTORS[n.strip().lower()]) for n in pii_names),
    )


def find_violation(texts: Iterable[tuple[str, str]], rules: ContentRules) -> Violation | None:
    """The first rule any (where, text) pair breaks, or None."""
    for where, text in texts:
        for i, pattern in enumerate(rules.deny):
            if pattern.search(text):
                return Violation(f"deny_patterns[{i}]", where)
        for name, detect in rules.pii:
            if detect(text):
                return Violation(f"pii.{name}", where)
    return None


def check_content(request: Prompt, rules: ContentRules) -> None:
    """400 content_filter naming the rule and the part of the request when any rule fires."""
    if not rules.deny and not rules.pii:
        return
    violation = find_violation(screened_texts(request), rules)
    if violation is not None:
        raise ContentFiltered(
            f"The request was blocked by the gateway's content policy (rule '{violation.rule}' "
            f"matched in {violation.where}).",
            param=violation.where.split("[", 1)[0],
        )


def screened_texts(request: Prompt) -> Iterator[tuple[str, str]]:
    """Every caller-supplied text the model reads, with where it is: message text, names, refusals and
    tool calls, and every string of the tool definitions and the response format (descriptions and
    schemas reach the model as prompt too, so a rule that skipped them would be a way round it)."""
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        yield where, message.text()
        if message.name:
            yield where, message.name
        if isinstance(message.content, list):
            yield from ((where, str(p["refusal"])) for p in message.content if p.get("type") == "refusal")
        for call in message.tool_calls or ():
            yield where, call.function.name
            yield where, call.function.arguments
    for index, tool in enumerate(request.tools or ()):
        yield from ((f"tools[{index}]", text) for text in _strings(tool))
    if request.response_format:
        yield from (("response_format", text) for text in _strings(request.response_format))


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON document, keys included (a schema's property names are prompt text too)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _texts(messages: Sequence[Message]) -> Iterator[tuple[int, str]]:
    """Message text and tool-call arguments, by message index (what the prompt size counts)."""
    for index, message in enumerate(messages):
        yield index, message.text()
        for call in message.tool_calls or ():
            yield index, call.function.arguments

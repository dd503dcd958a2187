"""A burst is not a breach: tokens-per-minute admission counts the output a request is expected to use."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import usage_table
from gateway_lib.config.settings import Settings
from gateway_lib.errors import RateLimited
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import Completion, Usage
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.quota.admission import COUNTERS_ROW, Counters
from gateway_lib.quota.expected import DEFAULT_OUTPUT_TOKENS, MIN_OUTPUT_TOKENS, ExpectedOutput
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.memory import MemoryTableStore

ROOT = Path(__file__).resolve().parents[2]


def test_a_new_caller_is_expected_to_use_the_default_and_never_more_than_its_cap() -> None:
    expected = ExpectedOutput()
    assert expected.tokens("new", 4096) == DEFAULT_OUTPUT_TOKENS
    assert expected.tokens("new", 100) == 100
    assert expected.tokens("new", 0) == 0  # an operation without output (embeddings)


def test_the_estimate_follows_the_callers_answers_with_headroom() -> None:
    expected = ExpectedOutput()
    expected.observe("c", 20)
    assert expected.tokens("c", 4096) == 40
    for _ in range(50):
        expected.observe("c", 3000)
    assert expected.tokens("c", 4096) == 4096  # long answers: back to the cap
    expected.observe("short", 1)
    assert expected.tokens("short", 4096) == MIN_OUTPUT_TOKENS


def _runtime(answer: Any) -> tuple[Runtime, MockProvider]:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values["GATEWAY_STORAGE_MODE"] = "memory"
    rt = build_runtime(Settings.from_env(values), store=MemoryTableStore())
    mock = MockProvider(answer)
    rt.providers = {"azure_openai": mock, "bedrock": mock}
    return rt, mock


def _caller(rt: Runtime, tier: str = "standard") -> Caller:
    return Caller(app_id=f"app-{tier}", tenant_id="t-1", user_id=None, tier=rt.settings.tiers.tiers[tier],
                  roles=frozenset(), scopes=frozenset(), is_admin=False)


def _chat(**extra: Any) -> ChatRequest:
    return ChatRequest(**{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], **extra})


async def _counters(rt: Runtime) -> Counters:
    rows = await rt.store.query(usage_table(rt.settings.storage.table_prefix))
    return next(Counters.from_entity(e) for e in rows if e.row_key == COUNTERS_ROW)


def _answer(completion_tokens: int) -> Completion:
    body = {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "ok"}}]}
    return Completion(body, Usage(10, completion_tokens))


def test_in_flight_tokens_are_the_prompt_plus_the_expected_answers_and_settle_to_the_actual() -> None:
    seen: list[Counters] = []

    async def answer(call: Call) -> Completion:
        seen.append(await _counters(rt))
        return _answer(20)

    rt, _ = _runtime(answer)

    async def run() -> None:
        caller = _caller(rt)
        n = 1
        for request in (_chat(), _chat(), _chat(n=2)):
            scope = Scope(request_id=f"req-{n}", trace_id="0" * 31 + "1", traceparent=None, route="chat")
            await pipeline.complete(rt, scope, caller, CHAT_COMPLETIONS, request)
            n += 1
        assert (await _counters(rt)).minute_tokens == 3 * 30  # settled to the usage each answer reported

    asyncio.run(run())
    prompt = seen[0].in_flight_tokens - DEFAULT_OUTPUT_TOKENS
    assert 0 < prompt < 20  # "hello" with the chat overhead, plus a default output, not the 4,096 cap
    assert seen[1].in_flight_tokens == prompt + 40  # learned: twice the 20-token answer
    assert seen[2].in_flight_tokens == prompt + 2 * 40  # n=2: two answers expected, each as long
    # USD stays reserved at the worst case: every choice at the tier's output cap, on the dearest target.
    assert seen[0].in_flight_usd > 0 and seen[2].in_flight_usd > seen[0].in_flight_usd


def test_fifty_concurrent_requests_without_max_tokens_from_a_fresh_caller_are_all_admitted() -> None:
    async def answer(call: Call) -> Completion:
        await asyncio.sleep(0.01)  # all fifty in flight together
        return _answer(16)

    rt, mock = _runtime(answer)

    async def run() -> None:
        caller = _caller(rt)
        scopes = [Scope(request_id=f"burst-{i}", trace_id="0" * 31 + "1", traceparent=None, route="chat")
                  for i in range(50)]
        await asyncio.gather(*(pipeline.complete(rt, s, caller, CHAT_COMPLETIONS, _chat()) for s in scopes))

    asyncio.run(run())
    assert len(mock.calls) == 50


def test_a_caller_that_really_uses_its_tokens_per_minute_is_refused_with_retry_after() -> None:
    rt, _ = _runtime(lambda call: _answer(9000))  # basic tier: 20,000 tokens per minute, 1,024 per answer cap

    async def run() -> RateLimited:
        caller = _caller(rt, "basic")
        for i in range(10):
            scope = Scope(request_id=f"big-{i}", trace_id="0" * 31 + "1", traceparent=None, route="chat")
            try:
                await pipeline.complete(rt, scope, caller, CHAT_COMPLETIONS, _chat(model="gpt-4o-mini"))
            except RateLimited as refused:
                return refused
        pytest.fail("never refused")

    refused = asyncio.run(run())
    assert "tokens per minute" in refused.message and refused.retry_after is not None and refused.retry_after >= 1

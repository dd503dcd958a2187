"""BedrockProvider through real boto3/botocore against the provider simulator on loopback.

Streams are decoded by botocore's own event-stream parser; faults come from
``POST /_sim/faults``; request counts from ``GET /_sim/stats``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from botocore.credentials import Credentials

from gateway_lib.config.catalog import Price, Target
from gateway_lib.errors import ProviderError
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import CallContext, ProviderSettings, StreamEvent
from gateway_lib.providers.bedrock.adapter import BedrockProvider
from gateway_lib.providers.bedrock.config import BedrockSettings
from gateway_lib.providers.bedrock.credentials import build_credentials
from gateway_lib.routing.fallback import complete_with_fallback
from gateway_lib.routing.plan import RoutePlan, RouteStep
from gateway_lib.routing.target_health import TargetHealth
from tests.inproc_simulator import control
from tools.dev_issuer import DevIssuer
from tools.provider_simulator import RunningSimulator

pytestmark = pytest.mark.integration


@pytest.fixture
def sim(thread_sim: RunningSimulator) -> RunningSimulator:
    return thread_sim  # started once per module, reset for each test (tests/inproc_simulator.py)


HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
SONNET = "anthropic.claude-3-5-sonnet-20240620-v1:0"
ROLE_ARN = "arn:aws:iam::123456789012:role/gateway-bedrock"
AUDIENCE = "api://AzureADTokenExchange"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def target(model_id: str = HAIKU, tid: str = "bedrock-haiku") -> Target:
    return Target(id=tid, provider="bedrock", deployment=model_id, model="claude-3-haiku", region="us-east-1",
                  endpoint=None, price=Price(Decimal("0.00025"), Decimal("0.00125")), quality=55,
                  context_window=200000, max_output_tokens=4096, tokenizer="claude")


def settings(sim: RunningSimulator, upstream_timeout_seconds: float = 10,
             **overrides: Any) -> tuple[BedrockSettings, ProviderSettings]:
    values: dict[str, Any] = dict(region="us-east-1", endpoint_url=sim.url, role_arn=None, web_identity_audience=None,
                                  sts_endpoint_url=None, role_session_name="ai-gateway")
    values.update(overrides)
    return BedrockSettings(**values), ProviderSettings(azure_client_id=None, connect_timeout_seconds=2,
                                                        upstream_timeout_seconds=upstream_timeout_seconds)


def request(text: str = "Tell me about Oslo", **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "claude-3-haiku", "messages": [{"role": "user", "content": text}],
                                       **extra})


CTX = CallContext(request_id="req-1", traceparent=TRACEPARENT, max_tokens=64)


@pytest.fixture
def provider(sim: RunningSimulator) -> Iterator[BedrockProvider]:
    bedrock = BedrockProvider(*settings(sim), credentials=Credentials("AKIDEXAMPLE", "secret"), max_workers=4)
    yield bedrock
    asyncio.run(bedrock.aclose())


def calls(sim: RunningSimulator, model_id: str = HAIKU) -> int:
    return int(control(sim, "GET", "/_sim/stats")["targets"].get(model_id, {}).get("count", 0))


async def drain(stream: AsyncIterator[StreamEvent], into: list[StreamEvent]) -> None:
    async for event in stream:
        into.append(event)


def test_converse_returns_an_openai_completion(sim: RunningSimulator, provider: BedrockProvider) -> None:
    completion = asyncio.run(provider.complete(request(), target(), CTX))
    body = completion.body
    assert body["object"] == "chat.completion" and body["model"] == "claude-3-haiku"
    assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    last = control(sim, "GET", "/_sim/stats")["targets"][HAIKU]["last"]
    assert last["body"]["inferenceConfig"]["maxTokens"] == 64
    assert last["headers"]["traceparent"] == TRACEPARENT


def test_converse_stream_is_decoded_into_openai_chunks(provider: BedrockProvider) -> None:
    events: list[StreamEvent] = []
    asyncio.run(drain(provider.stream(request(), target(), CTX), events))
    assert events[0].chunk["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e.text for e in events)
    finishes = [e.chunk["choices"][0]["finish_reason"] for e in events if e.chunk["choices"]]
    assert finishes[-1] in ("stop", "length")
    assert events[-1].chunk["choices"] == [] and events[-1].usage is not None


def test_tool_use_round_trips_through_the_simulator(provider: BedrockProvider) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    completion = asyncio.run(provider.complete(request("CALL_TOOL Oslo", tools=[tool]), target(), CTX))
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])


def test_throttling_is_rate_limited_retryable_and_not_retried_by_botocore(sim: RunningSimulator,
                                                                          provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/faults", {"provider": "bedrock", "mode": "status", "status": 429})
    with pytest.raises(ProviderError) as info:
        asyncio.run(provider.complete(request(), target(), CTX))
    assert (info.value.kind, info.value.retryable, info.value.upstream_status) == ("rate_limited", True, 429)
    assert calls(sim) == 1  # botocore's standard mode would have retried a 429 three times


def test_stream_throttled_before_the_first_chunk_fails_on_first_next(sim: RunningSimulator,
                                                                     provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/faults", {"provider": "bedrock", "mode": "status", "status": 503, "count": 1})

    async def first() -> None:
        await anext(provider.stream(request(), target(), CTX))

    with pytest.raises(ProviderError) as info:
        asyncio.run(first())
    assert info.value.kind == "server_error" and info.value.retryable and calls(sim) == 1


def test_cut_stream_raises_after_the_first_chunks(sim: RunningSimulator, provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/faults", {"provider": "bedrock", "mode": "cut", "after_chunks": 3})
    events: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        asyncio.run(drain(provider.stream(request(), target(), CTX), events))
    assert events, "chunks before the cut were delivered"
    assert info.value.kind == "connection" and info.value.retryable


def test_mid_stream_exception_event_is_a_provider_error(sim: RunningSimulator, provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/faults", {"provider": "bedrock", "mode": "status", "status": 429, "after_chunks": 2})
    events: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        asyncio.run(drain(provider.stream(request(), target(), CTX), events))
    assert events and info.value.kind == "rate_limited"


def test_validation_error_is_a_non_retryable_bad_request(sim: RunningSimulator, provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/faults", {"provider": "bedrock", "mode": "status", "status": 400,
                                          "error_type": "ValidationException", "message": "Input is too long"})
    with pytest.raises(ProviderError) as info:
        asyncio.run(provider.complete(request(), target(), CTX))
    assert info.value.kind == "bad_request" and not info.value.retryable and info.value.status == 400
    assert "Input is too long" in info.value.message


def test_fallback_moves_to_the_next_bedrock_target(sim: RunningSimulator, provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/faults", {"target": HAIKU, "mode": "status", "status": 429})
    plan = RoutePlan("chat", None, (RouteStep(target(HAIKU, "a"), "t"), RouteStep(target(SONNET, "b"), "t")))
    _, chosen, attempts = asyncio.run(complete_with_fallback(
        plan, {"bedrock": provider}, request(), CTX, TargetHealth(), lambda: 0.0))
    assert chosen.id == "b" and [a.outcome for a in attempts] == ["rate_limited", "ok"]
    assert (calls(sim, HAIKU), calls(sim, SONNET)) == (1, 1)


class JumpClock:
    """Real time plus an offset, so credentials can be made to look old."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def test_web_identity_credentials_through_the_sts_stand_in_refresh_after_expiry(sim: RunningSimulator) -> None:
    control(sim, "POST", "/_sim/config", {"sts_audience": AUDIENCE, "sts_expiry_seconds": 900})
    issuer = DevIssuer(audience=AUDIENCE)
    clock = JumpClock()
    config = settings(sim, role_arn=ROLE_ARN, web_identity_audience=AUDIENCE, sts_endpoint_url=sim.url)
    credentials = build_credentials(*config, token_provider=lambda: issuer.token(roles=()), time_fetcher=clock)
    assert control(sim, "GET", "/_sim/stats")["sts"]["count"] == 0  # deferred: nothing fetched yet
    bedrock = BedrockProvider(*config, credentials=credentials, max_workers=2)
    try:
        asyncio.run(bedrock.complete(request(), target(), CTX))
        asyncio.run(bedrock.complete(request(), target(), CTX))
        stats = control(sim, "GET", "/_sim/stats")
        assert stats["sts"]["count"] == 1 and stats["sts"]["last_role_arn"] == ROLE_ARN
        first_key = _access_key(stats)
        clock.offset = timedelta(seconds=899)  # the 900 s credentials are about to expire
        asyncio.run(bedrock.complete(request(), target(), CTX))
        stats = control(sim, "GET", "/_sim/stats")
        assert stats["sts"]["count"] == 2 and _access_key(stats) != first_key
    finally:
        asyncio.run(bedrock.aclose())


def _access_key(stats: dict[str, Any]) -> str:
    auth = stats["targets"][HAIKU]["last"]["headers"]["authorization"]
    return auth.split("Credential=", 1)[1].split("/", 1)[0]


def test_read_timeout_is_a_retryable_timeout_without_a_botocore_retry(sim: RunningSimulator) -> None:
    control(sim, "POST", "/_sim/faults", {"provider": "bedrock", "mode": "slow", "delay_ms": 1500, "count": 1})
    bedrock = BedrockProvider(*settings(sim, upstream_timeout_seconds=0.3), credentials=Credentials("a", "b"))
    try:
        with pytest.raises(ProviderError) as info:
            asyncio.run(bedrock.complete(request(), target(), CTX))
    finally:
        asyncio.run(bedrock.aclose())
    assert info.value.kind == "timeout" and info.value.retryable and calls(sim) == 1


def test_a_consumer_stopping_early_closes_the_stream(sim: RunningSimulator, provider: BedrockProvider) -> None:
    control(sim, "POST", "/_sim/config", {"chunk_delay_ms": 20})

    async def first_then_close() -> None:
        stream = provider.stream(request("a long answer please " * 20), target(), CTX)
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        completion = await provider.complete(request(), target(), CTX)  # the pool is still usable
        assert completion.body["choices"]

    asyncio.run(first_then_close())


def test_provider_federates_from_settings_with_an_injected_entra_token(sim: RunningSimulator) -> None:
    issuer = DevIssuer(audience=AUDIENCE)
    config = settings(sim, role_arn=ROLE_ARN, web_identity_audience=AUDIENCE, sts_endpoint_url=sim.url)
    bedrock = BedrockProvider(*config, web_identity_token=lambda: issuer.token(roles=()), max_workers=2)
    try:
        asyncio.run(bedrock.complete(request(), target(), CTX))
    finally:
        asyncio.run(bedrock.aclose())
    sts = control(sim, "GET", "/_sim/stats")["sts"]
    assert sts["count"] == 1 and sts["last_claims"]["aud"] == AUDIENCE


def test_a_new_operation_is_one_row_its_capability_and_dispatch_follow(provider: BedrockProvider,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """What adding an operation to Bedrock takes: a BedrockOperation in a module and its row in OPERATIONS."""
    from gateway_lib.providers import bedrock, registry
    from gateway_lib.providers.base import Completion, Usage, streamed
    from gateway_lib.providers.bedrock.operation import BedrockOperation, Calls
    from gateway_lib.providers.bedrock.operations import OPERATIONS

    @dataclass
    class Probe:
        operation = "probe"
        text: str

    async def complete(calls: Calls, request: Probe, where: Any, ctx: CallContext, created: int) -> Completion:
        body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16,
                "messages": [{"role": "user", "content": request.text}]}
        raw, _ = await calls.invoke(ctx, where.region, {"modelId": where.deployment, "body": json.dumps(body),
                                                               "contentType": "application/json"})
        return Completion(body={"probe": json.loads(raw)["type"], "created": created}, usage=Usage(1, 1))

    probe_target = target()
    assert registry.capabilities(probe_target).lacks("probe", frozenset()) is not None
    monkeypatch.setitem(OPERATIONS, "probe", BedrockOperation(serves=lambda t: t.kind == "chat", complete=complete))
    bedrock._capabilities.cache_clear()
    try:
        assert registry.capabilities(probe_target).lacks("probe", frozenset()) is None
        assert registry.capabilities(probe_target).lacks(streamed("probe"), frozenset()) is not None  # it has no stream
        answer = asyncio.run(provider.complete(Probe("hello"), probe_target, CTX))
        assert answer.body["probe"] == "message" and answer.body["created"] > 0
    finally:
        bedrock._capabilities.cache_clear()

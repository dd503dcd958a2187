"""The Azure OpenAI adapter through the real openai SDK against the simulator: auth modes, usage,
and every upstream failure mapped to one ProviderError (with SDK retries off)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.config.settings import Settings
from gateway_lib.errors import ProviderError
from gateway_lib.operations.responses import ResponsesRequest
from gateway_lib.operations.schema import ChatRequest, parse_model
from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider
from gateway_lib.providers.base import CHAT, RESPONSES, CallContext, ProviderSettings, Unsupported
from tools.azurite import free_port
from tools.provider_simulator import start_in_thread

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
CTX = CallContext(request_id="req-adapter", traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


@pytest.fixture(scope="module")
def simulator() -> Iterator[Any]:
    with start_in_thread() as sim:
        yield sim


@pytest.fixture()
def base(simulator: Any) -> Iterator[tuple[Any, ProviderSettings, Any]]:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values.update({"AZURE_OPENAI_ENDPOINT": simulator.url, "GATEWAY_STORAGE_MODE": "memory"})
    settings = Settings.from_env(values)
    simulator.state.faults.clear()
    simulator.state.stats.reset()
    yield simulator, settings.providers, settings.catalogue.targets["aoai-gpt-4o-mini-eastus"]
    simulator.state.faults.clear()


def aoai(providers: ProviderSettings, token_provider: Any = None, upstream_timeout_seconds: float | None = None,
         **section: Any) -> AzureOpenAIProvider:
    """The adapter on the example settings, with changes to its own section or the shared timeout."""
    shared = providers if upstream_timeout_seconds is None else replace(
        providers, upstream_timeout_seconds=upstream_timeout_seconds)
    return AzureOpenAIProvider(replace(providers.section("azure_openai"), **section), shared, token_provider)


def _chat(**extra: Any) -> ChatRequest:
    return ChatRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello adapter test"}], **extra)


def _run(provider: AzureOpenAIProvider, coro_factory: Any) -> Any:
    async def go() -> Any:
        try:
            return await coro_factory()
        finally:
            await provider.aclose()

    return asyncio.run(go())


def _last(simulator: Any) -> dict[str, Any]:
    return simulator.state.stats.snapshot()["targets"]["gpt-4o-mini"]["last"]


def test_managed_identity_mode_sends_an_entra_bearer_token_and_no_key(base: Any) -> None:
    simulator, settings, target = base
    tokens: list[str] = []

    async def token_provider() -> str:
        tokens.append("issued")
        return "entra-access-token"

    provider = aoai(settings, token_provider, auth="managed_identity")
    completion = _run(provider, lambda: provider.complete(_chat(), target, CTX))
    headers = {k.lower(): v for k, v in _last(simulator)["headers"].items()}
    assert headers["authorization"].startswith("Bearer ") and "api-key" not in headers
    assert tokens and completion.usage.prompt_tokens > 0
    assert headers["traceparent"] == CTX.traceparent and headers["x-ms-client-request-id"] == CTX.request_id


def test_a_token_that_cannot_be_had_is_an_auth_error_before_anything_is_sent(base: Any) -> None:
    simulator, settings, target = base

    def token_provider() -> str:
        raise RuntimeError("no managed identity here")

    provider = aoai(settings, token_provider, auth="managed_identity")
    with pytest.raises(ProviderError) as raised:
        _run(provider, lambda: provider.complete(_chat(), target, CTX))
    assert (raised.value.kind, raised.value.retryable) == ("auth", True)
    assert simulator.state.stats.snapshot()["total"] == 0


def test_api_key_mode_sends_the_key_header(base: Any) -> None:
    simulator, settings, target = base
    provider = aoai(settings)
    _run(provider, lambda: provider.complete(_chat(), target, CTX))
    assert "api-key" in {k.lower() for k in _last(simulator)["headers"]}


def test_stream_always_asks_for_usage_and_drops_the_prompt_filter_preamble(base: Any) -> None:
    simulator, settings, target = base
    provider = aoai(settings)

    async def collect() -> list[Any]:
        return [event async for event in provider.stream(_chat(stream=True), target, CTX)]

    events = _run(provider, collect)
    assert _last(simulator)["body"]["stream_options"] == {"include_usage": True}
    assert all(e.chunk.get("choices") or e.usage for e in events)
    assert events[-1].usage is not None and events[-1].usage.completion_tokens > 0
    assert "".join(e.text for e in events)


def test_a_kept_response_is_read_and_deleted_on_the_relays_session_and_auth(base: Any) -> None:
    simulator, settings, target = base
    provider = aoai(settings)
    request = parse_model(ResponsesRequest, {"model": "gpt-4o-mini", "input": "keep this"})

    async def lifecycle() -> list[Any]:
        made = await provider.complete(request, target, CTX)
        kept = await provider.stored(RESPONSES, made.body["id"], target, CTX)
        deleted = await provider.stored(RESPONSES, made.body["id"], target, CTX, delete=True)
        gone = await provider.stored(RESPONSES, made.body["id"], target, CTX)
        odd = await provider.stored(RESPONSES, "resp_/../x?y", target, CTX)  # one path segment, whatever it holds
        chat = await provider.stored(CHAT, "chatcmpl-1", target, CTX)
        return [made.body, kept, deleted, gone, odd, chat]

    made, kept, deleted, gone, odd, chat = _run(provider, lifecycle)
    assert kept == made and deleted == {"id": made["id"], "object": "response.deleted", "deleted": True}
    assert gone is None and odd is None
    assert isinstance(chat, Unsupported)
    last = simulator.state.stats.snapshot()["targets"]["responses"]["last"]
    assert last["path"] == "/openai/v1/responses/resp_%2F..%2Fx%3Fy" and "api-key" in {k.lower() for k in last["headers"]}


@pytest.mark.parametrize(("fault", "kind", "retryable"), [
    ({"mode": "status", "status": 429, "retry_after": 2}, "rate_limited", True),
    ({"mode": "status", "status": 500}, "server_error", True),
    ({"mode": "status", "status": 503}, "server_error", True),
    ({"mode": "status", "status": 400, "message": "bad parameter"}, "bad_request", False),
    ({"mode": "malformed"}, "malformed", True),
])
def test_upstream_failures_become_one_provider_error_without_sdk_retries(base: Any, fault: dict[str, Any], kind: str,
                                                                       retryable: bool) -> None:
    simulator, settings, target = base
    simulator.state.faults.add({**fault, "count": 5})
    provider = aoai(settings)
    with pytest.raises(ProviderError) as raised:
        _run(provider, lambda: provider.complete(_chat(), target, CTX))
    assert (raised.value.kind, raised.value.retryable) == (kind, retryable)
    if fault.get("retry_after"):
        assert raised.value.retry_after == 2
    assert simulator.state.stats.snapshot()["total"] == 1, "the SDK must not retry behind the gateway's back"


def test_timeout_and_refused_connection(base: Any) -> None:
    simulator, settings, target = base
    simulator.state.faults.add({"mode": "slow", "delay_ms": 2500, "count": 1})
    provider = aoai(settings, upstream_timeout_seconds=1)
    with pytest.raises(ProviderError) as slow:
        _run(provider, lambda: provider.complete(_chat(), target, CTX))
    assert slow.value.kind == "timeout" and slow.value.retryable
    closed = aoai(settings, endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderError) as refused:
        _run(closed, lambda: closed.complete(_chat(), target, CTX))
    assert refused.value.kind == "connection" and refused.value.retryable


@pytest.mark.parametrize(("fault", "kind"), [
    ({"mode": "stall", "delay_ms": 3000, "after_chunks": 3}, "timeout"),  # goes quiet past the read timeout
    ({"mode": "cut", "after_chunks": 3}, "connection"),
])
def test_a_stream_failing_mid_way_is_named_for_what_happened(base: Any, fault: dict[str, Any], kind: str) -> None:
    simulator, settings, target = base
    simulator.state.faults.add({**fault, "count": 1})
    provider = aoai(settings, upstream_timeout_seconds=1)
    seen: list[Any] = []

    async def consume() -> None:
        async for event in provider.stream(_chat(stream=True), target, CTX):
            seen.append(event)

    with pytest.raises(ProviderError) as failed:
        _run(provider, consume)
    assert seen and (failed.value.kind, failed.value.retryable) == (kind, True)


def test_a_cut_stream_raises_after_the_first_events(base: Any) -> None:
    simulator, settings, target = base
    simulator.state.faults.add({"mode": "cut", "after_chunks": 3, "count": 1})
    provider = aoai(settings)
    seen: list[Any] = []

    async def consume() -> None:
        async for event in provider.stream(_chat(stream=True), target, CTX):
            seen.append(event)

    with pytest.raises(ProviderError) as cut:
        _run(provider, consume)
    assert seen, "some events arrived before the cut"
    assert cut.value.retryable


def test_retry_after_ms_is_preferred_for_its_precision(base: Any) -> None:
    simulator, settings, target = base
    simulator.state.faults.add({"mode": "status", "status": 429, "retry_after": 1.5, "count": 1})
    provider = aoai(settings)
    with pytest.raises(ProviderError) as raised:
        _run(provider, lambda: provider.complete(_chat(), target, CTX))
    assert raised.value.retry_after == 1.5, "retry-after says 2, retry-after-ms says 1500"


_NO_SDK = """
import asyncio, json, sys
from gateway_lib.config.settings import Settings
from gateway_lib.operations.responses import ResponsesRequest
from gateway_lib.operations.schema import ChatRequest, parse_model
from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider
from gateway_lib.providers.base import CallContext

values = json.loads(open("local.settings.example.json").read())["Values"]
values.update({"AZURE_OPENAI_ENDPOINT": sys.argv[1], "GATEWAY_STORAGE_MODE": "memory"})
settings = Settings.from_env(values)
target = settings.catalogue.targets["aoai-gpt-4o-mini-eastus"]

async def main():
    provider = AzureOpenAIProvider(settings.providers.section("azure_openai"), settings.providers)
    ctx = CallContext(request_id="no-sdk")
    try:
        answer = await provider.complete(ChatRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]),
                                         target, ctx)
        streamed = [e async for e in provider.stream(
            ChatRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True), target, ctx)]
    finally:
        await provider.aclose()
    print(json.dumps({"choices": len(answer.body["choices"]), "events": len(streamed),
                      "sdk": sorted(m for m in sys.modules if m == "openai" or m.startswith("openai."))}))

asyncio.run(main())
"""


def test_no_openai_sdk_is_imported_on_the_request_path(base: Any) -> None:
    simulator, _, _ = base
    out = subprocess.run([sys.executable, "-c", _NO_SDK, simulator.url], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["choices"] == 1 and seen["events"] > 2, "the chat really ran"
    assert seen["sdk"] == []

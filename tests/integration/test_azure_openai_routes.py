"""The relay is operation-generic: each operation's row in ROUTES decides the upstream path, the request
builds its own body. Against the provider simulator (embeddings and the v1 Responses API as Azure serves
them), and a loopback aiohttp server where the test needs to see connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web

from gateway_lib.config.settings import Settings
from gateway_lib.errors import ProviderError
from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider
from gateway_lib.providers.base import EMBEDDINGS, RESPONSES, CallContext, StreamEvent
from tools.provider_simulator import start_in_thread

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
CTX = CallContext(request_id="req-routes", max_tokens=32)


@dataclass
class Request:
    """A minimal OperationRequest of another dialect: what the relay asks of any request."""

    operation: ClassVar[str]
    body: dict[str, Any]
    model: str = "alias"
    stream: bool = False
    provider_hint: str | None = None
    priority: str | None = None
    requested_max_tokens: int | None = None
    caps: list[int | None] = field(default_factory=list)

    def features(self) -> frozenset[str]:
        return frozenset()

    def wire_body(self, max_tokens: int | None) -> dict[str, Any]:
        self.caps.append(max_tokens)
        return dict(self.body)


class Embeddings(Request):
    operation = EMBEDDINGS


class Responses(Request):
    operation = RESPONSES


def _provider(endpoint: str) -> tuple[AzureOpenAIProvider, Any]:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values.update({"AZURE_OPENAI_ENDPOINT": endpoint, "GATEWAY_STORAGE_MODE": "memory"})
    settings = Settings.from_env(values)
    target = settings.catalogue.targets["aoai-gpt-4o-mini-eastus"]
    return AzureOpenAIProvider(settings.providers.section("azure_openai"), settings.providers), target


@pytest.fixture(scope="module")
def simulator() -> Iterator[Any]:
    with start_in_thread() as sim:
        yield sim


@pytest.fixture()
def sim(simulator: Any) -> Iterator[Any]:
    simulator.state.faults.clear()
    simulator.state.stats.reset()
    yield simulator
    simulator.state.faults.clear()


def _run(sim: Any, test: Any) -> Any:
    provider, target = _provider(sim.url)

    async def go() -> Any:
        try:
            return await test(provider, target)
        finally:
            await provider.aclose()

    return asyncio.run(go())


def _last(sim: Any, deployment: str) -> dict[str, Any]:
    return sim.state.stats.snapshot()["targets"][deployment]["last"]


def test_embeddings_go_to_the_deployments_embeddings_path_with_the_api_version(sim: Any) -> None:
    request = Embeddings({"model": "alias", "input": ["hello", "world"]})

    async def test(provider: AzureOpenAIProvider, target: Any) -> Any:
        return await provider.complete(request, replace(target, deployment="text-embedding-3-small"), CTX)

    answer = _run(sim, test)
    last = _last(sim, "text-embedding-3-small")
    assert last["path"] == "/openai/deployments/text-embedding-3-small/embeddings" and last["query"]["api-version"]
    assert last["body"] == {"model": "text-embedding-3-small", "input": ["hello", "world"]}
    assert request.caps == [32], "the effective cap is handed to the request's own wire_body"
    assert [d["index"] for d in answer.body["data"]] == [0, 1]
    assert answer.usage is None, "usage outside chat is the operation's to read"


def test_responses_go_to_the_v1_path_with_the_deployment_as_model_and_no_api_version(sim: Any) -> None:
    async def test(provider: AzureOpenAIProvider, target: Any) -> Any:
        return await provider.complete(Responses({"input": "hello", "max_output_tokens": 32}), target, CTX)

    answer = _run(sim, test)
    last = _last(sim, "gpt-4o-mini")
    assert last["path"] == "/openai/v1/responses" and "api-version" not in last["query"]
    assert last["body"] == {"input": "hello", "max_output_tokens": 32, "model": "gpt-4o-mini"}
    assert answer.body["object"] == "response" and answer.usage is None


def test_a_responses_stream_relays_named_events_as_received(sim: Any) -> None:
    async def test(provider: AzureOpenAIProvider, target: Any) -> list[StreamEvent]:
        return [e async for e in provider.stream(Responses({"input": "hello"}, stream=True), target, CTX)]

    events = _run(sim, test)
    assert _last(sim, "gpt-4o-mini")["body"] == {"input": "hello", "model": "gpt-4o-mini", "stream": True}, \
        "no chat stream_options on another operation"
    assert events[0].name == "response.created" and events[-1].name == "response.completed"
    assert all(e.name == e.chunk["type"] and json.loads(e.raw or b"") == e.chunk for e in events)
    assert all(e.usage is None for e in events) and events[-1].chunk["response"]["usage"]["output_tokens"] > 0


def test_an_error_event_inside_a_responses_stream_is_a_provider_error(sim: Any) -> None:
    sim.state.faults.add({"mode": "status", "status": 500, "after_chunks": 2, "count": 1})
    events: list[StreamEvent] = []

    async def test(provider: AzureOpenAIProvider, target: Any) -> None:
        async for event in provider.stream(Responses({"input": "hello"}, stream=True), target, CTX):
            events.append(event)

    with pytest.raises(ProviderError) as raised:
        _run(sim, test)
    assert len(events) <= 2, "events read with the error may go unrelayed; none after it"
    assert (raised.value.kind, raised.value.retryable) == ("server_error", True) and "mid-stream" in str(raised.value)


async def _serve(peers: list[Any]) -> web.AppRunner:
    async def responses(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"id": "resp_1", "object": "response", "output": []})

    app = web.Application()
    app.router.add_post("/openai/v1/responses", responses)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def test_sequential_calls_reuse_one_pooled_connection() -> None:
    async def go() -> list[Any]:
        peers: list[Any] = []
        runner = await _serve(peers)
        provider, target = _provider(f"http://127.0.0.1:{runner.addresses[0][1]}")
        try:
            for _ in range(3):
                await provider.complete(Responses({"input": "hi"}), target, CTX)
        finally:
            await provider.aclose()
            await runner.cleanup()
        return peers

    peers = asyncio.run(go())
    assert len(peers) == 3 and len(set(peers)) == 1, f"each call opened a connection of its own: {peers}"


@pytest.mark.parametrize(("answer", "relayed"), [
    (b'{ "id": "resp_1",  "object": "response", "output": [], "note": "caf\xc3\xa9 \\ud83d" }', True),
    ('{"id": "resp_1", "object": "response", "output": []}'.encode("utf-16"), False),
])
def test_an_answer_is_kept_byte_for_byte_to_be_relayed_and_one_not_in_utf8_is_unreadable(answer: bytes,
                                                                                          relayed: bool) -> None:
    async def go() -> Any:
        async def responses(_: web.Request) -> web.Response:
            return web.Response(body=answer, content_type="application/json")

        app = web.Application()
        app.router.add_post("/openai/v1/responses", responses)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        provider, target = _provider(f"http://127.0.0.1:{runner.addresses[0][1]}")
        try:
            return await provider.complete(Responses({"input": "hi"}), target, CTX)
        finally:
            await provider.aclose()
            await runner.cleanup()

    if relayed:
        completion = asyncio.run(go())
        assert completion.raw == answer and completion.body["note"] == "café \ud83d"
    else:
        with pytest.raises(ProviderError) as raised:
            asyncio.run(go())
        assert raised.value.kind == "malformed"

"""The relay is operation-generic: each operation's row in ROUTES decides the upstream path, the request
builds its own body. Served by a loopback aiohttp server that records what arrived (the simulator speaks
chat only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web

from gateway_lib.config.settings import Settings
from gateway_lib.errors import ProviderError
from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider
from gateway_lib.providers.base import EMBEDDINGS, RESPONSES, CallContext, StreamEvent

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
CTX = CallContext(request_id="req-routes", max_tokens=32)
RESPONSE_EVENTS = [
    ("response.created", {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hel"}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "lo"}),
    ("response.completed", {"type": "response.completed",
                            "response": {"id": "resp_1", "usage": {"input_tokens": 3, "output_tokens": 2}}}),
]


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


@dataclass
class Upstream:
    url: str
    seen: list[dict[str, Any]]


async def _serve(seen: list[dict[str, Any]], error_mid_stream: bool) -> web.AppRunner:
    async def record(request: web.Request) -> dict[str, Any]:
        entry = {"path": request.path, "query": dict(request.query), "body": await request.json(),
                 "api-key": request.headers.get("api-key"), "peer": request.transport.get_extra_info("peername")
                 if request.transport else None}
        seen.append(entry)
        return entry

    async def embeddings(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                                  "usage": {"prompt_tokens": 2, "total_tokens": 2}})

    async def responses(request: web.Request) -> web.StreamResponse:
        entry = await record(request)
        if not entry["body"].get("stream"):
            return web.json_response({"id": "resp_1", "object": "response", "output": [],
                                      "usage": {"input_tokens": 3, "output_tokens": 2}})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        events = [*RESPONSE_EVENTS[:2], ("error", {"type": "error", "code": "server_error"})] if error_mid_stream \
            else RESPONSE_EVENTS
        for name, data in events:
            await out.write(f"event: {name}\n".encode())
            await out.write(f"data: {json.dumps(data)}\n\n".encode())
        return out

    app = web.Application()
    app.router.add_post("/openai/deployments/{deployment}/embeddings", embeddings)
    app.router.add_post("/openai/v1/responses", responses)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _run(test: Any, error_mid_stream: bool = False) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        runner = await _serve(seen, error_mid_stream)
        port = runner.addresses[0][1]
        values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
        values.update({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{port}", "GATEWAY_STORAGE_MODE": "memory"})
        settings = Settings.from_env(values)
        target = replace(settings.catalogue.targets["aoai-gpt-4o-mini-eastus"], deployment="dep-1")
        provider = AzureOpenAIProvider(settings.providers.section("azure_openai"), settings.providers)
        try:
            await test(provider, target)
        finally:
            await provider.aclose()
            await runner.cleanup()
        return seen

    return asyncio.run(go())


def test_embeddings_go_to_the_deployments_embeddings_path_with_the_api_version() -> None:
    request = Embeddings({"model": "alias", "input": ["hello"]})
    answers = []

    async def test(provider: AzureOpenAIProvider, target: Any) -> None:
        answers.append(await provider.complete(request, target, CTX))

    seen = _run(test)
    assert seen[0]["path"] == "/openai/deployments/dep-1/embeddings" and "api-version" in seen[0]["query"]
    assert seen[0]["body"] == {"model": "dep-1", "input": ["hello"]} and seen[0]["api-key"]
    assert request.caps == [32], "the effective cap is handed to the request's own wire_body"
    assert answers[0].body["data"][0]["embedding"] == [0.1]
    assert answers[0].usage is None, "usage outside chat is the operation's to read"


def test_responses_go_to_the_v1_path_without_api_version_and_reuse_one_connection() -> None:
    async def test(provider: AzureOpenAIProvider, target: Any) -> None:
        for _ in range(3):
            await provider.complete(Responses({"input": "hi", "max_output_tokens": 32}), target, CTX)

    seen = _run(test)
    assert [s["path"] for s in seen] == ["/openai/v1/responses"] * 3 and seen[0]["query"] == {}
    assert seen[0]["body"] == {"input": "hi", "max_output_tokens": 32, "model": "dep-1"}
    assert len({s["peer"] for s in seen}) == 1, "each call opened a connection of its own: no pooling"


def test_a_responses_stream_relays_named_events_without_chat_usage() -> None:
    events: list[StreamEvent] = []

    async def test(provider: AzureOpenAIProvider, target: Any) -> None:
        stream: AsyncIterator[StreamEvent] = provider.stream(Responses({"input": "hi"}, stream=True), target, CTX)
        events.extend([e async for e in stream])

    seen = _run(test)
    assert seen[0]["body"] == {"input": "hi", "model": "dep-1", "stream": True}, "no chat stream_options"
    assert [e.name for e in events] == [name for name, _ in RESPONSE_EVENTS]
    assert [json.loads(e.raw or b"") for e in events] == [data for _, data in RESPONSE_EVENTS]
    assert all(e.usage is None for e in events)


def test_an_error_event_inside_a_responses_stream_is_a_provider_error() -> None:
    events: list[StreamEvent] = []

    async def test(provider: AzureOpenAIProvider, target: Any) -> None:
        async for event in provider.stream(Responses({"input": "hi"}, stream=True), target, CTX):
            events.append(event)

    with pytest.raises(ProviderError) as raised:
        _run(test, error_mid_stream=True)
    assert len(events) <= 2, "events read with the error may go unrelayed; none after it"
    assert (raised.value.kind, raised.value.retryable) == ("server_error", True) and "mid-stream" in str(raised.value)

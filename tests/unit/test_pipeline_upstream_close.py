"""A stream whose body never started closes its upstream itself, not through the garbage collector."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.operations import pipeline
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import CallContext, Completion, StreamEvent
from tests.unit.test_pipeline import _caller, _chat, _runtime, _scope, serve_to_a_caller_already_gone


class Tracked:
    """A provider stream that records when it is closed, and keeps a handle on it as a pooled client might."""

    name = "azure_openai"

    def __init__(self) -> None:
        self.closed = 0
        self.streams: list[Any] = []  # e.g. a client's registry of open responses

    def check(self, request: Any, target: Any) -> None:
        return None

    async def complete(self, request: ChatRequest, target: Target, ctx: CallContext) -> Completion:
        raise NotImplementedError

    def stream(self, request: ChatRequest, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        gen = self._stream()
        self.streams.append(gen)
        return gen

    async def _stream(self) -> AsyncIterator[StreamEvent]:
        try:
            for i in range(3):
                yield StreamEvent(chunk={"object": "chat.completion.chunk",
                                         "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}, text=f"w{i} ")
        finally:
            self.closed += 1

    async def aclose(self) -> None:
        pass


def test_an_unstarted_streams_upstream_is_closed_by_the_response_not_by_the_garbage_collector() -> None:
    async def run() -> None:
        provider = Tracked()
        rt = _runtime(provider)
        response = await pipeline.run(rt, _scope(), _caller(rt), CHAT_COMPLETIONS, _chat(stream=True))
        await serve_to_a_caller_already_gone(response)
        for _ in range(10):
            await asyncio.sleep(0)
        assert provider.closed == 1, "the upstream response is still open after the request was settled"

    asyncio.run(run())


class FailsToClose(Tracked):
    """An upstream whose close raises (a transport error while releasing the connection)."""

    async def _stream(self) -> AsyncIterator[StreamEvent]:
        try:
            yield StreamEvent(chunk={"object": "chat.completion.chunk",
                                     "choices": [{"index": 0, "delta": {"content": "w "}}]}, text="w ")
        finally:
            raise RuntimeError("connection reset while closing")


def test_an_unstarted_stream_whose_upstream_fails_to_close_still_leaves_its_one_cost_row() -> None:
    from tests.unit.test_pipeline import _counters

    async def run() -> None:
        rt = _runtime(FailsToClose())
        caller = _caller(rt)
        response = await pipeline.run(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(stream=True))
        with contextlib.suppress(RuntimeError):  # the close's failure may reach the server; the row must not depend on it
            await serve_to_a_caller_already_gone(response)
        counters, ledger = await _counters(rt, caller)
        assert [row["status"] for row in ledger] == ["client_disconnected"]
        assert counters.in_flight_tokens == 0

    asyncio.run(run())

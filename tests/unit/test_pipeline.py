"""The pipeline's promises, with fake providers on the in-memory store: every reservation is settled or
released exactly once, whatever the provider or the caller does."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import StreamingResponse

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import usage_table
from gateway_lib.config.settings import Settings
from gateway_lib.errors import InternalError, ProviderError, ServiceUnavailable
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import Completion, StreamEvent, Usage
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.quota.admission import COUNTERS_ROW, Counters
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.memory import MemoryTableStore

ROOT = Path(__file__).resolve().parents[2]


def broken(call: Call) -> Any:
    raise RuntimeError("a bug in an adapter")


def chatty(call: Call) -> Any:
    """Streams many content chunks and never a usage event (like a stream cut short)."""
    if not call.stream:
        body = {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}], "model": call.target.model}
        return Completion(body=body, usage=Usage(5, 1))
    return [StreamEvent(chunk={"object": "chat.completion.chunk",
                               "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}, text=f"w{i} ")
            for i in range(50)]


def _runtime(provider: Any, store: MemoryTableStore | None = None) -> Runtime:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values["GATEWAY_STORAGE_MODE"] = "memory"
    rt = build_runtime(Settings.from_env(values), store=store or MemoryTableStore())
    rt.providers = {"azure_openai": provider, "bedrock": provider}
    return rt


def _caller(rt: Runtime) -> Caller:
    tier = rt.settings.tiers.tiers["standard"]
    return Caller(app_id="app-1", tenant_id="t-1", user_id=None, tier=tier, roles=frozenset({"Gateway.Standard"}),
                  scopes=frozenset(), is_admin=False)


def _scope() -> Scope:
    return Scope(request_id="req-1", trace_id="0" * 31 + "1", traceparent="00-" + "0" * 31 + "1-" + "0" * 15 + "1-01",
                 route="chat")


async def _counters(rt: Runtime, caller: Caller) -> tuple[Counters, list[dict[str, Any]]]:
    prefix = rt.settings.storage.table_prefix
    rows = await rt.store.query(usage_table(prefix))
    counters = next(Counters.from_entity(e) for e in rows if e.row_key == COUNTERS_ROW)
    ledger = [dict(e.properties) for e in rows if e.row_key != COUNTERS_ROW]
    return counters, ledger


def _chat(**extra: Any) -> ChatRequest:
    return ChatRequest(**{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], **extra})


def test_a_bug_in_a_provider_releases_the_reservation_and_leaves_one_row() -> None:
    async def run() -> None:
        rt = _runtime(MockProvider(broken))
        caller = _caller(rt)
        with pytest.raises(RuntimeError):
            await pipeline.complete(rt, _scope(), caller, CHAT_COMPLETIONS, _chat())
        counters, ledger = await _counters(rt, caller)
        assert counters.in_flight_tokens == 0 and counters.day_usd == 0
        assert len(ledger) == 1 and ledger[0]["status"] == "error"
        assert ledger[0]["http_status"] == InternalError.status

    asyncio.run(run())


def overloaded(call: Call) -> Any:
    """Every target answers 503."""
    raise ProviderError("overloaded", provider=call.target.provider, kind="server_error", retryable=True,
                        upstream_status=503)


def test_a_request_every_target_refused_leaves_a_row_naming_the_last_provider_it_was_sent_to() -> None:
    async def run() -> None:
        rt = _runtime(MockProvider(overloaded))
        caller = _caller(rt)
        # chat-default: Azure East US, Bedrock, then Azure Sweden Central.
        with pytest.raises(ServiceUnavailable):
            await pipeline.complete(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(model="chat-default"))
        _, ledger = await _counters(rt, caller)
        assert len(ledger) == 1 and ledger[0]["status"] == "error" and ledger[0]["attempts"] == 3
        row = ledger[0]
        assert (row["provider"], row["model"], row["region"]) == ("azure_openai", "gpt-4o-mini", "swedencentral")
        assert Decimal(row["cost_usd"]) == 0 and row["completion_tokens"] == 0

    asyncio.run(run())


def test_what_a_failed_attempt_was_billed_is_on_the_row_at_its_targets_price_beside_the_answer() -> None:
    def first_fails_part_way(call: Call) -> Any:
        if call.target.provider == "azure_openai" and call.target.region == "eastus":
            raise ProviderError("part of a fan-out failed", provider="azure_openai", kind="server_error",
                                retryable=True, upstream_status=503, consumed=(1000, 0))
        return chatty(call)

    async def run() -> None:
        rt = _runtime(MockProvider(first_fails_part_way))
        caller = _caller(rt)
        await pipeline.complete(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(model="chat-default"))
        _, ledger = await _counters(rt, caller)
        failed, served = (rt.settings.catalogue.targets[t] for t in ("aoai-gpt-4o-mini-eastus",
                                                                      "bedrock-claude-3-haiku-us-east-1"))
        assert len(ledger) == 1 and ledger[0]["status"] == "ok" and ledger[0]["provider"] == served.provider
        assert (ledger[0]["prompt_tokens"], ledger[0]["completion_tokens"]) == (1005, 1)
        expected = failed.price.input_per_1k + (5 * served.price.input_per_1k + served.price.output_per_1k) / 1000
        assert Decimal(ledger[0]["cost_usd"]) == expected

    asyncio.run(run())


def test_a_stream_the_caller_abandons_is_settled_from_what_was_streamed() -> None:
    async def run() -> None:
        rt = _runtime(MockProvider(chatty))
        caller = _caller(rt)
        response = await pipeline.run(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(stream=True))
        assert isinstance(response, StreamingResponse)
        body = response.body_iterator
        frames = [await body.__anext__() for _ in range(5)]  # the caller reads a little, then hangs up
        await body.aclose()  # type: ignore[attr-defined]
        assert all(f.startswith(b"data: {") for f in frames)
        counters, ledger = await _counters(rt, caller)
        assert counters.in_flight_tokens == 0
        assert len(ledger) == 1 and ledger[0]["status"] == "client_disconnected"
        assert 0 < ledger[0]["completion_tokens"] < 50 * 2  # counted from the streamed words, not the estimate
        assert counters.day_tokens == ledger[0]["prompt_tokens"] + ledger[0]["completion_tokens"]

    asyncio.run(run())


def test_usage_chunk_is_hidden_unless_the_caller_asked_for_it() -> None:
    from gateway_lib.operations import chat

    usage_chunk = StreamEvent(chunk={"choices": [], "usage": {"prompt_tokens": 1}}, usage=Usage(1, 2))
    last_content = StreamEvent(chunk={"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}, usage=Usage(1, 2))
    plain, asked = _chat(stream=True), _chat(stream=True, stream_options={"include_usage": True})
    assert chat.frame(plain, usage_chunk) is None
    assert chat.frame(asked, usage_chunk) == b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    assert b"usage" not in (chat.frame(plain, last_content) or b"")


def bursty(call: Call) -> Any:
    """Events in two bursts (as two network reads would deliver them), the first relayed as raw JSON."""
    events = []
    for burst in range(2):
        for i in range(3):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"w{i}"}}]}
            raw = json.dumps(chunk, separators=(", ", ": ")).encode() if burst == 0 else None
            events.append(StreamEvent(chunk=chunk, text=f"w{i}", raw=raw, more=i < 2))
    return events


def test_events_that_arrived_together_go_out_in_one_write_and_raw_json_as_received() -> None:
    async def run() -> list[bytes]:
        rt = _runtime(MockProvider(bursty))
        response = await pipeline.run(rt, _scope(), _caller(rt), CHAT_COMPLETIONS, _chat(stream=True))
        assert isinstance(response, StreamingResponse)
        return [bytes(w) async for w in response.body_iterator]  # type: ignore[arg-type]

    writes = asyncio.run(run())
    assert len(writes) == 3 and writes[2] == b"data: [DONE]\n\n"  # burst, burst, then the end
    assert writes[0].count(b"data: ") == 3 and writes[1].count(b"data: ") == 3
    assert b'"content": "w0"' in writes[0], "relayed byte for byte (the upstream's own spacing)"
    assert b'"content":"w0"' in writes[1], "re-encoded when there is no raw JSON"


def test_an_answer_with_a_lone_surrogate_is_escaped_not_a_500() -> None:
    # Upstream JSON may carry "\ud800" escapes; the call is paid for by then, so the answer must still go out.
    from gateway_lib.http.edge import Scope, json_response

    response = json_response({"text": "x\ud800y", "name": "é"}, Scope(request_id="r", trace_id="t", traceparent="p",
                                                                       route="chat"))
    assert response.body == b'{"text":"x\\ud800y","name":"\\u00e9"}'
    assert json_response({"name": "é"}, Scope(request_id="r", trace_id="t", traceparent="p",
                                              route="chat")).body == '{"name":"é"}'.encode()


def test_an_upstream_answer_in_its_own_bytes_goes_out_as_they_came_and_is_billed_from_its_body() -> None:
    raw = b'{"object": "chat.completion",  "choices": [{"message": {"content": "ok"}}], "usage": {}}'

    def relayed(call: Call) -> Completion:
        return Completion(body=json.loads(raw), usage=Usage(7, 2), raw=raw)

    async def run() -> tuple[Any, list[dict[str, Any]]]:
        rt = _runtime(MockProvider(relayed))
        caller = _caller(rt)
        response = await pipeline.run(rt, _scope(), caller, CHAT_COMPLETIONS, _chat())
        return response, (await _counters(rt, caller))[1]

    response, rows = asyncio.run(run())
    assert (response.status_code, response.body, response.media_type) == (200, raw, "application/json")
    assert response.headers["x-gateway-target"] and response.headers["x-request-id"] == "req-1"
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(7, 2)]


def scripted(usage: Usage | None = Usage(5, 1), ending: BaseException | None = None) -> MockProvider:
    """A whole answer as given (``usage`` may be None: not reported), or a stream of words ending with
    ``ending``: a usage event, or an exception that is not a ProviderError (a bug)."""
    def handler(call: Call) -> Any:
        if not call.stream:
            message = {"role": "assistant", "content": "a fairly long answer " * 20,
                       "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}]}
            return Completion(body={"object": "chat.completion", "choices": [{"index": 0, "message": message}]},
                              usage=usage)
        events: list[Any] = [StreamEvent(chunk={"object": "chat.completion.chunk",
                                                "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]},
                                         text=f"w{i} ") for i in range(3)]
        events.append(ending if ending is not None else StreamEvent(
            chunk={"object": "chat.completion.chunk", "choices": [], "usage": {}}, usage=Usage(5, 3)))
        return events

    return MockProvider(handler)


def test_an_answer_without_usage_is_billed_from_its_text_not_as_free() -> None:
    async def run() -> None:
        rt = _runtime(scripted(usage=None))
        caller = _caller(rt)
        served = await pipeline.complete(rt, _scope(), caller, CHAT_COMPLETIONS, _chat())
        counters, ledger = await _counters(rt, caller)
        assert len(ledger) == 1 and ledger[0]["prompt_tokens"] > 0
        assert ledger[0]["completion_tokens"] >= 80, "the answer's words and its tool call, counted"
        assert Decimal(ledger[0]["cost_usd"]) > 0 and counters.in_flight_tokens == 0
        assert (served.usage.prompt_tokens, served.usage.completion_tokens) == (
            ledger[0]["prompt_tokens"], ledger[0]["completion_tokens"])

    asyncio.run(run())


async def serve_to_a_caller_already_gone(response: Any) -> None:
    """Run ``response`` as an ASGI 2.4 server does for a caller that left before the headers: sends raise."""
    from starlette.requests import ClientDisconnect

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("client disconnected")

    asgi = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST",
            "path": "/api/v1/chat/completions", "headers": []}
    with pytest.raises(ClientDisconnect):
        await response(asgi, receive, send)


def test_a_stream_whose_caller_left_before_its_headers_went_out_is_settled_once() -> None:
    # An ASGI 2.4 server raises from the first send when the caller is gone, so the body never starts (and a
    # generator that never started runs no ``finally``): the response itself must settle, and close the upstream.

    async def run() -> None:
        provider = scripted()
        rt = _runtime(provider)
        caller = _caller(rt)
        response = await pipeline.run(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(stream=True))
        await serve_to_a_caller_already_gone(response)
        counters, ledger = await _counters(rt, caller)
        assert counters.in_flight_tokens == 0 and len(provider.closed) == 1
        assert len(ledger) == 1 and ledger[0]["status"] == "client_disconnected" and ledger[0]["prompt_tokens"] > 0

    asyncio.run(run())


def test_a_request_cancelled_while_its_settlement_is_written_still_settles_once() -> None:
    class SlowTransactions(MemoryTableStore):
        def __init__(self) -> None:
            super().__init__()
            self.writing = asyncio.Event()

        async def transact(self, table: str, ops: Any) -> Any:
            self.writing.set()
            await asyncio.sleep(0.05)
            return await super().transact(table, ops)

    async def run() -> None:
        store = SlowTransactions()
        rt = _runtime(scripted(), store)
        caller = _caller(rt)
        task = asyncio.ensure_future(pipeline.complete(rt, _scope(), caller, CHAT_COMPLETIONS, _chat()))
        await store.writing.wait()  # the answer is in, its settlement on the wire: the host cancels the request
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)
        counters, ledger = await _counters(rt, caller)
        assert counters.in_flight_tokens == 0 and len(ledger) == 1 and ledger[0]["status"] == "ok"

    asyncio.run(run())


def test_a_stream_that_fails_with_a_bug_ends_with_an_error_event_and_is_recorded_as_an_error() -> None:
    async def run() -> None:
        rt = _runtime(scripted(ending=KeyError("toolUseId")))
        caller = _caller(rt)
        response = await pipeline.run(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(stream=True))
        assert isinstance(response, StreamingResponse)
        body = b"".join([bytes(w) async for w in response.body_iterator])  # type: ignore[arg-type]
        last = json.loads(body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "internal_error" and "toolUseId" not in body.decode()
        _, ledger = await _counters(rt, caller)
        assert len(ledger) == 1 and (ledger[0]["status"], ledger[0]["http_status"]) == ("error", 500)
        assert ledger[0]["completion_tokens"] > 0, "billed for what was streamed"

    asyncio.run(run())


def misshapen(call: Call) -> Any:
    """An answer without usage whose message is not an object (a proxy's or an upstream's bug)."""
    return Completion(body={"object": "chat.completion", "choices": [{"message": "ok"}, 5]}, usage=None)


def test_an_answer_unreadable_for_its_usage_is_still_settled_and_billed() -> None:
    async def run() -> None:
        rt = _runtime(MockProvider(misshapen))
        caller = _caller(rt)
        served = await pipeline.complete(rt, _scope(), caller, CHAT_COMPLETIONS, _chat(max_tokens=50))
        assert served.usage.completion_tokens == 50, "billed at the output cap"
        counters, ledger = await _counters(rt, caller)
        assert (counters.in_flight_tokens, counters.in_flight_usd) == (0, 0), "the reservation stayed in flight"
        assert len(ledger) == 1 and Decimal(str(ledger[0]["cost_usd"])) > 0, "an answered request billed as free"

    asyncio.run(run())

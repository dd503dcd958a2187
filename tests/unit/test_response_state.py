"""Stored responses belong to their caller: recorded when a target keeps them, continued only by their owner
and only on the target keeping them, read and deleted only by their owner (in-memory store, mock providers)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from starlette.responses import JSONResponse, StreamingResponse

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import usage_table
from gateway_lib.config.settings import Settings
from gateway_lib.errors import InvalidRequest, NotFound
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline, response_state
from gateway_lib.operations.response_owners import responses_table
from gateway_lib.operations.responses import RESPONSES_API, ResponsesRequest
from gateway_lib.operations.schema import parse_model
from gateway_lib.providers.base import Completion, StreamEvent, Usage
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.quota.admission import COUNTERS_ROW
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.base import Entity
from gateway_lib.storage.memory import MemoryTableStore

ROOT = Path(__file__).resolve().parents[2]
EAST, SWEDEN, BEDROCK = "aoai-gpt-4o-mini-eastus", "aoai-gpt-4o-mini-swedencentral", "bedrock-claude-3-haiku-us-east-1"


class CountingStore(MemoryTableStore):
    """The in-memory store, noting which tables each call touched."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: list[str] = []

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        self.touched.append(table)
        return await super().get(table, partition_key, row_key)

    async def insert(self, table: str, entity: Entity) -> Entity:
        self.touched.append(table)
        return await super().insert(table, entity)

    async def ensure_tables(self, tables: Sequence[str]) -> None:
        self.touched.extend(tables)
        await super().ensure_tables(tables)


class Upstream:
    """A target that keeps what it answers, as Azure does: answers are kept unless ``store`` is false."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.azure = MockProvider(self.answer, objects=self.objects, name="azure_openai")
        self.bedrock = MockProvider(self.answer, name="bedrock")

    def answer(self, call: Call) -> Any:
        request: ResponsesRequest = call.request
        body = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "status": "completed",
                "model": call.target.model, "store": request.store is not False,
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}],
                "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}}
        if call.target.provider == "azure_openai" and request.store is not False:
            self.objects[body["id"]] = body
        if not call.stream:
            return Completion(body=body, usage=Usage(5, 1))
        created = {"type": "response.created", "response": body | {"status": "in_progress", "usage": None}}
        return [StreamEvent(chunk=created, name="response.created"),
                StreamEvent(chunk={"type": "response.output_text.delta", "delta": "hi"}, text="hi"),
                StreamEvent(chunk={"type": "response.completed", "response": body}, usage=Usage(5, 1))]


def _runtime(upstream: Upstream, store: MemoryTableStore) -> Runtime:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values["GATEWAY_STORAGE_MODE"] = "memory"
    rt = build_runtime(Settings.from_env(values), store=store)
    rt.providers = {"azure_openai": upstream.azure, "bedrock": upstream.bedrock}
    return rt


def _caller(rt: Runtime, app: str = "app-1") -> Caller:
    return Caller(app_id=app, tenant_id="t-1", user_id=None, tier=rt.settings.tiers.tiers["standard"],
                  roles=frozenset({"Gateway.Standard"}), scopes=frozenset(), is_admin=False)


def _scope(route: str = "responses") -> Scope:
    return Scope(request_id=f"req-{uuid.uuid4().hex[:8]}", trace_id="0" * 31 + "1",
                 traceparent="00-" + "0" * 31 + "1-" + "0" * 15 + "1-01", route=route)


def _request(**body: Any) -> ResponsesRequest:
    return parse_model(ResponsesRequest, {"model": "gpt-4o-mini", "input": "hello", **body})


async def _create(rt: Runtime, caller: Caller, request: ResponsesRequest) -> dict[str, Any]:
    state = response_state.ResponseState(rt.response_owners, caller, request)
    response = await pipeline.run(rt, _scope(), caller, RESPONSES_API, request, state)
    assert isinstance(response, JSONResponse)
    return dict(json.loads(bytes(response.body)))


async def _ledger(rt: Runtime, caller: Caller) -> list[Any]:
    rows = await rt.store.query(usage_table(rt.settings.storage.table_prefix), caller.key)
    return [row for row in rows if row.row_key != COUNTERS_ROW]


def test_the_owner_reads_its_response_and_another_caller_gets_the_answer_an_unknown_id_gets(
        caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice, bob = _caller(rt, "alice"), _caller(rt, "bob")
        created = await _create(rt, alice, _request(store=True))
        read = await response_state.retrieve(rt, _scope("responses_retrieve"), alice, created["id"])
        assert read["id"] == created["id"] and upstream.azure.object_calls == [("GET", created["id"], EAST)]
        with pytest.raises(NotFound) as others:
            await response_state.retrieve(rt, _scope("responses_retrieve"), bob, created["id"])
        with pytest.raises(NotFound) as unknown:
            await response_state.retrieve(rt, _scope("responses_retrieve"), bob, "resp_unknown")
        assert others.value.status == 404 and others.value.code == "not_found"
        assert others.value.message.replace(created["id"], "X") == unknown.value.message.replace("resp_unknown", "X")
        assert len(upstream.azure.object_calls) == 1  # another's id never reaches the upstream
        assert len(await _ledger(rt, alice)) == 1  # the create's row; the read leaves none

    with caplog.at_level(logging.INFO, logger="gateway.request"):
        asyncio.run(run())
    dims = [getattr(r, "custom_dimensions", {}) for r in caplog.records]
    reads = [d for d in dims if d.get("route") == "responses_retrieve"]
    assert len(reads) == 1 and reads[0]["provider"] == "azure_openai" and reads[0]["cost_usd"] == "0"


def test_a_continuation_goes_only_to_the_target_keeping_the_previous_response() -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice = _caller(rt, "alice")
        first = await _create(rt, alice, _request())  # store unset: Azure keeps it by default
        owner = await rt.response_owners.find(first["id"], alice.key)
        assert owner is not None and owner.target_id == EAST
        upstream.azure.calls.clear()
        await rt.response_owners.record("resp_in_sweden", alice.key, SWEDEN)
        upstream.objects["resp_in_sweden"] = {"id": "resp_in_sweden"}
        await _create(rt, alice, _request(previous_response_id="resp_in_sweden"))
        assert [call.target.id for call in upstream.azure.calls] == [SWEDEN]

    asyncio.run(run())


def test_continuing_another_callers_response_is_a_400_naming_previous_response_id_before_any_upstream_call() -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice, bob = _caller(rt, "alice"), _caller(rt, "bob")
        first = await _create(rt, alice, _request(store=True))
        upstream.azure.calls.clear()
        for previous in (first["id"], "resp_unknown"):
            with pytest.raises(InvalidRequest) as caught:
                await _create(rt, bob, _request(previous_response_id=previous))
            error = caught.value
            assert (error.status, error.param, error.code) == (400, "previous_response_id", "previous_response_not_found")
        assert upstream.azure.calls == [] and await _ledger(rt, bob) == []

    asyncio.run(run())


def test_a_continuation_under_a_model_that_does_not_route_to_the_keeping_target_is_a_400() -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice = _caller(rt, "alice")
        await rt.response_owners.record("resp_on_gpt4o", alice.key, "aoai-gpt-4o-eastus")
        with pytest.raises(InvalidRequest) as caught:
            await _create(rt, alice, _request(previous_response_id="resp_on_gpt4o"))
        assert caught.value.param == "previous_response_id" and caught.value.code == "invalid_value"

    asyncio.run(run())


@pytest.mark.parametrize(("model", "extra"), [("gpt-4o-mini", {"store": False}), ("claude-3-haiku", {}),
                                              ("gpt-4o-mini", {"stream": True, "store": False})])
def test_an_answer_no_target_keeps_records_nothing_and_never_touches_the_table(model: str, extra: dict[str, Any]) -> None:
    async def run() -> None:
        upstream, store = Upstream(), CountingStore()
        rt = _runtime(upstream, store)
        request = _request(model=model, **extra)
        response = await pipeline.run(rt, _scope(), _caller(rt), RESPONSES_API, request,
                                      response_state.ResponseState(rt.response_owners, _caller(rt), request))
        if isinstance(response, StreamingResponse):
            _ = [frame async for frame in response.body_iterator]
        assert responses_table(rt.settings.storage.table_prefix) not in store.touched
        assert len(await _ledger(rt, _caller(rt))) == 1

    asyncio.run(run())


def test_a_streamed_response_is_recorded_before_its_first_event_goes_out() -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice = _caller(rt, "alice")
        request = _request(stream=True)
        response = await pipeline.run(rt, _scope(), alice, RESPONSES_API, request,
                                      response_state.ResponseState(rt.response_owners, alice, request))
        assert isinstance(response, StreamingResponse)
        body = response.body_iterator
        first = await body.__anext__()
        response_id = json.loads(bytes(first).split(b"data: ", 1)[1])["response"]["id"]  # type: ignore[arg-type]
        assert await rt.response_owners.find(response_id, alice.key) is not None
        rest = [frame async for frame in body]
        assert rest and len(await _ledger(rt, alice)) == 1

    asyncio.run(run())


def test_the_owner_deletes_its_response_upstream_and_then_it_is_gone() -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice, bob = _caller(rt, "alice"), _caller(rt, "bob")
        created = await _create(rt, alice, _request())
        with pytest.raises(NotFound):
            await response_state.retrieve(rt, _scope("responses_delete"), bob, created["id"], delete=True)
        assert created["id"] in upstream.objects
        deleted = await response_state.retrieve(rt, _scope("responses_delete"), alice, created["id"], delete=True)
        assert deleted == {"id": created["id"], "object": "response.deleted", "deleted": True}
        assert created["id"] not in upstream.objects
        with pytest.raises(NotFound):
            await response_state.retrieve(rt, _scope("responses_retrieve"), alice, created["id"])
        with pytest.raises(InvalidRequest):
            await _create(rt, alice, _request(previous_response_id=created["id"]))

    asyncio.run(run())


def test_a_response_gone_upstream_is_a_404_and_its_record_is_dropped() -> None:
    async def run() -> None:
        upstream = Upstream()
        rt = _runtime(upstream, MemoryTableStore())
        alice = _caller(rt, "alice")
        created = await _create(rt, alice, _request())
        upstream.objects.clear()  # expired upstream
        with pytest.raises(NotFound):
            await response_state.retrieve(rt, _scope("responses_retrieve"), alice, created["id"])
        assert await rt.response_owners.find(created["id"], alice.key) is None

    asyncio.run(run())

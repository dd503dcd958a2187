"""Embeddings: the request model's limits, the Bedrock translation, and one input-priced cost row per call."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import usage_table
from gateway_lib.config.settings import Settings
from gateway_lib.errors import InvalidRequest
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline
from gateway_lib.operations.embeddings import EMBEDDINGS_OP, EmbeddingsRequest, embeddings_list
from gateway_lib.operations.schema import parse_model
from gateway_lib.providers.base import Completion, Usage
from gateway_lib.providers.bedrock import embeddings as bedrock
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.quota.admission import COUNTERS_ROW, Counters
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.memory import MemoryTableStore

ROOT = Path(__file__).resolve().parents[2]


def _request(**body: Any) -> EmbeddingsRequest:
    return parse_model(EmbeddingsRequest, {"model": "titan-embed-text-v2", **body})


@pytest.mark.parametrize(("given", "texts"), [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([15339, 1917], ["hello world"]),  # one token array (cl100k_base)
    ([[15339], [1917]], ["hello", " world"]),
])
def test_input_takes_every_openai_shape(given: Any, texts: list[str]) -> None:
    assert _request(input=given).texts == texts


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", ""]}, "input"),
    ({"input": ["x"] * 2049}, "input"), ({"input": [[1] * 8193]}, "input"), ({"input": [-1]}, "input"),
    ({"input": [10**9]}, "input"), ({"input": ["a", 1]}, "input[1]"), ({"input": [True]}, "input[0]"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"), ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "dimension": 256}, "dimension"), ({}, "input"),
])
def test_bad_input_is_a_400_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_model(EmbeddingsRequest, {"model": "m", **body})
    assert raised.value.param == param and raised.value.status == 400


def test_an_input_past_8192_tokens_is_refused_and_one_at_the_limit_is_not() -> None:
    _request(input=" hello" * 8192)  # ' hello' is one token
    with pytest.raises(InvalidRequest, match="8192 tokens"):
        _request(input=" hello" * 8193)


def test_integral_dimensions_are_an_integer_and_the_wire_body_is_what_the_caller_set() -> None:
    request = _request(input="x", dimensions=256.0, provider_hint="bedrock")
    assert request.dimensions == 256
    assert request.wire_body(None) == {"input": "x", "dimensions": 256}


def test_base64_is_little_endian_float32_as_openai_sends_it() -> None:
    body = embeddings_list([[0.5, -1.25]], "m", 3, "base64")
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert struct.unpack("<2f", raw) == (0.5, -1.25)
    assert embeddings_list([[0.5]], "m", 3, None)["data"][0]["embedding"] == [0.5]


# ---- Bedrock ----

def _target(rt: Runtime, alias: str) -> Any:
    return rt.settings.catalogue.targets_for(alias)[0]


def test_titan_gets_one_invocation_per_input_and_the_answers_become_one_openai_list(rt: Runtime) -> None:
    target = _target(rt, "titan-embed-text-v2")
    request = _request(input=["a", "b"], dimensions=256, encoding_format="base64")
    assert bedrock.invocations(request, target) == [{"inputText": "a", "normalize": True, "dimensions": 256},
                                                    {"inputText": "b", "normalize": True, "dimensions": 256}]
    answers = [({"embedding": [0.25] * 256, "inputTextTokenCount": 1}, {}),
               ({"embedding": [0.5] * 256, "inputTextTokenCount": 2}, {})]
    completion = bedrock.to_completion(request, target, answers)
    assert completion.usage == Usage(3, 0)
    data = completion.body["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert struct.unpack("<256f", base64.b64decode(data[1]["embedding"]))[0] == 0.5
    assert completion.body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_cohere_takes_the_texts_in_one_call_and_its_token_count_comes_from_the_header(rt: Runtime) -> None:
    target = replace(_target(rt, "titan-embed-text-v2"), deployment="cohere.embed-english-v3", model="cohere")
    request = _request(input=["a", "b"])
    assert bedrock.invocations(request, target) == [{"texts": ["a", "b"], "input_type": "search_document",
                                                     "truncate": "NONE"}]
    for body in ({"embeddings": [[1.0], [2.0]], "response_type": "embeddings_floats"},
                 {"embeddings": {"float": [[1.0], [2.0]]}, "response_type": "embeddings_by_type"}):
        completion = bedrock.to_completion(request, target, [(body, {bedrock.TOKEN_COUNT_HEADER: "7"})])
        assert completion.usage == Usage(7, 0)
        assert [d["embedding"] for d in completion.body["data"]] == [[1.0], [2.0]]


@pytest.mark.parametrize(("deployment", "body", "param"), [
    ("amazon.titan-embed-text-v2:0", {"input": "x", "dimensions": 300}, "dimensions"),
    ("amazon.titan-embed-text-v2:0", {"input": ["x"] * 97}, "input"),
    ("amazon.titan-embed-text-v2:0", {"input": "a" * 50_001}, "input"),  # ~6,300 tokens, past 50,000 characters
    ("cohere.embed-english-v3", {"input": ["x"] * 97}, "input"),
    ("cohere.embed-english-v3", {"input": "x" * 2049}, "input"),
    ("cohere.embed-english-v3", {"input": "x", "dimensions": 256}, "dimensions"),
    ("anthropic.claude-3-haiku-20240307-v1:0", {"input": "x"}, "model"),
])
def test_bedrock_refuses_what_its_models_cannot_take(rt: Runtime, deployment: str, body: dict[str, Any],
                                                     param: str) -> None:
    target = replace(_target(rt, "titan-embed-text-v2"), deployment=deployment)
    refusal = bedrock.check(_request(**body), target)
    assert refusal is not None and refusal.param == param


def test_bedrock_takes_what_fits(rt: Runtime) -> None:
    target = _target(rt, "titan-embed-text-v2")
    assert bedrock.check(_request(input=["x"] * 96, dimensions=512), target) is None


def test_an_answer_with_too_few_vectors_is_unreadable(rt: Runtime) -> None:
    with pytest.raises(ValueError, match="1 embeddings for 2 inputs"):
        bedrock.to_completion(_request(input=["a", "b"]), _target(rt, "titan-embed-text-v2"),
                              [({"embedding": [1.0], "inputTextTokenCount": 1}, {})])


# ---- the pipeline ----

@pytest.fixture()
def rt() -> Runtime:
    values = json.loads((ROOT / "local.settings.example.json").read_text())["Values"]
    values["GATEWAY_STORAGE_MODE"] = "memory"
    return build_runtime(Settings.from_env(values), store=MemoryTableStore())


def _caller(rt: Runtime) -> Caller:
    return Caller(app_id="app-1", tenant_id="t-1", user_id=None, tier=rt.settings.tiers.tiers["standard"],
                  roles=frozenset({"Gateway.Standard"}), scopes=frozenset(), is_admin=False)


def test_an_embeddings_call_leaves_one_cost_row_priced_on_input_only(rt: Runtime) -> None:
    def answer(call: Call) -> Completion:
        assert call.target.kind == "embeddings" and not call.stream
        return Completion(embeddings_list([[0.1, 0.2]], call.target.model, 1000, None), Usage(1000, 0))

    mock = MockProvider(answer)
    rt.providers = {"azure_openai": mock, "bedrock": mock}

    async def run() -> tuple[Counters, list[dict[str, Any]]]:
        scope = Scope(request_id="req-e1", trace_id="0" * 31 + "1", traceparent=None, route="embeddings")
        served = await pipeline.complete(rt, scope, _caller(rt), EMBEDDINGS_OP,
                                         _request(model="text-embedding-3-small", input="hello"))
        assert served.body["data"][0]["embedding"] == [0.1, 0.2]
        rows = await rt.store.query(usage_table(rt.settings.storage.table_prefix))
        counters = next(Counters.from_entity(e) for e in rows if e.row_key == COUNTERS_ROW)
        return counters, [dict(e.properties) for e in rows if e.row_key != COUNTERS_ROW]

    counters, ledger = asyncio.run(run())
    assert len(ledger) == 1
    row = ledger[0]
    assert (row["route"], row["prompt_tokens"], row["completion_tokens"], row["status"]) == ("embeddings", 1000, 0, "ok")
    assert Decimal(row["cost_usd"]) == Decimal("0.000022")  # 1,000 tokens at the input price, nothing reserved for output
    assert row["completion_tokens_estimated"] == 0
    assert counters.in_flight_tokens == 0 and counters.day_tokens == 1000


def test_a_chat_model_named_for_embeddings_is_a_400(rt: Runtime) -> None:
    rt.providers = {"azure_openai": MockProvider(lambda call: None)}
    scope = Scope(request_id="req-e2", trace_id="0" * 31 + "1", traceparent=None, route="embeddings")
    with pytest.raises(InvalidRequest) as raised:
        asyncio.run(pipeline.complete(rt, scope, _caller(rt), EMBEDDINGS_OP, _request(model="gpt-4o-mini", input="x")))
    assert (raised.value.code, raised.value.param) == ("model_not_supported", "model")


@pytest.mark.parametrize("token", [100256, 100261, 100275])
def test_a_token_id_in_a_gap_of_the_vocabulary_is_a_400_not_a_500(token: int) -> None:
    # cl100k_base numbers its tokens up to 100276 but assigns no token to these ids: nothing to decode.
    with pytest.raises(InvalidRequest) as raised:
        _request(input=[[15339], [1917, token]])
    assert (raised.value.param, raised.value.status) == ("input", 400) and "input[1]" in raised.value.message

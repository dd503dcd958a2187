"""Embeddings on the simulator: Azure OpenAI's route and Bedrock's Titan V2 and Cohere Embed v3 bodies."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import boto3
import openai
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from tests.inproc_simulator import control
from tools import sim_text
from tools.provider_simulator import RunningSimulator

pytestmark = pytest.mark.integration

API_VERSION = "2024-10-21"
EMBEDDING = "text-embedding-3-small"
TITAN = "amazon.titan-embed-text-v2:0"
COHERE = "cohere.embed-english-v3"


@pytest.fixture
def sim(thread_sim: RunningSimulator) -> RunningSimulator:
    return thread_sim


@pytest.fixture
def azure(sim: RunningSimulator) -> Iterator[openai.AzureOpenAI]:
    with openai.AzureOpenAI(api_key="k", azure_endpoint=sim.url, api_version=API_VERSION, max_retries=0,
                            timeout=10) as client:
        yield client


@pytest.fixture
def bedrock(sim: RunningSimulator) -> Iterator[Any]:
    client = boto3.client("bedrock-runtime", endpoint_url=sim.url, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y", config=Config(retries={"total_max_attempts": 1}, read_timeout=10))
    yield client
    client.close()


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def invoke(bedrock: Any, model_id: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    response = bedrock.invoke_model(modelId=model_id, body=json.dumps(body))
    return json.loads(response["body"].read()), response["ResponseMetadata"]["HTTPHeaders"]


def test_azure_embeddings_float_are_deterministic_unit_vectors(sim: RunningSimulator,
                                                               azure: openai.AzureOpenAI) -> None:
    texts = ["the cat sat", "a different text", "the cat sat"]
    result = azure.embeddings.create(model=EMBEDDING, input=texts, encoding_format="float")
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2] and all(len(v) == 1536 for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert all(abs(norm(v) - 1) < 1e-5 for v in vectors)
    tokens = sum(sim_text.count_tokens(t) for t in texts)
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
    last = control(sim, "GET", "/_sim/stats")["targets"][EMBEDDING]["last"]
    assert last["path"] == f"/openai/deployments/{EMBEDDING}/embeddings"


def test_azure_embeddings_base64_with_dimensions_match_the_float_values(sim: RunningSimulator,
                                                                        azure: openai.AzureOpenAI) -> None:
    floats = azure.embeddings.create(model=EMBEDDING, input="shorten me", dimensions=256, encoding_format="float")
    assert len(floats.data[0].embedding) == 256 and abs(norm(floats.data[0].embedding) - 1) < 1e-5
    # The SDK asks for base64 by default and decodes it; check the raw wire value too.
    decoded = azure.embeddings.create(model=EMBEDDING, input="shorten me", dimensions=256)
    assert decoded.data[0].embedding == floats.data[0].embedding
    raw = azure.embeddings.with_raw_response.create(model=EMBEDDING, input="shorten me", dimensions=256,
                                                    encoding_format="base64")
    wire = json.loads(raw.http_response.text)["data"][0]["embedding"]
    assert list(struct.unpack("<256f", base64.b64decode(wire))) == floats.data[0].embedding


def test_azure_embeddings_take_token_arrays_and_the_v1_path(sim: RunningSimulator) -> None:
    with openai.OpenAI(api_key="k", base_url=f"{sim.url}/openai/v1/", max_retries=0, timeout=10) as client:
        result = client.embeddings.create(model=EMBEDDING, input=[[1, 2, 3], [4, 5]], encoding_format="float")
        single = client.embeddings.create(model=EMBEDDING, input=[7, 8, 9, 10], encoding_format="float")
    assert len(result.data) == 2 and result.usage.prompt_tokens == 5
    assert len(single.data) == 1 and single.usage.prompt_tokens == 4


def test_azure_embeddings_refuse_what_azure_refuses(azure: openai.AzureOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not support specifying dimensions"):
        azure.embeddings.create(model="text-embedding-ada-002", input="x", dimensions=64)
    with pytest.raises(openai.BadRequestError, match="input"):
        azure.embeddings.create(model=EMBEDDING, input="")
    with pytest.raises(openai.BadRequestError, match="does not work with the specified model"):
        azure.embeddings.create(model="gpt-4o-mini", input="x")


def test_azure_embeddings_faults(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    control(sim, "POST", "/_sim/faults", {"target": EMBEDDING, "mode": "status", "status": 429, "retry_after": 3,
                                          "count": 1})
    with pytest.raises(openai.RateLimitError) as caught:
        azure.embeddings.create(model=EMBEDDING, input="x")
    assert caught.value.response.headers["retry-after"] == "3"
    control(sim, "POST", "/_sim/faults", {"target": EMBEDDING, "mode": "slow", "delay_ms": 300, "count": 1})
    started = time.monotonic()
    assert azure.embeddings.create(model=EMBEDDING, input="x").data
    assert time.monotonic() - started >= 0.3
    control(sim, "POST", "/_sim/faults", {"target": EMBEDDING, "mode": "cut", "count": 1})
    with pytest.raises(openai.APIConnectionError):
        azure.embeddings.create(model=EMBEDDING, input="x")
    control(sim, "POST", "/_sim/faults", {"target": EMBEDDING, "mode": "malformed", "count": 1})
    with pytest.raises(json.JSONDecodeError):
        azure.embeddings.create(model=EMBEDDING, input="x")


def test_titan_v2_embedding_with_dimensions_and_token_header(bedrock: Any) -> None:
    body, headers = invoke(bedrock, TITAN, {"inputText": "the cat sat", "dimensions": 256, "normalize": True})
    assert len(body["embedding"]) == 256 and abs(norm(body["embedding"]) - 1) < 1e-5
    assert body["inputTextTokenCount"] == sim_text.count_tokens("the cat sat") == 3
    assert body["embeddingsByType"]["float"] == body["embedding"]
    assert headers["x-amzn-bedrock-input-token-count"] == "3"
    again, _ = invoke(bedrock, TITAN, {"inputText": "the cat sat", "dimensions": 256})
    assert again["embedding"] == body["embedding"]
    default, _ = invoke(bedrock, TITAN, {"inputText": "the cat sat", "embeddingTypes": ["binary"]})
    assert len(default["embedding"]) == 1024 and set(default["embeddingsByType"]["binary"]) <= {0, 1}


def test_titan_refuses_bad_bodies(bedrock: Any) -> None:
    for body in ({"inputText": "x", "dimensions": 100}, {"texts": ["x"]}, {"inputText": "x", "model": "m"}):
        with pytest.raises(ClientError) as caught:
            invoke(bedrock, TITAN, body)
        assert caught.value.response["Error"]["Code"] == "ValidationException"
        assert "Malformed input request" in caught.value.response["Error"]["Message"]


def test_cohere_embed_floats_and_by_type(bedrock: Any) -> None:
    texts = ["first doc", "second doc"]
    body, headers = invoke(bedrock, COHERE, {"texts": texts, "input_type": "search_document"})
    assert body["response_type"] == "embeddings_floats" and body["texts"] == texts and body["id"]
    assert [len(v) for v in body["embeddings"]] == [1024, 1024]
    assert headers["x-amzn-bedrock-input-token-count"] == str(sum(sim_text.count_tokens(t) for t in texts))
    typed, _ = invoke(bedrock, "cohere.embed-multilingual-v3", {"texts": texts, "input_type": "search_query",
                                                                "embedding_types": ["float", "int8", "ubinary"]})
    assert typed["response_type"] == "embeddings_by_type"
    assert typed["embeddings"]["float"] == body["embeddings"]
    assert all(-128 <= v <= 127 for v in typed["embeddings"]["int8"][0])
    assert len(typed["embeddings"]["ubinary"][0]) == 1024 // 8
    with pytest.raises(ClientError, match="input_type"):
        invoke(bedrock, COHERE, {"texts": texts})


def test_embeddings_do_not_stream_and_keep_faults(sim: RunningSimulator, bedrock: Any) -> None:
    with pytest.raises(ClientError, match="unsupported for streaming"):
        bedrock.invoke_model_with_response_stream(modelId=TITAN, body=json.dumps({"inputText": "x"}))
    control(sim, "POST", "/_sim/faults", {"target": COHERE, "mode": "status", "status": 429, "count": 1})
    with pytest.raises(ClientError) as caught:
        invoke(bedrock, COHERE, {"texts": ["x"], "input_type": "clustering"})
    assert caught.value.response["Error"]["Code"] == "ThrottlingException"
    control(sim, "POST", "/_sim/faults", {"target": TITAN, "mode": "cut", "count": 1})
    with pytest.raises(ConnectionClosedError):
        invoke(bedrock, TITAN, {"inputText": "x"})
    control(sim, "POST", "/_sim/faults", {"target": TITAN, "mode": "malformed", "count": 1})
    with pytest.raises(json.JSONDecodeError):
        invoke(bedrock, TITAN, {"inputText": "x"})

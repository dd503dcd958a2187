"""The clients enterprises use, unchanged, against the local stack: the openai client (the whole chat
parameter set, structured outputs, embeddings on both providers, model retrieval), AzureOpenAI and
langchain-openai. Every answered call leaves exactly one cost row and shows in /api/v1/usage."""

from __future__ import annotations

import base64
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import openai
import pytest
import requests
from pydantic import BaseModel

from tests import closing
from tests.integration.test_quota_e2e import ledger_state
from tools.dev_issuer import DevIssuer
from tools.stack import Stack

pytestmark = pytest.mark.integration

API_VERSION = "2024-10-21"




def fresh_token(stack: Stack, role: str = "Gateway.Standard") -> str:
    """A caller of its own, so its cost rows and counters are this test's alone."""
    assert stack.data_dir is not None
    return DevIssuer(stack.data_dir / "dev-issuer").token(caller=f"i19-{uuid.uuid4().hex[:10]}", roles=[role])


def oai(stack: Stack, token: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0, timeout=30)
    return closing.keep(client)


def azure(stack: Stack, token: str, api_version: str = API_VERSION) -> openai.AzureOpenAI:
    client = openai.AzureOpenAI(azure_endpoint=stack.base_url, azure_ad_token_provider=lambda: token,
                                api_version=api_version, max_retries=0, timeout=30)
    return closing.keep(client)


def usage(stack: Stack, token: str) -> dict[str, Any]:
    response = requests.get(f"{stack.base_url}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def assert_one_row_per_answer(stack: Stack, token: str, answered: int, routes: set[str]) -> None:
    """``answered`` calls: as many cost rows, one per request, all ok, and the usage view adds them up."""
    view = usage(stack, token)
    counters, rows = ledger_state(stack, view["caller"])
    assert len(rows) == answered and len({r.request_id for r in rows}) == answered
    assert all(r.status == "ok" for r in rows) and {r.route for r in rows} == routes
    assert view["day"]["used"]["tokens"] == sum(r.total_tokens for r in rows) == counters.day_tokens
    assert Decimal(view["day"]["used"]["usd"]) == sum((r.cost_usd for r in rows), Decimal(0))
    assert view["in_flight"]["tokens"] == 0


def floats(encoded: str) -> list[float]:
    raw = base64.b64decode(encoded)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# ---- the openai client ----------------------------------------------------------------------------

class Person(BaseModel):
    name: str
    age: int


def test_openai_chat_with_advisory_semantic_and_structured_parameters(stack: Stack, sim: Any) -> None:
    token = fresh_token(stack)
    client = oai(stack, token)
    advised = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], store=True,
        metadata={"project": "i19"}, service_tier="auto", user="u-1", prompt_cache_key="k", safety_identifier="s")
    assert advised.choices[0].message.content
    # Either region may answer (an earlier test can leave the first cooling down): read the one that did.
    served = [d for d in ("gpt-4o-mini", "gpt-4o-mini-swc") if d in sim.stats()["targets"]]
    sent = next(b for b in (sim.last(d)["body"] for d in served) if b.get("safety_identifier") == "s")
    assert (sent["store"], sent["metadata"], sent["service_tier"], sent["safety_identifier"]) == (
        True, {"project": "i19"}, "auto", "s")  # forwarded to Azure as the caller set them

    two = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], n=2,
                                         logprobs=True, top_logprobs=2, seed=12236)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].logprobs is not None and two.choices[0].logprobs.content
    assert two.usage is not None and two.usage.completion_tokens > 0

    parsed = client.chat.completions.parse(model="gpt-4o-mini", response_format=Person,
                                           messages=[{"role": "user", "content": "Invent a person."}])
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name

    with pytest.raises(openai.BadRequestError) as refused:  # Bedrock cannot give two answers
        client.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == "n"

    # Bedrock serves the same chat with the advisory parameters dropped.
    hinted = client.chat.completions.create(model="claude-3-haiku", messages=[{"role": "user", "content": "Hi"}],
                                            store=True, metadata={"a": "b"}, service_tier="auto")
    assert hinted.choices[0].message.content
    assert_one_row_per_answer(stack, token, 4, {"chat"})


@pytest.mark.parametrize("model", ["text-embedding-3-small", "titan-embed-text-v2"])
def test_openai_embeddings_on_both_providers(stack: Stack, sim: Any, model: str) -> None:
    token = fresh_token(stack)
    client = oai(stack, token)
    raw = client.embeddings.with_raw_response.create(model=model, input=["alpha", "beta"], dimensions=256)
    listed = raw.parse()  # the SDK asked for base64 and decoded it
    assert raw.headers["x-gateway-provider"] == ("azure_openai" if model.startswith("text") else "bedrock")
    assert [d.index for d in listed.data] == [0, 1]
    assert all(len(d.embedding) == 256 for d in listed.data)
    assert listed.usage.prompt_tokens > 0 and listed.usage.total_tokens == listed.usage.prompt_tokens
    as_floats = client.embeddings.create(model=model, input="alpha", dimensions=256, encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(listed.data[0].embedding, abs=1e-6)  # deterministic
    tokens = client.embeddings.create(model=model, input=[[1, 2, 3]], dimensions=256)  # a token array
    assert len(tokens.data) == 1
    assert_one_row_per_answer(stack, token, 3, {"embeddings"})


def test_a_titan_fan_out_that_fails_part_way_still_bills_the_calls_that_answered(stack: Stack, sim: Any) -> None:
    from tests.integration.test_content_filter_e2e import cost_row

    token, request_id = fresh_token(stack), f"titan-partial-{uuid.uuid4().hex[:8]}"
    inputs = [f"text number {i} to embed" for i in range(8)]
    whole = oai(stack, token).embeddings.create(model="titan-embed-text-v2", input=inputs, dimensions=256)
    sim.fault(mode="status", status=400, target="amazon.titan-embed-text-v2:0", count=1)  # one of the 8 calls
    with pytest.raises(openai.APIStatusError):
        oai(stack, token).embeddings.create(model="titan-embed-text-v2", input=inputs, dimensions=256,
                                            extra_headers={"x-request-id": request_id})
    row = cost_row(stack, token, request_id)
    assert row.status == "error"
    # Seven of the eight inputs were embedded and billed by Bedrock: so are they here.
    assert 0 < row.prompt_tokens < whole.usage.prompt_tokens and row.cost_usd > 0


def test_openai_models_retrieve_and_list_say_what_each_model_serves(stack: Stack) -> None:
    client = oai(stack, fresh_token(stack))
    model = client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object) == ("gpt-4o-mini", "model")
    listed = {m.id: getattr(m, "operations", None) for m in client.models.list()}
    assert listed["gpt-4o-mini"] == ["chat", "responses"] and listed["titan-embed-text-v2"] == ["embeddings"]
    for unknown in ("gpt-17", "gpt-4o"):  # gpt-4o exists, but not for the standard tier: the same answer
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(unknown)
        assert missing.value.body["code"] == "model_not_found"


# ---- AzureOpenAI --------------------------------------------------------------------------------

@pytest.mark.parametrize("api_version", ["2024-02-01", "2024-10-21", "2025-01-01-preview"])
def test_azure_openai_client_chat_stream_and_embeddings(stack: Stack, api_version: str) -> None:
    token = fresh_token(stack)
    client = azure(stack, token, api_version)
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model="chat-default", messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    vectors = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
    assert_one_row_per_answer(stack, token, 3, {"chat", "embeddings"})


def test_azure_v1_paths_take_the_model_from_the_body(stack: Stack) -> None:
    token = fresh_token(stack)
    client = openai.OpenAI(base_url=f"{stack.base_url}/openai/v1", api_key=token, max_retries=0, timeout=30)
    closing.keep(client)
    assert client.chat.completions.create(model="claude-3-haiku",
                                          messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content
    assert len(client.embeddings.create(model="titan-embed-text-v2", input="x").data) == 1
    assert_one_row_per_answer(stack, token, 2, {"chat", "embeddings"})


def test_an_azure_api_key_is_refused_with_a_401_that_says_to_send_an_entra_token(stack: Stack, sim: Any) -> None:
    client = openai.AzureOpenAI(azure_endpoint=stack.base_url, api_key="0123456789abcdef", api_version=API_VERSION,
                                max_retries=0, timeout=30)
    closing.keep(client)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert "Entra access token" in refused.value.body["message"]
    assert refused.value.body["code"] == "api_key_not_accepted"
    assert sim.total() == 0


# ---- langchain-openai -----------------------------------------------------------------------------

def test_langchain_azure_chat_structured_output_and_openai_embeddings(stack: Stack) -> None:
    from langchain_openai import AzureChatOpenAI, OpenAIEmbeddings

    token = fresh_token(stack)
    llm = AzureChatOpenAI(azure_endpoint=stack.base_url, azure_deployment="gpt-4o-mini", api_version=API_VERSION,
                          azure_ad_token_provider=lambda: token, max_retries=0)
    assert llm.invoke("Say hello").content
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(person, Person) and person.name
    embedder = OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{stack.base_url}/v1", api_key=token,
                                check_embedding_ctx_length=False, max_retries=0)  # strings, no tiktoken download
    documents = embedder.embed_documents(["first document", "second document"])
    assert len(documents) == 2 and len(documents[0]) == len(embedder.embed_query("a query")) > 0
    assert_one_row_per_answer(stack, token, 4, {"chat", "embeddings"})


@pytest.fixture()
def tiktoken_offline(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken's download cache, filled from the rank files the gateway ships (no network here)."""
    import gzip
    import hashlib

    from gateway_lib.guardrails import tokens

    blob = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    ranks = gzip.decompress(tokens.rank_file_path("cl100k_base").read_bytes())
    (tmp_path / hashlib.sha1(blob.encode()).hexdigest()).write_bytes(ranks)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def test_langchain_openai_embeddings_by_default_sends_token_arrays(stack: Stack, sim: Any,
                                                                    tiktoken_offline: None) -> None:
    from langchain_openai import OpenAIEmbeddings

    token = fresh_token(stack)
    embedder = OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{stack.base_url}/v1", api_key=token,
                                max_retries=0)  # check_embedding_ctx_length: tokenizes with tiktoken first
    vectors = embedder.embed_documents(["first document", "second document"])
    assert len(vectors) == 2 and len(vectors[0]) > 0
    sent = sim.last("text-embedding-3-small")["body"]["input"]
    assert all(isinstance(t, int) for item in sent for t in item)  # relayed as token arrays
    assert_one_row_per_answer(stack, token, 1, {"embeddings"})


# ---- a burst is not a breach ----------------------------------------------------------------------

def test_fifty_concurrent_requests_without_max_tokens_from_a_fresh_standard_caller_are_not_429(stack: Stack) -> None:
    token = fresh_token(stack)

    def call(i: int) -> int:
        response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=60,
                                 headers={"Authorization": f"Bearer {token}"},
                                 json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Hi {i}"}]})
        return response.status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(call, range(50)))
    assert statuses == [200] * 50
    assert_one_row_per_answer(stack, token, 50, {"chat"})


def test_a_caller_that_really_exceeds_its_tokens_per_minute_gets_429_with_retry_after(stack: Stack) -> None:
    token = fresh_token(stack, "Gateway.Basic")  # 20,000 tokens per minute
    big = " hello" * 6000  # 6,000 prompt tokens a request
    for _ in range(10):  # 4 fit in one minute; a minute turning in between allows a few more
        response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=60,
                                 headers={"Authorization": f"Bearer {token}"},
                                 json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}]})
        if response.status_code != 200:
            break
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in response.json()["error"]["message"]


# ---- bad input on the new routes ------------------------------------------------------------------

def _call(stack: Stack, method: str, path: str, token: str | None, body: Any = None, headers: dict[str, str] | None = None,
          data: bytes | None = None) -> requests.Response:
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{stack.base_url}{path}", json=body, data=data, timeout=30,
                            headers=sent | (headers or {}))


EMBED = "/v1/embeddings"
AZ_CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=" + API_VERSION
AZ_EMBED = "/openai/deployments/text-embedding-3-small/embeddings?api-version=" + API_VERSION
HI = {"messages": [{"role": "user", "content": "Hi"}]}

BAD = [
    ("embeddings: not JSON", "POST", EMBED, None, b"{", {"Content-Type": "application/json"}, 400, "invalid_json", None),
    ("embeddings: no input", "POST", EMBED, {"model": "titan-embed-text-v2"}, None, None, 400,
     "missing_required_parameter", "input"),
    ("embeddings: empty input", "POST", EMBED, {"model": "titan-embed-text-v2", "input": []}, None, None, 400,
     "invalid_value", "input"),
    ("embeddings: bad encoding", "POST", EMBED, {"model": "titan-embed-text-v2", "input": "x", "encoding_format": "hex"},
     None, None, 400, "invalid_value", "encoding_format"),
    ("embeddings: unknown field", "POST", EMBED, {"model": "titan-embed-text-v2", "input": "x", "dims": 3}, None, None,
     400, "unknown_parameter", "dims"),
    ("embeddings: a chat model", "POST", EMBED, {"model": "gpt-4o-mini", "input": "x"}, None, None, 400,
     "model_not_supported", "model"),
    ("embeddings: unknown model", "POST", EMBED, {"model": "ada-17", "input": "x"}, None, None, 404,
     "model_not_found", "model"),
    ("embeddings: Titan dimensions", "POST", EMBED, {"model": "titan-embed-text-v2", "input": "x", "dimensions": 300},
     None, None, 400, "invalid_value", "dimensions"),
    ("chat model for embeddings in Azure's path", "POST",
     "/openai/deployments/gpt-4o-mini/embeddings?api-version=" + API_VERSION, {"input": "x"}, None, None, 400,
     "model_not_supported", "model"),
    ("models: unknown id", "GET", "/v1/models/gpt-17", None, None, None, 404, "model_not_found", "model"),
    ("azure: no api-version", "POST", "/openai/deployments/gpt-4o-mini/chat/completions", HI, None, None, 400,
     "missing_required_parameter", "api-version"),
    ("azure: malformed api-version", "POST", "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-1-1",
     HI, None, None, 400, "invalid_value", "api-version"),
    ("azure: unknown deployment", "POST", f"/openai/deployments/gpt-17/chat/completions?api-version={API_VERSION}",
     HI, None, None, 404, "model_not_found", "model"),
    ("azure: typo in the body", "POST", AZ_CHAT, {**HI, "max_token": 3}, None, None, 400, "unknown_parameter",
     "max_token"),
    ("azure: embeddings without input", "POST", AZ_EMBED, {}, None, None, 400, "missing_required_parameter", "input"),
    ("azure v1: no model", "POST", "/openai/v1/chat/completions", HI, None, None, 400, "missing_required_parameter",
     "model"),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "data", "headers", "status", "code", "param"), BAD,
                         ids=[case[0] for case in BAD])
def test_bad_input_on_the_new_routes_gets_its_exact_status_in_the_openai_shape(
        stack: Stack, token: str, sim: Any, name: str, method: str, path: str, body: Any, data: bytes | None,
        headers: dict[str, str] | None, status: int, code: str, param: str | None) -> None:
    response = _call(stack, method, path, token, body, headers, data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)
    assert sim.total() == 0, "bad input must never reach a provider"


@pytest.mark.parametrize("path", [EMBED, AZ_CHAT, AZ_EMBED, "/v1/models/gpt-4o-mini"])
def test_the_new_routes_need_a_token(stack: Stack, path: str) -> None:
    response = _call(stack, "GET" if "models" in path else "POST", path, None, {"model": "x", "input": "x"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


# ---- the Responses API in Azure's dialect ---------------------------------------------------------


def test_azure_openai_client_responses_create_stream_and_retrieve(stack: Stack) -> None:
    """``AzureOpenAI(...).responses`` posts to /openai/responses?api-version=..., the v1 client to /openai/v1/responses."""
    token = fresh_token(stack)
    client = azure(stack, token, "2025-03-01-preview")
    made = client.responses.create(model="gpt-4o-mini", input="Say hello", store=True)
    assert made.output_text and made.usage is not None
    events = list(client.responses.create(model="gpt-4o-mini", input="Say hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert client.responses.retrieve(made.id).id == made.id
    v1 = openai.OpenAI(base_url=f"{stack.base_url}/openai/v1", api_key=token, max_retries=0, timeout=30)
    closing.keep(v1)
    chained = v1.responses.create(model="gpt-4o-mini", input="And again", previous_response_id=made.id)
    assert chained.output_text
    assert v1.responses.retrieve(made.id).id == made.id
    assert_one_row_per_answer(stack, token, 3, {"responses"})


def test_azure_responses_paths_refuse_a_bad_api_version_and_an_api_key(stack: Stack, sim: Any) -> None:
    token = fresh_token(stack)
    bad = requests.post(f"{stack.base_url}/openai/responses?api-version=2025-13-01",
                        headers={"Authorization": f"Bearer {token}"}, json={"model": "gpt-4o-mini", "input": "x"},
                        timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "api-version"
    missing = requests.post(f"{stack.base_url}/openai/responses", headers={"Authorization": f"Bearer {token}"},
                            json={"model": "gpt-4o-mini", "input": "x"}, timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_required_parameter"
    keyed = requests.post(f"{stack.base_url}/openai/v1/responses", headers={"api-key": "0123456789abcdef"},
                          json={"model": "gpt-4o-mini", "input": "x"}, timeout=10)
    assert keyed.status_code == 401 and keyed.json()["error"]["code"] == "api_key_not_accepted"
    someone_else = requests.get(f"{stack.base_url}/openai/v1/responses/resp_not_yours",
                                headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert someone_else.status_code == 404
    assert sim.total() == 0

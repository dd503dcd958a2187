"""The OpenAI-compatible provider end to end: openai SDK → local host → gateway → the simulator's OpenAI-shaped
v1 paths (``/openai/v1/chat/completions``, ``/embeddings``, ``/responses``) with a bearer key.

The module runs its own stack: its catalogue adds openai_compatible targets, and the provider's settings
point at the simulator's v1 surface as the default base URL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway_lib.config.catalog import default_catalogue_json
from tests.integration.test_content_filter_e2e import cost_row
from tests.stack_fixture import Sim, cleared_sim
from tools.stack import Ports, Stack

pytestmark = pytest.mark.integration

API_KEY = "local-openai-compatible-key-not-a-secret"
PRICE = {"input_per_1k": "0.00015", "output_per_1k": "0.0006"}


def _catalogue() -> str:
    doc = json.loads(default_catalogue_json())
    chat = {"provider": "openai_compatible", "region": "global", "price": PRICE, "context_window": 128000,
            "max_output_tokens": 16384, "tokenizer": "o200k_base"}
    doc["targets"] |= {
        "oc-mini": {**chat, "deployment": "oc-gpt-4o-mini", "model": "gpt-4o-mini"},
        "oc-embed": {**chat, "kind": "embeddings", "deployment": "text-embedding-3-small", "max_output_tokens": 0,
                     "tokenizer": "cl100k_base", "price": {"input_per_1k": "0.00002", "output_per_1k": "0"}},
        "oc-fb-a": {**chat, "deployment": "oc-fb-a"},
        "aoai-fb-b": {**doc["targets"]["aoai-gpt-4o-mini-eastus"], "deployment": "oc-fb-b"},
    }
    doc["aliases"] |= {
        "oc-mini": {"targets": ["oc-mini"], "description": "gpt-4o-mini on an OpenAI-compatible endpoint"},
        "oc-embed": {"targets": ["oc-embed"], "description": "embeddings on an OpenAI-compatible endpoint"},
        "oc-fallback": {"targets": ["oc-fb-a", "aoai-fb-b"], "description": "OpenAI-compatible, then Azure"},
    }
    return json.dumps(doc)


@pytest.fixture(scope="module")
def oc_stack() -> Iterator[Stack]:
    ports = Ports.free()
    running = Stack(ports=ports, extra_env={
        "GATEWAY_MODELS": _catalogue(),
        "OPENAI_COMPATIBLE_BASE_URL": f"http://127.0.0.1:{ports.simulator}/openai/v1",
        "OPENAI_COMPATIBLE_API_KEY": API_KEY,
    }).start()
    try:
        yield running
        assert running.log_dir is not None
        assert "netguard:" not in (running.log_dir / "host.log").read_text(errors="replace")
    finally:
        running.stop()


@pytest.fixture(scope="module")
def token(oc_stack: Stack) -> str:
    return oc_stack.token("openai-compatible-e2e", roles="Gateway.Premium")  # premium: every alias


@pytest.fixture()
def osim(oc_stack: Stack) -> Iterator[Sim]:
    with cleared_sim(oc_stack) as driver:
        yield driver


@pytest.fixture(scope="module")
def sdk(oc_stack: Stack, token: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{oc_stack.base_url}/v1", api_key=token, max_retries=0, timeout=30) as client:
        yield client


def ask(model: str, request_id: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello from an OpenAI-compatible test"}],
            "extra_headers": {"x-request-id": request_id}, **extra}


def sent(osim: Sim, deployment: str) -> dict[str, Any]:
    """What the simulator received for a deployment: the OpenAI-compatible shape, with a bearer key."""
    last = osim.last(deployment)
    assert last["headers"].get("authorization") == "Bearer ***", last["headers"]
    assert "api-key" not in last["headers"] and last["query"] == {}, "no Azure api-key, no api-version"
    return last


def test_a_chat_completion_is_relayed_to_the_endpoint_and_billed_once(oc_stack: Stack, token: str, osim: Sim,
                                                                     sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(**ask("oc-mini", "oc-chat-1", n=2, logprobs=True))
    completion = raw.parse()
    assert raw.headers["x-gateway-provider"] == "openai_compatible" and raw.headers["x-gateway-target"] == "oc-mini"
    assert len(completion.choices) == 2 and completion.choices[0].message.content
    assert completion.choices[0].logprobs is not None
    last = sent(osim, "oc-gpt-4o-mini")
    assert last["path"] == "/openai/v1/chat/completions" and last["body"]["model"] == "oc-gpt-4o-mini"
    assert last["body"]["n"] == 2 and last["body"]["logprobs"] is True
    assert completion.usage is not None
    row = cost_row(oc_stack, token, "oc-chat-1")
    assert (row.provider, row.deployment, row.status) == ("openai_compatible", "oc-gpt-4o-mini", "ok")
    assert (row.prompt_tokens, row.completion_tokens) == (completion.usage.prompt_tokens,
                                                          completion.usage.completion_tokens)
    assert row.cost_usd > 0


def test_a_streamed_chat_arrives_chunk_by_chunk_with_usage_and_is_billed_once(oc_stack: Stack, token: str,
                                                                             osim: Sim, sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(**ask("oc-mini", "oc-stream-1", stream=True,
                                                    stream_options={"include_usage": True})))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and usage.completion_tokens > 0
    last = sent(osim, "oc-gpt-4o-mini")
    assert last["body"]["stream"] is True and last["body"]["stream_options"] == {"include_usage": True}
    row = cost_row(oc_stack, token, "oc-stream-1")
    assert (row.provider, row.status, row.completion_tokens) == ("openai_compatible", "ok", usage.completion_tokens)


def test_embeddings_are_relayed_to_the_endpoint_and_billed_once(oc_stack: Stack, token: str, osim: Sim,
                                                                sdk: openai.OpenAI) -> None:
    raw = sdk.embeddings.with_raw_response.create(model="oc-embed", input=["first text", "second text"],
                                                  extra_headers={"x-request-id": "oc-embed-1"})
    answer = raw.parse()
    assert raw.headers["x-gateway-provider"] == "openai_compatible"
    assert [item.index for item in answer.data] == [0, 1] and len(answer.data[0].embedding) > 0
    assert sent(osim, "text-embedding-3-small")["path"] == "/openai/v1/embeddings"
    row = cost_row(oc_stack, token, "oc-embed-1")
    assert (row.provider, row.status, row.prompt_tokens, row.completion_tokens) == (
        "openai_compatible", "ok", answer.usage.prompt_tokens, 0)


def test_a_response_is_relayed_not_to_be_kept_upstream_and_billed_once(oc_stack: Stack, token: str, osim: Sim,
                                                                       sdk: openai.OpenAI) -> None:
    raw = sdk.responses.with_raw_response.create(model="oc-mini", input="Hello there",
                                                 extra_headers={"x-request-id": "oc-responses-1"})
    response = raw.parse()
    assert raw.headers["x-gateway-provider"] == "openai_compatible" and response.output_text
    last = sent(osim, "oc-gpt-4o-mini")
    assert last["path"] == "/openai/v1/responses" and last["body"]["store"] is False
    assert cost_row(oc_stack, token, "oc-responses-1").provider == "openai_compatible"


def test_a_503_from_the_endpoint_falls_back_to_azure_and_is_billed_once(oc_stack: Stack, token: str, osim: Sim,
                                                                        sdk: openai.OpenAI) -> None:
    osim.fault(mode="status", status=503, target="oc-fb-a")
    raw = sdk.chat.completions.with_raw_response.create(**ask("oc-fallback", "oc-fallback-1"))
    assert raw.headers["x-gateway-provider"] == "azure_openai" and raw.headers["x-gateway-target"] == "aoai-fb-b"
    assert raw.parse().choices[0].message.content
    assert (osim.count("oc-fb-a"), osim.count("oc-fb-b")) == (1, 1), "the endpoint tried once, then Azure"
    assert osim.last("oc-fb-a")["path"] == "/openai/v1/chat/completions"
    assert osim.last("oc-fb-b")["path"] == "/openai/deployments/oc-fb-b/chat/completions"
    row = cost_row(oc_stack, token, "oc-fallback-1")
    assert (row.provider, row.deployment, row.status, row.attempts) == ("azure_openai", "oc-fb-b", "ok", 2)

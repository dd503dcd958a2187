"""The OpenAI-compatible provider: its settings section, what its targets can do, and what it sends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway_lib.config.catalog import default_catalogue_json
from gateway_lib.config.settings import ConfigError, Settings
from gateway_lib.providers import registry
from gateway_lib.providers.base import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, CallContext, ProviderSettings, streamed
from gateway_lib.providers.openai_compatible.adapter import OpenAICompatibleProvider
from gateway_lib.providers.openai_compatible.config import OpenAICompatibleSettings
from gateway_lib.providers.openai_compatible.routes import ROUTES

BASE = {"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
        "GATEWAY_STORAGE_MODE": "memory", "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9",
        "AZURE_OPENAI_AUTH": "api_key", "AZURE_OPENAI_API_KEY": "k"}
UNRESOLVED = "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/openai-key)"
SHARED = ProviderSettings(azure_client_id=None, upstream_timeout_seconds=30, connect_timeout_seconds=5)


def catalogue(**endpoints: str | None) -> str:
    """The default catalogue plus one openai_compatible chat target per name (its endpoint, or none)."""
    doc = json.loads(default_catalogue_json())
    for name, endpoint in endpoints.items():
        doc["targets"][name] = {"provider": "openai_compatible", "deployment": "gpt-4o-mini", "region": "global",
                                "price": {"input_per_1k": "0.00015", "output_per_1k": "0.0006"},
                                **({"endpoint": endpoint} if endpoint else {})}
        doc["aliases"][name] = {"targets": [name]}
    return json.dumps(doc)


def problems(env: dict[str, str]) -> list[str]:
    try:
        Settings.from_env(BASE | env)
    except ConfigError as error:
        return list(error.problems)
    return []


def test_the_default_settings_load_with_the_provider_registered_and_unconfigured() -> None:
    settings = Settings.from_env(BASE)
    assert "openai_compatible" in registry.names()
    assert settings.providers.section("openai_compatible") == OpenAICompatibleSettings(base_url=None, api_key=None)
    assert not any(t.provider == "openai_compatible" for t in settings.catalogue.targets.values())


def test_a_target_without_an_endpoint_needs_the_default_base_url() -> None:
    found = problems({"GATEWAY_MODELS": catalogue(oc=None)})
    assert [p for p in found if p.startswith("OPENAI_COMPATIBLE_BASE_URL")], found
    assert problems({"GATEWAY_MODELS": catalogue(oc=None), "OPENAI_COMPATIBLE_BASE_URL": "http://127.0.0.1:9/v1"}) == []


def test_a_target_with_its_own_endpoint_needs_no_default_and_no_key() -> None:
    assert problems({"GATEWAY_MODELS": catalogue(oc="http://vllm.internal:8000/v1")}) == []


def test_an_unresolved_key_vault_reference_is_a_problem_only_when_the_catalogue_routes_there() -> None:
    assert problems({"OPENAI_COMPATIBLE_API_KEY": UNRESOLVED}) == []
    found = problems({"OPENAI_COMPATIBLE_API_KEY": UNRESOLVED, "GATEWAY_MODELS": catalogue(oc="http://127.0.0.1:9/v1")})
    assert [p for p in found if p.startswith("OPENAI_COMPATIBLE_API_KEY")], found
    assert not any("secrets/openai-key" in p for p in found), "the reference's URI stays out of the message"


def test_a_bad_base_url_is_a_problem_naming_it() -> None:
    assert [p for p in problems({"OPENAI_COMPATIBLE_BASE_URL": "http://[::1/v1"})
            if p.startswith("OPENAI_COMPATIBLE_BASE_URL")]


def _target(kind: str = CHAT, endpoint: str | None = None) -> Any:
    settings = Settings.from_env(BASE | {"GATEWAY_MODELS": catalogue(oc=endpoint or "http://127.0.0.1:9/v1")})
    target = settings.catalogue.targets["oc"]
    return target if kind == CHAT else type(target)(**{**vars(target), "kind": kind})


def test_a_chat_target_serves_chat_and_responses_whole_and_streamed_with_n_and_logprobs() -> None:
    capabilities = registry.capabilities(_target())
    for operation in (CHAT, streamed(CHAT), RESPONSES, streamed(RESPONSES)):
        assert capabilities.lacks(operation, frozenset({"n", "logprobs"})) is None
    assert capabilities.lacks(EMBEDDINGS, frozenset()) == EMBEDDINGS
    assert capabilities.lacks(MESSAGES, frozenset()) == MESSAGES


@pytest.mark.parametrize("feature", ["store", "previous_response_id", "audio", "prediction"])
def test_a_chat_target_refuses_what_the_gateway_cannot_keep_or_only_some_models_have(feature: str) -> None:
    assert registry.capabilities(_target()).lacks(RESPONSES, frozenset({feature})) == feature


def test_an_embeddings_target_serves_embeddings_only() -> None:
    capabilities = registry.capabilities(_target(kind=EMBEDDINGS))
    assert capabilities.lacks(EMBEDDINGS, frozenset()) is None
    assert capabilities.lacks(CHAT, frozenset()) == CHAT


@pytest.mark.parametrize(("endpoint", "expected"), [
    (None, "http://default.example:8000/v1/chat/completions"),
    ("http://vllm.internal:8000/v1/", "http://vllm.internal:8000/v1/chat/completions"),
])
def test_the_url_is_the_targets_endpoint_or_the_default_base_url_plus_the_operations_path(
        endpoint: str | None, expected: str) -> None:
    provider = OpenAICompatibleProvider(OpenAICompatibleSettings("http://default.example:8000/v1", None), SHARED)
    target = type(_target())(**{**vars(_target()), "endpoint": endpoint})
    assert str(provider.url(CHAT, ROUTES[CHAT], target)) == expected


@pytest.mark.parametrize(("key", "authorization"), [("sk-test", "Bearer sk-test"), (None, None)])
def test_the_key_goes_as_a_bearer_token_and_no_key_sends_no_authorization(key: str | None,
                                                                           authorization: str | None) -> None:
    provider = OpenAICompatibleProvider(OpenAICompatibleSettings("http://127.0.0.1:9/v1", key), SHARED)
    headers = asyncio.run(provider.headers(CallContext(request_id="req-1", traceparent="00-abc-def-01")))
    assert headers.get("Authorization") == authorization
    assert headers["X-Client-Request-Id"] == "req-1" and headers["traceparent"] == "00-abc-def-01"
    assert "api-key" not in headers


def test_a_response_is_asked_not_to_be_kept_upstream_and_goes_with_the_targets_model() -> None:
    from gateway_lib.operations.responses import ResponsesRequest
    from gateway_lib.operations.schema import parse_model

    provider = OpenAICompatibleProvider(OpenAICompatibleSettings("http://127.0.0.1:9/v1", None), SHARED)
    request = parse_model(ResponsesRequest, {"model": "oc", "input": "Hello"})
    body = provider.body(request, _target(), CallContext(request_id="r", max_tokens=50))
    assert body == {"model": "gpt-4o-mini", "input": "Hello", "store": False, "max_output_tokens": 50}

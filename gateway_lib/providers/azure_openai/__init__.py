"""Azure OpenAI, reached with the Function App's managed identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway_lib.providers.azure_openai import config
from gateway_lib.providers.base import CHAT, EMBEDDINGS, RESPONSES, Capabilities, streamed
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import Provider, ProviderSettings

# Azure keeps stored responses (the Responses API's store and previous_response_id) and runs reasoning models.
_CHAT = Capabilities(operations=frozenset({CHAT, streamed(CHAT), RESPONSES, streamed(RESPONSES)}),
                     features=frozenset({"n", "logprobs", "audio", "prediction", "store", "functions",
                                         "previous_response_id", "reasoning"}))
_EMBEDDINGS = Capabilities(operations=frozenset({EMBEDDINGS}))  # relayed to /embeddings as sent


def _capabilities(target: Target) -> Capabilities:
    return _CHAT if target.kind == CHAT else _EMBEDDINGS if target.kind == EMBEDDINGS else Capabilities()


def _build(section: config.AzureOpenAISettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider

    return AzureOpenAIProvider(section, shared, token_provider=credential)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=_capabilities, check=config.check))

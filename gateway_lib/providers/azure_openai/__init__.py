"""Azure OpenAI, reached with the Function App's managed identity."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway_lib.providers.azure_openai import config
from gateway_lib.providers.azure_openai.routes import FEATURES, ROUTES
from gateway_lib.providers.openai_relay import relay_capabilities
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.providers.base import Provider, ProviderSettings


def _build(section: config.AzureOpenAISettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.azure_openai.adapter import AzureOpenAIProvider

    return AzureOpenAIProvider(section, shared, token_provider=credential)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=relay_capabilities(ROUTES, FEATURES), check=config.check))

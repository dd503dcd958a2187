"""Any endpoint that speaks the OpenAI REST API: OpenAI itself, Azure AI Foundry serverless endpoints, vLLM, Ollama."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway_lib.providers.openai_compatible import config
from gateway_lib.providers.openai_compatible.routes import FEATURES, ROUTES
from gateway_lib.providers.openai_relay import relay_capabilities
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.providers.base import Provider, ProviderSettings


def _build(section: config.OpenAICompatibleSettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.openai_compatible.adapter import OpenAICompatibleProvider

    return OpenAICompatibleProvider(section, shared)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=relay_capabilities(ROUTES, FEATURES), check=config.check))

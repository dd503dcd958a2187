"""Any endpoint that speaks the OpenAI REST API: OpenAI itself, Azure AI Foundry serverless endpoints, vLLM, Ollama."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway_lib.providers.base import CHAT, EMBEDDINGS, RESPONSES, Capabilities, streamed
from gateway_lib.providers.openai_compatible import config
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import Provider, ProviderSettings

# What every such endpoint's chat API takes. Not "store" or "previous_response_id": the gateway keeps no
# record of responses kept here, so those go to a target that can read them back. Parameters only some
# OpenAI models have (audio, prediction, web search) are left to Azure targets.
_CHAT = Capabilities(operations=frozenset({CHAT, streamed(CHAT), RESPONSES, streamed(RESPONSES)}),
                     features=frozenset({"n", "logprobs", "reasoning"}))
_EMBEDDINGS = Capabilities(operations=frozenset({EMBEDDINGS}))


def _capabilities(target: Target) -> Capabilities:
    return _CHAT if target.kind == CHAT else _EMBEDDINGS if target.kind == EMBEDDINGS else Capabilities()


def _build(section: config.OpenAICompatibleSettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.openai_compatible.adapter import OpenAICompatibleProvider

    return OpenAICompatibleProvider(section, shared)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=_capabilities, check=config.check))

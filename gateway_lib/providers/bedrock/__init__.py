"""AWS Bedrock, reached through keyless web-identity federation from Entra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway_lib.providers.base import CHAT, EMBEDDINGS, Capabilities, streamed
from gateway_lib.providers.bedrock import config
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import Provider, ProviderSettings

_CHAT = Capabilities(operations=frozenset({CHAT, streamed(CHAT)}))
_EMBEDDINGS = Capabilities(operations=frozenset({EMBEDDINGS}))  # Titan v2 and Cohere Embed by InvokeModel


def _capabilities(target: Target) -> Capabilities:
    return _CHAT if target.kind == CHAT else _EMBEDDINGS if target.kind == EMBEDDINGS else Capabilities()


def _build(section: config.BedrockSettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.bedrock.adapter import BedrockProvider

    return BedrockProvider(section, shared, web_identity_token=credential)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=_capabilities))

"""AWS Bedrock, reached through keyless web-identity federation from Entra."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from gateway_lib.providers.base import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, Capabilities, streamed
from gateway_lib.providers.bedrock import config
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import Provider, ProviderSettings

# Responses are translated to Converse, and keep no state here. Anthropic Messages go in their native
# format to Anthropic's models only (anthropic.claude-..., or an inference profile such as us.anthropic.claude-...).
_CHAT = Capabilities(operations=frozenset({CHAT, streamed(CHAT), RESPONSES, streamed(RESPONSES)}))
_ANTHROPIC = Capabilities(operations=_CHAT.operations | {MESSAGES, streamed(MESSAGES)})
_EMBEDDINGS = Capabilities(operations=frozenset({EMBEDDINGS}))  # Titan v2 and Cohere Embed by InvokeModel


def _capabilities(target: Target) -> Capabilities:
    if target.kind == EMBEDDINGS:
        return _EMBEDDINGS
    if target.kind != CHAT:
        return Capabilities()
    return _ANTHROPIC if is_anthropic(target.deployment) else _CHAT


def is_anthropic(deployment: str) -> bool:
    """A model id, an inference profile id or an ARN naming one of Anthropic's models."""
    return re.search(r"(^|[./])anthropic\.", deployment) is not None


def _build(section: config.BedrockSettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.bedrock.adapter import BedrockProvider

    return BedrockProvider(section, shared, web_identity_token=credential)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=_capabilities))

"""AWS Bedrock, reached through keyless web-identity federation from Entra."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gateway_lib.providers.base import Capabilities, streamed
from gateway_lib.providers.bedrock import config
from gateway_lib.providers.bedrock.messages import is_anthropic
from gateway_lib.providers.bedrock.operations import OPERATIONS
from gateway_lib.providers.registry import ProviderSpec, register

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import Provider, ProviderSettings

__all__ = ["is_anthropic"]


@lru_cache(maxsize=256)  # asked on every request's routing; a catalogue has a few dozen targets
def _capabilities(target: Target) -> Capabilities:
    """The operations whose ``serves`` takes the target (streamed too, where the operation streams)."""
    served = [(name, op) for name, op in OPERATIONS.items() if op.serves(target)]
    return Capabilities(operations=frozenset({name for name, _ in served}
                                             | {streamed(name) for name, op in served if op.stream is not None}))


def _build(section: config.BedrockSettings, shared: ProviderSettings, credential: Any) -> Provider:
    from gateway_lib.providers.bedrock.adapter import BedrockProvider

    return BedrockProvider(section, shared, web_identity_token=credential)


register(ProviderSpec(name=config.NAME, setting_names=config.SETTING_NAMES, read_settings=config.read,
                      build=_build, capabilities=_capabilities))

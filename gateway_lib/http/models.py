"""The OpenAI model object of a catalogue alias, with the operations it serves (GET /api/v1/models)."""

from __future__ import annotations

from typing import Any

from gateway_lib.config.catalog import Catalogue, ModelAlias
from gateway_lib.providers import registry
from gateway_lib.providers.base import CHAT, EMBEDDINGS, MESSAGES, RESPONSES

_ORDER = (CHAT, EMBEDDINGS, RESPONSES, MESSAGES)


def model_object(catalogue: Catalogue, alias: ModelAlias) -> dict[str, Any]:
    """OpenAI's ``model`` object plus ``operations``: what the alias's targets can serve between them."""
    served: set[str] = set()
    for target in catalogue.targets_for(alias.name):
        served |= registry.capabilities(target).operations
    return {"id": alias.name, "object": "model", "created": 0, "owned_by": "ai-gateway",
            "description": alias.description, "operations": [op for op in _ORDER if op in served]}

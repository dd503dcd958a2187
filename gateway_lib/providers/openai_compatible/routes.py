"""What an OpenAI-compatible endpoint serves: each operation's route under the base URL, and the chat features."""

from __future__ import annotations

from gateway_lib.providers.base import CHAT, EMBEDDINGS, RESPONSES
from gateway_lib.providers.openai_relay import Route

# Every operation such an endpoint serves, by its path under the base URL: the relay serves what has a route.
ROUTES: dict[str, Route] = {
    CHAT: Route("/chat/completions", versioned=False, stream_options=True),
    EMBEDDINGS: Route("/embeddings", versioned=False, answer_key="data", kind=EMBEDDINGS, streams=False),
    RESPONSES: Route("/responses", versioned=False, answer_key="output"),
}
# What every such endpoint's chat API takes. Not "store" or "previous_response_id": the gateway keeps no
# record of responses kept here, so those go to a target that can read them back. Parameters only some
# OpenAI models have (audio, prediction, web search) are left to Azure targets.
FEATURES = frozenset({"n", "logprobs", "reasoning"})

"""What Azure OpenAI serves: each operation's route (the relay serves what has one) and the chat features."""

from __future__ import annotations

from gateway_lib.providers.base import CHAT, EMBEDDINGS, RESPONSES
from gateway_lib.providers.openai_relay import Route

# Every operation Azure serves, by where it goes: the relay serves what has a route.
ROUTES: dict[str, Route] = {
    CHAT: Route("/openai/deployments/{deployment}/chat/completions", stream_options=True),
    EMBEDDINGS: Route("/openai/deployments/{deployment}/embeddings", answer_key="data", kind=EMBEDDINGS, streams=False),
    # Azure's v1 surface: no deployment in the path, the deployment goes in the body's "model".
    RESPONSES: Route("/openai/v1/responses", versioned=False, answer_key="output", keeps=True),
}
# Azure keeps stored responses (the Responses API's store and previous_response_id) and runs reasoning models.
FEATURES = frozenset({"n", "logprobs", "audio", "prediction", "store", "functions", "previous_response_id", "reasoning"})

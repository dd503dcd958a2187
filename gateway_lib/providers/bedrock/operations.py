"""Every operation Bedrock serves. The provider's capabilities and the adapter's dispatch come from here."""

from __future__ import annotations

from gateway_lib.providers.base import CHAT, EMBEDDINGS, MESSAGES, RESPONSES
from gateway_lib.providers.bedrock import chat, embeddings, messages, responses
from gateway_lib.providers.bedrock.operation import BedrockOperation

OPERATIONS: dict[str, BedrockOperation] = {
    CHAT: chat.OPERATION,
    RESPONSES: responses.OPERATION,  # through the chat view: Bedrock keeps no responses
    MESSAGES: messages.OPERATION,  # Anthropic's models only, in Anthropic's own format
    EMBEDDINGS: embeddings.OPERATION,  # Titan v2 and Cohere Embed by InvokeModel
}

"""Chat completions on Bedrock: Converse and ConverseStream, translated by ``transform``."""

from __future__ import annotations

import uuid
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.providers.base import CHAT, CallContext, Completion
from gateway_lib.providers.bedrock.operation import BedrockOperation, Calls, StreamCall, converts
from gateway_lib.providers.bedrock.transform import StreamTranslator, from_converse_response, to_converse_request


async def complete(calls: Calls, request: Any, target: Target, ctx: CallContext, created: int) -> Completion:
    response = await calls.converse(ctx, target.region, to_converse_request(request, target, ctx))
    return from_converse_response(response, target, completion_id=_completion_id(), created=created)


def stream(request: Any, target: Target, ctx: CallContext, created: int) -> StreamCall:
    return StreamCall("converse_stream", "stream", to_converse_request(request, target, ctx),
                      StreamTranslator(target, completion_id=_completion_id(), created=created))


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


OPERATION = BedrockOperation(serves=lambda target: target.kind == CHAT, complete=complete, stream=stream,
                             check=converts(to_converse_request))

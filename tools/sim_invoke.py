"""Bedrock Runtime ``InvokeModel`` and ``InvokeModelWithResponseStream``: the model's own body, framed by Bedrock.

``POST /model/{modelId}/invoke`` answers the model family's JSON body with the usage headers
``x-amzn-bedrock-input-token-count``, ``x-amzn-bedrock-output-token-count`` (text models) and
``x-amzn-bedrock-invocation-latency``. ``/invoke-with-response-stream`` sends each of the model's
stream events as an event-stream ``chunk`` event whose payload is ``{"bytes": base64(json)}``; the last
one carries ``amazon-bedrock-invocationMetrics``. Families: ``anthropic.*`` (``tools.sim_anthropic``),
``amazon.titan-embed-text-v2`` and ``cohere.embed-*`` (``tools.sim_bedrock_embeddings``, no streaming).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from . import sim_anthropic, sim_bedrock_embeddings
from .sim_bedrock import PROVIDER, BedrockError, elapsed_ms, json_body, non_stream_fault, request_id, send_error, stream_error
from .sim_eventstream import broken_frame, event_frame
from .sim_http import Request, Send, StreamFaultFrames, send_json, send_stream
from .sim_invoke_types import InvokeAnswer
from .sim_state import Fault, SimState, replaces_answer, take_fault

# ResponseStream (botocore's bedrock-runtime model) carries these exceptions as stream events.
STREAM_EXCEPTIONS = {400: "validationException", 408: "modelTimeoutException", 424: "modelStreamErrorException",
                     429: "throttlingException", 503: "serviceUnavailableException"}
_MALFORMED = b'{"id": "msg_bdrk_broken", "content": ['


def family(model_id: str) -> Callable[[dict[str, Any], str], InvokeAnswer]:
    """The body builder for a model id (region-prefixed inference profile ids included)."""
    if "anthropic." in model_id:
        return lambda body, model: sim_anthropic.build(sim_anthropic.validated(body), model)
    if "amazon.titan-embed-text-v2" in model_id:
        return lambda body, _: sim_bedrock_embeddings.titan(body)
    if "cohere.embed-" in model_id:
        return lambda body, _: sim_bedrock_embeddings.cohere(body)
    raise BedrockError(400, "The provided model identifier is invalid.")


async def handle_invoke(request: Request, model_id: str, stream: bool, state: SimState, send: Send) -> None:
    """``POST /model/{modelId}/invoke`` and ``/invoke-with-response-stream``."""
    started = time.monotonic()
    try:
        body = json_body(request)
        answer = family(model_id)(body, model_id)
        if stream and answer.events is None:
            raise BedrockError(400, "The model is unsupported for streaming.")
    except BedrockError as exc:
        await send_error(send, exc)
        return
    fault = await take_fault(state, PROVIDER, model_id, stream)
    if fault and replaces_answer(fault, stream):
        await non_stream_fault(send, fault, _MALFORMED)
        return
    if not stream:
        await send_json(send, 200, answer.payload, {**request_id(), **usage_headers(answer, elapsed_ms(started))})
        return
    frames = chunk_frames(answer, elapsed_ms(started))
    spelled = StreamFaultFrames(error=_stream_error, malformed=broken_frame())
    headers = {**request_id(), "x-amzn-bedrock-content-type": "application/json"}
    await send_stream(send, frames, "application/vnd.amazon.eventstream", headers, state.config.chunk_delay_ms,
                      fault, spelled)


def _stream_error(fault: Fault) -> bytes:
    return stream_error(fault, STREAM_EXCEPTIONS)


def usage_headers(answer: InvokeAnswer, latency_ms: int) -> dict[str, str]:
    headers = {"x-amzn-bedrock-invocation-latency": str(latency_ms),
               "x-amzn-bedrock-input-token-count": str(answer.input_tokens)}
    if answer.events is not None:
        headers["x-amzn-bedrock-output-token-count"] = str(answer.output_tokens)
    return headers


def chunk_frames(answer: InvokeAnswer, latency_ms: int) -> list[bytes]:
    """One ``chunk`` frame per stream event; Bedrock adds its invocation metrics to the last event."""
    events = [dict(e) for e in answer.events or []]
    events[-1]["amazon-bedrock-invocationMetrics"] = {
        "inputTokenCount": answer.input_tokens, "outputTokenCount": answer.output_tokens,
        "invocationLatency": latency_ms, "firstByteLatency": latency_ms}
    return [event_frame("chunk", {"bytes": base64.b64encode(json.dumps(e, separators=(",", ":")).encode()).decode()})
            for e in events]

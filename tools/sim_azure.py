"""What every Azure OpenAI route of the simulator shares: credential checks, error bodies, faults, headers.

Errors follow Azure's data plane: ``{"error": {"code", "message", "type", "param"}}``, with
``retry-after`` and ``retry-after-ms`` on throttling; content-filter refusals carry
``innererror.content_filter_result``.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from .sim_http import Request, Send, drop_connection, send_bytes, send_json
from .sim_state import Fault, SimState

PROVIDER = "azure_openai"
FINGERPRINT = "fp_sim0001"
_SAFE = {"filtered": False, "severity": "safe"}
FILTER_RESULTS = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": FILTER_RESULTS}]
# What a filter that fired reports: one category over the deployment's threshold.
FILTER_HIT = {**FILTER_RESULTS, "violence": {"filtered": True, "severity": "medium"}}
PROMPT_FILTERED_MESSAGE = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry. To learn more about our content filtering policies please read our "
    "documentation: https://go.microsoft.com/fwlink/?linkid=2198766")
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request was invalid."),
    401: ("401", "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
                 "valid key for an active subscription and use a correct regional API endpoint for your resource."),
    403: ("403", "Forbidden: the principal does not have access to this deployment."),
    404: ("DeploymentNotFound", "The API deployment for this resource does not exist."),
    408: ("Timeout", "The operation was timeout."),
    429: ("429", "Requests to the ChatCompletions_Create Operation have exceeded the rate limit of your current "
                 "pricing tier. Please retry after {retry} seconds."),
    500: ("InternalServerError", "The server had an error while processing your request. Sorry about that!"),
    503: ("ServiceUnavailable", "The service is temporarily unable to process your request. Please try again later."),
}


def check_request(request: Request, state: SimState, needs_version: bool = True) -> tuple[int, dict[str, Any]] | None:
    """Azure's credential and ``api-version`` checks; the v1 paths (``/openai/v1/...``) need no version."""
    key = request.headers.get("api-key")
    bearer = request.headers.get("authorization", "")
    if not key and not bearer.startswith("Bearer "):
        return 401, error_body(401)
    if state.config.azure_api_key and key and key != state.config.azure_api_key:
        return 401, error_body(401)
    if needs_version and not request.query.get("api-version"):
        return 400, invalid("Missing required query parameter: api-version.", param="api-version",
                             code="missing_required_parameter")
    return None


def invalid(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def error_body(status: int, retry_after: float | None = None, message: str | None = None) -> dict[str, Any]:
    code, default = _ERRORS.get(status, (str(status), f"Simulated upstream error {status}."))
    text = message or default.format(retry=math.ceil(retry_after or 1))
    return {"error": {"code": code, "message": text, "type": "invalid_request_error" if status < 500 else
                      "server_error", "param": None}}


def prompt_filtered_body() -> dict[str, Any]:
    """Azure's answer when the input filter refuses the prompt (the same for streamed requests)."""
    return {"error": {"message": PROMPT_FILTERED_MESSAGE, "type": None, "param": "prompt", "code": "content_filter",
                      "status": 400, "innererror": {"code": "ResponsibleAIPolicyViolation",
                                                    "content_filter_result": FILTER_HIT}}}


def _retry_headers(retry_after: float | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    return {"retry-after": str(math.ceil(retry_after)), "retry-after-ms": str(int(retry_after * 1000))}


async def non_stream_fault(send: Send, fault: Fault, malformed: bytes = b'{"id": "chatcmpl-broken", "choices": [') -> None:
    """A fault that replaces a whole answer: a dropped connection, a truncated body, or an error status."""
    if fault.mode == "cut":
        await drop_connection(send)
    elif fault.mode == "malformed":
        await send_bytes(send, 200, malformed, "application/json")
    else:
        retry = fault.retry_after if fault.retry_after is not None else (1 if fault.status == 429 else None)
        headers = {**response_headers(), **_retry_headers(retry)}
        await send_json(send, fault.status, error_body(fault.status, retry, fault.message), headers)


def stream_error(fault: Fault) -> bytes:
    """A mid-stream error event as Azure sends one on a chat stream."""
    body = error_body(fault.status, fault.retry_after, fault.message)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def response_headers() -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return {"x-request-id": request_id, "apim-request-id": request_id,
            "x-ratelimit-remaining-requests": "999", "x-ratelimit-remaining-tokens": "999999"}

"""Azure OpenAI's own dialect, for the clients Azure shops use (``AzureOpenAI``, ``AzureChatOpenAI``).

``AzureOpenAI(azure_endpoint="<gateway>/api", azure_ad_token_provider=..., api_version=...)`` posts to
``/openai/deployments/{deployment}/chat/completions?api-version=...`` (and ``.../embeddings``); the
deployment is a gateway model alias and names the model, whatever the body says (``AzureChatOpenAI``
sends ``"model": null``). The v1 paths (``/openai/v1/...``) take the model from the body, as OpenAI's; so
does the Responses API on both of its paths (``/openai/v1/responses`` and ``/openai/responses?api-version=``).
Bodies, answers and errors are OpenAI's shapes: the requests then run the same operations as
``/api/v1``. Entra tokens only: an ``api-key`` header is refused with a 401 that says what to send.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway_lib.errors import AuthenticationFailed, InvalidRequest
from gateway_lib.http import api, dialects, edge
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline
from gateway_lib.operations.base import Operation
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.embeddings import EMBEDDINGS_OP, EmbeddingsRequest
from gateway_lib.operations.schema import ChatRequest, parse_model
from gateway_lib.runtime import Runtime

# GA (2024-02-01, 2024-10-21) and preview (2025-01-01-preview) versions alike: the date is what clients pin.
_VERSION = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(-preview)?")
_V1_VERSIONS = ("preview", "latest", "v1")  # what the v1 API takes, besides none at all


async def deployment_chat(request: Request) -> Response:
    return await _serve(request, "chat", CHAT_COMPLETIONS, ChatRequest, v1=False)


async def deployment_embeddings(request: Request) -> Response:
    return await _serve(request, "embeddings", EMBEDDINGS_OP, EmbeddingsRequest, v1=False)


async def v1_chat(request: Request) -> Response:
    return await _serve(request, "chat", CHAT_COMPLETIONS, ChatRequest, v1=True)


async def v1_embeddings(request: Request) -> Response:
    return await _serve(request, "embeddings", EMBEDDINGS_OP, EmbeddingsRequest, v1=True)


async def v1_responses(request: Request) -> Response:
    return await dialects.responses(request, _checks(v1=True))


async def preview_responses(request: Request) -> Response:
    """``/openai/responses?api-version=...``: the path ``AzureOpenAI(...).responses`` posts to."""
    return await dialects.responses(request, _checks(v1=False))


async def v1_stored_response(request: Request) -> Response:
    return await dialects.stored_response(request, _checks(v1=True))


async def preview_stored_response(request: Request) -> Response:
    return await dialects.stored_response(request, _checks(v1=False))


def _checks(*, v1: bool) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        refuse_api_key(request)
        check_api_version(request.query_params.get("api-version"), v1=v1)

    return check


async def _serve(request: Request, route: str, op: Operation[Any], model: type[Any], *, v1: bool) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        refuse_api_key(request)
        check_api_version(request.query_params.get("api-version"), v1=v1)
        caller = await api._caller(rt, request, scope)
        body = await edge.read_json(request, rt.settings.limits.max_body_bytes)
        if not v1 and isinstance(body, dict):
            body["model"] = edge.path_param(request, "deployment", after="deployments")
        return await pipeline.run(rt, scope, caller, op, parse_model(model, body))

    return await api._serve(request, route, handle)


def check_api_version(version: str | None, *, v1: bool) -> None:
    """400 unless ``version`` is a dated API version (``YYYY-MM-DD`` or ``YYYY-MM-DD-preview``); the v1
    paths also take none, ``preview`` or ``latest``."""
    if v1 and version in (None, *_V1_VERSIONS):
        return
    if version is None:
        raise InvalidRequest("Missing required query parameter 'api-version' (e.g. 2024-10-21).",
                             code="missing_required_parameter", param="api-version")
    match = _VERSION.fullmatch(version)
    if match is None or not _is_date(*match.group(1, 2, 3)):
        raise InvalidRequest(f"Invalid value for 'api-version': '{version[:40]}'; expected a version such as "
                             "2024-10-21 or 2025-01-01-preview.", code="invalid_value", param="api-version")


def refuse_api_key(request: Request) -> None:
    """Keys are not identities: the gateway authenticates callers by their Entra token."""
    if "api-key" in request.headers and "authorization" not in request.headers:
        raise AuthenticationFailed("API keys are not accepted: send an Entra access token for the gateway as "
                                   "'Authorization: Bearer <token>' (AzureOpenAI(azure_ad_token_provider=...)).",
                                   code="api_key_not_accepted", headers={"WWW-Authenticate": "Bearer"})


def _is_date(year: str, month: str, day: str) -> bool:
    try:
        date(int(year), int(month), int(day))
    except ValueError:
        return False
    return True

"""Routes for the clients that speak other dialects than Chat Completions: OpenAI's Responses API
(the Agents SDK, ``client.responses``) and Anthropic Messages (the Anthropic SDK, Claude Code).

Same shape as ``api``'s handlers: open the scope, authenticate, parse, hand the request to the one
pipeline with its operation. Errors on ``/messages`` render in Anthropic's shape, mid-stream too.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from gateway_lib.errors import AuthenticationFailed, InvalidRequest
from gateway_lib.guardrails import tokens
from gateway_lib.http import edge
from gateway_lib.http.api import _caller, _serve
from gateway_lib.http.edge import Scope
from gateway_lib.operations import messages as anthropic
from gateway_lib.operations import pipeline, response_state
from gateway_lib.operations.responses import RESPONSES_API, ResponsesRequest
from gateway_lib.operations.schema import parse_model
from gateway_lib.routing import plan as routing
from gateway_lib.runtime import Runtime


async def responses(request: Request, check: Callable[[Request], None] | None = None) -> Response:
    """``check``: the dialect's own refusals (Azure's api-version, its api-key header) before anything else."""
    async def handle(rt: Runtime, scope: Scope) -> Response:
        if check is not None:
            check(request)
        caller = await _caller(rt, request, scope)
        body = parse_model(ResponsesRequest, await edge.read_json(request, rt.settings.limits.max_body_bytes))
        state = response_state.ResponseState(rt.response_owners, caller, body)
        return await pipeline.run(rt, scope, caller, RESPONSES_API, body, state)

    return await _serve(request, "responses", handle)


async def stored_response(request: Request, check: Callable[[Request], None] | None = None) -> Response:
    """``GET`` / ``DELETE /v1/responses/{id}``: the caller's own kept response, from the target keeping it."""
    delete = request.method == "DELETE"

    async def handle(rt: Runtime, scope: Scope) -> Response:
        if check is not None:
            check(request)
        caller = await _caller(rt, request, scope)
        if request.query_params.get("stream", "false").lower() not in ("false", "0"):
            raise InvalidRequest("Streaming a stored response back is not supported; retrieve it whole.",
                                 code="unsupported_parameter", param="stream")
        response_id = edge.path_param(request, "response_id", after="responses")
        answer = await response_state.retrieve(rt, scope, caller, response_id, delete=delete)
        return edge.json_response(answer, scope)

    return await _serve(request, "responses_delete" if delete else "responses_retrieve", handle, answers=True)


async def messages(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        _refuse_api_key(request)
        caller = await _caller(rt, request, scope)
        body = parse_model(anthropic.MessagesRequest, await edge.read_json(request, rt.settings.limits.max_body_bytes))
        body = body.with_betas(request.headers.get("anthropic-beta"))
        return await pipeline.run(rt, scope, caller, anthropic.ANTHROPIC_MESSAGES, body)

    return await _serve(request, "messages", handle, anthropic.error_body)


async def count_tokens(request: Request) -> Response:
    """The gateway's own Claude estimate (what admission reserves): no upstream call, so no cost row."""
    async def handle(rt: Runtime, scope: Scope) -> Response:
        _refuse_api_key(request)
        caller = await _caller(rt, request, scope)
        body = parse_model(anthropic.CountTokensRequest, await edge.read_json(request, rt.settings.limits.max_body_bytes))
        alias = await rt.admission.effective_alias(caller, body.model)
        # As on /messages: an unknown model is a 404, one outside the tier a 403, one without Messages targets a 400.
        routing.plan_route(alias=alias, catalogue=rt.settings.catalogue, tier=caller.tier, provider_hint=None,
                           priority=None, request=body)
        prompt = body.prompt
        count = tokens.count_chat_prompt(prompt.messages, "claude", tools=prompt.tools)
        scope.model = alias
        return edge.json_response({"input_tokens": count}, scope)

    return await _serve(request, "count_tokens", handle, anthropic.error_body, answers=True)


def _refuse_api_key(request: Request) -> None:
    if "x-api-key" in request.headers and "authorization" not in request.headers:
        raise AuthenticationFailed(
            "This gateway does not take API keys (x-api-key): send your Entra token as 'Authorization: Bearer "
            "<token>' (the Anthropic SDK's auth_token=, Claude Code's ANTHROPIC_AUTH_TOKEN).",
            code="api_key_not_accepted", headers={"WWW-Authenticate": "Bearer"})


__all__ = ["count_tokens", "messages", "responses", "stored_response"]

"""Route handlers behind function_app.py: parse the edge, authenticate, delegate, render.

Each handler is the same four lines of shape: open the scope, get the runtime,
authenticate, hand over. Errors render in the OpenAI shape through ``edge``; a
request rejected before reaching the pipeline still leaves one telemetry record.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway_lib.auth.identity import Caller
from gateway_lib.errors import GatewayError, InvalidRequest, ModelNotFound, PermissionDenied
from gateway_lib.http import edge, models
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline, tasks
from gateway_lib.operations.base import Operation
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.embeddings import EMBEDDINGS_OP, EmbeddingsRequest
from gateway_lib.operations.schema import ChatRequest, GenerateRequest, parse_model
from gateway_lib.runtime import Runtime, get_runtime, try_runtime

log = logging.getLogger("gateway.api")
Handler = Callable[[Runtime, Scope], Awaitable[Response]]


async def _serve(request: Request, route: str, handler: Handler, shape: edge.ErrorShape | None = None, *,
                 answers: bool = False) -> Response:
    """``answers``: the handler answers without the pipeline (which records the requests it runs), so its
    successes are recorded here, as its refusals are."""
    scope = edge.begin(request, route)
    rt: Runtime | None = None

    async def run() -> Response:
        nonlocal rt
        rt = get_runtime()
        return await handler(rt, scope)

    response = await edge.guarded(scope, run, shape)
    if rt is not None:
        if response.status_code >= 400 and not scope.recorded:
            rt.telemetry.rejection(scope, response.status_code, scope.error_code)
        elif answers and not scope.recorded:
            rt.telemetry.answered(scope, response.status_code)
        rt.warmed_up()
    return response


async def _caller(rt: Runtime, request: Request, scope: Scope) -> Caller:
    caller = await rt.authenticator.authenticate(request.headers, request.query_params, label=scope.label)
    scope.caller = caller
    return caller


def _operation_route(model: type[Any], op: Operation[Any], route: str) -> Callable[[Request], Awaitable[Response]]:
    """A route that parses one operation's request and runs it on the pipeline."""
    async def serve(request: Request) -> Response:
        async def handle(rt: Runtime, scope: Scope) -> Response:
            caller = await _caller(rt, request, scope)
            body = parse_model(model, await edge.read_json(request, rt.settings.limits.max_body_bytes))
            return await pipeline.run(rt, scope, caller, op, body)

        return await _serve(request, route, handle)

    return serve


chat_completions = _operation_route(ChatRequest, CHAT_COMPLETIONS, "chat")
embeddings = _operation_route(EmbeddingsRequest, EMBEDDINGS_OP, "embeddings")


async def generate(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        caller = await _caller(rt, request, scope)
        job = parse_model(GenerateRequest, await edge.read_json(request, rt.settings.limits.max_body_bytes))
        try:
            served = await pipeline.complete(rt, scope, caller, CHAT_COMPLETIONS, tasks.to_chat(job), task=job.task)
        except GatewayError as error:
            raise tasks.in_task_terms(error) from None
        return edge.json_response(tasks.render(job, served, scope.request_id), scope, headers=served.headers)

    return await _serve(request, "generate", handle)


async def list_models(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        caller = await _caller(rt, request, scope)
        data = [models.model_object(rt.settings.catalogue, alias) for alias in rt.settings.catalogue.aliases.values()
                if caller.tier.allows(alias.name)]
        return edge.json_response({"object": "list", "data": data}, scope)

    return await _serve(request, "models", handle, answers=True)


async def retrieve_model(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        caller = await _caller(rt, request, scope)
        name = scope.model = edge.path_param(request, "model", after="models")
        alias = rt.settings.catalogue.aliases.get(name)
        if alias is None or not caller.tier.allows(name):  # one answer for both: the catalogue is not disclosed
            raise ModelNotFound(f"The model '{name[:256]}' does not exist or you do not have access to it.",
                                param="model")
        return edge.json_response(models.model_object(rt.settings.catalogue, alias), scope)

    return await _serve(request, "models", handle, answers=True)


async def usage(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        caller = await _caller(rt, request, scope)
        subject = request.query_params.get("caller")
        if subject and subject != caller.key and not caller.is_admin:
            raise PermissionDenied("Only gateway admins may read another caller's usage.")
        # Another caller's tier comes from the callers directory, never from the admin asking.
        view = await rt.admission.usage_view(caller if subject in (None, "", caller.key) else subject)
        return edge.json_response(view, scope)

    return await _serve(request, "usage", handle, answers=True)


async def admin_limits(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        admin = await _caller(rt, request, scope)
        _require_admin(admin)
        subject = request.query_params.get("caller")
        if not subject:
            raise InvalidRequest("Query parameter 'caller' (a caller key from /api/v1/usage) is required.",
                                 param="caller")
        if request.method == "PUT":
            body = await edge.read_json(request, rt.settings.limits.max_body_bytes)
            saved = await rt.admission.put_overrides(subject, body, changed_by=admin.key)
            return edge.json_response(saved, scope)
        return edge.json_response(await rt.admission.get_overrides(subject), scope)

    return await _serve(request, "admin_limits", handle, answers=True)


async def admin_alerts(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        _require_admin(await _caller(rt, request, scope))
        from gateway_lib.billing import alerts

        limit = _int_param(request, "limit", 100, 1, 1000)
        days = _int_param(request, "days", 31, 1, 62)
        since = datetime.now(UTC) - timedelta(days=days)
        rows = await alerts.list_alerts(rt.store, rt.settings.storage.table_prefix, since, limit)
        return edge.json_response({"object": "list", "data": [a.as_json() for a in rows]}, scope)

    return await _serve(request, "admin_alerts", handle, answers=True)


async def health(request: Request) -> Response:
    """Liveness plus readiness: configuration valid, storage reachable. Never shows secrets."""
    scope = edge.begin(request, "health")
    rt, problems = try_runtime()
    checks: dict[str, dict[str, object]] = {
        # Anonymous: the settings at fault by name only. Messages can quote values (a URL with a secret in it);
        # they are in the function's log and in the 503 the first real request gets.
        "configuration": {"status": "ok"} if rt else {"status": "error", "settings": _setting_names(problems)},
    }
    if rt is not None:
        try:
            await asyncio.wait_for(rt.store.ping(), timeout=3)
            checks["storage"] = {"status": "ok", "mode": rt.settings.storage.mode}
        except Exception as exc:  # readiness reports any failure; the type name is safe to show
            checks["storage"] = {"status": "error", "error": type(exc).__name__}
    ready = all(c["status"] == "ok" for c in checks.values())
    body: dict[str, object] = {"status": "ok" if ready else "degraded", "checks": checks,
            "catalogue_version": rt.settings.catalogue.version if rt else None}
    if rt is not None and rt.settings.budget.alert_webhook_unresolved:  # alerting degraded; serving is not
        body["warnings"] = ["ALERT_WEBHOOK_URL: Key Vault reference not resolved; webhook alerts are off"]
    return edge.json_response(body, scope, status=200 if ready else 503)


async def budget_rollup(past_due: bool) -> None:
    """The timer's body (the rollup logs its own report)."""
    from gateway_lib.billing import rollup_timer

    await rollup_timer.rollup_timer_entry(past_due)


def _setting_names(problems: list[str]) -> list[str]:
    names = (re.match(r"[A-Z][A-Z0-9_]+", p) for p in problems)
    return sorted({m.group(0) for m in names if m} or {"configuration"})


def _require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise PermissionDenied("This route needs the gateway admin app role.")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not lo <= int(raw) <= hi:  # "²".isdigit() too
        raise InvalidRequest(f"Query parameter '{name}' must be an integer in {lo}..{hi}.", param=name)
    return int(raw)


__all__ = ["admin_alerts", "admin_limits", "budget_rollup", "chat_completions", "embeddings", "generate", "health",
           "list_models", "retrieve_model", "usage"]

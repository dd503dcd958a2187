"""Responses a target keeps (``store``, ``previous_response_id``, ``GET``/``DELETE /responses/{id}``), tied
to the caller that made them.

``ResponseState`` is one request's part, which the pipeline calls at three points: ``pin`` (a continuation
goes only to the target that keeps its previous response, and only for that response's owner), ``keep``
and ``see`` (an answer's id is recorded before the caller sees it, so the caller can at once read or
continue it). ``retrieve`` serves the stored-object routes. Another caller's id, an unknown id and an
expired one get one and the same answer, so ids are not disclosed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gateway_lib.auth.identity import Caller
from gateway_lib.errors import InvalidRequest, NotFound
from gateway_lib.operations.response_owners import ResponseOwners
from gateway_lib.providers import registry
from gateway_lib.providers.base import RESPONSES, CallContext, KeepsObjects, StreamEvent, Unsupported
from gateway_lib.storage.base import StorageError
from gateway_lib.telemetry import RequestRecord

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.http.edge import Scope
    from gateway_lib.operations.responses import ResponsesRequest
    from gateway_lib.routing.plan import RoutePlan
    from gateway_lib.runtime import Runtime

log = logging.getLogger("gateway.responses")
_CARRIES_RESPONSE = frozenset({"response.created", "response.in_progress", "response.completed", "response.incomplete",
                               "response.failed"})


def keeps_responses(target: Target) -> bool:
    """Whether the target keeps the responses it answers (it declares the ``store`` feature)."""
    return "store" in registry.capabilities(target).features


class ResponseState:
    """One Responses request's part in the state its target keeps."""

    def __init__(self, owners: ResponseOwners, caller: Caller, request: ResponsesRequest) -> None:
        self._owners, self._caller, self._request = owners, caller, request
        self._recorded = False

    async def pin(self, plan: RoutePlan) -> RoutePlan:
        """A continuation's plan: only the target keeping the previous response, and only for its owner.
        No storage call for a request that continues nothing."""
        previous = self._request.previous_response_id
        if previous is None:
            return plan
        owner = await self._owners.find(previous, self._caller.key)
        if owner is None:  # OpenAI's answer to an unknown id, for another caller's id too
            raise InvalidRequest(f"Previous response with id '{previous[:256]}' not found.",
                                 code="previous_response_not_found", param="previous_response_id")
        pinned = plan.only([owner.target_id])
        if not pinned.steps:
            raise InvalidRequest(f"Previous response with id '{previous[:256]}' was answered by a target that model "
                                 f"'{plan.alias}' does not route to; continue it with the model that answered it.",
                                 code="invalid_value", param="previous_response_id")
        return pinned

    async def keep(self, target: Target, answer: dict[str, Any]) -> None:
        """Record the answer's owner when its target keeps it (``store`` not false)."""
        response_id = answer.get("id")
        if (self._recorded or self._request.store is False or answer.get("store") is False
                or not isinstance(response_id, str) or not response_id or not keeps_responses(target)):
            return
        self._recorded = True
        try:
            await self._owners.record(response_id, self._caller.key, target.id)
        except StorageError:  # the answer is paid for and goes out; only reading or continuing it will 404
            log.error("response owner not recorded", extra={"custom_dimensions": {"target": target.id}})

    async def see(self, target: Target, event: StreamEvent) -> None:
        """A stream's response id, from the first event that carries the response (``response.created``)."""
        if not self._recorded and event.chunk.get("type") in _CARRIES_RESPONSE:
            response = event.chunk.get("response")
            if isinstance(response, dict):
                await self.keep(target, response)


async def retrieve(rt: Runtime, scope: Scope, caller: Caller, response_id: str, *, delete: bool = False) -> dict[str, Any]:
    """A kept response (or its deletion) for its owner, fetched from the target that keeps it. No tokens are
    used, so no cost row: the request's telemetry record says what happened."""
    owners = rt.response_owners
    owner = await owners.find(response_id, caller.key)
    target = rt.settings.catalogue.targets.get(owner.target_id) if owner else None
    provider = rt.providers.get(target.provider) if target else None
    if target is None or not isinstance(provider, KeepsObjects):
        raise _not_found(response_id)
    asked = scope.elapsed_ms()
    answer = await provider.stored(RESPONSES, response_id, target, CallContext(scope.request_id, scope.traceparent),
                                   delete=delete)
    scope.upstream_ms = scope.elapsed_ms() - asked
    if isinstance(answer, Unsupported):
        raise InvalidRequest(answer.message, code=answer.code, param=answer.param)
    if answer is None or delete:
        await owners.forget(response_id)  # gone upstream (expired, deleted): nothing left to own
    if answer is None:
        raise _not_found(response_id)
    _record(rt, scope, caller, target)
    return answer


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id[:256]}' not found.", param=None)


def _record(rt: Runtime, scope: Scope, caller: Caller, target: Target) -> None:
    scope.recorded = True
    rt.telemetry.request(RequestRecord(
        request_id=scope.request_id, trace_id=scope.trace_id, route=scope.route, caller_app=caller.app_id,
        caller_user=caller.user_id, tenant=caller.tenant_id, team=caller.team, tier=caller.tier.name,
        provider=target.provider, target_model=target.model, deployment=target.deployment, region=target.region,
        latency_ms=round(scope.elapsed_ms(), 2), upstream_ms=round(scope.upstream_ms, 2),
        overhead_ms=round(scope.overhead_ms(), 2)))

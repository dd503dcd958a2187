"""Pure routing: which targets to try for a request, in which order, and why.

Decisions (each is pinned by a test in tests/unit/test_routing.py):

* Ranking: no priority keeps the catalogue's configured order; ``low_cost`` ranks by
  the price of the estimated prompt plus the expected output (``max_tokens``, else
  ``DEFAULT_OUTPUT_ESTIMATE`` for every target alike, so a target's larger output
  limit does not make it look dearer); ``quality`` by the configured rank, best first;
  ``low_latency`` by the observed latency EWMA, with **unknown latency first**: an
  unmeasured target is tried once and measured, otherwise a target that was never
  chosen could never become known. Ties keep the configured order (stable sort).
* Health: targets whose circuit is open (or half-open with its probe in flight) are
  **kept, last**, the soonest to recover first, marked ``available=False``. The
  executor does not call them during their cooldown, but the plan still names them so
  the caller's Retry-After and the logs can say when they come back. A half-open
  target with a free probe slot keeps its rank: the probe is how it earns traffic back.
* Targets whose context window cannot hold the estimated prompt are dropped; if none
  is left, 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway_lib.billing import pricing
from gateway_lib.config.catalog import Catalogue, Target
from gateway_lib.config.tiers import Tier
from gateway_lib.errors import InvalidRequest, ModelNotFound, PermissionDenied
from gateway_lib.providers import registry
from gateway_lib.providers.base import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, OperationRequest, streamed
from gateway_lib.routing.target_health import HealthView

DEFAULT_OUTPUT_ESTIMATE = 1024


@dataclass(frozen=True)
class RouteStep:
    target: Target
    reason: str  # why this target sits at this position
    available: bool = True  # False: circuit open; the executor skips it during the cooldown
    retry_in: float = 0.0  # seconds until the cooldown ends (0 when available)
    upstream_hold: bool = False  # the cooldown is the upstream's Retry-After


@dataclass(frozen=True)
class RoutePlan:
    alias: str
    priority: str | None
    steps: tuple[RouteStep, ...]

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(step.target for step in self.steps)

    def only(self, target_ids: Sequence[str]) -> RoutePlan:
        """The plan restricted to ``target_ids`` (order kept): e.g. the targets a request fits."""
        keep = set(target_ids)
        return replace(self, steps=tuple(step for step in self.steps if step.target.id in keep))


def plan_route(alias: str, catalogue: Catalogue, tier: Tier, provider_hint: str | None, priority: str | None,
               health_view: HealthView | None = None, estimate_prompt_tokens: int | None = None,
               max_tokens: int | None = None, now: float | None = None, *, health: HealthView | None = None,
               request: OperationRequest | None = None) -> RoutePlan:
    """Order the alias's targets for this request.

    ``now`` is the health clock's time (default: ``time.monotonic()``, TargetHealth's
    default clock). Callers that only have the ``request`` may pass it instead of the
    estimates: the prompt is then estimated at 4 characters a token, enough to rank
    by price; the exact per-tokenizer fit is guardrails' job.
    """
    view = health_view or health or HealthView({})
    if estimate_prompt_tokens is None:
        estimate_prompt_tokens = _rough_prompt_tokens(request)
    if max_tokens is None and request is not None:
        max_tokens = request.requested_max_tokens
    now = time.monotonic() if now is None else now
    if alias not in catalogue.aliases:
        raise ModelNotFound(f"The model '{alias}' does not exist or you do not have access to it.", param="model")
    if not tier.allows(alias):
        raise PermissionDenied(f"Your tier '{tier.name}' is not allowed to use model '{alias}'.",
                               code="model_not_allowed", param="model")
    targets = _capable(alias, _filter(alias, catalogue.targets_for(alias), provider_hint), request)
    ranked = _rank(targets, priority, view, estimate_prompt_tokens, max_tokens)
    return RoutePlan(alias, priority, _apply_health(ranked, view, now))


def _rough_prompt_tokens(request: OperationRequest | None) -> int:
    messages = getattr(request, "messages", None) or ()
    return sum(len(m.text()) for m in messages) // 4


def _filter(alias: str, targets: Sequence[Target], provider_hint: str | None) -> list[Target]:
    # No context-window filter here: the estimate this module may have is 4 characters a token, which
    # refused prompts that fit. Whether a prompt fits each target is guardrails' call, on exact counts.
    if provider_hint:
        targets = [t for t in targets if t.provider == provider_hint]
        if not targets:
            raise InvalidRequest(f"Model '{alias}' has no target on provider '{provider_hint}'; "
                                 "drop provider_hint or choose another model.", code="invalid_value",
                                 param="provider_hint")
    return list(targets)


def _capable(alias: str, targets: list[Target], request: OperationRequest | None) -> list[Target]:
    """The targets able to serve the request's operation and parameters: a 400 naming what none can do."""
    if request is None:
        return targets
    kind = EMBEDDINGS if request.operation == EMBEDDINGS else CHAT
    targets = [t for t in targets if t.kind == kind]
    if not targets:
        raise InvalidRequest(f"Model '{alias}' does not serve {_OPERATION_NAMES.get(request.operation, request.operation)};"
                             " choose a model of that kind (see /api/v1/models).", code="model_not_supported",
                             param="model")
    operation = streamed(request.operation) if request.stream else request.operation
    needs = request.features()
    lacking = [missing for t in targets if (missing := registry.capabilities(t).lacks(operation, needs))]
    if len(lacking) < len(targets):
        return [t for t in targets if not registry.capabilities(t).lacks(operation, needs)]
    missing = lacking[0]
    if missing in (operation, request.operation):
        raise InvalidRequest(f"Model '{alias}' cannot serve {operation.replace('_', ' ')} requests.",
                             code="model_not_supported", param="stream" if request.stream else "model")
    raise InvalidRequest(f"Model '{alias}' has no target that supports '{missing}'; drop it or choose another model.",
                         code="unsupported_parameter", param=missing)


_OPERATION_NAMES = {CHAT: "chat completions", EMBEDDINGS: "embeddings", RESPONSES: "responses", MESSAGES: "messages"}


def _rank(targets: list[Target], priority: str | None, view: HealthView, prompt_tokens: int,
          max_tokens: int | None) -> list[tuple[Target, str]]:
    if priority == "low_cost":
        output = max_tokens or DEFAULT_OUTPUT_ESTIMATE
        costs = {t.id: pricing.estimate(t.price, prompt_tokens, output) for t in targets}
        ordered = sorted(targets, key=lambda t: costs[t.id])
        return [(t, f"low_cost: est. ${costs[t.id]:.6f} for {prompt_tokens}+{output} tokens") for t in ordered]
    if priority == "quality":
        ordered = sorted(targets, key=lambda t: -t.quality)
        return [(t, f"quality: rank {t.quality}") for t in ordered]
    if priority == "low_latency":
        return _rank_latency(targets, view)
    return [(t, f"configured order #{i + 1}") for i, t in enumerate(targets)]


def _rank_latency(targets: list[Target], view: HealthView) -> list[tuple[Target, str]]:
    def key(t: Target) -> tuple[int, float]:
        latency = view.status(t.id).latency_ms
        return (0, 0.0) if latency is None else (1, latency)

    ranked = []
    for t in sorted(targets, key=key):
        latency = view.status(t.id).latency_ms
        ranked.append((t, "low_latency: unmeasured, tried to learn it" if latency is None
                       else f"low_latency: EWMA {latency:.0f} ms"))
    return ranked


def _apply_health(ranked: list[tuple[Target, str]], view: HealthView, now: float) -> tuple[RouteStep, ...]:
    ready: list[RouteStep] = []
    cooling: list[RouteStep] = []
    for target, reason in ranked:
        status = view.status(target.id)
        if status.admits_at(now):
            probe = status.circuit_at(now) == "half_open"
            ready.append(RouteStep(target, f"{reason}; half-open probe" if probe else reason))
        else:
            retry_in = status.retry_in(now)
            cooling.append(RouteStep(target, f"{reason}; circuit open, retry in {retry_in:.1f}s", available=False,
                                     retry_in=retry_in, upstream_hold=status.upstream_hold))
    cooling.sort(key=lambda s: s.retry_in)
    return tuple(ready + cooling)

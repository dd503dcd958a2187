"""Call a route plan's targets in order until one answers.

Fallback moves on at once (no sleep) after a *retryable* ``ProviderError``; never
after a non-retryable one (the caller's own mistake would fail everywhere) and never
once a stream has produced its first event (bytes may be on the wire). A target that
cannot take the request at all (its adapter's ``check`` answers ``Unsupported``: Bedrock
and a remote image URL, a model without tools) is an ordinary outcome: it is passed over,
and the 400 stands only if no target of the plan could take it.

Targets whose circuit is cooling down are skipped. One exception: when *every*
target is cooling down, the one closest to recovery is tried once, unless its
cooldown is the upstream's own Retry-After (honoured: calling early only earns
another 429). The breaker opens on a single failure, so without this a one-target
alias would refuse all callers for seconds after a single blip.

When nothing answers: 429 if every failure was a rate limit, counting a target skipped
for its cooldown by the failure that started it (the right client reaction is the same
back-off, and SDKs honour Retry-After on 429), else 503 "all N targets ... are
unavailable"; either carries Retry-After = the shortest cooldown.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, TypeVar

from gateway_lib.config.catalog import Target
from gateway_lib.errors import InvalidRequest, ProviderError, RateLimited, ServiceUnavailable
from gateway_lib.providers.base import CallContext, Completion, OperationRequest, Provider, StreamEvent, Unsupported
from gateway_lib.routing.plan import RoutePlan, RouteStep
from gateway_lib.routing.target_health import TargetHealth

Clock = Callable[[], float]
# Every attempt has its own upstream timeout, and a timeout moves on to the next target: three targets at
# 120 s would outlast the Functions front end (230 s) and APIM (240 s), and the caller would get their
# timeout instead of ours. So the attempts of one request share this much time, until its first byte.
FALLBACK_BUDGET_SECONDS = 220.0
T = TypeVar("T")


_SKIPPED = frozenset({"circuit_open", "unconfigured", "unsupported"})  # outcomes of a target not tried


@dataclass(frozen=True)
class Attempt:
    target_id: str
    provider: str
    outcome: str  # ok | <ProviderError.kind> | circuit_open | unconfigured | unsupported
    upstream_status: int | None = None
    latency_ms: float = 0.0
    retry_after: float | None = None
    consumed: tuple[int, int] = (0, 0)  # (prompt, completion) tokens a failed attempt was billed for anyway

    @property
    def sent(self) -> bool:
        """The request went to this target (False: skipped by its breaker, its config or its features)."""
        return self.outcome not in _SKIPPED

    def as_dict(self) -> dict[str, Any]:
        """The telemetry shape (``target``, ``status``: the names the request record uses)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "consumed"}  # (in the tokens)
        values["target"], values["status"] = values.pop("target_id"), values.pop("upstream_status")
        return values


class Completed(NamedTuple):
    """``completion, target, attempts = await complete_with_fallback(...)``, or by name."""

    completion: Completion
    target: Target
    attempts: list[Attempt]

    @property
    def upstream_ms(self) -> float:
        return sum(a.latency_ms for a in self.attempts)


class OpenedStream(NamedTuple):
    """``target, first, events, attempts = await open_stream_with_fallback(...)``, or by name."""

    target: Target
    first: StreamEvent
    events: UpstreamEvents
    attempts: list[Attempt]

    @property
    def upstream_ms(self) -> float:
        """Until the first event; the pipeline adds the rest of the stream itself."""
        return sum(a.latency_ms for a in self.attempts)


async def complete_with_fallback(plan: RoutePlan, providers: Mapping[str, Provider], request: OperationRequest,
                                 ctx: CallContext, health: TargetHealth,
                                 clock: Clock = time.monotonic) -> Completed:
    """The first completion any target of the plan gives."""
    async def call(provider: Provider, target: Target) -> Completion:
        return await provider.complete(request, target, ctx)

    completion, target, attempts = await _first_success(plan, providers, request, health, clock, call)
    return Completed(completion, target, attempts)


async def open_stream_with_fallback(
    plan: RoutePlan, providers: Mapping[str, Provider], request: OperationRequest, ctx: CallContext,
    health: TargetHealth, clock: Clock = time.monotonic,
) -> OpenedStream:
    """Open the first stream that yields an event; returns that event and the rest of the stream."""
    async def call(provider: Provider, target: Target) -> tuple[StreamEvent, AsyncIterator[StreamEvent]]:
        stream = provider.stream(request, target, ctx)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise ProviderError("The upstream stream ended before any event.", provider=provider.name,
                                kind="malformed", retryable=True) from None
        except BaseException:
            await _aclose(stream)
            raise
        return first, stream

    (first, stream), target, attempts = await _first_success(plan, providers, request, health, clock, call)
    return OpenedStream(target, first, UpstreamEvents(stream, target, health), attempts)


async def _first_success(plan: RoutePlan, providers: Mapping[str, Provider], request: OperationRequest,
                         health: TargetHealth, clock: Clock,
                         call: Callable[[Provider, Target], Awaitable[T]]) -> tuple[T, Target, list[Attempt]]:
    attempts: list[Attempt] = []
    last: ProviderError | None = None
    unsupported: Unsupported | None = None  # the first target that could not take the request, and why
    budget_ends = clock() + FALLBACK_BUDGET_SECONDS
    for step in _admitted(plan, providers, health, attempts):
        provider = providers[step.target.provider]
        refusal = provider.check(request, step.target)
        if refusal is not None:
            health.release(step.target.id)  # admitted but not called: its probe slot goes back
            attempts.append(Attempt(step.target.id, step.target.provider, "unsupported"))
            unsupported = unsupported or refusal
            continue
        remaining = budget_ends - clock()
        if remaining <= 0:
            health.release(step.target.id)
            break
        started = clock()
        try:
            result = await _attempt(provider, step.target, health, call, remaining)
        except ProviderError as error:
            attempts.append(_failed(step.target, error, clock() - started))
            if not error.retryable:
                error.attempts = attempts  # accounting records them
                raise
            last = error
            continue
        latency_ms = (clock() - started) * 1000
        health.record_success(step.target.id, latency_ms)
        attempts.append(Attempt(step.target.id, step.target.provider, "ok", 200, latency_ms))
        return result, step.target, attempts
    if unsupported is not None and last is None:  # no target failed; those called could not take it: the caller's 400
        refused = InvalidRequest(unsupported.message, code=unsupported.code, param=unsupported.param)
        refused.attempts = attempts
        raise refused
    exhausted = _exhausted(plan, attempts, last, health, clock())
    exhausted.attempts = attempts
    raise exhausted


def _admitted(plan: RoutePlan, providers: Mapping[str, Provider], health: TargetHealth,
              attempts: list[Attempt]) -> Iterator[RouteStep]:
    """The steps to call, lazily: admitting a half-open target takes its one probe slot,
    so a target is admitted only when the previous ones have failed."""
    configured = [s for s in plan.steps if s.target.provider in providers]
    attempts.extend(Attempt(s.target.id, s.target.provider, "unconfigured") for s in plan.steps
                    if s not in configured)
    admitted_any = False
    for step in configured:
        if health.admit(step.target.id):
            admitted_any = True
            yield step
        else:
            attempts.append(Attempt(step.target.id, step.target.provider, "circuit_open"))
    if admitted_any:
        return
    # Everything is cooling down: cooling steps are listed soonest-recovery first.
    last_resort = next((s for s in configured if not s.upstream_hold), None)
    if last_resort is not None and health.admit(last_resort.target.id, force=True):
        yield last_resort


async def _attempt(provider: Provider, target: Target, health: TargetHealth,
                   call: Callable[[Provider, Target], Awaitable[T]], remaining: float) -> T:
    try:
        async with asyncio.timeout(remaining):
            return await call(provider, target)
    except TimeoutError:  # the request's time ran out (each attempt has the upstream timeout of its own)
        health.release(target.id)  # not the target's verdict: it may have had less than its own timeout
        raise ProviderError(f"no answer within the {remaining:.0f} s the request had left", provider=target.provider,
                            kind="timeout", retryable=True) from None
    except ProviderError as error:
        if error.retryable:
            health.record_failure(target.id, error.retry_after, error.kind)
        else:
            health.release(target.id)  # the caller's mistake says nothing about the target
        raise
    except BaseException:
        health.release(target.id)  # cancelled, or a bug: give the probe slot back
        raise


def _failed(target: Target, error: ProviderError, elapsed: float) -> Attempt:
    return Attempt(target.id, target.provider, error.kind, error.upstream_status, elapsed * 1000, error.retry_after,
                   error.consumed)


def _exhausted(plan: RoutePlan, attempts: list[Attempt], last: ProviderError | None, health: TargetHealth,
               now: float) -> ServiceUnavailable | RateLimited:
    view = health.view()
    waits = [view.status(t.id).retry_in(now) for t in plan.targets]
    retry_after = float(max(1, math.ceil(min(waits, default=1.0))))
    n, alias = len(plan.steps), plan.alias
    # Why each target failed, or why it is cooling down (so not tried): throttling is told apart from failure.
    reasons = [a.outcome if a.sent else view.status(a.target_id).reason for a in attempts
               if a.outcome == "circuit_open" or (a.sent and a.outcome != "ok")]
    throttled = bool(reasons) and all(r == "rate_limited" for r in reasons)
    if last is None:
        if throttled:
            return RateLimited(f"all {n} targets for model {alias} are rate limited (cooling down after upstream "
                               "429s).", code="upstream_rate_limited", retry_after=retry_after)
        reason = "cooling down after recent failures" if attempts else "not configured"
        return ServiceUnavailable(f"all {n} targets for model {alias} are unavailable ({reason}).",
                                  retry_after=retry_after)
    detail = f"(last error: {last.kind} from {last.provider}: {last.message})"
    if throttled:
        return RateLimited(f"all {n} targets for model {alias} are rate limited {detail}",
                           code="upstream_rate_limited", retry_after=retry_after)
    return ServiceUnavailable(f"all {n} targets for model {alias} are unavailable {detail}", retry_after=retry_after)


class UpstreamEvents:
    """The rest of a stream; a mid-stream upstream failure still counts against the target. Not a generator:
    closing one that never started would skip its ``finally`` and leave the upstream to the garbage collector
    (a stream whose caller left before its headers went out is never read)."""

    def __init__(self, stream: AsyncIterator[StreamEvent], target: Target, health: TargetHealth) -> None:
        self._stream, self._target, self._health = stream, target, health

    def __aiter__(self) -> UpstreamEvents:
        return self

    async def __anext__(self) -> StreamEvent:
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except ProviderError as error:
            if error.retryable:
                self._health.record_failure(self._target.id, error.retry_after, error.kind)
            await self.aclose()
            raise

    async def aclose(self) -> None:
        await _aclose(self._stream)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()

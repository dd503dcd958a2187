"""The one pipeline every operation runs, top to bottom.

    plan route → screen input → reserve quota → call provider with fallback
    → settle and record cost → render

Each step is a plain call that returns one value or raises one of our errors; what differs between
chat completions, embeddings, responses and messages is described by their ``Operation``. Once quota
is reserved, exactly one ``Accounting.finish`` settles it, whatever happens: success, provider
failure, a stream cut mid-way or a caller that hangs up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.responses import Response, StreamingResponse

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.accounting import Accounting
from gateway_lib.config.catalog import Target
from gateway_lib.errors import ClientDisconnected, GatewayError, InternalError, ProviderError
from gateway_lib.guardrails import screen as guardrails
from gateway_lib.http.edge import SSE_HEADERS, Scope, json_response, relayed_json
from gateway_lib.operations.base import KeptState, Operation
from gateway_lib.providers.base import CallContext, OperationRequest, StreamEvent, Usage
from gateway_lib.routing import fallback
from gateway_lib.routing import plan as routing
from gateway_lib.storage import circuit

if TYPE_CHECKING:
    from gateway_lib.runtime import Runtime

log = logging.getLogger("gateway.pipeline")


@dataclass
class Served:
    """A whole answer: the OpenAI body plus what the edge needs to render it."""

    body: dict[str, Any]
    target: Target
    usage: Usage
    cost_usd: Decimal
    headers: dict[str, str]
    raw: bytes | None = None  # the upstream's bytes of ``body``, relayed without encoding it again


async def run(rt: Runtime, scope: Scope, caller: Caller, op: Operation[Any], request: OperationRequest,
              state: KeptState | None = None) -> Response:
    """Serve one request of ``op`` (streamed or not) for an authenticated caller. ``state``: the request's
    part in state its target keeps (stored responses), if its operation has any."""
    if request.stream:
        acct, ctx = await _admit(rt, scope, caller, op, request, task=None, state=state)
        return await _stream(rt, acct, op, request, ctx, state)
    served = await complete(rt, scope, caller, op, request, state=state)
    if served.raw is not None:
        return relayed_json(served.raw, scope, headers=served.headers)
    return json_response(served.body, scope, headers=served.headers)


async def complete(rt: Runtime, scope: Scope, caller: Caller, op: Operation[Any], request: OperationRequest,
                   task: str | None = None, state: KeptState | None = None) -> Served:
    """The non-streamed path, shared by every operation and the task API."""
    acct, ctx = await _admit(rt, scope, caller, op, request, task, state)
    async with _released_on_failure(acct):
        result = await fallback.complete_with_fallback(acct.plan, rt.providers, request, ctx, rt.health)
    acct.attempts = result.attempts
    scope.upstream_ms = result.upstream_ms
    headers = acct.response_headers(result.target)
    body = result.completion.body
    usage = result.completion.usage or _answer_usage(acct, op, result.target, body)
    cost = await acct.finish(result.target, usage, status="ok")
    if state is not None:
        await state.keep(result.target, body)
    return Served(body, result.target, usage, cost, headers, result.completion.raw)


async def _admit(rt: Runtime, scope: Scope, caller: Caller, op: Operation[Any], request: OperationRequest,
                 task: str | None, state: KeptState | None = None) -> tuple[Accounting, CallContext]:
    """Plan the route, screen the input and reserve quota: everything before the first upstream byte.
    Its storage waits (the override read, row lock waits, the reservation, a kept response's owner) share
    one deadline."""
    with circuit.deadline():
        alias = await rt.admission.effective_alias(caller, request.model)
        plan = routing.plan_route(
            alias=alias, catalogue=rt.settings.catalogue, tier=caller.tier, provider_hint=request.provider_hint,
            priority=request.priority, health=rt.health.view(), request=request,
        )
        if state is not None:  # after the capability check: a target that keeps no state is refused as such first
            plan = await state.pin(plan)
        screened = guardrails.screen(op.prompt(request), caller.tier, plan.targets, rt.settings.limits)
        plan = plan.only(screened.eligible)  # targets whose context window the request fits
        acct = Accounting(rt, scope, caller, request, alias, task, plan, screened)
        await acct.reserve()
    return acct, CallContext(request_id=scope.request_id, traceparent=scope.traceparent,
                             max_tokens=screened.max_tokens)


def _answer_usage(acct: Accounting, op: Operation[Any], target: Target, body: dict[str, Any]) -> Usage:
    """The usage the body reports, else an estimate from its text: an answer without usage (a proxy or a model
    that leaves it out) is not free. A body shaped unlike its operation is billed at the request's output cap,
    since raising here would leave the reservation in flight and the paid answer without its cost row."""
    try:
        return op.usage(body) or acct.estimate_usage(target, op.answer_text(body))
    except Exception:
        log.warning("answer unreadable for its usage; billed at the output cap",
                    extra={"custom_dimensions": {"request_id": acct.scope.request_id, "target": target.id}})
        return acct.capped_usage(target)


@asynccontextmanager
async def _released_on_failure(acct: Accounting) -> AsyncIterator[None]:
    """Release the reservation if the provider call fails, raises a bug, or the caller goes away."""
    try:
        yield
    except GatewayError as error:
        await acct.finish_error(error)
        raise
    except asyncio.CancelledError:
        await acct.finish_error(ClientDisconnected())
        raise
    except Exception:
        await acct.finish_error(InternalError())
        raise


async def _stream(rt: Runtime, acct: Accounting, op: Operation[Any], request: OperationRequest,
                  ctx: CallContext, state: KeptState | None) -> Response:
    # The first event is pulled before any byte goes out: until then a failed target can
    # still be replaced by the next one. After it, a failure ends the stream with an error event.
    async with _released_on_failure(acct):
        opened = await fallback.open_stream_with_fallback(acct.plan, rt.providers, request, ctx, rt.health)
    acct.attempts = opened.attempts
    acct.scope.upstream_ms = opened.upstream_ms
    body = _sse_body(acct, op, request, opened.first, opened.events, state)

    async def settle_unstarted() -> None:  # the body settles the request itself if it ever starts
        try:
            await opened.events.aclose()
        finally:  # a failing close still leaves the request its one cost row
            usage = acct.estimate_usage(opened.target, _text_or_nothing(op, opened.first))  # asked and answered
            await acct.finish(opened.target, usage, status="client_disconnected")

    return _SettledStream(body, settle_unstarted, media_type="text/event-stream",
                          headers=acct.scope.headers() | SSE_HEADERS | acct.response_headers(opened.target))


def _text_or_nothing(op: Operation[Any], event: StreamEvent) -> str:
    try:
        return op.stream_text(event)
    except Exception:  # an event the dialect cannot read for text: bill the prompt, never skip the row
        return ""


class _SettledStream(StreamingResponse):
    """A stream that settles its request however the server ends it. A server whose first send fails (the
    caller gone before the headers; ASGI 2.4 servers raise there) never iterates the body, and a generator
    that never started runs no ``finally``; one whose send fails mid-stream leaves the body suspended."""

    def __init__(self, content: AsyncGenerator[bytes, None], settle_unstarted: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._body, self._settle_unstarted = content, settle_unstarted

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()  # a started body settles in its own ``finally``; else a no-op
            await self._settle_unstarted()  # a no-op if the body settled


async def _sse_body(acct: Accounting, op: Operation[Any], request: OperationRequest, first: StreamEvent,
                    events: fallback.UpstreamEvents, state: KeptState | None) -> AsyncGenerator[bytes, None]:
    target = acct.served_by
    usage: Usage | None = None
    streamed: list[str] = []
    frames: list[bytes] = []  # written together when the upstream delivered them together
    status = "client_disconnected"  # what it stays if the caller hangs up (the generator is closed)
    error: GatewayError | None = None
    last: StreamEvent | None = None  # the error event of a dialect that numbers events follows its number
    try:
        async with aclosing(_timed(first, events, acct)) as stream:
            async for event in stream:
                last = event
                if state is not None and target is not None:
                    await state.see(target, event)
                streamed.append(op.stream_text(event))
                usage = op.stream_usage(event) or usage
                frame = op.frame(request, event)
                if frame is not None:
                    frames.append(frame)
                if frames and not event.more:
                    yield b"".join(frames)
                    frames.clear()
        yield b"".join(frames) + op.stream_end
        status = "ok"
    except ProviderError as exc:
        # Bytes already went out, so no fallback: tell the caller plainly instead of truncating silently.
        status, error = "upstream_cut", exc
        yield b"".join(frames) + op.error_frame(exc, last)
    except Exception as exc:  # a bug (e.g. in translating a provider's events): an error event, never silence
        log.error("stream failed: %s", type(exc).__name__)  # the type only: messages may quote content
        status, error = "error", InternalError()
        yield b"".join(frames) + op.error_frame(error, last)
    finally:
        if usage is None:  # cut or abandoned: count what was streamed so the spend is not lost
            usage = acct.estimate_usage(target, "".join(streamed))
        await acct.finish(target, usage, status=status, error=error)


async def _timed(first: StreamEvent, rest: fallback.UpstreamEvents,
                 acct: Accounting) -> AsyncGenerator[StreamEvent, None]:
    """``first``, then the rest of the stream, adding each wait for the upstream to the upstream time.
    Closing this closes the upstream at once (not whenever the generator is collected)."""
    loop = asyncio.get_running_loop()
    async with aclosing(rest):
        yield first
        while True:
            started = loop.time()
            try:
                event = await anext(rest)
            except StopAsyncIteration:
                return
            finally:
                acct.scope.upstream_ms += (loop.time() - started) * 1000
            yield event

"""A relay for the OpenAI REST wire: the request's JSON goes up, the answer's JSON comes back.

One ``aiohttp`` session per relay and event loop (the runtime builds one provider per loop), so warm
invocations reuse pooled connections. No SDK sits on this path: a gateway forwards JSON, it does not
rebuild it through typed models. No retries either: the gateway's own fallback decides what happens
after a 429 or a 5xx, and a hidden retry would delay that decision and hide the throttling.

A relay says where each operation goes (``routes``, ``url``) and how it authenticates (``headers``);
sending, streaming and reading answers are shared here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from gateway_lib.errors import ProviderError
from gateway_lib.providers.base import (
    CHAT,
    CallContext,
    Capabilities,
    Completion,
    OperationRequest,
    StreamEvent,
    Unsupported,
    streamed,
    usage_of,
)
from gateway_lib.providers.openai_wire import SseStream, Wire

_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps builds an encoder per call when given options

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import ProviderSettings


@dataclass(frozen=True)
class Route:
    """Where one operation goes upstream and what its answers look like."""

    path: str  # may hold ``{deployment}``, the target's deployment
    versioned: bool = True  # takes an ``?api-version=`` (Azure's deployment paths)
    answer_key: str = "choices"  # a key every answer of the operation has: the shape check
    stream_options: bool = False  # streams take ``stream_options.include_usage``
    keeps: bool = False  # answers are kept upstream, readable and deletable at ``{path}/{id}``
    kind: str = CHAT  # the catalogue kind of target the operation runs on
    streams: bool = True  # also served streamed


def relay_capabilities(routes: Mapping[str, Route], features: frozenset[str]) -> Callable[[Target], Capabilities]:
    """A relay serves each operation it has a route for (streamed too, where the route streams) on targets of the
    route's kind; ``features`` are the chat parameters its chat targets take. A new operation is a new route."""
    operations: dict[str, set[str]] = {}
    for operation, route in routes.items():
        operations.setdefault(route.kind, set()).update({operation, streamed(operation)} if route.streams else {operation})
    by_kind = {kind: Capabilities(operations=frozenset(ops), features=features if kind == CHAT else frozenset())
               for kind, ops in operations.items()}
    return lambda target: by_kind.get(target.kind, Capabilities())


class OpenAIRelay:
    """Sends and streams one operation's wire JSON; subclasses give ``routes``, ``url`` and ``headers``."""

    name: str  # the registered provider name
    wire: ClassVar[Wire]
    routes: ClassVar[dict[str, Route]]

    def __init__(self, shared: ProviderSettings) -> None:
        self._shared = shared
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the session's loop

    def check(self, request: OperationRequest, target: Target) -> Unsupported | None:
        if request.operation not in self.routes:
            return Unsupported(f"{self.wire.label} has no route for {request.operation}", code="unsupported_operation")
        return None  # capabilities cover the parameters

    async def complete(self, request: OperationRequest, target: Target, ctx: CallContext) -> Completion:
        route = self.routes[request.operation]
        body = self.body(request, target, ctx)
        try:
            async with self._post(request.operation, route, target, body, await self.headers(ctx)) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise self.wire.status_error(response.status, response.headers, raw)
        except ProviderError:
            raise
        except Exception as exc:
            raise self.wire.translate(exc) from exc
        answer = self.wire.answer(raw, route.answer_key)
        usage = usage_of(answer.get("usage"), "prompt_tokens", "completion_tokens") if request.operation == CHAT else None
        return Completion(body=answer, usage=usage, raw=raw)

    async def stream(self, request: OperationRequest, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        route = self.routes[request.operation]
        body = self.body(request, target, ctx) | {"stream": True}
        if route.stream_options:
            body["stream_options"] = {"include_usage": True}
        reader = SseStream(self.wire, chat=request.operation == CHAT)
        try:
            async with self._post(request.operation, route, target, body, await self.headers(ctx)) as response:
                if response.status >= 400:  # before any event: the router can still fall back
                    raise self.wire.status_error(response.status, response.headers, await response.read())
                reader.opened = True
                async for received in response.content.iter_any():
                    for event in reader.feed(received):
                        yield event
                for event in reader.end():
                    yield event
        except ProviderError:
            raise
        except Exception as exc:
            raise self.wire.translate(exc, mid_stream=reader.opened) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, request: OperationRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
        return request.wire_body(ctx.max_tokens) | {"model": target.deployment}

    def url(self, operation: str, route: Route, target: Target) -> URL:
        raise NotImplementedError

    async def headers(self, ctx: CallContext) -> dict[str, str]:
        raise NotImplementedError

    def _post(self, operation: str, route: Route, target: Target, body: dict[str, Any],
              headers: dict[str, str]) -> Any:
        payload = _COMPACT.encode(body).encode()
        return self.client().post(self.url(operation, route, target), data=payload, headers=headers)

    def client(self) -> aiohttp.ClientSession:
        """This loop's session, made on first use."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            import aiohttp

            if self._session is not None and not self._session.closed:
                self._session.detach()  # bound to another (finished) loop: it cannot be closed from this one
            self._loop = loop

            shared = self._shared
            # The upstream timeout bounds each wait for data (a stream's every chunk), not the whole call.
            timeout = aiohttp.ClientTimeout(total=None, connect=shared.connect_timeout_seconds,
                                            sock_read=shared.upstream_timeout_seconds)
            # No pool limit: the host bounds concurrency, and a queue here would spend the connect timeout.
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)
        return self._session

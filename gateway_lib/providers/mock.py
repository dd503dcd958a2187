"""``MockProvider``: a provider whose answers come from a function, for tests (as httpx's ``MockTransport``).

The handler gets each ``Call`` and returns a ``Completion`` (whole answers), an iterable or async iterable
of ``StreamEvent`` (streams; an exception in it is raised at that point of the stream), or raises a
``ProviderError``. It may be sync or async. Not registered: tests install it in ``Runtime.providers``.
Kept objects (``KeepsObjects.stored``) come from ``objects``, a dict of object id to its JSON; without it the
provider keeps nothing and answers ``Unsupported``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.providers.base import CallContext, Completion, StreamEvent, Unsupported


@dataclass(frozen=True)
class Call:
    request: Any
    target: Target
    ctx: CallContext
    stream: bool


Handler = Callable[[Call], Any]
Check = Callable[[Any, Target], Unsupported | None]


class MockProvider:
    def __init__(self, handler: Handler, *, check: Check | None = None, name: str = "mock",
                 objects: dict[str, dict[str, Any]] | None = None) -> None:
        self.name = name
        self.calls: list[Call] = []
        self.objects = objects
        self.object_calls: list[tuple[str, str, str]] = []  # (GET | DELETE, object id, target id)
        self.closed: list[str] = []  # targets whose stream was closed (finished, cut or abandoned)
        self._handler, self._check = handler, check

    def check(self, request: Any, target: Target) -> Unsupported | None:
        return self._check(request, target) if self._check else None

    async def complete(self, request: Any, target: Target, ctx: CallContext) -> Completion:
        answer = await self._answer(Call(request, target, ctx, stream=False))
        if not isinstance(answer, Completion):
            raise TypeError(f"the handler answered {type(answer).__name__}, not a Completion")
        return answer

    async def stream(self, request: Any, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        try:
            events = await self._answer(Call(request, target, ctx, stream=True))
            if hasattr(events, "__aiter__"):
                async for event in events:
                    yield _raised(event)
            else:
                for event in events:
                    yield _raised(event)
        finally:
            self.closed.append(target.id)

    async def stored(self, operation: str, object_id: str, target: Target, ctx: CallContext, *,
                     delete: bool = False) -> dict[str, Any] | Unsupported | None:
        if self.objects is None:
            return Unsupported("this mock keeps nothing", code="unsupported_operation")
        self.object_calls.append(("DELETE" if delete else "GET", object_id, target.id))
        if delete:
            return {"id": object_id, "object": "response.deleted", "deleted": True} if self.objects.pop(object_id, None) else None
        return self.objects.get(object_id)

    async def aclose(self) -> None:
        return None

    async def _answer(self, call: Call) -> Any:
        self.calls.append(call)
        answer = self._handler(call)
        return await answer if inspect.isawaitable(answer) else answer


def _raised(event: Any) -> StreamEvent:
    if isinstance(event, BaseException):
        raise event
    return event

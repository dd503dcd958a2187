"""An OpenAI-compatible endpoint as a relay: ``{base}/chat/completions``, ``/embeddings`` and ``/responses``
with a bearer key. Sending, streaming and reading answers are the shared OpenAI relay's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gateway_lib.errors import ProviderError
from gateway_lib.providers.base import RESPONSES, CallContext, OperationRequest
from gateway_lib.providers.openai_compatible.config import NAME, OpenAICompatibleSettings
from gateway_lib.providers.openai_compatible.routes import ROUTES
from gateway_lib.providers.openai_relay import OpenAIRelay, Route
from gateway_lib.providers.openai_wire import Wire

if TYPE_CHECKING:
    from yarl import URL

    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import ProviderSettings

WIRE = Wire(NAME, "the OpenAI-compatible endpoint")


class OpenAICompatibleProvider(OpenAIRelay):
    name = NAME
    wire: ClassVar[Wire] = WIRE
    routes: ClassVar[dict[str, Route]] = ROUTES

    def __init__(self, section: OpenAICompatibleSettings, shared: ProviderSettings) -> None:
        super().__init__(shared)
        self._section = section
        self._urls: dict[tuple[str, str], URL] = {}

    def body(self, request: OperationRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
        body = super().body(request, target, ctx)
        if request.operation == RESPONSES:
            # OpenAI keeps a response unless told not to; the gateway could never read it back or delete it.
            body.setdefault("store", False)
        return body

    async def headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Client-Request-Id": ctx.request_id}
        if ctx.traceparent:
            headers["traceparent"] = ctx.traceparent
        if self._section.api_key:
            headers["Authorization"] = "Bearer " + self._section.api_key
        return headers

    def url(self, operation: str, route: Route, target: Target) -> URL:
        key = (operation, target.endpoint or "")
        url = self._urls.get(key)
        if url is None:
            from yarl import URL

            base = target.endpoint or self._section.base_url
            if base is None:  # settings validation makes this unreachable; keep the message clear anyway
                raise ProviderError("no OpenAI-compatible base URL configured", provider=NAME, kind="server_error",
                                    retryable=False)
            url = self._urls[key] = URL(base.rstrip("/") + route.path)
        return url

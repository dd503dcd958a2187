"""Azure OpenAI as a relay: a resource's deployment paths with ``?api-version=``, its v1 Responses API, and
Entra tokens from the managed identity (an ``api-key`` in local development only).

Sending, streaming and reading answers are the shared OpenAI relay's (``providers/openai_relay.py``);
operations differ only by their row in ``ROUTES`` (``__init__.py``); the body is the request's own ``wire_body``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gateway_lib.errors import ProviderError
from gateway_lib.providers.azure_openai.config import AzureOpenAISettings
from gateway_lib.providers.azure_openai.routes import ROUTES
from gateway_lib.providers.azure_openai.token import TokenCache, TokenSource, bearer, managed_identity
from gateway_lib.providers.base import CallContext, Unsupported
from gateway_lib.providers.openai_relay import OpenAIRelay, Route
from gateway_lib.providers.openai_wire import Wire

if TYPE_CHECKING:
    from yarl import URL

    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import ProviderSettings

NAME = "azure_openai"
WIRE = Wire(NAME, "Azure OpenAI")


class AzureOpenAIProvider(OpenAIRelay):
    name = NAME
    wire: ClassVar[Wire] = WIRE
    routes: ClassVar[dict[str, Route]] = ROUTES

    def __init__(self, section: AzureOpenAISettings, shared: ProviderSettings,
                 token_provider: TokenSource | None = None) -> None:
        super().__init__(shared)
        self._section = section
        self._token: TokenSource | None = token_provider
        self._own_token: TokenCache | None = None  # built here, so closed here
        self._urls: dict[tuple[str, str, str], URL] = {}

    async def stored(self, operation: str, object_id: str, target: Target, ctx: CallContext, *,
                     delete: bool = False) -> dict[str, Any] | Unsupported | None:
        """A kept answer (``GET {path}/{id}``) or its deletion (``DELETE``), on the relay's session and auth."""
        route = ROUTES.get(operation)
        if route is None or not route.keeps:
            return Unsupported(f"Azure OpenAI keeps no {operation} objects", code="unsupported_operation")
        url = self._object_url(operation, route, target, object_id)
        try:
            async with self.client().request("DELETE" if delete else "GET", url,
                                             headers=await self.headers(ctx)) as response:
                raw = await response.read()
                if response.status == 404:  # expired or deleted upstream: the caller's 404, not a configuration fault
                    return None
                if response.status >= 400:
                    raise WIRE.status_error(response.status, response.headers, raw)
        except ProviderError:
            raise
        except Exception as exc:
            raise WIRE.translate(exc) from exc
        return WIRE.answer(raw, "deleted", bool) if delete else WIRE.answer(raw, route.answer_key)

    async def aclose(self) -> None:
        await super().aclose()
        if self._own_token is not None:
            await self._own_token.aclose()
            self._own_token = None

    async def headers(self, ctx: CallContext) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "x-ms-client-request-id": ctx.request_id}
        if ctx.traceparent:
            headers["traceparent"] = ctx.traceparent
        if self._section.auth == "api_key":
            headers["api-key"] = self._section.api_key or ""
            return headers
        try:
            headers["Authorization"] = "Bearer " + await bearer(self._token or self._managed_identity())
        except Exception as exc:
            raise ProviderError("the gateway could not get an Entra token for Azure OpenAI", provider=NAME,
                                kind="auth", retryable=True) from exc
        return headers

    def _managed_identity(self) -> TokenCache:
        if self._own_token is None:
            self._own_token = managed_identity(self._shared.azure_client_id, self._section.token_scope)
        return self._own_token

    def url(self, operation: str, route: Route, target: Target) -> URL:
        key = (operation, target.endpoint or "", target.deployment)
        url = self._urls.get(key)
        if url is None:
            from yarl import URL

            endpoint = target.endpoint or self._section.endpoint
            if endpoint is None:  # settings validation makes this unreachable; keep the message clear anyway
                raise ProviderError("no Azure OpenAI endpoint configured", provider=NAME, kind="server_error",
                                    retryable=False)
            url = URL(endpoint.rstrip("/") + route.path.format(deployment=target.deployment))
            if route.versioned:
                url = url.with_query({"api-version": self._section.api_version})
            self._urls[key] = url
        return url

    def _object_url(self, operation: str, route: Route, target: Target, object_id: str) -> URL:
        from urllib.parse import quote

        base = self.url(operation, route, target)
        return base.with_path(f"{base.raw_path}/{quote(object_id, safe='')}", encoded=True).with_query(base.query)

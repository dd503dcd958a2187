"""Azure OpenAI as a relay: the request's wire JSON goes up, the answer's wire JSON comes back.

One ``aiohttp`` session per provider and event loop (the runtime builds one provider per loop), so
warm invocations reuse pooled connections. No SDK sits on this path: a gateway forwards JSON, it
does not rebuild it through typed models. No retries either: the gateway's own fallback decides what
happens after a 429 or a 5xx, and a hidden retry would delay that decision and hide the throttling.

Operations differ only by their row in ``ROUTES``; the body is the request's own ``wire_body``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway_lib.errors import ProviderError
from gateway_lib.providers.azure_openai.config import AzureOpenAISettings
from gateway_lib.providers.azure_openai.token import TokenCache, TokenSource, bearer, managed_identity
from gateway_lib.providers.base import (
    CHAT,
    EMBEDDINGS,
    RESPONSES,
    CallContext,
    Completion,
    OperationRequest,
    StreamEvent,
    Unsupported,
    seconds,
    usage_of,
)

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

    from gateway_lib.config.catalog import Target
    from gateway_lib.providers.base import ProviderSettings

NAME = "azure_openai"
_decode = json.JSONDecoder().decode  # on str: json.loads would sniff each event's encoding first


@dataclass(frozen=True)
class Route:
    """Where one operation goes upstream and what its answers look like."""

    path: str  # ``{deployment}`` is the target's deployment
    versioned: bool = True  # takes ``?api-version=`` (the v1 surface does not)
    answer_key: str = "choices"  # a key every answer of the operation has: the shape check
    stream_options: bool = False  # streams take ``stream_options.include_usage``
    keeps: bool = False  # answers are kept upstream, readable and deletable at ``{path}/{id}``


ROUTES: dict[str, Route] = {
    CHAT: Route("/openai/deployments/{deployment}/chat/completions", stream_options=True),
    EMBEDDINGS: Route("/openai/deployments/{deployment}/embeddings", answer_key="data"),
    # Azure's v1 surface: no deployment in the path, the deployment goes in the body's "model".
    RESPONSES: Route("/openai/v1/responses", versioned=False, answer_key="output", keeps=True),
}


class AzureOpenAIProvider:
    name = NAME

    def __init__(self, section: AzureOpenAISettings, shared: ProviderSettings,
                 token_provider: TokenSource | None = None) -> None:
        self._section, self._shared = section, shared
        self._token: TokenSource | None = token_provider
        self._own_token: TokenCache | None = None  # built here, so closed here
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the session's loop
        self._urls: dict[tuple[str, str, str], URL] = {}

    def check(self, request: OperationRequest, target: Target) -> Unsupported | None:
        if request.operation not in ROUTES:
            return Unsupported(f"Azure OpenAI has no route for {request.operation}", code="unsupported_operation")
        return None  # capabilities cover the parameters

    async def complete(self, request: OperationRequest, target: Target, ctx: CallContext) -> Completion:
        route = ROUTES[request.operation]
        body = self._body(request, target, ctx)
        try:
            async with self._post(request.operation, route, target, body, await self._headers(ctx)) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise _status_error(response.status, response.headers, _upstream_message(response.status, raw))
        except ProviderError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        answer = _answer(raw, route.answer_key)
        usage = usage_of(answer.get("usage"), "prompt_tokens", "completion_tokens") if request.operation == CHAT else None
        return Completion(body=answer, usage=usage)

    async def stream(self, request: OperationRequest, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        route = ROUTES[request.operation]
        body = self._body(request, target, ctx) | {"stream": True}
        if route.stream_options:
            body["stream_options"] = {"include_usage": True}
        reader = _Stream(chat=request.operation == CHAT)
        try:
            async with self._post(request.operation, route, target, body, await self._headers(ctx)) as response:
                if response.status >= 400:  # before any event: the router can still fall back
                    raw = await response.read()
                    raise _status_error(response.status, response.headers, _upstream_message(response.status, raw))
                reader.opened = True
                async for received in response.content.iter_any():
                    for event in reader.feed(received):
                        yield event
                for event in reader.end():
                    yield event
        except ProviderError:
            raise
        except Exception as exc:
            raise _translate(exc, mid_stream=reader.opened) from exc

    async def stored(self, operation: str, object_id: str, target: Target, ctx: CallContext, *,
                     delete: bool = False) -> dict[str, Any] | Unsupported | None:
        """A kept answer (``GET {path}/{id}``) or its deletion (``DELETE``), on the relay's session and auth."""
        route = ROUTES.get(operation)
        if route is None or not route.keeps:
            return Unsupported(f"Azure OpenAI keeps no {operation} objects", code="unsupported_operation")
        url = self._object_url(operation, route, target, object_id)
        try:
            async with self._client().request("DELETE" if delete else "GET", url,
                                              headers=await self._headers(ctx)) as response:
                raw = await response.read()
                if response.status == 404:  # expired or deleted upstream: the caller's 404, not a configuration fault
                    return None
                if response.status >= 400:
                    raise _status_error(response.status, response.headers, _upstream_message(response.status, raw))
        except ProviderError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        return _answer(raw, "deleted", bool) if delete else _answer(raw, route.answer_key)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_token is not None:
            await self._own_token.aclose()
            self._own_token = None

    def _body(self, request: OperationRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
        return request.wire_body(ctx.max_tokens) | {"model": target.deployment}

    def _post(self, operation: str, route: Route, target: Target, body: dict[str, Any],
              headers: dict[str, str]) -> Any:
        payload = json.dumps(body, separators=(",", ":")).encode()
        return self._client().post(self._url(operation, route, target), data=payload, headers=headers)

    async def _headers(self, ctx: CallContext) -> dict[str, str]:
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

    def _url(self, operation: str, route: Route, target: Target) -> URL:
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

        base = self._url(operation, route, target)
        return base.with_path(f"{base.raw_path}/{quote(object_id, safe='')}", encoded=True).with_query(base.query)

    def _client(self) -> aiohttp.ClientSession:
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


def _answer(raw: bytes, key: str, kind: type = list) -> dict[str, Any]:
    """The answer's JSON object, checked by one key every answer of its kind has."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get(key), kind):
        raise ProviderError("Azure OpenAI returned an unreadable response", provider=NAME, kind="malformed",
                            retryable=True)
    return answer


class _Stream:
    """One upstream stream's SSE lines, into events; an ``event:`` line names the ``data:`` line after it."""

    def __init__(self, chat: bool) -> None:
        self.chat, self.tail = chat, b""
        self.name: str | None = None  # the pending ``event:`` field
        self.opened = False  # the upstream answered 2xx: a failure from here on is mid-stream

    def feed(self, received: bytes) -> list[StreamEvent]:
        lines = (self.tail + received).split(b"\n")
        self.tail = lines.pop()  # an incomplete line waits for the next read
        return self.events(lines)

    def end(self) -> list[StreamEvent]:
        lines, self.tail = [self.tail], b""
        return self.events(lines)

    def events(self, lines: list[bytes]) -> list[StreamEvent]:
        """The events of complete lines that arrived together, all but the last marked ``more``."""
        events = []
        for line in lines:
            if line.startswith(b"data:"):
                data, name, self.name = line[5:].strip(), self.name, None
                event = None if data == b"[DONE]" else self._event(data, name)
                if event is not None:
                    events.append(event)
            elif line.startswith(b"event:"):
                self.name = line[6:].strip().decode()
            elif not line.strip():
                self.name = None
        for event in events[:-1]:
            event.more = True
        return events

    def _event(self, data: bytes, name: str | None) -> StreamEvent | None:
        chunk = _decode(data.decode())
        if not isinstance(chunk, dict):
            raise ValueError("SSE data is not a JSON object")
        if chunk.get("error") or name == "error" or chunk.get("type") == "error":
            # Azure reports a failure inside an open stream as an error event
            raise ProviderError("Azure OpenAI reported an error mid-stream", provider=NAME, kind="server_error",
                                retryable=True)
        return _chat_event(chunk, data) if self.chat else StreamEvent(chunk=chunk, raw=data, name=name)


def _events(lines: list[bytes]) -> list[StreamEvent]:
    """The chat events of complete SSE lines read together."""
    return _Stream(chat=True).events(lines)


def _chat_event(chunk: dict[str, Any], raw: bytes) -> StreamEvent | None:
    usage = chunk.get("usage")
    choices = chunk.get("choices") or []
    if not choices and not usage:
        return None  # Azure's prompt_filter_results preamble: OpenAI clients expect choices[0]
    text = "".join(str((c.get("delta") or {}).get("content") or "") for c in choices)
    text += "".join(str(((tc.get("function") or {}).get("arguments")) or "")
                    for c in choices for tc in (c.get("delta") or {}).get("tool_calls") or [])
    return StreamEvent(chunk=chunk, usage=usage_of(usage, "prompt_tokens", "completion_tokens"), text=text, raw=raw)


def _translate(exc: Exception, mid_stream: bool = False) -> ProviderError:
    """Map transport failures onto the one provider error type (the only place that knows them)."""
    import aiohttp

    where = " mid-stream" if mid_stream else ""
    if isinstance(exc, TimeoutError):  # aiohttp's connect and read timeouts are TimeoutErrors too
        return ProviderError(f"Azure OpenAI timed out{where}", provider=NAME, kind="timeout", retryable=True)
    if isinstance(exc, aiohttp.ClientError | ConnectionError):
        return ProviderError(f"Azure OpenAI connection failed{where}", provider=NAME, kind="connection", retryable=True)
    return ProviderError(f"Azure OpenAI returned an unreadable response{where}", provider=NAME, kind="malformed",
                         retryable=True)


def _status_error(status: int, headers: Any, detail: str) -> ProviderError:
    retry_after = _retry_after(headers)
    if status == 429:
        return ProviderError(f"Azure OpenAI is throttling ({detail})", provider=NAME, kind="rate_limited",
                             retryable=True, upstream_status=status, retry_after=retry_after)
    if status >= 500 or status == 408:
        return ProviderError(f"Azure OpenAI failed with {status} ({detail})", provider=NAME, kind="server_error",
                             retryable=True, upstream_status=status, retry_after=retry_after)
    if status == 404:  # DeploymentNotFound or an unknown api-version: our configuration, not the caller's request
        return ProviderError(f"Azure OpenAI has no such deployment ({detail})", provider=NAME, kind="server_error",
                             retryable=True, upstream_status=status)
    if status in (401, 403):
        return ProviderError("the gateway's credentials were refused by Azure OpenAI", provider=NAME, kind="auth",
                             retryable=True, upstream_status=status)
    if status == 400 and "content_filter" in detail:
        # A policy decision about this prompt, not an outage: never retried on another target.
        return ProviderError("Azure OpenAI's content filter refused the prompt; change the messages and retry",
                             provider=NAME, kind="content_filter", retryable=False, upstream_status=status,
                             param="messages")
    return ProviderError(f"Azure OpenAI rejected the request: {detail}", provider=NAME, kind="bad_request",
                         retryable=False, upstream_status=status)


def _upstream_message(status: int, raw: bytes) -> str:
    """``code: message`` from an error answer's ``error`` object, else the status."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    error = body.get("error", body) if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = str(error.get("message") or "") if isinstance(error, dict) else ""
    # Upstream messages can quote the prompt (e.g. validation errors): keep them short.
    return f"{code or status}: {message[:200]}" if message else str(code or status)


def _retry_after(headers: Any) -> float | None:
    for name in ("retry-after-ms", "retry-after"):
        value = seconds(headers.get(name) if headers is not None else None)
        if value is not None:
            return value / 1000 if name == "retry-after-ms" else value
    return None

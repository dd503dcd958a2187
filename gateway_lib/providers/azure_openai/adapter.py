"""Azure OpenAI adapter on the official ``openai`` SDK (async client).

Auth is an Entra token provider (managed identity in Azure) or, for local
development only, an api-key. SDK retries are off (``max_retries=0``): the gateway's
own fallback decides what happens after a 429 or 5xx, and hidden retries would
both delay that decision and hide the throttling from it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway_lib.config.catalog import Target
from gateway_lib.errors import ProviderError
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.azure_openai.config import AzureOpenAISettings
from gateway_lib.providers.base import CallContext, Completion, ProviderSettings, StreamEvent, Unsupported, seconds, usage_of

NAME = "azure_openai"
_PATH = "/chat/completions"  # the Azure client prefixes /openai/deployments/{model}
TokenProvider = Callable[[], Awaitable[str]]

# Caller fields forwarded verbatim when set; everything else is gateway-only.
_PASSTHROUGH = ("temperature", "top_p", "stop", "user", "response_format", "tools", "tool_choice",
                "parallel_tool_calls", "presence_penalty", "frequency_penalty", "seed")


class AzureOpenAIProvider:
    name = NAME

    def __init__(self, section: AzureOpenAISettings, shared: ProviderSettings,
                 token_provider: TokenProvider | None = None) -> None:
        self._section, self._shared = section, shared
        self._token_provider = token_provider
        self._clients: dict[str, Any] = {}  # endpoint -> AsyncAzureOpenAI, reused across invocations

    # Both calls go through the SDK's client (auth, endpoint and deployment routing, timeouts, status
    # errors, SSE decoding) by its generic ``post`` with ``cast_to=object``, which hands back the wire
    # JSON: the gateway relays dicts. The typed ``chat.completions.create`` walks the request through the
    # SDK's TypedDict transform and builds a pydantic model per answer or SSE chunk, only for us to dump
    # it again: together ~1 ms per call and ~4 ms per stream (docs/benchmarks.md).

    def check(self, request: ChatRequest, target: Target) -> Unsupported | None:
        return None  # Azure OpenAI takes every chat request the schema accepts; capabilities cover the rest

    async def complete(self, request: ChatRequest, target: Target, ctx: CallContext) -> Completion:
        client = self._client(target)
        try:
            body = _json_object(await client.post(_PATH, cast_to=object, body=_body(request, target, ctx),
                                                  options={"headers": _headers(ctx)}))
        except Exception as exc:
            raise _translate(exc) from exc
        return Completion(body=body, usage=usage_of(body.get("usage"), "prompt_tokens", "completion_tokens"))

    async def stream(self, request: ChatRequest, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        import openai

        client = self._client(target)
        body = _body(request, target, ctx) | {"stream": True, "stream_options": {"include_usage": True}}
        try:  # status errors surface here, before any chunk
            chunks = await client.post(_PATH, cast_to=object, body=body, options={"headers": _headers(ctx)},
                                       stream=True, stream_cls=openai.AsyncStream[object])
        except Exception as exc:
            raise _translate(exc) from exc
        try:
            # The SSE lines themselves rather than the SDK's decoded events: each chunk's JSON is parsed
            # once (usage, text) and relayed as received, not re-encoded; events that arrived in one read
            # are marked so the pipeline writes them to the caller in one write.
            tail = b""
            async for received in chunks.response.aiter_bytes():
                lines = (tail + received).split(b"\n")
                tail = lines.pop()  # an incomplete line waits for the next read
                for event in _events(lines):
                    yield event
            for event in _events([tail]):
                yield event
        except ProviderError:
            raise
        except Exception as exc:
            raise _translate(exc, mid_stream=True) from exc
        finally:
            await chunks.close()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def _client(self, target: Target) -> Any:
        endpoint = target.endpoint or self._section.endpoint
        if endpoint is None:  # settings validation makes this unreachable; keep the message clear anyway
            raise ProviderError("no Azure OpenAI endpoint configured", provider=NAME, kind="server_error",
                                retryable=False)
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = self._new_client(endpoint)
        return client

    def _new_client(self, endpoint: str) -> Any:
        import openai  # heavy: imported on first use to keep cold start short

        s, shared = self._section, self._shared
        auth: dict[str, Any]
        if s.auth == "api_key":
            auth = {"api_key": s.api_key}
        else:
            auth = {"azure_ad_token_provider": self._token_provider or _managed_identity_provider(s, shared)}
        timeout = openai.Timeout(shared.upstream_timeout_seconds, connect=shared.connect_timeout_seconds)
        # aiohttp under the SDK's HTTP client (the ``openai[aiohttp]`` transport): the default httpx
        # pool walks every pooled connection, polling its socket, on each request; with a few dozen
        # connections open that pool was a third of the gateway's CPU per request.
        return openai.AsyncAzureOpenAI(
            azure_endpoint=endpoint, api_version=s.api_version, max_retries=0, timeout=timeout,
            http_client=openai.DefaultAioHttpClient(timeout=timeout), **auth,
        )


def _managed_identity_provider(s: AzureOpenAISettings, shared: ProviderSettings) -> TokenProvider:
    """Entra token provider: the Function's user-assigned identity in Azure, the default chain elsewhere."""
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential, get_bearer_token_provider

    credential = (ManagedIdentityCredential(client_id=shared.azure_client_id) if shared.azure_client_id
                  else DefaultAzureCredential())
    return get_bearer_token_provider(credential, s.token_scope)


def _body(request: ChatRequest, target: Target, ctx: CallContext) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.deployment,
        "messages": [m.model_dump(mode="json", exclude_none=True) for m in request.messages],
    }
    for field in _PASSTHROUGH:
        value = getattr(request, field)
        if value is not None:
            body[field] = value
    cap = ctx.max_tokens or request.requested_max_tokens
    if cap is not None:
        body["max_completion_tokens" if request.max_completion_tokens else "max_tokens"] = cap
    return body


def _headers(ctx: CallContext) -> dict[str, str]:
    headers = {"x-ms-client-request-id": ctx.request_id}
    if ctx.traceparent:
        headers["traceparent"] = ctx.traceparent
    return headers


def _json_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("choices"), list):
        raise ValueError("not a chat completion object")
    return value


def _events(lines: list[bytes]) -> list[StreamEvent]:
    """The events of complete SSE lines that arrived together, all but the last marked ``more``."""
    events = []
    for line in lines:
        data = _sse_data(line)
        if data is None:
            continue
        event = _event(_chunk(data), data)
        if event is not None:
            events.append(event)
    for event in events[:-1]:
        event.more = True
    return events


def _sse_data(line: bytes) -> bytes | None:
    """The payload of one ``data:`` line; None for comments, other fields, blank lines and ``[DONE]``."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    return None if data == b"[DONE]" else data


def _chunk(data: bytes) -> dict[str, Any]:
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError("SSE data is not a JSON object")
    if chunk.get("error"):  # Azure reports a failure inside an open stream as an error event
        raise ProviderError("Azure OpenAI reported an error mid-stream", provider=NAME, kind="server_error",
                            retryable=True)
    return chunk


def _event(chunk: dict[str, Any], raw: bytes | None = None) -> StreamEvent | None:
    usage = chunk.get("usage")
    choices = chunk.get("choices") or []
    if not choices and not usage:
        return None  # Azure's prompt_filter_results preamble: OpenAI clients expect choices[0]
    text = "".join(str((c.get("delta") or {}).get("content") or "") for c in choices)
    text += "".join(str(((tc.get("function") or {}).get("arguments")) or "")
                    for c in choices for tc in (c.get("delta") or {}).get("tool_calls") or [])
    parsed = usage_of(usage, "prompt_tokens", "completion_tokens")
    return StreamEvent(chunk=chunk, usage=parsed, text=text, raw=raw)


def _translate(exc: Exception, mid_stream: bool = False) -> ProviderError:
    """Map SDK exceptions onto the one provider error type (the only place that knows them)."""
    import aiohttp
    import openai

    where = " mid-stream" if mid_stream else ""
    # Mid-stream reads bypass the SDK's own mapping: its HTTP client's errors arrive, the transport's inside.
    timed_out = isinstance(exc, openai.APITimeoutError) or (mid_stream and _caused_by(exc, TimeoutError))
    if timed_out and not _refused(exc):
        return ProviderError(f"Azure OpenAI timed out{where}", provider=NAME, kind="timeout", retryable=True)
    if isinstance(exc, openai.APIConnectionError) or (mid_stream and _caused_by(exc, aiohttp.ClientError)):
        return ProviderError(f"Azure OpenAI connection failed{where}", provider=NAME, kind="connection", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc.status_code, exc.response.headers, _upstream_message(exc))
    if isinstance(exc, openai.APIError):  # an error event inside an SSE stream
        return ProviderError(f"Azure OpenAI reported an error{where}", provider=NAME, kind="server_error",
                             retryable=True)
    return ProviderError(f"Azure OpenAI returned an unreadable response{where}", provider=NAME, kind="malformed",
                         retryable=True)


def _refused(exc: BaseException) -> bool:
    """A refused or reset connection somewhere under ``exc``: the aiohttp transport reports every
    connection failure as a connect *timeout*, the refusal itself stays in the exception chain."""
    return _caused_by(exc, ConnectionError)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


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


def _upstream_message(exc: Any) -> str:
    body = exc.body if isinstance(getattr(exc, "body", None), dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = error.get("code") if isinstance(error, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    # Upstream messages can quote the prompt (e.g. validation errors): keep them short.
    return f"{code or exc.status_code}: {message[:200]}" if message else str(code or exc.status_code)


def _retry_after(headers: Any) -> float | None:
    for name in ("retry-after-ms", "retry-after"):
        value = seconds(headers.get(name) if headers is not None else None)
        if value is not None:
            return value / 1000 if name == "retry-after-ms" else value
    return None


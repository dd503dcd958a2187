"""AWS Bedrock adapter: boto3 ``bedrock-runtime`` calls for the operations of ``operations.OPERATIONS``.

boto3 is blocking, so every call runs in a bounded thread pool owned by the adapter
(one pool, sized with the HTTP connection pool, so threads never wait on sockets).
A stream is read **one event per pool job** rather than by a thread pinned to the
stream: backpressure comes for free (nothing is read before the caller is ready), and
a slow reader never holds a thread, so many streams cannot starve plain calls.

botocore's own retries are off: a throttle must reach the gateway's router at once so
it can fall back, not be retried here with sleeps. Note ``total_max_attempts=1``, not
``max_attempts=1``: botocore's ``max_attempts`` counts *retries*, so 1 still means two
requests (pinned by the simulator test that counts upstream calls).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from gateway_lib.config.catalog import Target
from gateway_lib.errors import ProviderError
from gateway_lib.providers.base import CallContext, Completion, ProviderSettings, StreamEvent, Unsupported, seconds
from gateway_lib.providers.bedrock.config import BedrockSettings
from gateway_lib.providers.bedrock.credentials import FederationError, TokenProvider, botocore_session, build_credentials
from gateway_lib.providers.bedrock.operations import OPERATIONS
from gateway_lib.providers.bedrock.transform import PROVIDER, error_from_aws

if TYPE_CHECKING:
    from botocore.credentials import Credentials
    from botocore.session import Session

T = TypeVar("T")
_traceparent: contextvars.ContextVar[str | None] = contextvars.ContextVar("bedrock_traceparent", default=None)
_END = object()


class BedrockProvider:
    name = PROVIDER

    def __init__(self, section: BedrockSettings, shared: ProviderSettings, *, credentials: Credentials | None = None,
                 web_identity_token: TokenProvider | None = None, max_workers: int = 32,
                 clock: Callable[[], float] = time.time) -> None:
        """``credentials`` wins; else federation per settings (``web_identity_token`` replaces
        the managed identity, for tests and the local stack); else the standard AWS chain."""
        self._section, self._shared = section, shared
        self._credentials = credentials
        self._web_identity_token = web_identity_token
        self._max_workers = max_workers
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="bedrock")
        self._session: Session | None = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()  # clients are built in pool threads

    def check(self, request: Any, target: Target) -> Unsupported | None:
        """What this operation's translation cannot carry to ``target`` (images by URL, tools on a model
        without); the row of ``operations.OPERATIONS`` says."""
        operation = OPERATIONS.get(request.operation)
        if operation is None:
            return Unsupported(f"Bedrock has no {request.operation}", code="unsupported_operation")
        return operation.check(request, target)

    async def complete(self, request: Any, target: Target, ctx: CallContext) -> Completion:
        return await OPERATIONS[request.operation].complete(self, request, target, ctx, int(self._clock()))

    async def stream(self, request: Any, target: Target, ctx: CallContext) -> AsyncIterator[StreamEvent]:
        """Opens the stream and reads its first event before yielding, so any error
        (HTTP status, or an exception event first thing) surfaces on the first ``__anext__``."""
        streamed = OPERATIONS[request.operation].stream
        assert streamed is not None  # routing asks capabilities, which name only operations that stream
        call = streamed(request, target, ctx, int(self._clock()))
        response = await self._run(ctx, self._call, target.region, call.method, call.kwargs)
        events = response[call.key]
        try:
            iterator = iter(events)
            while (event := await self._run(ctx, _next_event, iterator)) is not _END:
                for out in call.translator.translate(event):
                    yield out
        finally:
            events.close()  # cancellation or an early stop: release the connection now

    # ------------------------------------------------------------ the calls operations make (``operation.Calls``)

    async def converse(self, ctx: CallContext, region: str, kwargs: dict[str, Any]) -> Any:
        return await self._run(ctx, self._call, region, "converse", kwargs)

    async def invoke(self, ctx: CallContext, region: str, kwargs: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        return await self._run(ctx, self._invoke, region, kwargs)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    # ------------------------------------------------------------ threads and errors

    async def _run(self, ctx: CallContext, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn`` in the pool, with the traceparent visible to botocore's hook."""
        context = contextvars.copy_context()  # run_in_executor does not copy it by itself
        context.run(_traceparent.set, ctx.traceparent)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: context.run(fn, *args))
        except ProviderError:
            raise
        except Exception as exc:
            raise translate_exception(exc) from exc

    def _call(self, region: str, operation: str, kwargs: dict[str, Any]) -> Any:
        return getattr(self._client(region), operation)(**kwargs)

    def _invoke(self, region: str, kwargs: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """InvokeModel, its body read in the same pool job (reading it blocks too)."""
        response = self._client(region).invoke_model(**kwargs)
        body = response["body"]
        try:
            return bytes(body.read()), response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        finally:
            body.close()

    def _client(self, region: str) -> Any:
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._clients[region] = self._new_client(region)
            return client

    def _new_client(self, region: str) -> Any:
        from botocore.config import Config

        if self._session is None:
            credentials = self._credentials or build_credentials(self._section, self._shared,
                                                                 token_provider=self._web_identity_token)
            self._session = botocore_session(credentials)
        config = Config(
            region_name=region, retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self._shared.connect_timeout_seconds,
            read_timeout=self._shared.upstream_timeout_seconds,
            max_pool_connections=self._max_workers, user_agent_extra="ai-gateway")
        client = self._session.create_client("bedrock-runtime", region_name=region, config=config,
                                             endpoint_url=self._section.endpoint_url)
        client.meta.events.register("before-sign.bedrock-runtime", _add_traceparent)
        return client


def _next_event(iterator: Iterator[dict[str, Any]]) -> Any:
    return next(iterator, _END)


def _add_traceparent(request: Any, **_: Any) -> None:
    if traceparent := _traceparent.get():
        request.headers["traceparent"] = traceparent


def translate_exception(exc: Exception) -> ProviderError:
    """The one boundary where botocore/urllib3 failures become our ProviderError."""
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux  # a cut event stream surfaces raw urllib3 errors

    if isinstance(exc, bx.ClientError):  # includes EventStreamError (an exception event mid-stream)
        return _from_client_error(exc)
    if isinstance(exc, bx.ReadTimeoutError | ux.ReadTimeoutError):
        return ProviderError("Bedrock did not answer in time.", provider=PROVIDER, kind="timeout", retryable=True)
    if isinstance(exc, bx.ConnectTimeoutError | bx.EndpointConnectionError | bx.ConnectionClosedError
                  | bx.ResponseStreamingError | bx.HTTPClientError | ux.HTTPError):
        return ProviderError(f"Could not reach Bedrock ({type(exc).__name__}).", provider=PROVIDER,
                             kind="connection", retryable=True)
    if isinstance(exc, FederationError | bx.NoCredentialsError | bx.PartialCredentialsError):
        return ProviderError("The gateway could not obtain AWS credentials.", provider=PROVIDER, kind="auth",
                             retryable=True)
    return ProviderError(f"Bedrock call failed ({type(exc).__name__}).", provider=PROVIDER, kind="malformed",
                         retryable=True)


def _from_client_error(exc: Any) -> ProviderError:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    if getattr(exc, "operation_name", "") == "AssumeRoleWithWebIdentity":
        return ProviderError("The gateway could not obtain AWS credentials.", provider=PROVIDER, kind="auth",
                             retryable=True, upstream_status=status)
    return error_from_aws(str(error.get("Code", "")), status, str(error.get("Message", "")),
                          _retry_after(meta.get("HTTPHeaders", {})))


def _retry_after(headers: dict[str, str]) -> float | None:
    return seconds(headers.get("retry-after") or headers.get("x-amzn-retry-after"))

"""The HTTP edge: request scope, body reading under a cap, and rendering.

Everything here speaks Starlette types, which are exactly what the Functions
``azurefunctions-extensions-http-fastapi`` extension hands to and takes from our
functions, so the same code runs under the Functions host and the local host.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from gateway_lib.auth.identity import Caller
from gateway_lib.errors import (
    ClientDisconnected,
    GatewayError,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from gateway_lib.http import strict_json
from gateway_lib.http.tracecontext import accept_request_id, child_traceparent, parse_traceparent
from gateway_lib.storage.base import StorageError

_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps builds an encoder per call when given options
_UTF8_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

log = logging.getLogger("gateway.edge")



@dataclass
class Scope:
    """Per-request facts every step may read: ids, timing, the route."""

    request_id: str
    trace_id: str
    traceparent: str  # the W3C header we send upstream: the caller's trace, our span
    route: str
    started: float = field(default_factory=time.perf_counter)
    upstream_ms: float = 0.0
    label: str | None = None  # APIM subscription name: a label, never identity
    caller: Caller | None = None  # set once authenticated
    recorded: bool = False  # the request's telemetry record was emitted
    model: str | None = None  # the model the request named, for a record made at the edge
    error_code: str | None = None  # the code of the error the request was answered with

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def overhead_ms(self) -> float:
        return max(0.0, self.elapsed_ms() - self.upstream_ms)

    def headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id, "x-gateway-overhead-ms": f"{self.overhead_ms():.2f}"}


def begin(request: Request, route: str) -> Scope:
    """Open the scope: accept a well-formed caller x-request-id / traceparent, otherwise mint new ones."""
    ours = child_traceparent(parse_traceparent(request.headers.get("traceparent")))
    label = request.headers.get("x-apim-subscription") or None
    return Scope(request_id=accept_request_id(request.headers.get("x-request-id")), trace_id=ours.trace_id,
                 traceparent=ours.traceparent, route=route, label=label[:128] if label else None)


async def read_json(request: Request, max_bytes: int) -> Any:
    """Read a JSON body: 415 for the wrong type, 413 past the cap (before parsing), 400 when unreadable."""
    _check_media_type(request.headers.get("content-type", ""), request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:  # chunked uploads carry no Content-Length: count as we read
                raise _too_large(max_bytes)
    except ClientDisconnect:  # the caller hung up mid-upload: theirs to retry, not a failure of ours (a 500)
        raise ClientDisconnected() from None
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_body")
    try:
        return strict_json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidRequest(f"The request body is not valid JSON{where}.", code="invalid_json") from None
    except RecursionError:  # e.g. 100k nested "[": valid JSON under the size cap, but past the parser's depth
        raise InvalidRequest("The request body nests too deeply.", code="invalid_json") from None
    except ValueError:  # an integer over Python's 4,300-digit conversion limit
        raise InvalidRequest("The request body holds a number too long to read.", code="invalid_json") from None


def _check_media_type(content_type: str, content_encoding: str | None) -> None:
    """415 for a body we would misread: not JSON, not UTF-8 (RFC 8259 8.1), or compressed (nothing decodes it)."""
    media_type, *params = content_type.split(";")
    if media_type.strip().lower() != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json.", param="content-type")
    for name, _, value in (p.partition("=") for p in params):
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"charset {charset[:32]!r} is not supported; send JSON in UTF-8.",
                                       param="content-type")
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {content_encoding.strip()[:32]!r} is not supported; send the "
                                   "body uncompressed.", param="content-encoding")


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body exceeds the {max_bytes}-byte limit.")


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            return _UTF8_JSON.encode(content).encode("utf-8")  # JSONResponse.render's options, encoder built once
        except UnicodeEncodeError:  # a lone surrogate from upstream: escaped, since the call is already paid for
            return _COMPACT.encode(content).encode()


def json_response(body: Any, scope: Scope, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return _JSON(body, status_code=status, headers=scope.headers() | (headers or {}))


def relayed_json(raw: bytes, scope: Scope, headers: dict[str, str] | None = None) -> Response:
    """A 200 whose body is an upstream's JSON exactly as it came (parsed once for its usage, not encoded again)."""
    return Response(raw, media_type="application/json", headers=scope.headers() | (headers or {}))


ErrorShape = Callable[[GatewayError], Any]


def error_response(error: GatewayError, scope: Scope, shape: ErrorShape | None = None) -> Response:
    """The error in the route's dialect (OpenAI's by default; Anthropic's on /messages)."""
    scope.error_code = error.code
    headers = scope.headers() | error.headers
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse((shape or GatewayError.body)(error), status_code=error.status, headers=headers)


async def guarded(scope: Scope, handler: Callable[[], Awaitable[Response]], shape: ErrorShape | None = None) -> Response:
    """Run a handler; our errors render as themselves, anything else as a generic 500 (logged, not shown)."""
    try:
        return await handler()
    except GatewayError as error:
        return error_response(error, scope, shape)
    except StorageError:
        log.error("storage unavailable", extra={"custom_dimensions": {"request_id": scope.request_id,
                                                                      "route": scope.route}})
        return error_response(ServiceUnavailable("Gateway storage is unavailable; retry shortly.",
                                                 code="storage_unavailable", retry_after=5), scope, shape)
    except Exception:
        # Only the exception type and the code locations: messages can quote request content.
        exc_type, _, tb = sys.exc_info()
        log.error("unhandled %s", exc_type.__name__ if exc_type else "error", extra={"custom_dimensions": {
            "request_id": scope.request_id, "route": scope.route,
            "stack": "".join(traceback.format_tb(tb)[-8:])}})
        return error_response(InternalError(), scope, shape)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + _COMPACT.encode(data).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def path_param(request: Request, name: str, after: str) -> str:
    """A route parameter: as the host passed it, else the path segment after ``after`` (the HTTP-streams
    worker syncs route parameters into ``path_params`` only when its request scope already has them)."""
    value = request.path_params.get(name)
    if value is None:
        parts = request.url.path.split("/")
        value = parts[parts.index(after) + 1] if after in parts[:-1] else ""
    return str(value)

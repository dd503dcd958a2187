"""The gateway's one error tree.

Every failure a caller can see is a ``GatewayError``. Each class knows its HTTP
status and its OpenAI error ``type``; instances carry ``code``, ``param`` and an
optional Retry-After. ``render.error_body`` turns any of them into the OpenAI
shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class GatewayError(Exception):
    """Base class: an error with a status code, an OpenAI type and a message safe to show."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})
        self.attempts: list[Any] = []  # provider attempts made before this error (set by the fallback executor)

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class ContentFiltered(InvalidRequest):
    default_code = "content_filter"


class AuthenticationFailed(GatewayError):
    """401: missing or invalid token. Rendered with ``WWW-Authenticate: Bearer error="invalid_token"``."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_token"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_scope"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(GatewayError):
    """429 for a rate limit (requests or tokens per minute). Always carries Retry-After."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    """429 when a token or USD budget for the day/month is spent."""

    status = 429
    type = "insufficient_quota"
    default_code = "insufficient_quota"


class InternalError(GatewayError):
    """500: a bug. The message is always generic; details go to the log only."""

    status = 500
    type = "server_error"
    default_code = "internal_error"

    def __init__(self, message: str = "The gateway hit an internal error. Quote the x-request-id when reporting it.") -> None:
        super().__init__(message)


class ClientDisconnected(GatewayError):
    """The caller went away before the answer (never rendered; recorded with nginx's 499)."""

    status = 499
    type = "client_disconnected"
    default_code = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("The caller closed the connection before the answer.")


class UpstreamError(GatewayError):
    """502: the provider answered with something unusable."""

    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class ServiceUnavailable(GatewayError):
    """503: no target could serve, or a dependency (storage) is down."""

    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class GatewayTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"


class ProviderError(GatewayError):
    """An upstream failure, raised only by provider adapters.

    ``retryable`` tells the router whether the next target may be tried: 429, 5xx,
    timeouts and connection errors are; the caller's own mistakes (other 4xx) are not.
    ``upstream_status`` is the provider's status (None for connection errors/timeouts).
    The HTTP status shown to the caller is derived from the kind of failure.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        kind: str,
        retryable: bool,
        upstream_status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        consumed: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__(message, code=kind, param=param, retry_after=retry_after)
        self.provider = provider
        self.kind = kind  # rate_limited | server_error | timeout | connection | bad_request | auth | malformed
        self.retryable = retryable
        self.upstream_status = upstream_status
        # (prompt, completion) tokens the provider billed before the failure (some of a fan-out's calls answered)
        self.consumed = consumed
        self.status, self.type = _PROVIDER_STATUS.get(kind, (502, "upstream_error"))


_PROVIDER_STATUS: dict[str, tuple[int, str]] = {
    "rate_limited": (429, "rate_limit_error"),
    "server_error": (502, "upstream_error"),
    "timeout": (504, "upstream_error"),
    "connection": (502, "upstream_error"),
    "bad_request": (400, "invalid_request_error"),
    "auth": (502, "upstream_error"),  # our credentials failed upstream: not the caller's fault
    "malformed": (502, "upstream_error"),
    "content_filter": (400, "invalid_request_error"),
}

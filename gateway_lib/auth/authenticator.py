"""Authenticate a request: an Entra ID access token in ``Authorization: Bearer`` becomes a ``Caller``.

Order matters: everything an attacker controls for free (query string, header size, shape,
``alg``) is checked before any key lookup, so forged tokens cost no JWKS traffic. See
docs/auth.md for the rules and the roles -> tiers mapping.

401s carry ``WWW-Authenticate: Bearer`` when no credentials were sent (RFC 6750 §3.1: no
error code then) and ``Bearer error="invalid_token", error_description="..."`` otherwise;
403s carry ``error="insufficient_scope"``. Messages say what is wrong and never echo the token.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jwt

from gateway_lib.auth.entitlements import caller_from_claims
from gateway_lib.auth.identity import Caller
from gateway_lib.auth.jwks import JwksCache, JwksUnavailable, KeySource, KeyUnavailable
from gateway_lib.config.settings import AuthSettings
from gateway_lib.config.tiers import TierPolicy
from gateway_lib.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable

MAX_AUTHORIZATION_BYTES = 16 * 1024  # Entra tokens are 1-4 KiB; group overage keeps them well below this
# `code` is not listed: it is how the Functions host takes a function key (?code=...). A JWT-shaped
# value is still refused in any parameter, `code` included, and so is a JWT anywhere in a name or value
# (`?Bearer%20eyJ...`, a bare `?eyJ...`): _JWT_INSIDE below.
_TOKEN_QUERY_PARAMS = frozenset({"access_token", "token", "id_token", "jwt", "bearer", "authorization"})
_JWT_INSIDE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.")  # a JWT anywhere: "Bearer eyJ...", a bare key
_JWS_COMPACT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")  # empty signature: alg none
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_REQUIRED_CLAIMS = ["exp", "nbf", "iat", "iss", "aud", "tid"]
_TIME_CLAIMS = ("exp", "nbf", "iat")
# A caller sends the same token for up to an hour; verifying its RS256 signature and claims again on
# every request was the largest single cost of a request (about a fifth of its CPU). A verified token
# is trusted again, without re-verification, until it expires or for this long, whichever is first:
# the window in which a signing key withdrawn from the JWKS still admits tokens it signed earlier.
VERIFIED_TOKEN_TTL_SECONDS = 60.0
VERIFIED_TOKENS_KEPT = 4096  # about 1 KiB each (digest + claims)
LABELS_KEPT_PER_TOKEN = 4  # callers kept per token, one per subscription label (a client-set header)


class Authenticator:
    """Validates bearer tokens against AuthSettings and maps them to callers with TierPolicy."""

    def __init__(self, settings: AuthSettings, policy: TierPolicy, keys: KeySource | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._policy = policy
        self._keys = keys if keys is not None else JwksCache.from_settings(settings)
        self._issuers = _trusted_issuers(settings)
        self._allowed_tenants = frozenset(t.lower() for t in settings.allowed_tenants or settings.tenant_ids)
        # The first of AUTH_TENANT_IDS is the gateway's home tenant: only its admins administer the gateway.
        self._admin_tenants = frozenset(t.lower() for t in settings.tenant_ids[:1])
        self._verified = _VerifiedTokens(clock, settings.leeway_seconds)

    async def authenticate(
        self, headers: Mapping[str, str], query: Mapping[str, str], label: str | None = None
    ) -> Caller:
        """The verified caller; raises AuthenticationFailed (401), PermissionDenied (403) or 503 without keys."""
        try:
            token = bearer_token(headers, query)
            claims, callers = await self._verified_claims(token)
            caller = callers.get(label)
            if caller is None:  # pure in the claims, the policy and the label: built once per token and label
                caller = caller_from_claims(claims, self._policy, label, admin_tenants=self._admin_tenants)
                if len(callers) < LABELS_KEPT_PER_TOKEN:
                    callers[label] = caller
            return caller
        except AuthenticationFailed as exc:
            exc.headers.setdefault("WWW-Authenticate", _challenge("invalid_token", exc.message))
            raise
        except PermissionDenied as exc:
            exc.headers.setdefault("WWW-Authenticate", _challenge("insufficient_scope", exc.message))
            raise

    async def _verified_claims(self, token: str) -> tuple[dict[str, Any], dict[str | None, Caller]]:
        """The token's claims and its callers built so far, by label."""
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._verified.entry(digest)
        if hit is not None:
            return hit
        alg, kid = self._checked_header(token)
        key = await self._key(kid, alg)
        claims = _decode(token, key, self._settings)
        self._check_issuer(claims)
        return self._verified.put(digest, claims)

    def _checked_header(self, token: str) -> tuple[str, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationFailed("token header is not valid JSON Web Token encoding") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._settings.algorithms:
            raise AuthenticationFailed(
                f"token algorithm '{_safe(alg)}' is not accepted; expected {', '.join(self._settings.algorithms)}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationFailed("token header has no key id (kid)")
        return alg, kid

    async def _key(self, kid: str, alg: str) -> jwt.PyJWK:
        try:
            return await self._keys.get_key(kid, alg)
        except KeyUnavailable:
            raise AuthenticationFailed("token is signed with an unknown key (kid)") from None
        except JwksUnavailable:
            raise ServiceUnavailable(
                "the gateway cannot load its token signing keys; retry shortly", retry_after=5
            ) from None

    def _check_issuer(self, claims: Mapping[str, Any]) -> None:
        issuer, tid = claims.get("iss"), claims.get("tid")
        if not isinstance(issuer, str) or issuer not in self._issuers:
            raise AuthenticationFailed("token issuer is not trusted")
        if not isinstance(tid, str):
            raise AuthenticationFailed("token tenant claim (tid) is not a string")
        issuer_tenant = self._issuers[issuer]
        if issuer_tenant is not None and tid.lower() != issuer_tenant:
            raise AuthenticationFailed("token tenant (tid) does not match its issuer")
        if tid.lower() not in self._allowed_tenants:
            raise AuthenticationFailed("token tenant (tid) is not allowed")


class _VerifiedTokens:
    """Claims of tokens that passed every check, by SHA-256 of the exact token (a bounded LRU).

    Only a byte-identical token hits, so nothing an attacker can send without the token itself
    reaches a cached entry; expiry is checked on every hit.
    """

    def __init__(self, clock: Callable[[], float], leeway: float) -> None:
        self._clock, self._leeway = clock, leeway
        self._entries: OrderedDict[bytes, tuple[float, dict[str, Any], dict[str | None, Caller]]] = OrderedDict()

    def get(self, digest: bytes) -> dict[str, Any] | None:
        hit = self.entry(digest)
        return None if hit is None else hit[0]

    def entry(self, digest: bytes) -> tuple[dict[str, Any], dict[str | None, Caller]] | None:
        """The claims and the callers built from them (by label), while the entry lasts."""
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if self._clock() >= hit[0]:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return hit[1], hit[2]

    def put(self, digest: bytes, claims: dict[str, Any]) -> tuple[dict[str, Any], dict[str | None, Caller]]:
        now = self._clock()
        until = min(float(claims["exp"]) + self._leeway, now + VERIFIED_TOKEN_TTL_SECONDS)
        self._entries[digest] = (until, claims, {})
        self._entries.move_to_end(digest)
        while len(self._entries) > VERIFIED_TOKENS_KEPT:
            self._entries.popitem(last=False)
        return claims, self._entries[digest][2]


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The compact JWS from ``Authorization: Bearer``; rejects tokens anywhere else."""
    _reject_token_in_query(query)
    values = [v for k, v in headers.items() if k.lower() == "authorization"]
    if not values:
        raise AuthenticationFailed(
            "missing Authorization header; send 'Authorization: Bearer <token>'",
            code="missing_token", headers={"WWW-Authenticate": "Bearer"},
        )
    if len(values) > 1:
        raise AuthenticationFailed("more than one Authorization header")
    value = values[0]
    if len(value.encode("utf-8", "replace")) > MAX_AUTHORIZATION_BYTES:
        raise AuthenticationFailed(f"Authorization header is larger than {MAX_AUTHORIZATION_BYTES} bytes")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationFailed("Authorization scheme must be Bearer")
    token = token.strip()
    if not _JWS_COMPACT.match(token):
        raise AuthenticationFailed("bearer token is not a JSON Web Token (three base64url segments)")
    return token


def _reject_token_in_query(query: Mapping[str, str]) -> None:
    # A token in a URL lands in proxy, APIM and browser logs: refuse it even if a header is present too.
    # Starlette's QueryParams.items() keeps only the last value of a repeated name; multi_items() has all.
    multi_items = getattr(query, "multi_items", None)
    for name, value in multi_items() if callable(multi_items) else query.items():
        if name.lower() in _TOKEN_QUERY_PARAMS or _JWT_INSIDE.search(name) or _JWT_INSIDE.search(value or ""):
            raise AuthenticationFailed(
                "tokens are accepted only in the Authorization header (Bearer); remove the token from the query string"
            )


def _decode(token: str, key: jwt.PyJWK, settings: AuthSettings) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=list(settings.algorithms), audience=list(settings.audiences),
            leeway=settings.leeway_seconds,
            options={"require": _REQUIRED_CLAIMS, "verify_iss": False},  # issuer + tid checked together below
        )
    except jwt.PyJWTError as exc:
        raise AuthenticationFailed(_describe(exc)) from None
    _times_are_numbers(claims)
    return claims


def _times_are_numbers(claims: Mapping[str, Any]) -> None:
    # RFC 7519 2 makes them NumericDate, a JSON number; pyjwt takes whatever int() takes ("9999999999", true).
    for name in _TIME_CLAIMS:
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise AuthenticationFailed(f"token claim '{name}' is not a number")


def _describe(exc: jwt.PyJWTError) -> str:
    # Most specific first: ExpiredSignatureError and friends subclass broader pyjwt errors.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token is not yet valid (nbf or iat is in the future)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the required claim '{exc.claim}'"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is not this gateway"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature is invalid"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm does not match its signing key"
    if isinstance(exc, jwt.DecodeError):
        return "token is malformed"
    return "token is invalid"


def _trusted_issuers(settings: AuthSettings) -> dict[str, str | None]:
    """Exact issuer string -> the tenant it speaks for (None when it names no tenant)."""
    issuers: dict[str, str | None] = {}
    for tenant in (t.lower() for t in settings.tenant_ids):
        issuers[f"https://sts.windows.net/{tenant}/"] = tenant  # v1 access tokens
        issuers[f"https://login.microsoftonline.com/{tenant}/v2.0"] = tenant  # v2 access tokens
    for issuer in settings.extra_issuers:
        match = _GUID.search(issuer)
        issuers[issuer] = match.group(0).lower() if match else None
    return issuers


def _challenge(error: str, description: str) -> str:
    # RFC 6750 §3: error_description allows %x20-21 / %x23-5B / %x5D-7E only (no quote, no backslash).
    safe = "".join(c for c in description if " " <= c <= "~" and c not in '"\\')
    return f'Bearer error="{error}", error_description="{safe}"'


def _safe(value: object) -> str:
    """A short printable rendering of an attacker-supplied header field, for messages."""
    return re.sub(r"[^A-Za-z0-9._-]", "", str(value))[:16]

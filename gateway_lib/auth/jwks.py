"""Signing keys for token validation: a JWKS cache that survives an identity-provider outage.

Keys come from ``AUTH_JWKS_URL``, or from the ``jwks_uri`` of ``AUTH_OPENID_CONFIG_URL``.
Three rules shape the cache:

* Keys live for ``ttl_seconds``; after that the next request refreshes them.
* A ``kid`` we do not know triggers a refetch (Entra rotates keys without notice), but at
  most one fetch attempt per ``min_refresh_seconds``: otherwise tokens with forged kids
  would turn the gateway into an amplifier against the key endpoint.
* A failed refresh keeps serving the keys we have, however old: an Entra or network blip
  must not fail every request. Only a cold cache with an unreachable endpoint fails.

Concurrent requests share one in-flight fetch. The cache belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlparse

import jwt

from gateway_lib.config.settings import AuthSettings

logger = logging.getLogger(__name__)

Fetcher = Callable[[str], Mapping[str, Any]]  # url -> parsed JSON document; blocking, run in a thread
Clock = Callable[[], float]  # monotonic seconds

_ASYMMETRIC_KTY = frozenset({"RSA", "EC", "OKP"})  # never "oct": a shared secret is not a public key
_MAX_DOCUMENT_BYTES = 512 * 1024  # Entra's JWKS is ~10 KiB; refuse anything absurd


class KeyUnavailable(Exception):
    """No key can be found for this ``kid`` (unknown, or unusable with the token's algorithm)."""


class JwksUnavailable(Exception):
    """The cache holds no keys and the key endpoint cannot be reached."""


class KeySource(Protocol):
    async def get_key(self, kid: str, alg: str | None = None) -> jwt.PyJWK: ...


def requests_fetcher(timeout: float = 5.0) -> Fetcher:
    """The default fetcher: a short-timeout GET that returns the JSON body."""

    def fetch(url: str) -> Mapping[str, Any]:
        import requests  # imported on first use to keep cold start short

        response = requests.get(url, timeout=timeout, headers={"Accept": "application/json"})
        response.raise_for_status()
        if len(response.content) > _MAX_DOCUMENT_BYTES:
            raise ValueError(f"document from {url} is larger than {_MAX_DOCUMENT_BYTES} bytes")
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError(f"document from {url} is not a JSON object")
        return document

    return fetch


class JwksCache:
    """Fetches, caches and rate-limits refreshes of a JSON Web Key Set."""

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        openid_config_url: str | None = None,
        ttl_seconds: float = 3600,
        min_refresh_seconds: float = 60,
        fetcher: Fetcher | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not jwks_url and not openid_config_url:
            raise ValueError("JwksCache needs a jwks_url or an openid_config_url")
        self._configured_url = jwks_url
        self._openid_config_url = openid_config_url
        self._discovered_url: str | None = None
        self._ttl = ttl_seconds
        self._min_refresh = min_refresh_seconds
        self._fetch = fetcher or requests_fetcher()
        self._clock = clock
        self._jwks: dict[str, dict[str, Any]] = {}  # kid -> JWK as published
        self._parsed: dict[tuple[str, str | None], jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self.fetch_count = 0  # attempts, for tests and telemetry

    @classmethod
    def from_settings(
        cls, auth: AuthSettings, fetcher: Fetcher | None = None, clock: Clock = time.monotonic
    ) -> JwksCache:
        return cls(
            jwks_url=auth.jwks_url, openid_config_url=auth.openid_config_url,
            ttl_seconds=auth.jwks_cache_ttl_seconds, min_refresh_seconds=auth.jwks_min_refresh_seconds,
            fetcher=fetcher, clock=clock,
        )

    async def get_key(self, kid: str, alg: str | None = None) -> jwt.PyJWK:
        """The key for ``kid``, bound to the JWK's own ``alg`` or else to ``alg``.

        Raises KeyUnavailable for an unknown kid, JwksUnavailable when no keys were ever loaded.
        """
        if self._is_expired():
            await self._refresh_if_allowed()
        if kid not in self._jwks:
            await self._refresh_if_allowed()
        if self._fetched_at is None:
            raise JwksUnavailable("signing keys could not be loaded")
        if kid not in self._jwks:
            raise KeyUnavailable("unknown key id")
        return self._pyjwk(kid, alg)

    def _is_expired(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self._ttl

    async def _refresh_if_allowed(self) -> None:
        if self._inflight is None:
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._min_refresh:
                return
            self._last_attempt = now
            self._inflight = asyncio.ensure_future(self._refresh())
        # shield: a caller that disconnects must not cancel the fetch other requests are waiting on
        await asyncio.shield(self._inflight)

    async def _refresh(self) -> bool:
        self.fetch_count += 1
        try:
            keys = _usable_keys(await self._fetch_jwks())
        except Exception as exc:  # any failure: keep serving what we have
            self._discovered_url = None  # the OpenID document may have moved the keys: rediscover next time
            logger.warning(
                "jwks refresh failed; serving %d cached keys", len(self._jwks),
                extra={"jwks_error": type(exc).__name__, "jwks_detail": str(exc)[:200]},
            )
            return False
        finally:
            self._inflight = None
        self._jwks, self._parsed, self._fetched_at = keys, {}, self._clock()
        return True

    async def _fetch_jwks(self) -> Mapping[str, Any]:
        return await asyncio.to_thread(self._fetch, await self._jwks_url())

    async def _jwks_url(self) -> str:
        if self._configured_url:
            return self._configured_url
        if self._discovered_url is None:
            assert self._openid_config_url is not None
            document = await asyncio.to_thread(self._fetch, self._openid_config_url)
            self._discovered_url = _http_url(document.get("jwks_uri"),
                                             https=self._openid_config_url.lower().startswith("https://"))
        return self._discovered_url

    def _pyjwk(self, kid: str, alg: str | None) -> jwt.PyJWK:
        # Entra's JWKs carry no "alg"; bind them to the token's (already allow-listed) algorithm.
        # A JWK that names its own alg keeps it, so pyjwt refuses a token claiming another one.
        jwk = self._jwks[kid]
        bound = jwk.get("alg") or alg
        if (kid, bound) not in self._parsed:
            try:
                self._parsed[(kid, bound)] = jwt.PyJWK(jwk, algorithm=bound)
            except jwt.PyJWTError as exc:
                raise KeyUnavailable("key is not usable with the token's algorithm") from exc
        return self._parsed[(kid, bound)]


def _usable_keys(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise ValueError("JWKS document has no 'keys' list")
    usable = {
        jwk["kid"]: jwk for jwk in keys
        if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str)
        and jwk.get("kty") in _ASYMMETRIC_KTY and jwk.get("use", "sig") == "sig"
    }
    if not usable:
        raise ValueError("JWKS document has no usable signing keys")
    return usable


def _http_url(value: Any, https: bool) -> str:
    """The discovered jwks_uri: https when the configuration came over https (no downgrade to plain http,
    where the signing keys could be swapped in transit); plain http only for a local issuer."""
    allowed = ("https",) if https else ("http", "https")
    if not isinstance(value, str) or urlparse(value).scheme not in allowed:
        raise ValueError(f"OpenID configuration has no {' or '.join(allowed)} jwks_uri")
    return value

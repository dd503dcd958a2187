"""The Entra token the relay sends as ``Authorization: Bearer``: fetched once, reused until near expiry.

A managed identity's token lives for hours; asking the credential per request would cost an IMDS
round trip each time. The token is refreshed ``REFRESH_BEFORE_S`` ahead of its expiry, by one caller
while the others wait for that same fetch, and a refresh that fails while the old token is still
valid keeps the old one (the next request tries again).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

REFRESH_BEFORE_S = 300.0
# What the relay asks for a bearer token: an injected provider (tests, the local stack) or a TokenCache.
TokenSource = Callable[[], "str | Awaitable[str]"]


class AsyncTokenCredential(Protocol):
    """azure.identity.aio credentials: ``get_token`` returns an AccessToken(token, expires_on)."""

    async def get_token(self, *scopes: str) -> Any: ...

    async def close(self) -> None: ...


class TokenCache:
    """One scope's token from an async credential, cached with early refresh, one fetch at a time."""

    def __init__(self, credential: AsyncTokenCredential, scope: str, clock: Callable[[], float] = time.time) -> None:
        self._credential, self._scope, self._clock = credential, scope, clock
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock: asyncio.Lock | None = None

    async def __call__(self) -> str:
        if self._token is not None and self._clock() < self._expires_on - REFRESH_BEFORE_S:
            return self._token
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # the waiters find the token the first one fetched
            if self._token is None or self._clock() >= self._expires_on - REFRESH_BEFORE_S:
                await self._refresh()
        assert self._token is not None  # _refresh sets it or raises
        return self._token

    async def _refresh(self) -> None:
        try:
            access = await self._credential.get_token(self._scope)
        except Exception:
            if self._token is not None and self._clock() < self._expires_on:
                log.warning("Entra token refresh failed; the current token is still valid", exc_info=True)
                return
            raise
        self._token, self._expires_on = access.token, float(access.expires_on)

    async def aclose(self) -> None:
        await self._credential.close()


def managed_identity(client_id: str | None, scope: str) -> TokenCache:
    """The Function's user-assigned identity in Azure (``client_id``), the default chain elsewhere."""
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential

    credential = ManagedIdentityCredential(client_id=client_id) if client_id else DefaultAzureCredential()
    return TokenCache(credential, scope)


async def bearer(source: TokenSource) -> str:
    """A token from a sync or async source."""
    token = source()
    return await token if inspect.isawaitable(token) else token

"""The relay's Entra token: cached, refreshed ahead of expiry, fetched once for concurrent first calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import pytest

from gateway_lib.providers.azure_openai.token import REFRESH_BEFORE_S, TokenCache, bearer

SCOPE = "https://cognitiveservices.azure.com/.default"


class AccessToken(NamedTuple):  # azure.core.credentials.AccessToken's shape
    token: str
    expires_on: int


class Credential:
    """An async credential that counts its fetches; each fetch may be held until released, or fail."""

    def __init__(self, clock: list[float], lifetime: int = 3600) -> None:
        self.clock, self.lifetime = clock, lifetime
        self.fetches: list[tuple[str, ...]] = []
        self.gate: asyncio.Event | None = None
        self.fail = False
        self.closed = False

    async def get_token(self, *scopes: str) -> AccessToken:
        self.fetches.append(scopes)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("IMDS unavailable")
        return AccessToken(f"token-{len(self.fetches)}", int(self.clock[0]) + self.lifetime)

    async def close(self) -> None:
        self.closed = True


def cache(lifetime: int = 3600) -> tuple[TokenCache, Credential, list[float]]:
    clock = [1_000_000.0]
    credential = Credential(clock, lifetime)
    return TokenCache(credential, SCOPE, clock=lambda: clock[0]), credential, clock


def test_the_token_is_fetched_once_and_reused_until_its_refresh_window() -> None:
    tokens, credential, clock = cache()

    async def go() -> list[str]:
        got = [await tokens(), await tokens()]
        clock[0] += 3600 - REFRESH_BEFORE_S - 1  # one second before the refresh window
        got.append(await tokens())
        clock[0] += 2  # inside the window: still valid for ~5 min, refreshed now
        got.append(await tokens())
        return got

    assert asyncio.run(go()) == ["token-1", "token-1", "token-1", "token-2"]
    assert credential.fetches == [(SCOPE,), (SCOPE,)]


def test_concurrent_first_calls_share_one_fetch() -> None:
    tokens, credential, _ = cache()

    async def go() -> list[str]:
        credential.gate = asyncio.Event()
        calls = [asyncio.create_task(tokens()) for _ in range(20)]
        await asyncio.sleep(0)  # every call is now waiting on the one fetch
        credential.gate.set()
        return await asyncio.gather(*calls)

    assert asyncio.run(go()) == ["token-1"] * 20
    assert len(credential.fetches) == 1


def test_a_failed_early_refresh_keeps_the_valid_token_and_retries_next_time() -> None:
    tokens, credential, clock = cache()

    async def go() -> list[str]:
        first = await tokens()
        clock[0] += 3600 - 60  # a minute before expiry: due for refresh, still valid
        credential.fail = True
        kept = await tokens()
        credential.fail = False
        return [first, kept, await tokens()]

    assert asyncio.run(go()) == ["token-1", "token-1", "token-3"]
    assert len(credential.fetches) == 3


def test_a_failed_refresh_of_an_expired_token_raises() -> None:
    tokens, credential, clock = cache()

    async def go() -> None:
        await tokens()
        clock[0] += 3600
        credential.fail = True
        await tokens()

    with pytest.raises(RuntimeError, match="IMDS"):
        asyncio.run(go())


def test_closing_the_cache_closes_its_credential() -> None:
    tokens, credential, _ = cache()
    asyncio.run(tokens.aclose())
    assert credential.closed


@pytest.mark.parametrize(("source", "expected"), [(lambda: "sync-token", "sync-token"),
                                                  (lambda: _async_token(), "async-token")])
def test_an_injected_source_may_be_sync_or_async(source: Callable[[], str | Awaitable[str]], expected: str) -> None:
    assert asyncio.run(bearer(source)) == expected


async def _async_token() -> str:
    return "async-token"

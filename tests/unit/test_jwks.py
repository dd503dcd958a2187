"""JwksCache: TTL, unknown-kid refetch limits, shared fetches, stale keys during outages (no sockets)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest

from gateway_lib.auth.jwks import JwksCache, JwksUnavailable, KeyUnavailable
from tools.dev_issuer import DevIssuer

JWKS_URL = "https://keys.example/discovery/v2.0/keys"
OPENID_URL = "https://login.example/tenant/v2.0/.well-known/openid-configuration"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEndpoint:
    """A fetcher: serves the issuer's JWKS (and an OpenID document), or fails when told to."""

    def __init__(self, issuer: DevIssuer, delay: float = 0.0) -> None:
        self.issuer = issuer
        self.delay = delay
        self.down = False
        self.urls: list[str] = []

    def __call__(self, url: str) -> Mapping[str, Any]:
        self.urls.append(url)
        time.sleep(self.delay)  # runs in a worker thread, like requests would
        if self.down:
            raise ConnectionError("key endpoint unreachable")
        if url == OPENID_URL:
            return {"issuer": "https://login.example/tenant/v2.0", "jwks_uri": JWKS_URL}
        return self.issuer.jwks()

    @property
    def jwks_calls(self) -> int:
        return self.urls.count(JWKS_URL)


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer()


@pytest.fixture
def endpoint(issuer: DevIssuer) -> FakeEndpoint:
    return FakeEndpoint(issuer)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def cache(endpoint: FakeEndpoint, clock: Clock, **kwargs: Any) -> JwksCache:
    options: dict[str, Any] = {"jwks_url": JWKS_URL, "ttl_seconds": 3600, "min_refresh_seconds": 60, **kwargs}
    return JwksCache(fetcher=endpoint, clock=clock, **options)


def test_keys_are_fetched_once_and_served_from_cache_within_ttl(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock)

    async def run() -> None:
        for _ in range(5):
            key = await keys.get_key(endpoint.issuer.kid, "RS256")
            assert isinstance(key, jwt.PyJWK) and key.algorithm_name == "RS256"
            clock.now += 100

    asyncio.run(run())
    assert endpoint.jwks_calls == 1


def test_keys_are_refetched_after_ttl(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock)
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    clock.now += 3600
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert endpoint.jwks_calls == 2


def test_unknown_kid_refetches_at_most_once_per_min_refresh(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock)

    async def forged(count: int) -> None:
        for i in range(count):
            with pytest.raises(KeyUnavailable):
                await keys.get_key(f"forged-{i}", "RS256")

    asyncio.run(keys.get_key(endpoint.issuer.kid))
    clock.now += 61
    asyncio.run(forged(50))
    assert endpoint.jwks_calls == 2  # the warm-up fetch plus one refetch for all 50 forged kids
    clock.now += 59
    asyncio.run(forged(10))
    assert endpoint.jwks_calls == 2
    clock.now += 1
    asyncio.run(forged(10))
    assert endpoint.jwks_calls == 3


def test_rotated_key_is_picked_up_by_unknown_kid_refetch(clock: Clock) -> None:
    issuer = DevIssuer()
    endpoint = FakeEndpoint(issuer)
    keys = cache(endpoint, clock)
    old_kid = issuer.kid
    asyncio.run(keys.get_key(old_kid))
    clock.now += 61
    new_kid = issuer.rotate()
    assert asyncio.run(keys.get_key(new_kid)).key_id == new_kid
    assert asyncio.run(keys.get_key(old_kid)).key_id == old_kid  # still published after rotation
    assert endpoint.jwks_calls == 2


def test_concurrent_requests_share_one_in_flight_fetch(issuer: DevIssuer, clock: Clock) -> None:
    endpoint = FakeEndpoint(issuer, delay=0.05)
    keys = cache(endpoint, clock)

    async def run() -> list[jwt.PyJWK]:
        return await asyncio.gather(*(keys.get_key(issuer.kid, "RS256") for _ in range(50)))

    assert len(asyncio.run(run())) == 50
    assert endpoint.jwks_calls == 1


def test_cancelled_waiter_does_not_cancel_the_shared_fetch(issuer: DevIssuer, clock: Clock) -> None:
    endpoint = FakeEndpoint(issuer, delay=0.05)
    keys = cache(endpoint, clock)

    async def run() -> jwt.PyJWK:
        impatient = asyncio.ensure_future(keys.get_key(issuer.kid))
        patient = asyncio.ensure_future(keys.get_key(issuer.kid))
        await asyncio.sleep(0.01)
        impatient.cancel()
        return await patient

    assert asyncio.run(run()).key_id == issuer.kid
    assert endpoint.jwks_calls == 1


def test_stale_keys_are_served_while_the_endpoint_is_down(
    endpoint: FakeEndpoint, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    keys = cache(endpoint, clock)
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    endpoint.down = True
    clock.now += 10 * 3600
    with caplog.at_level(logging.WARNING, logger="gateway_lib.auth.jwks"):
        assert asyncio.run(keys.get_key(endpoint.issuer.kid)).key_id == endpoint.issuer.kid
    assert endpoint.jwks_calls == 2
    assert "jwks refresh failed; serving 1 cached keys" in caplog.text
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert endpoint.jwks_calls == 2  # failed refreshes are rate limited too


def test_recovered_endpoint_is_used_again_after_min_refresh(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock)
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    endpoint.down = True
    clock.now += 3600
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    endpoint.down = False
    clock.now += 60
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    clock.now += 100
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert endpoint.jwks_calls == 3  # warm-up, failed refresh, successful refresh; then cached again


def test_cold_cache_with_endpoint_down_is_unavailable_and_does_not_hammer(endpoint: FakeEndpoint, clock: Clock) -> None:
    endpoint.down = True
    keys = cache(endpoint, clock)
    for _ in range(5):
        with pytest.raises(JwksUnavailable):
            asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert endpoint.jwks_calls == 1


def test_keys_are_discovered_from_openid_configuration(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock, jwks_url=None, openid_config_url=OPENID_URL)
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    clock.now += 3600
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert endpoint.urls == [OPENID_URL, JWKS_URL, JWKS_URL]


def test_discovery_is_repeated_after_a_failed_fetch(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock, jwks_url=None, openid_config_url=OPENID_URL)
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    endpoint.down = True
    clock.now += 3600
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    endpoint.down = False
    clock.now += 60
    asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert endpoint.urls == [OPENID_URL, JWKS_URL, JWKS_URL, OPENID_URL, JWKS_URL]


def test_only_asymmetric_signing_keys_are_kept(issuer: DevIssuer, clock: Clock) -> None:
    good = issuer.jwks()["keys"][0]
    document = {"keys": [
        {"kty": "oct", "kid": "shared-secret", "k": "c2VjcmV0"},
        {**good, "kid": "encryption", "use": "enc"},
        {k: v for k, v in good.items() if k != "kid"},
        "not-a-key",
        good,
    ]}
    keys = JwksCache(jwks_url=JWKS_URL, fetcher=lambda _: document, clock=clock)
    assert asyncio.run(keys.get_key(good["kid"])).key_id == good["kid"]
    for kid in ("shared-secret", "encryption"):
        with pytest.raises(KeyUnavailable):
            asyncio.run(keys.get_key(kid))


@pytest.mark.parametrize("document", [{}, {"keys": "nope"}, {"keys": []}, {"keys": [{"kty": "oct", "kid": "x"}]}])
def test_a_document_without_usable_keys_counts_as_a_failed_fetch(document: dict[str, Any], clock: Clock) -> None:
    keys = JwksCache(jwks_url=JWKS_URL, fetcher=lambda _: document, clock=clock)
    with pytest.raises(JwksUnavailable):
        asyncio.run(keys.get_key("any"))


def test_a_jwk_that_names_its_alg_keeps_it(issuer: DevIssuer, clock: Clock) -> None:
    document = {"keys": [{**issuer.jwks()["keys"][0], "alg": "RS256"}]}
    keys = JwksCache(jwks_url=JWKS_URL, fetcher=lambda _: document, clock=clock)
    assert asyncio.run(keys.get_key(issuer.kid, "PS256")).algorithm_name == "RS256"


def test_a_jwk_without_alg_is_bound_to_the_requested_algorithm(endpoint: FakeEndpoint, clock: Clock) -> None:
    keys = cache(endpoint, clock)
    assert asyncio.run(keys.get_key(endpoint.issuer.kid, "PS256")).algorithm_name == "PS256"


def test_a_url_is_required() -> None:
    with pytest.raises(ValueError):
        JwksCache()


def test_discovery_over_https_never_downgrades_to_a_plain_http_jwks_uri(endpoint: FakeEndpoint, clock: Clock) -> None:
    # Keys fetched over plain http could be swapped in transit: a https configuration must point at https keys.
    plain = "http://keys.example/discovery/v2.0/keys"
    served = endpoint.__call__

    def downgrading(url: str) -> Mapping[str, Any]:
        return {"issuer": "https://login.example/tenant/v2.0", "jwks_uri": plain} if url == OPENID_URL else served(url)

    keys = cache(downgrading, clock, jwks_url=None, openid_config_url=OPENID_URL)  # type: ignore[arg-type]
    with pytest.raises(JwksUnavailable):
        asyncio.run(keys.get_key(endpoint.issuer.kid))
    assert plain not in endpoint.urls


def test_signing_key_urls_must_be_https_in_azure() -> None:
    from gateway_lib.config.settings import ConfigError, Settings

    env = {"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
           "GATEWAY_TABLE_ENDPOINT": "https://acct.table.core.windows.net", "AZURE_OPENAI_ENDPOINT": "https://a.example",
           "WEBSITE_INSTANCE_ID": "instance-1", "PYTHON_ENABLE_INIT_INDEXING": "1"}
    Settings.from_env(env | {"AUTH_JWKS_URL": "https://keys.example/keys"})
    for name in ("AUTH_JWKS_URL", "AUTH_OPENID_CONFIG_URL"):
        with pytest.raises(ConfigError, match=f"{name} must be an https URL in Azure"):
            Settings.from_env(env | {name: "http://keys.example/keys"})

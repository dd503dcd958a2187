"""Authenticator + JwksCache against the dev issuer's real JWKS endpoint over loopback HTTP.

The default ``requests`` fetcher is used; only the cache clock is injected, so TTL and
refetch limits are exercised without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator

import pytest

from gateway_lib.auth.authenticator import Authenticator
from gateway_lib.auth.identity import Caller
from gateway_lib.auth.jwks import JwksCache
from gateway_lib.config.tiers import TierPolicy, default_tiers_json, parse_tiers
from gateway_lib.errors import GatewayError, ServiceUnavailable
from tests.attack_matrix import AttackCase, attack_cases, bearer, matrix_settings
from tools.dev_issuer import DevIssuer, JwksServer

pytestmark = pytest.mark.integration
MATRIX_ISSUER = DevIssuer()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Rig:
    issuer: DevIssuer
    server: JwksServer
    clock: Clock
    auth: Authenticator

    def authenticate(self, token: str) -> Caller:
        return asyncio.run(self.auth.authenticate(bearer(token), {}))

    def failure(self, token: str) -> GatewayError:
        with pytest.raises(GatewayError) as err:
            self.authenticate(token)
        return err.value


def policy() -> TierPolicy:
    parsed = parse_tiers(default_tiers_json(), [])
    assert parsed is not None
    return parsed


def rig_for(issuer: DevIssuer, server: JwksServer, discover: bool = False) -> Rig:
    settings = matrix_settings(issuer, server.jwks_url)
    if discover:
        settings = dataclasses.replace(settings, jwks_url=None, openid_config_url=server.openid_config_url)
    clock = Clock()
    return Rig(issuer, server, clock, Authenticator(settings, policy(), JwksCache.from_settings(settings, clock=clock)))


@pytest.fixture
def rig() -> Iterator[Rig]:
    issuer = DevIssuer()
    with JwksServer(issuer) as server:
        yield rig_for(issuer, server)


@pytest.fixture(scope="module")
def matrix_rig() -> Iterator[Rig]:
    with JwksServer(MATRIX_ISSUER) as server:
        yield rig_for(MATRIX_ISSUER, server)


@pytest.mark.parametrize("case", attack_cases(MATRIX_ISSUER), ids=str)
def test_attack_matrix_over_http_jwks(matrix_rig: Rig, case: AttackCase) -> None:
    outcome = asyncio.run(_status(matrix_rig.auth, case))
    assert outcome == case.status


async def _status(auth: Authenticator, case: AttackCase) -> int:
    try:
        await auth.authenticate(case.headers, case.query)
    except GatewayError as exc:
        return exc.status
    return 200


def test_rotated_key_is_picked_up(rig: Rig) -> None:
    rig.authenticate(rig.issuer.token())
    rig.clock.now += 61
    rig.issuer.rotate(keep_previous=False)
    assert rig.authenticate(rig.issuer.token()).tier.name == "standard"
    assert rig.server.hits == 2


def test_unknown_kid_refetch_is_rate_limited(rig: Rig) -> None:
    rig.authenticate(rig.issuer.token())
    stranger = DevIssuer()
    rig.clock.now += 61
    for _ in range(20):
        assert rig.failure(stranger.token()).message == "token is signed with an unknown key (kid)"
    assert rig.server.hits == 2
    rig.clock.now += 60
    rig.failure(stranger.token())
    assert rig.server.hits == 3


def test_cached_keys_are_used_while_the_endpoint_is_down(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.authenticate(rig.issuer.token())
    rig.server.failing = True
    rig.clock.now += 2 * 3600  # well past the TTL
    with caplog.at_level(logging.WARNING, logger="gateway_lib.auth.jwks"):
        for _ in range(5):
            rig.authenticate(rig.issuer.token())
    assert rig.server.hits == 2  # one failed refresh attempt, then rate limited
    assert "jwks refresh failed" in caplog.text
    rig.server.failing = False
    rig.clock.now += 60
    rig.authenticate(rig.issuer.token())
    assert rig.server.hits == 3


def test_cold_start_with_endpoint_down_is_503(rig: Rig) -> None:
    rig.server.failing = True
    assert isinstance(rig.failure(rig.issuer.token()), ServiceUnavailable)


def test_keys_are_discovered_through_openid_configuration() -> None:
    issuer = DevIssuer()
    with JwksServer(issuer) as server:
        rig = rig_for(issuer, server, discover=True)
        assert rig.authenticate(issuer.token(version=1)).tier.name == "standard"
        assert server.hits == 1

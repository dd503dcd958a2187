"""Keyless AWS federation: Entra token -> STS -> self-refreshing botocore credentials.

A fake STS client and a fake clock: no azure-identity credential is ever built here.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway_lib.providers.base import ProviderSettings
from gateway_lib.providers.bedrock.config import BedrockSettings
from gateway_lib.providers.bedrock.credentials import (
    FederationError,
    WebIdentityFetcher,
    botocore_session,
    build_credentials,
    web_identity_credentials,
)

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class FakeSts:
    """Issues credentials valid for an hour from the fake clock's now."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.requests: list[dict[str, Any]] = []

    def assume_role_with_web_identity(self, **kwargs: Any) -> dict[str, Any]:
        self.requests.append(kwargs)
        n = len(self.requests)
        return {"Credentials": {"AccessKeyId": f"ASIA{n}", "SecretAccessKey": f"secret{n}", "SessionToken": f"tok{n}",
                                "Expiration": self.clock.now + timedelta(hours=1)}}


def settings(**overrides: Any) -> tuple[BedrockSettings, ProviderSettings]:
    values: dict[str, Any] = dict(
        region="us-east-1", endpoint_url=None, role_arn="arn:aws:iam::123456789012:role/gw",
        web_identity_audience="api://AzureADTokenExchange", sts_endpoint_url=None, role_session_name="ai-gateway")
    values.update(overrides)
    return BedrockSettings(**values), ProviderSettings(azure_client_id="cid", upstream_timeout_seconds=30,
                                                        connect_timeout_seconds=2)


def federated(clock: FakeClock, sts: FakeSts, token: Any = lambda: "header.payload.sig") -> Any:
    return build_credentials(*settings(), token_provider=token, sts_client_factory=lambda: sts, time_fetcher=clock)


def test_without_role_settings_the_standard_chain_is_used() -> None:
    assert build_credentials(*settings(role_arn=None, web_identity_audience=None)) is None


def test_nothing_is_fetched_until_the_credentials_are_first_used() -> None:
    clock = FakeClock()
    sts = FakeSts(clock)
    creds = federated(clock, sts)
    assert sts.requests == []
    frozen = creds.get_frozen_credentials()
    assert (frozen.access_key, frozen.token) == ("ASIA1", "tok1")
    assert sts.requests == [{"RoleArn": "arn:aws:iam::123456789012:role/gw", "RoleSessionName": "ai-gateway",
                             "WebIdentityToken": "header.payload.sig", "DurationSeconds": 3600}]


def test_credentials_are_reused_while_fresh() -> None:
    clock = FakeClock()
    sts = FakeSts(clock)
    creds = federated(clock, sts)
    creds.get_frozen_credentials()
    clock.now += timedelta(minutes=50)  # 10 minutes left: outside the 5-minute advisory window
    assert creds.get_frozen_credentials().access_key == "ASIA1"
    assert len(sts.requests) == 1


@pytest.mark.parametrize("minutes", [56, 59])  # advisory (4 min left), mandatory (1 min left)
def test_credentials_refresh_before_expiry(minutes: int) -> None:
    clock = FakeClock()
    sts = FakeSts(clock)
    creds = federated(clock, sts)
    creds.get_frozen_credentials()
    clock.now += timedelta(minutes=minutes)
    assert creds.get_frozen_credentials().access_key == "ASIA2"
    assert len(sts.requests) == 2


def test_a_failed_advisory_refresh_keeps_the_current_credentials() -> None:
    clock = FakeClock()
    sts = FakeSts(clock)
    creds = federated(clock, sts)
    creds.get_frozen_credentials()
    sts.assume_role_with_web_identity = _raise  # type: ignore[method-assign]
    clock.now += timedelta(minutes=56)
    assert creds.get_frozen_credentials().access_key == "ASIA1"


def _raise(**kwargs: Any) -> Any:
    raise RuntimeError("STS down")


def test_an_async_token_provider_is_supported() -> None:
    clock = FakeClock()
    sts = FakeSts(clock)

    async def token() -> str:
        await asyncio.sleep(0)
        return "async.jwt.sig"

    federated(clock, sts, token).get_frozen_credentials()
    assert sts.requests[0]["WebIdentityToken"] == "async.jwt.sig"


def test_token_failure_is_a_federation_error() -> None:
    def broken() -> str:
        raise RuntimeError("IMDS unreachable")

    fetcher = WebIdentityFetcher("arn", "s", broken, lambda: None)
    with pytest.raises(FederationError):
        fetcher()


def test_sts_failure_is_a_federation_error_on_mandatory_refresh() -> None:
    class Refusing:
        def assume_role_with_web_identity(self, **kwargs: Any) -> Any:
            raise RuntimeError("InvalidIdentityToken")

    creds = web_identity_credentials(WebIdentityFetcher("arn", "s", lambda: "t", Refusing), FakeClock())
    with pytest.raises(FederationError):
        creds.get_frozen_credentials()


def test_session_signs_with_the_given_credentials() -> None:
    clock = FakeClock()
    creds = federated(clock, FakeSts(clock))
    session = botocore_session(creds)
    assert session.get_credentials() is creds

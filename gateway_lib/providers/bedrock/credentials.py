"""AWS credentials for Bedrock: the standard chain, or keyless federation from Entra.

Keyless (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_AUDIENCE``): the Function App's managed
identity gets an Entra token for the audience, STS ``AssumeRoleWithWebIdentity``
swaps it for short-lived AWS credentials, and botocore's ``RefreshableCredentials``
refreshes them before expiry (advisory 5 min, mandatory 2 min before), in whichever
worker thread next signs a request. No AWS secret is stored anywhere.

The credentials are *deferred*: nothing is fetched until the first Bedrock call, so
cold start pays neither the Entra nor the STS round trip.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway_lib.providers.base import ProviderSettings
from gateway_lib.providers.bedrock.config import BedrockSettings

if TYPE_CHECKING:
    from botocore.credentials import Credentials
    from botocore.session import Session

# Returns an Entra access token (a JWT) for the web-identity audience. Sync is the
# natural fit (refresh runs in a boto worker thread); an async provider is run to
# completion on a private event loop in that thread.
TokenProvider = Callable[[], "str | Awaitable[str]"]
StsClientFactory = Callable[[], Any]
METHOD = "custom-entra-web-identity"


class FederationError(Exception):
    """The Entra token or the STS exchange failed (the adapter maps it to an auth error)."""


def managed_identity_token_provider(client_id: str | None, audience: str) -> TokenProvider:
    """Azure only: a token provider on ``ManagedIdentityCredential`` (built on first use)."""
    scope = audience if audience.endswith("/.default") else f"{audience}/.default"
    credential: Any = None

    def token() -> str:
        nonlocal credential
        if credential is None:
            from azure.identity import ManagedIdentityCredential  # heavy: only when first needed

            credential = ManagedIdentityCredential(client_id=client_id)
        return str(credential.get_token(scope).token)

    return token


class WebIdentityFetcher:
    """``refresh_using`` for botocore: Entra token -> STS AssumeRoleWithWebIdentity -> metadata."""

    def __init__(self, role_arn: str, session_name: str, token_provider: TokenProvider,
                 sts_client_factory: StsClientFactory, duration_seconds: int = 3600) -> None:
        self._role_arn = role_arn
        self._session_name = session_name
        self._token_provider = token_provider
        self._sts_factory = sts_client_factory
        self._sts: Any = None
        self._duration = duration_seconds
        self.calls = 0  # STS exchanges made; tests and telemetry read it

    def __call__(self) -> dict[str, str]:
        token = self._entra_token()
        if self._sts is None:
            self._sts = self._sts_factory()
        self.calls += 1
        try:
            response = self._sts.assume_role_with_web_identity(
                RoleArn=self._role_arn, RoleSessionName=self._session_name, WebIdentityToken=token,
                DurationSeconds=self._duration)
        except Exception as exc:
            raise FederationError(f"STS AssumeRoleWithWebIdentity failed ({type(exc).__name__})") from exc
        creds = response["Credentials"]
        expiration = creds["Expiration"]
        return {"access_key": creds["AccessKeyId"], "secret_key": creds["SecretAccessKey"],
                "token": creds["SessionToken"],
                "expiry_time": expiration.isoformat() if hasattr(expiration, "isoformat") else str(expiration)}

    def _entra_token(self) -> str:
        try:
            token = self._token_provider()
            if inspect.isawaitable(token):
                token = asyncio.run(_awaited(token))
        except Exception as exc:
            raise FederationError(f"could not get an Entra token for AWS federation ({type(exc).__name__})") from exc
        return str(token)


async def _awaited(awaitable: Awaitable[str]) -> str:
    return await awaitable


def web_identity_credentials(fetcher: Callable[[], dict[str, str]],
                             time_fetcher: Callable[[], Any] | None = None) -> Credentials:
    """Deferred, self-refreshing credentials around ``fetcher`` (``time_fetcher``: tz-aware now)."""
    from botocore.credentials import DeferredRefreshableCredentials

    class FederatedCredentials(DeferredRefreshableCredentials):  # type: ignore[misc]
        # botocore's 15/10-minute windows assume 1-hour credentials; STS may issue 15-minute
        # ones (its minimum), which would then be "due" on every single request.
        _advisory_refresh_timeout = 5 * 60
        _mandatory_refresh_timeout = 2 * 60

    if time_fetcher is None:
        return FederatedCredentials(refresh_using=fetcher, method=METHOD)
    return FederatedCredentials(refresh_using=fetcher, method=METHOD, time_fetcher=time_fetcher)


def default_sts_factory(section: BedrockSettings, shared: ProviderSettings) -> StsClientFactory:
    def create() -> Any:
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        # AssumeRoleWithWebIdentity is unsigned: the web identity token is the credential.
        config = Config(signature_version=UNSIGNED, retries={"total_max_attempts": 3, "mode": "standard"},
                        connect_timeout=shared.connect_timeout_seconds, read_timeout=30)
        return botocore.session.get_session().create_client(
            "sts", region_name=section.region, endpoint_url=section.sts_endpoint_url, config=config)

    return create


def build_credentials(section: BedrockSettings, shared: ProviderSettings, *, token_provider: TokenProvider | None = None,
                      sts_client_factory: StsClientFactory | None = None,
                      time_fetcher: Callable[[], Any] | None = None) -> Credentials | None:
    """Federated credentials when configured; None means "use the standard AWS chain"."""
    if not (section.role_arn and section.web_identity_audience):
        return None
    provider = token_provider or managed_identity_token_provider(shared.azure_client_id, section.web_identity_audience)
    fetcher = WebIdentityFetcher(section.role_arn, section.role_session_name, provider,
                                 sts_client_factory or default_sts_factory(section, shared))
    return web_identity_credentials(fetcher, time_fetcher)


def botocore_session(credentials: Credentials | None) -> Session:
    """A botocore session that signs with ``credentials``, or with the standard chain when None."""
    import botocore.session
    from botocore.credentials import CredentialProvider, CredentialResolver

    session = botocore.session.get_session()
    if credentials is not None:

        class _Fixed(CredentialProvider):  # type: ignore[misc]
            METHOD = "custom-fixed"

            def load(self) -> Credentials:
                return credentials

        # The public way to replace botocore's chain: register a resolver with one provider.
        session.register_component("credential_provider", CredentialResolver([_Fixed()]))
    return session

"""The token attack matrix, reusable by unit tests (Authenticator) and end-to-end tests (HTTP host).

Each case is a request (headers, query) and the status the gateway must answer. ``200``
means "authentication passes": through the HTTP host use an endpoint that needs nothing
but a caller (e.g. GET /v1/models). The gateway must trust ``issuer.tenant`` and
``issuer.audience`` with RS256 only (``matrix_settings``; local.settings.example.json
matches the DevIssuer defaults) and fetch keys from a JWKS serving ``issuer.jwks()``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from gateway_lib.config.settings import AuthSettings
from tools.dev_issuer import DevIssuer, v2_issuer

OTHER_TENANT = "11111111-1111-4111-8111-111111111111"


@dataclass(frozen=True)
class AttackCase:
    name: str
    headers: dict[str, str]
    query: dict[str, str] = field(default_factory=dict)
    status: int = 401

    def __str__(self) -> str:  # readable pytest ids
        return self.name


def matrix_settings(issuer: DevIssuer, jwks_url: str = "http://127.0.0.1:7073/keys") -> AuthSettings:
    """AuthSettings under which the matrix's expectations hold."""
    return AuthSettings(
        tenant_ids=(issuer.tenant,), allowed_tenants=(), audiences=(issuer.audience,), extra_issuers=(),
        openid_config_url=None, jwks_url=jwks_url, algorithms=("RS256",), leeway_seconds=60,
        jwks_cache_ttl_seconds=3600, jwks_min_refresh_seconds=60,
    )


def attack_cases(issuer: DevIssuer) -> list[AttackCase]:
    """Every case, built fresh (tokens carry the current time)."""
    return [*_malformed(issuer), *_forged(issuer), *_wrong_claims(issuer), *_placement(issuer), *_valid(issuer)]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _malformed(issuer: DevIssuer) -> list[AttackCase]:
    two_segments = ".".join(issuer.token().split(".")[:2])
    return [
        AttackCase("missing_header", {}),
        AttackCase("wrong_scheme", {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}),
        AttackCase("empty_bearer", {"Authorization": "Bearer "}),
        AttackCase("garbage", {"Authorization": "Bearer not-a-token"}),
        AttackCase("two_segments", bearer(two_segments)),
        AttackCase("garbage_segments", bearer("abc.def.ghi")),
        AttackCase("oversized_header", bearer("a" * (16 * 1024 + 1))),
    ]


def _forged(issuer: DevIssuer) -> list[AttackCase]:
    stranger = DevIssuer()  # a key the gateway has never seen
    valid = issuer.token()
    head, payload, signature = valid.split(".")
    admin_claims = {**issuer.claims(), "roles": ["Gateway.Admin"]}
    return [
        AttackCase("alg_none", bearer(_unsigned(issuer, issuer.claims()))),
        AttackCase("hs256_signed_with_public_key", bearer(_hs256_with_public_key(issuer, issuer.claims()))),
        AttackCase("unconfigured_alg_rs512", bearer(issuer.sign(issuer.claims(), algorithm="RS512"))),
        AttackCase("unknown_kid", bearer(stranger.token())),
        AttackCase("forged_with_known_kid", bearer(stranger.token(headers={"kid": issuer.kid}))),
        AttackCase("tampered_payload", bearer(f"{head}.{b64json(admin_claims)}.{signature}")),
        AttackCase("tampered_signature", bearer(f"{head}.{payload}.{_flip(signature)}")),
    ]


def _wrong_claims(issuer: DevIssuer) -> list[AttackCase]:
    now = int(time.time())
    return [
        AttackCase("expired", bearer(issuer.token(now=now - 7200, ttl=3600))),
        AttackCase("not_yet_valid", bearer(issuer.token({"nbf": now + 3600}))),
        AttackCase("issued_in_future", bearer(issuer.token({"iat": now + 3600}))),
        AttackCase("missing_exp", bearer(issuer.token({"exp": None}))),
        AttackCase("wrong_audience", bearer(issuer.token(audience="api://someone-else"))),
        AttackCase("wrong_issuer", bearer(issuer.token({"iss": f"https://evil.example.com/{issuer.tenant}/v2.0"}))),
        AttackCase("untrusted_tenant", bearer(issuer.token(tenant=OTHER_TENANT))),
        AttackCase("tid_mismatch", bearer(issuer.token({"tid": OTHER_TENANT, "iss": v2_issuer(issuer.tenant)}))),
        AttackCase("no_gateway_role", bearer(issuer.token(roles=())), status=403),
        AttackCase("unknown_role_only", bearer(issuer.token(roles=["Other.Role"])), status=403),
    ]


def _placement(issuer: DevIssuer) -> list[AttackCase]:
    token = issuer.token()
    return [
        AttackCase("token_in_query_access_token", {}, {"access_token": token}),
        AttackCase("token_in_query_code", {}, {"code": token}),
        AttackCase("token_in_query_with_valid_header", bearer(token), {"token": token}),
        AttackCase("jwt_shaped_query_value", {}, {"q": token}),
        # With a valid header: the URL (and every log that keeps it) must still not carry the token.
        AttackCase("token_as_a_bare_query_key", bearer(token), {token: ""}),
        AttackCase("bearer_token_in_a_query_value", bearer(token), {"x": f"Bearer {token}"}),
    ]


def _valid(issuer: DevIssuer) -> list[AttackCase]:
    return [
        AttackCase("valid_v2_app_token", bearer(issuer.token(version=2)), status=200),
        AttackCase("valid_v1_app_token", bearer(issuer.token(version=1)), status=200),
        AttackCase("valid_delegated_scope", bearer(issuer.token(roles=(), scopes=["Gateway.Invoke"])), status=200),
        AttackCase("valid_lowercase_scheme", {"authorization": f"bearer {issuer.token()}"}, status=200),
    ]


def b64json(value: dict[str, Any]) -> str:
    """base64url(JSON) without padding: one JWS segment."""
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned(issuer: DevIssuer, claims: dict[str, Any]) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT', 'kid': issuer.kid})}.{b64json(claims)}."


def _hs256_with_public_key(issuer: DevIssuer, claims: dict[str, Any]) -> str:
    # The classic key-confusion attack: HMAC keyed with the public key a verifier might misuse as a secret.
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.kid})}.{b64json(claims)}"
    mac = hmac.new(issuer.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def _flip(segment: str) -> str:
    # Change a middle character: the last one may only hold padding bits and decode unchanged.
    middle = len(segment) // 2
    return segment[:middle] + ("A" if segment[middle] != "A" else "B") + segment[middle + 1:]

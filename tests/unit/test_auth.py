"""Authenticator: the token attack matrix and the validation rules, with an in-memory JWKS (no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Any

import jwt
import pytest

from gateway_lib.auth.authenticator import Authenticator
from gateway_lib.auth.identity import Caller
from gateway_lib.auth.jwks import JwksCache
from gateway_lib.config.settings import AuthSettings
from gateway_lib.config.tiers import TierPolicy, default_tiers_json, parse_tiers
from gateway_lib.errors import AuthenticationFailed, GatewayError, PermissionDenied, ServiceUnavailable
from tests.attack_matrix import OTHER_TENANT, AttackCase, attack_cases, b64json, bearer, matrix_settings
from tools.dev_issuer import DevIssuer, app_id_for, v1_issuer

ISSUER = DevIssuer()
CASES = attack_cases(ISSUER)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
NO_KEY_LOOKUP = {"missing_header", "wrong_scheme", "empty_bearer", "garbage", "two_segments", "garbage_segments",
                 "oversized_header", "alg_none", "hs256_signed_with_public_key", "unconfigured_alg_rs512",
                 "token_in_query_access_token", "token_in_query_code", "token_in_query_with_valid_header",
                 "jwt_shaped_query_value", "token_as_a_bare_query_key", "bearer_token_in_a_query_value"}


class Keys:
    """Fetcher serving the issuer's JWKS from memory, counting calls."""

    def __init__(self, issuer: DevIssuer = ISSUER) -> None:
        self.issuer = issuer
        self.calls = 0

    def __call__(self, url: str) -> Mapping[str, Any]:
        self.calls += 1
        return self.issuer.jwks()


def policy() -> TierPolicy:
    parsed = parse_tiers(default_tiers_json(), [])
    assert parsed is not None
    return parsed


def authenticator(keys: Keys | None = None, **changes: Any) -> tuple[Authenticator, Keys]:
    keys = keys or Keys()
    settings = dataclasses.replace(matrix_settings(ISSUER), **changes)
    return Authenticator(settings, policy(), JwksCache.from_settings(settings, fetcher=keys)), keys


def authenticate(auth: Authenticator, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> Caller:
    return asyncio.run(auth.authenticate(headers, query or {}))


def failure(auth: Authenticator, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        authenticate(auth, headers, query)
    return err.value


@pytest.mark.parametrize("case", CASES, ids=str)
def test_attack_matrix(case: AttackCase) -> None:
    auth, _ = authenticator()
    if case.status == 200:
        assert isinstance(authenticate(auth, case.headers, case.query), Caller)
        return
    error = failure(auth, case.headers, case.query)
    assert error.status == case.status, error.message
    assert "WWW-Authenticate" in error.headers
    assert not _JWT.search(error.message) and not _JWT.search(error.headers["WWW-Authenticate"])


@pytest.mark.parametrize("case", [c for c in CASES if c.name in NO_KEY_LOOKUP], ids=str)
def test_cheap_rejections_happen_before_any_key_lookup(case: AttackCase) -> None:
    auth, keys = authenticator()
    failure(auth, case.headers, case.query)
    assert keys.calls == 0


def test_matrix_names_are_unique_and_cover_the_brief() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert {"missing_header", "alg_none", "hs256_signed_with_public_key", "unknown_kid", "tampered_payload",
            "tampered_signature", "expired", "not_yet_valid", "wrong_audience", "wrong_issuer", "untrusted_tenant",
            "token_in_query_access_token", "oversized_header", "no_gateway_role", "valid_v1_app_token",
            "valid_v2_app_token"} <= set(names)


def test_missing_token_gets_a_bare_bearer_challenge() -> None:
    auth, _ = authenticator()
    error = failure(auth, {"Accept": "application/json"})
    assert isinstance(error, AuthenticationFailed)
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert error.code == "missing_token"


def test_invalid_token_challenge_names_the_error_and_describes_it() -> None:
    auth, _ = authenticator()
    error = failure(auth, bearer(ISSUER.token(now=time.time() - 7200, ttl=3600)))
    assert error.message == "token has expired"
    assert error.headers["WWW-Authenticate"] == 'Bearer error="invalid_token", error_description="token has expired"'


def test_missing_role_is_403_with_insufficient_scope_challenge() -> None:
    auth, _ = authenticator()
    error = failure(auth, bearer(ISSUER.token(roles=())))
    assert isinstance(error, PermissionDenied)
    assert error.headers["WWW-Authenticate"].startswith('Bearer error="insufficient_scope", error_description="')


@pytest.mark.parametrize(("case", "words"), [
    ("alg_none", "algorithm 'none' is not accepted"),
    ("hs256_signed_with_public_key", "algorithm 'HS256' is not accepted"),
    ("unknown_kid", "unknown key"),
    ("forged_with_known_kid", "signature is invalid"),
    ("tampered_payload", "signature is invalid"),
    ("tampered_signature", "signature is invalid"),
    ("not_yet_valid", "not yet valid"),
    ("issued_in_future", "not yet valid"),
    ("missing_exp", "required claim 'exp'"),
    ("wrong_audience", "audience"),
    ("wrong_issuer", "issuer is not trusted"),
    ("untrusted_tenant", "issuer is not trusted"),
    ("tid_mismatch", "does not match its issuer"),
    ("token_in_query_access_token", "only in the Authorization header"),
    ("oversized_header", "larger than 16384 bytes"),
    ("wrong_scheme", "scheme must be Bearer"),
    ("two_segments", "three base64url segments"),
])
def test_messages_say_what_is_wrong(case: str, words: str) -> None:
    auth, _ = authenticator()
    chosen = next(c for c in CASES if c.name == case)
    assert words in failure(auth, chosen.headers, chosen.query).message


def test_v1_and_v2_tokens_name_the_same_stable_caller() -> None:
    auth, _ = authenticator()
    v1 = authenticate(auth, bearer(ISSUER.token(caller="bob", version=1)))
    v2 = authenticate(auth, bearer(ISSUER.token(caller="bob", version=2)))
    assert v1.app_id == v2.app_id == app_id_for("bob")
    assert v1.key == v2.key and v1.user_id is None and v1.tier.name == "standard"


def test_delegated_token_names_the_user() -> None:
    auth, _ = authenticator()
    caller = authenticate(auth, bearer(ISSUER.token(roles=(), scopes=["Gateway.Invoke"], user="user-oid-1")))
    assert caller.user_id == "user-oid-1" and caller.tier.name == "standard"


def test_label_is_passed_through() -> None:
    auth, _ = authenticator()
    caller = asyncio.run(auth.authenticate(bearer(ISSUER.token()), {}, label="apim-sub"))
    assert caller.label == "apim-sub"


def test_clock_skew_within_leeway_is_accepted() -> None:
    auth, _ = authenticator()
    now = time.time()
    authenticate(auth, bearer(ISSUER.token(now=now - 3630, ttl=3600)))  # expired 30 s ago
    authenticate(auth, bearer(ISSUER.token({"nbf": int(now) + 30, "iat": int(now) + 30})))


@pytest.mark.parametrize(("claim", "spelled"), [("exp", str), ("nbf", str), ("iat", str), ("nbf", bool), ("iat", bool)])
def test_a_time_claim_that_is_not_a_json_number_is_refused(claim: str, spelled: Any) -> None:
    auth, _ = authenticator()
    now = int(time.time())
    value = {"exp": now + 3600, "nbf": now - 60, "iat": now - 60}[claim]
    error = failure(auth, bearer(ISSUER.token({claim: spelled(value)})))  # "1796400891", or true (int() says 1)
    assert error.status == 401 and error.message == f"token claim '{claim}' is not a number"
    assert isinstance(authenticate(auth, bearer(ISSUER.token({claim: value + 0.5}))), Caller)  # a fraction is fine


def test_leeway_zero_rejects_just_expired() -> None:
    auth, _ = authenticator(leeway_seconds=0)
    assert failure(auth, bearer(ISSUER.token(now=time.time() - 3630, ttl=3600))).message == "token has expired"


def test_allowed_tenants_restricts_tid() -> None:
    auth, _ = authenticator(allowed_tenants=(OTHER_TENANT,))
    assert failure(auth, bearer(ISSUER.token())).message == "token tenant (tid) is not allowed"


def test_extra_issuer_is_trusted_when_its_tenant_matches_tid() -> None:
    sovereign = f"https://login.microsoftonline.us/{ISSUER.tenant}/v2.0"
    auth, _ = authenticator(extra_issuers=(sovereign,))
    authenticate(auth, bearer(ISSUER.token({"iss": sovereign})))
    error = failure(auth, bearer(ISSUER.token({"iss": sovereign, "tid": OTHER_TENANT})))
    assert error.status == 401


def test_tenant_ids_are_compared_case_insensitively() -> None:
    auth, _ = authenticator(tenant_ids=(ISSUER.tenant.upper(),))
    authenticate(auth, bearer(ISSUER.token(version=1)))
    upper_issuer = v1_issuer(ISSUER.tenant.upper())
    assert failure(auth, bearer(ISSUER.token({"iss": upper_issuer}, version=1))).status == 401  # issuer is exact


def test_only_configured_algorithms_pass_even_if_pyjwt_supports_more() -> None:
    auth, _ = authenticator(algorithms=("RS256", "PS256"))
    authenticate(auth, bearer(ISSUER.sign(ISSUER.claims(), algorithm="PS256")))
    assert failure(auth, bearer(ISSUER.sign(ISSUER.claims(), algorithm="RS384"))).status == 401


def test_token_without_kid_is_rejected_before_key_lookup() -> None:
    auth, keys = authenticator()
    token = jwt.encode(ISSUER.claims(), ISSUER.private_key, algorithm="RS256")  # pyjwt adds no kid
    assert "no key id" in failure(auth, bearer(token)).message
    assert keys.calls == 0


def test_two_authorization_headers_are_rejected() -> None:
    auth, _ = authenticator()
    token = ISSUER.token()
    assert failure(auth, {"Authorization": f"Bearer {token}", "authorization": f"Bearer {token}"}).status == 401


def test_header_of_exactly_16_kib_is_parsed_not_refused_for_size() -> None:
    auth, _ = authenticator()
    value = "Bearer " + "a" * (16 * 1024 - len("Bearer "))
    assert "larger than" not in failure(auth, {"Authorization": value}).message


def test_query_params_that_are_not_tokens_are_fine() -> None:
    auth, _ = authenticator()
    authenticate(auth, bearer(ISSUER.token()), {"api-version": "2024-10-21", "limit": "10"})


def test_unreachable_keys_on_a_cold_start_are_503_not_401() -> None:
    def down(url: str) -> Mapping[str, Any]:
        raise ConnectionError("no route")

    settings = matrix_settings(ISSUER)
    auth = Authenticator(settings, policy(), JwksCache.from_settings(settings, fetcher=down))
    error = failure(auth, bearer(ISSUER.token()))
    assert isinstance(error, ServiceUnavailable) and error.retry_after


def test_challenge_description_never_contains_quotes_or_control_characters() -> None:
    auth, _ = authenticator(algorithms=("RS256",))
    header = b64json({"alg": 'RS"256\n', "kid": ISSUER.kid})
    token = f"{header}.{b64json(ISSUER.claims())}.c2ln"
    challenge = failure(auth, bearer(token)).headers["WWW-Authenticate"]
    description = challenge.split('error_description="', 1)[1][:-1]
    assert '"' not in description and "\n" not in description


def test_default_authenticator_builds_its_own_jwks_cache() -> None:
    settings: AuthSettings = matrix_settings(ISSUER)
    assert isinstance(Authenticator(settings, policy()), Authenticator)


def test_token_hidden_in_a_repeated_query_parameter_is_found() -> None:
    from starlette.datastructures import QueryParams

    auth, _ = authenticator()
    query = QueryParams([("q", ISSUER.token()), ("q", "harmless")])
    assert "only in the Authorization header" in failure(auth, bearer(ISSUER.token()), query).message


def test_starlette_headers_are_read_case_insensitively() -> None:
    from starlette.datastructures import Headers

    auth, _ = authenticator()
    headers = Headers(raw=[(b"authorization", f"Bearer {ISSUER.token()}".encode())])
    assert authenticate(auth, headers).tier.name == "standard"


def test_an_admin_of_a_second_trusted_tenant_is_not_the_gateways_admin() -> None:
    # Multi-tenant: the partner's own admins assign roles in the partner's directory. Only the home tenant
    # (the first of AUTH_TENANT_IDS) administers the gateway.
    home, partner = ISSUER.tenant, OTHER_TENANT
    auth, _ = authenticator(tenant_ids=(home, partner))
    assert authenticate(auth, bearer(ISSUER.token(roles=["Gateway.Admin"]))).is_admin
    partner_admin = ISSUER.token({"iss": f"https://login.microsoftonline.com/{partner}/v2.0", "tid": partner},
                                 roles=["Gateway.Admin", "Gateway.Standard"])
    caller = authenticate(auth, bearer(partner_admin))
    assert not caller.is_admin and caller.tier.name == "standard"


def test_a_cached_verification_ends_with_the_tokens_expiry_not_the_caches_ttl() -> None:
    # Verified tokens are cached by digest; a hit must still honour exp (+ leeway), or an expired token would
    # be accepted for as long as it sat in the cache.
    from gateway_lib.auth.authenticator import VERIFIED_TOKEN_TTL_SECONDS, _VerifiedTokens

    now = [1000.0]
    cache = _VerifiedTokens(lambda: now[0], leeway=10)
    cache.put(b"soon", {"exp": 1010})  # exp + leeway (1020) comes before the cache's own TTL ends the entry
    cache.put(b"late", {"exp": 1000 + 10 * VERIFIED_TOKEN_TTL_SECONDS})
    now[0] = 1019.0
    assert cache.get(b"soon") == {"exp": 1010}  # within exp + leeway
    now[0] = 1020.0
    assert cache.get(b"soon") is None and cache.get(b"late") is not None
    now[0] = 1000 + VERIFIED_TOKEN_TTL_SECONDS
    assert cache.get(b"late") is None  # and never past the cache's TTL: revocations and key rotations show

"""caller_from_claims: identity, tier and team from verified claims (pure, no I/O)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway_lib.auth.entitlements import caller_from_claims
from gateway_lib.config.tiers import TierPolicy, default_tiers_json, parse_tiers
from gateway_lib.errors import AuthenticationFailed, PermissionDenied

TID = "00000000-0000-4000-8000-000000000de0"
APP = "11111111-2222-4333-8444-555555555555"
USER = "99999999-8888-4777-8666-555555555555"
SP = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"


@pytest.fixture(scope="module")
def policy() -> TierPolicy:
    problems: list[str] = []
    parsed = parse_tiers(default_tiers_json(), problems)
    assert parsed is not None and not problems
    return parsed


def app_only(**extra: Any) -> dict[str, Any]:
    return {"azp": APP, "tid": TID, "oid": SP, "roles": ["Gateway.Standard"], **extra}


def delegated(**extra: Any) -> dict[str, Any]:
    return {"azp": APP, "tid": TID, "oid": USER, "scp": "Gateway.Invoke User.Read", **extra}


def test_app_only_token_has_no_user_even_though_oid_is_present(policy: TierPolicy) -> None:
    caller = caller_from_claims(app_only(), policy)
    assert (caller.app_id, caller.tenant_id, caller.user_id) == (APP, TID, None)
    assert caller.tier.name == "standard"
    assert caller.roles == {"Gateway.Standard"} and caller.scopes == frozenset()
    assert not caller.is_admin


def test_v1_token_names_the_client_appid(policy: TierPolicy) -> None:
    claims = app_only()
    claims["appid"] = claims.pop("azp")
    assert caller_from_claims(claims, policy).app_id == APP


def test_delegated_token_carries_the_user_and_maps_scope_to_tier(policy: TierPolicy) -> None:
    caller = caller_from_claims(delegated(), policy)
    assert caller.user_id == USER
    assert caller.scopes == {"Gateway.Invoke", "User.Read"}
    assert caller.tier.name == "standard"
    assert caller.key == f"{TID}:{APP}:{USER}"


def test_best_tier_in_tier_order_wins(policy: TierPolicy) -> None:
    caller = caller_from_claims(app_only(roles=["Gateway.Basic", "Gateway.Premium", "Gateway.Standard"]), policy)
    assert caller.tier.name == "premium"


def test_role_beats_scope_when_it_names_a_better_tier(policy: TierPolicy) -> None:
    assert caller_from_claims(delegated(roles=["Gateway.Premium"]), policy).tier.name == "premium"


def test_admin_role_makes_an_admin_in_the_admin_tier(policy: TierPolicy) -> None:
    caller = caller_from_claims(app_only(roles=["Gateway.Admin"]), policy)
    assert caller.is_admin and caller.tier.name == "admin"


@pytest.mark.parametrize("claims", [app_only(roles=[]), app_only(roles=["Other.Role"]), delegated(scp="User.Read")])
def test_no_gateway_role_or_scope_is_403_listing_what_is_needed(policy: TierPolicy, claims: dict[str, Any]) -> None:
    with pytest.raises(PermissionDenied) as err:
        caller_from_claims(claims, policy)
    assert err.value.status == 403
    assert "need one of" in err.value.message and "Gateway.Standard" in err.value.message
    assert "Gateway.Invoke" in err.value.message


def test_roles_claim_that_is_not_a_list_grants_nothing(policy: TierPolicy) -> None:
    with pytest.raises(PermissionDenied):
        caller_from_claims(app_only(roles="Gateway.Admin"), policy)


@pytest.mark.parametrize(("drop", "word"), [("azp", "azp or appid"), ("tid", "tid")])
def test_missing_identity_claims_are_401(policy: TierPolicy, drop: str, word: str) -> None:
    claims = app_only()
    del claims[drop]
    with pytest.raises(AuthenticationFailed) as err:
        caller_from_claims(claims, policy)
    assert err.value.status == 401 and word in err.value.message


def test_delegated_token_without_oid_is_401(policy: TierPolicy) -> None:
    claims = delegated()
    del claims["oid"]
    with pytest.raises(AuthenticationFailed, match="oid"):
        caller_from_claims(claims, policy)


def test_team_comes_from_the_configured_claim_first(policy: TierPolicy) -> None:
    teamed = dataclasses.replace(policy, team_claim="extn.costCenter", teams={APP: "platform"})
    assert caller_from_claims(app_only(**{"extn.costCenter": "cc-42"}), teamed).team == "cc-42"


def test_team_mapping_prefers_the_user_then_the_app(policy: TierPolicy) -> None:
    teamed = dataclasses.replace(policy, team_claim="extn.costCenter", teams={USER: "research", APP: "platform"})
    assert caller_from_claims(delegated(), teamed).team == "research"
    assert caller_from_claims(app_only(), teamed).team == "platform"
    assert caller_from_claims(app_only(azp="other-app"), teamed).team is None


def test_label_is_recorded_but_not_identity(policy: TierPolicy) -> None:
    caller = caller_from_claims(app_only(), policy, label="apim-sub-marketing")
    assert caller.label == "apim-sub-marketing"
    assert "apim" not in caller.key


def test_a_users_assigned_role_decides_the_tier_and_the_scope_only_stands_in_without_one(policy: TierPolicy) -> None:
    # Every delegated token carries Gateway.Invoke: if it counted beside roles, no user could be given basic.
    assert caller_from_claims(delegated(roles=["Gateway.Basic"]), policy).tier.name == "basic"
    assert caller_from_claims(delegated(roles=["Gateway.Premium"]), policy).tier.name == "premium"
    assert caller_from_claims(delegated(), policy).tier.name == "standard"


PARTNER = "22222222-0000-4000-8000-000000000de0"


def test_only_the_home_tenants_admins_administer_the_gateway(policy: TierPolicy) -> None:
    home = frozenset({TID})
    assert caller_from_claims(app_only(roles=["Gateway.Admin"]), policy, admin_tenants=home).is_admin
    partner = caller_from_claims(app_only(tid=PARTNER, roles=["Gateway.Admin", "Gateway.Standard"]), policy,
                                 admin_tenants=home)
    assert not partner.is_admin and partner.tier.name == "standard"
    with pytest.raises(PermissionDenied):  # a partner's admin role alone grants nothing here
        caller_from_claims(app_only(tid=PARTNER, roles=["Gateway.Admin"]), policy, admin_tenants=home)

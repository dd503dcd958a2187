"""Who may read the spend reports, and how the dashboard signs in: pure functions of the caller and settings."""

from __future__ import annotations

import dataclasses

import pytest

from gateway_lib.auth.entitlements import caller_from_claims
from gateway_lib.auth.identity import Caller
from gateway_lib.config.tiers import TierPolicy, default_tiers_json, parse_tiers
from gateway_lib.errors import PermissionDenied
from gateway_lib.http.admin_reports import viewer_team
from gateway_lib.http.dashboard_page import sign_in_config
from tests.unit import test_quota

HOME, PARTNER = "00000000-0000-4000-8000-000000000de0", "11111111-0000-4000-8000-000000000de1"


def policy() -> TierPolicy:
    parsed = parse_tiers(default_tiers_json(), [])
    assert parsed is not None
    return parsed


def claims(roles: list[str], tid: str = HOME, **more: object) -> dict[str, object]:
    return {"azp": "app-1", "tid": tid, "roles": roles, **more}


def caller(**changes: object) -> Caller:
    return dataclasses.replace(test_quota.make_caller(team="red"), **changes)  # type: ignore[arg-type]


def test_an_admin_sees_every_team_and_a_team_lead_only_its_own() -> None:
    assert viewer_team(caller(is_admin=True)) is None
    assert viewer_team(caller(is_team_lead=True, lead_team="red")) == "red"
    assert viewer_team(caller(is_admin=True, is_team_lead=True, lead_team="red")) is None


@pytest.mark.parametrize("changes", [{}, {"is_team_lead": True, "lead_team": None}])
def test_neither_role_or_a_lead_without_a_team_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(PermissionDenied):
        viewer_team(caller(**changes))


def test_the_team_lead_role_counts_only_from_the_home_tenant() -> None:
    home = caller_from_claims(claims(["Gateway.Standard", "Gateway.TeamLead"]), policy(), admin_tenants=frozenset({HOME}))
    partner = caller_from_claims(claims(["Gateway.Standard", "Gateway.TeamLead"], PARTNER), policy(),
                                 admin_tenants=frozenset({HOME}))
    assert (home.is_team_lead, partner.is_team_lead, home.is_admin) == (True, False, False)


def test_names_come_from_the_token_and_only_a_delegated_token_names_a_user() -> None:
    app_only = caller_from_claims(claims(["Gateway.Standard"], app_displayname="Billing bot", name="ignored"), policy())
    assert (app_only.app_name, app_only.user_name) == ("Billing bot", None)
    v2 = caller_from_claims(claims(["Gateway.Standard"]), policy())
    assert v2.app_name == "app-1"  # v2 tokens carry no display name: the client id stands in
    user = caller_from_claims(claims([], scp="Gateway.Invoke", oid="u-1", preferred_username="ada@example.com"),
                              policy())
    assert (user.user_id, user.user_name) == ("u-1", "ada@example.com")


def test_the_dashboard_signs_in_with_msal_only_where_the_audience_names_an_entra_client() -> None:
    settings = test_quota.make_settings().auth
    assert sign_in_config(settings) == {"mode": "dev-token"}
    guid = "3f2b8c1e-5d4a-4e7b-9c0d-1a2b3c4d5e6f"
    entra = dataclasses.replace(settings, audiences=(f"api://{guid}", guid))
    assert sign_in_config(entra) == {
        "mode": "msal", "client_id": guid, "authority": f"https://login.microsoftonline.com/{settings.tenant_ids[0]}",
        "scopes": [f"api://{guid}/.default"]}


def test_a_delegated_lead_reads_its_users_team_not_the_team_of_the_app_it_signed_in_through() -> None:
    lead = ["Gateway.Standard", "Gateway.TeamLead"]
    teams = dataclasses.replace(policy(), teams={"app-1": "blue", "u-red": "red"})
    via_blue_app = caller_from_claims(claims(lead, scp="Gateway.Invoke", oid="u-lead"), teams)
    assert via_blue_app.team == "blue"  # its requests are the app's team's spend...
    with pytest.raises(PermissionDenied):  # ...but the user leads no team: blue's reports are not its to read
        viewer_team(via_blue_app)
    mapped_user = caller_from_claims(claims(lead, scp="Gateway.Invoke", oid="u-red"), teams)
    assert viewer_team(mapped_user) == "red"
    app_only = caller_from_claims(claims(lead), teams)  # an application holding the role leads its own team
    assert viewer_team(app_only) == "blue"
    claimed = caller_from_claims(claims(lead, scp="Gateway.Invoke", oid="u-lead", team="green"),
                                 dataclasses.replace(teams, team_claim="team"))
    assert viewer_team(claimed) == "green"

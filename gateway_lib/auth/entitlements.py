"""From verified token claims to a ``Caller``: who is calling, for whom, and in which tier.

Pure: no I/O, no clock. Claims must already be verified (signature, issuer, audience, lifetime).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway_lib.auth.identity import Caller
from gateway_lib.config.tiers import Tier, TierPolicy
from gateway_lib.errors import AuthenticationFailed, PermissionDenied


def caller_from_claims(claims: Mapping[str, Any], policy: TierPolicy, label: str | None = None,
                       admin_tenants: frozenset[str] | None = None) -> Caller:
    """Build the caller from verified claims; 401 when identity claims are missing, 403 without a tier.

    ``admin_tenants``: the tenants whose admin role counts (the gateway's home tenant). A partner tenant
    of a multi-tenant deployment assigns roles in its own directory; its "admin" (or team lead) must not
    administer everyone's limits or read their spend. None: no restriction (single-tenant use and tests)."""
    app_id = _text(claims, "azp") or _text(claims, "appid")  # v2 names the client azp, v1 appid
    if app_id is None:
        raise AuthenticationFailed("token lacks the client application claim (azp or appid)")
    tenant_id = _text(claims, "tid")
    if tenant_id is None:
        raise AuthenticationFailed("token lacks the tenant claim (tid)")
    roles = _roles(claims)
    if admin_tenants is not None and tenant_id.lower() not in admin_tenants:
        roles = roles - {policy.admin_role, policy.team_lead_role}
    scopes = frozenset((_text(claims, "scp") or "").split())
    user_id = _user_id(claims, delegated=bool(scopes))
    return Caller(
        app_id=app_id, tenant_id=tenant_id, user_id=user_id, tier=_tier(roles, scopes, policy),
        roles=roles, scopes=scopes, is_admin=policy.admin_role in roles,
        team=_team(claims, policy, app_id, user_id), label=label,
        is_team_lead=policy.team_lead_role in roles,
        lead_team=_lead_team(claims, policy, app_id, user_id) if policy.team_lead_role in roles else None,
        # Names for the spend reports' callers directory only: v1 tokens carry the app's display name,
        # v2 tokens only its id; a delegated token names its user.
        app_name=_text(claims, "app_displayname") or app_id,
        user_name=(_text(claims, "name") or _text(claims, "preferred_username")) if user_id else None,
    )


def _text(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return (value.strip() or None) if isinstance(value, str) else None


def _roles(claims: Mapping[str, Any]) -> frozenset[str]:
    value = claims.get("roles")
    return frozenset(r for r in value if isinstance(r, str)) if isinstance(value, list) else frozenset()


def _user_id(claims: Mapping[str, Any], *, delegated: bool) -> str | None:
    # App-only tokens carry `roles` and an oid that is the service principal, not a person:
    # treating it as a user would split one application's quota across a fake user.
    if not delegated:
        return None
    oid = _text(claims, "oid")
    if oid is None:
        raise AuthenticationFailed("delegated token lacks the user object id claim (oid)")
    return oid


def _tier(roles: frozenset[str], scopes: frozenset[str], policy: TierPolicy) -> Tier:
    # Roles assigned to the user (or the app) decide; a delegated scope only stands in when no role maps.
    # Every delegated token carries the scope: if it counted beside roles, a user assigned a lower tier
    # would always get the scope's.
    matched = {policy.role_tiers[r] for r in roles if r in policy.role_tiers}
    if not matched:
        matched = {policy.scope_tiers[s] for s in scopes if s in policy.scope_tiers}
    ranked = [name for name in policy.tier_order if name in matched] + sorted(matched - set(policy.tier_order))
    for name in ranked:
        if name in policy.tiers:
            return policy.tiers[name]
    raise PermissionDenied(f"token lacks a gateway role or scope; need one of: {_needed(policy)}")


def _needed(policy: TierPolicy) -> str:
    roles = ", ".join(f"role {r}" for r in policy.role_tiers)
    scopes = ", ".join(f"scope {s}" for s in policy.scope_tiers)
    return ", ".join(part for part in (roles, scopes) if part) or "(no roles or scopes are configured)"


def _lead_team(claims: Mapping[str, Any], policy: TierPolicy, app_id: str, user_id: str | None) -> str | None:
    # A delegated token's lead is its user: the client app it signed in through (another team's tool, or the
    # dashboard's own registration) must not choose the team whose spend the user reads.
    if user_id is None:
        return _team(claims, policy, app_id, None)
    if policy.team_claim and (team := _text(claims, policy.team_claim)):
        return team
    return policy.teams.get(user_id)


def _team(claims: Mapping[str, Any], policy: TierPolicy, app_id: str, user_id: str | None) -> str | None:
    if policy.team_claim and (team := _text(claims, policy.team_claim)):
        return team
    if user_id and user_id in policy.teams:
        return policy.teams[user_id]
    return policy.teams.get(app_id)

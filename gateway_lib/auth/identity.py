"""Who is calling: a ``Caller`` derived from verified token claims only."""

from __future__ import annotations

from dataclasses import dataclass

from gateway_lib.config.tiers import Tier


@dataclass(frozen=True)
class Caller:
    app_id: str  # azp (v2) / appid (v1): the calling application
    tenant_id: str  # tid
    user_id: str | None  # oid when the token is delegated (on-behalf-of a user)
    tier: Tier
    roles: frozenset[str]
    scopes: frozenset[str]
    is_admin: bool
    team: str | None = None
    label: str | None = None  # e.g. APIM subscription name: recorded, never trusted as identity
    is_team_lead: bool = False  # may read its own team's spend reports (app role Gateway.TeamLead)
    lead_team: str | None = None  # the team a lead reads: a delegated token's user's, never its client app's
    app_name: str | None = None  # readable names for the callers directory, from the token; never identity
    user_name: str | None = None

    @property
    def key(self) -> str:
        """Quota / ledger partition identity: app X, or app X for user Y."""
        return f"{self.tenant_id}:{self.app_id}:{self.user_id or '-'}"

    @property
    def display(self) -> str:
        return f"app {self.app_id} for user {self.user_id}" if self.user_id else f"app {self.app_id}"

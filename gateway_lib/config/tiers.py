"""Tiers: what a class of callers may do (models, token caps, rate limits, default budgets).

App roles (``roles`` claim) and delegated scopes (``scp`` claim) map to tiers; the
mapping is configuration (``GATEWAY_TIERS`` JSON, default ``defaults/tiers.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

_INT_LIMITS = ("max_tokens_per_request", "requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month")
_USD_LIMITS = ("usd_per_day", "usd_per_month")


@dataclass(frozen=True)
class Tier:
    name: str
    models: frozenset[str]  # alias names; "*" = every alias
    max_tokens_per_request: int
    max_tokens_policy: str  # "clamp": lower max_tokens to the cap; "reject": 400
    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int
    tokens_per_month: int
    usd_per_day: Decimal
    usd_per_month: Decimal
    fail_open: bool  # admit when quota storage is unreachable (default False: fail closed)

    def allows(self, alias: str) -> bool:
        return "*" in self.models or alias in self.models


@dataclass(frozen=True)
class TierPolicy:
    tiers: Mapping[str, Tier]
    role_tiers: Mapping[str, str]  # app role -> tier
    scope_tiers: Mapping[str, str]  # delegated scope -> tier
    tier_order: tuple[str, ...]  # best first: a caller holding several roles gets the first match
    admin_role: str
    team_lead_role: str  # reads its own team's spend reports
    team_claim: str | None  # claim carrying team / cost centre, if any
    teams: Mapping[str, str]  # app id or object id -> team, when no claim carries it


def default_tiers_json() -> str:
    return resources.files("gateway_lib.config.defaults").joinpath("tiers.json").read_text(encoding="utf-8")


def parse_tiers(raw: str, problems: list[str]) -> TierPolicy | None:
    """Parse tier JSON, appending every problem found to ``problems``."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        problems.append(f"GATEWAY_TIERS: not valid JSON ({exc.msg} at line {exc.lineno})")
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), dict) or not doc["tiers"]:
        problems.append("GATEWAY_TIERS: must be an object with a non-empty 'tiers' object")
        return None
    tiers = {name: t for name, spec in doc["tiers"].items() if (t := _tier(name, spec, problems))}
    role_tiers = _mapping(doc, "role_tiers", problems)
    scope_tiers = _mapping(doc, "scope_tiers", problems)
    for source, mapping in (("role_tiers", role_tiers), ("scope_tiers", scope_tiers)):
        for key, tier in mapping.items():
            if tier not in doc["tiers"]:
                problems.append(f"GATEWAY_TIERS: {source}['{key}'] names unknown tier '{tier}'")
    listed_order = doc.get("tier_order") or sorted(tiers)
    if not isinstance(listed_order, list) or not all(isinstance(n, str) for n in listed_order):
        problems.append("GATEWAY_TIERS: 'tier_order' must be a list of tier names")
        listed_order = sorted(tiers)
    order = tuple(listed_order)
    for name in order:
        if name not in doc["tiers"]:
            problems.append(f"GATEWAY_TIERS: tier_order names unknown tier '{name}'")
    return TierPolicy(
        tiers=tiers, role_tiers=role_tiers, scope_tiers=scope_tiers, tier_order=order,
        admin_role=str(doc.get("admin_role") or "Gateway.Admin"),
        team_lead_role=str(doc.get("team_lead_role") or "Gateway.TeamLead"),
        team_claim=_team_claim(doc, problems), teams=_mapping(doc, "teams", problems),
    )


def _mapping(doc: dict[str, Any], key: str, problems: list[str]) -> dict[str, str]:
    value = doc.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        problems.append(f"GATEWAY_TIERS: '{key}' must map strings to strings")
        return {}
    return dict(value)


def _tier(name: str, spec: Any, problems: list[str]) -> Tier | None:
    where = f"GATEWAY_TIERS: tier '{name}'"
    if not isinstance(spec, dict):
        problems.append(f"{where} must be an object")
        return None
    before = len(problems)
    ints: dict[str, Any] = {}
    for key in _INT_LIMITS:
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{where}: '{key}' must be a positive integer")
        ints[key] = value
    usd: dict[str, Any] = {}
    for key in _USD_LIMITS:
        try:
            usd[key] = Decimal(str(spec.get(key)))
            if not usd[key].is_finite() or usd[key] <= 0:
                raise InvalidOperation
        except (InvalidOperation, ValueError):
            problems.append(f"{where}: '{key}' must be a positive decimal string")
    policy = spec.get("max_tokens_policy", "clamp")
    if policy not in ("clamp", "reject"):
        problems.append(f"{where}: 'max_tokens_policy' must be 'clamp' or 'reject'")
    models: Any = spec.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        problems.append(f"{where}: 'models' must be a non-empty list of aliases (or [\"*\"])")
    if len(problems) > before:
        return None
    return Tier(name=name, models=frozenset(models), max_tokens_policy=policy,
                fail_open=bool(spec.get("fail_open", False)), **ints, **usd)


def _team_claim(doc: dict[str, Any], problems: list[str]) -> str | None:
    claim = doc.get("team_claim") or None
    if claim is not None and not isinstance(claim, str):
        problems.append("GATEWAY_TIERS: 'team_claim' must be a claim name (a string) or null")
        return None
    return claim

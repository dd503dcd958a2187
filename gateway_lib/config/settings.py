"""The one settings object, built once from the environment.

Nothing else in the gateway reads ``os.environ``. ``Settings.from_env`` collects
*every* configuration problem and raises one ``ConfigError`` listing them all, so an
operator fixes a bad deployment in one pass. Names here match
``local.settings.example.json`` and the Bicep app settings (``SETTING_NAMES``; a test
holds the three together).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from gateway_lib.config.catalog import Catalogue, default_catalogue_json, parse_catalogue
from gateway_lib.config.reader import SettingsReader as _Env
from gateway_lib.config.tiers import TierPolicy, default_tiers_json, parse_tiers
from gateway_lib.guardrails.pii import pii_problems
from gateway_lib.providers import registry
from gateway_lib.providers.base import ProviderSettings

# Every app setting the gateway reads. Platform settings (FUNCTIONS_*, AzureWebJobsStorage,
# PYTHON_ENABLE_INIT_INDEXING) belong to the host and are listed in PLATFORM_SETTING_NAMES.
SETTING_NAMES: tuple[str, ...] = (
    "GATEWAY_ENVIRONMENT",
    "GATEWAY_MODELS",
    "GATEWAY_TIERS",
    "GATEWAY_MAX_BODY_BYTES",
    "GATEWAY_MAX_PROMPT_CHARS",
    "GATEWAY_MAX_MESSAGES",
    "GATEWAY_DENY_PATTERNS",
    "GATEWAY_PII_PATTERNS",
    "GATEWAY_UPSTREAM_TIMEOUT_SECONDS",
    "GATEWAY_CONNECT_TIMEOUT_SECONDS",
    "AUTH_TENANT_IDS",
    "AUTH_ALLOWED_TENANTS",
    "AUTH_AUDIENCES",
    "AUTH_EXTRA_ISSUERS",
    "AUTH_OPENID_CONFIG_URL",
    "AUTH_JWKS_URL",
    "AUTH_ALGORITHMS",
    "AUTH_LEEWAY_SECONDS",
    "AUTH_JWKS_CACHE_TTL_SECONDS",
    "AUTH_JWKS_MIN_REFRESH_SECONDS",
    "AZURE_CLIENT_ID",
    "GATEWAY_STORAGE_MODE",
    "GATEWAY_STORAGE_CONNECTION_STRING",
    "GATEWAY_TABLE_ENDPOINT",
    "GATEWAY_TABLE_PREFIX",
    "GATEWAY_QUOTA_MODE",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "BUDGET_ROLLUP_SCHEDULE",
    "BUDGET_ALERT_THRESHOLDS",
    "BUDGET_ENFORCEMENT",
    "BUDGET_DOWNGRADE_ALIAS",
    "BUDGET_ROLLUP_MAX_ROWS",
    "ALERT_WEBHOOK_URL",
    # ... and each provider's own section (``gateway_lib/providers/<name>/config.py``):
    *(name for spec in registry.specs().values() for name in spec.setting_names),
)
PLATFORM_SETTING_NAMES: tuple[str, ...] = (
    "FUNCTIONS_WORKER_RUNTIME",
    "AzureWebJobsStorage",
    "PYTHON_ENABLE_INIT_INDEXING",
)

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def worker_indexing_problem(environ: Mapping[str, str]) -> str | None:
    """Under the Functions host, HTTP streams need the worker to index at init: with PYTHON_ENABLE_INIT_INDEXING
    unset the worker reports no HTTP endpoint and every HTTP call waits for the front end's timeout; with 0
    no function loads. Outside the host (tests, tools) the setting is not needed."""
    under_host = "FUNCTIONS_WORKER_RUNTIME" in environ or bool(environ.get("WEBSITE_INSTANCE_ID"))
    if under_host and environ.get("PYTHON_ENABLE_INIT_INDEXING") != "1":
        return ("PYTHON_ENABLE_INIT_INDEXING must be '1' under the Functions host (HTTP streams): unset, every HTTP "
                "call hangs until the front end's timeout; '0', no function loads")
    return None


def check_worker_indexing(environ: Mapping[str, str] | None = None) -> None:
    """Fail indexing loudly (the host logs it, naming the setting) instead of serving nothing silently."""
    problem = worker_indexing_problem(os.environ if environ is None else environ)
    if problem:
        raise ConfigError([problem])


class ConfigError(Exception):
    """Raised once with every configuration problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class AuthSettings:
    tenant_ids: tuple[str, ...]  # tenants whose v1/v2 issuers are trusted
    allowed_tenants: tuple[str, ...]  # optional allowlist on the `tid` claim (multi-tenant apps); empty = tenant_ids
    audiences: tuple[str, ...]  # app ID URI and/or client id
    extra_issuers: tuple[str, ...]  # exact issuer strings trusted in addition (e.g. a sovereign cloud)
    openid_config_url: str | None
    jwks_url: str | None  # set directly, or discovered from the OpenID configuration
    algorithms: tuple[str, ...]
    leeway_seconds: int
    jwks_cache_ttl_seconds: int
    jwks_min_refresh_seconds: int  # at most one refetch per interval for unknown `kid`s


@dataclass(frozen=True)
class LimitSettings:
    max_body_bytes: int
    max_prompt_chars: int
    max_messages: int
    deny_patterns: tuple[str, ...]  # regexes; a match is a 400 content_filter
    pii_patterns: tuple[str, ...]  # names of built-in PII detectors to enforce (email, credit_card, us_ssn, ...)


@dataclass(frozen=True)
class StorageSettings:
    mode: str  # table | memory (memory: tests and benchmarks only; refused in Azure)
    connection_string: str | None  # Azurite / local
    table_endpoint: str | None  # https://<account>.table.core.windows.net, reached with managed identity
    table_prefix: str
    quota_mode: str  # strict (every request reserves and settles on the row) | leased (gateway_lib/leases.py)


@dataclass(frozen=True)
class BudgetSettings:
    rollup_schedule: str  # NCRONTAB, checked for its six fields; the timer trigger binds %BUDGET_ROLLUP_SCHEDULE% itself
    alert_thresholds: tuple[int, ...]  # percent of budget
    enforcement: str  # none | block | downgrade
    downgrade_alias: str | None
    rollup_max_rows: int  # bounded work per run; a backlog is worked through across runs
    alert_webhook_url: str | None
    # App Service leaves a Key Vault reference it cannot resolve (secret missing, role not yet effective) as
    # its literal text: the webhook is then off, with a warning, instead of the whole gateway refusing to start.
    alert_webhook_unresolved: bool = False


@dataclass(frozen=True)
class Settings:
    environment: str  # local | dev | test | prod (validated; nothing branches on it)
    catalogue: Catalogue
    tiers: TierPolicy
    auth: AuthSettings
    providers: ProviderSettings
    limits: LimitSettings
    storage: StorageSettings
    budget: BudgetSettings
    appinsights_connection_string: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ, SETTING_NAMES)
        settings = cls(
            environment=env.choice("GATEWAY_ENVIRONMENT", ("local", "dev", "test", "prod"), "prod"),
            catalogue=parse_catalogue(env.text("GATEWAY_MODELS") or default_catalogue_json(), env.problems, registry.names()),  # type: ignore[arg-type]
            tiers=parse_tiers(env.text("GATEWAY_TIERS") or default_tiers_json(), env.problems),  # type: ignore[arg-type]
            auth=_auth(env),
            providers=_providers(env),
            limits=_limits(env),
            storage=_storage(env),
            budget=_budget(env),
            appinsights_connection_string=env.text("APPLICATIONINSIGHTS_CONNECTION_STRING"),
        )
        _cross_checks(settings, env)
        if env.problems:
            raise ConfigError(env.problems)
        return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built on first use (never at import time)."""
    return Settings.from_env()


def _auth(env: _Env) -> AuthSettings:
    tenants = env.csv("AUTH_TENANT_IDS")
    for tid in tenants:
        if not _GUID.match(tid):
            env.problems.append(f"AUTH_TENANT_IDS: '{tid}' is not a tenant GUID")
    if not tenants:
        env.problems.append("AUTH_TENANT_IDS: at least one Entra tenant id is required")
    audiences = env.csv("AUTH_AUDIENCES")
    if not audiences:
        env.problems.append("AUTH_AUDIENCES: the gateway's app ID URI and/or client id is required")
    openid, jwks = env.url("AUTH_OPENID_CONFIG_URL"), env.url("AUTH_JWKS_URL")
    if not openid and not jwks and tenants:
        openid = f"https://login.microsoftonline.com/{tenants[0]}/v2.0/.well-known/openid-configuration"
    algorithms = tuple(env.csv("AUTH_ALGORITHMS") or ["RS256"])
    for alg in algorithms:
        if alg not in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
            env.problems.append(f"AUTH_ALGORITHMS: '{alg}' is not an asymmetric algorithm the gateway accepts")
    return AuthSettings(
        tenant_ids=tuple(tenants), allowed_tenants=tuple(env.csv("AUTH_ALLOWED_TENANTS")),
        audiences=tuple(audiences), extra_issuers=tuple(env.csv("AUTH_EXTRA_ISSUERS")),
        openid_config_url=openid, jwks_url=jwks, algorithms=algorithms,
        leeway_seconds=env.integer("AUTH_LEEWAY_SECONDS", 60, lo=0, hi=300),
        jwks_cache_ttl_seconds=env.integer("AUTH_JWKS_CACHE_TTL_SECONDS", 3600, lo=60),
        jwks_min_refresh_seconds=env.integer("AUTH_JWKS_MIN_REFRESH_SECONDS", 60, lo=1),
    )


def _providers(env: _Env) -> ProviderSettings:
    return ProviderSettings(
        azure_client_id=env.text("AZURE_CLIENT_ID"),
        upstream_timeout_seconds=env.number("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", 120.0, lo=1, hi=230),
        connect_timeout_seconds=env.number("GATEWAY_CONNECT_TIMEOUT_SECONDS", 5.0, lo=0.1, hi=60),
        sections={name: spec.read_settings(env) for name, spec in registry.specs().items()},
    )


def _limits(env: _Env) -> LimitSettings:
    deny: tuple[str, ...] = tuple(env.json_list("GATEWAY_DENY_PATTERNS"))
    for pattern in deny:
        try:
            re.compile(pattern)
        except re.error as exc:
            env.problems.append(f"GATEWAY_DENY_PATTERNS: '{pattern}' is not a valid regex ({exc})")

    env.problems.extend(pii_problems(env.csv("GATEWAY_PII_PATTERNS")))
    return LimitSettings(
        max_body_bytes=env.integer("GATEWAY_MAX_BODY_BYTES", 1_048_576, lo=1024, hi=100 * 1_048_576),
        max_prompt_chars=env.integer("GATEWAY_MAX_PROMPT_CHARS", 400_000, lo=1),
        max_messages=env.integer("GATEWAY_MAX_MESSAGES", 256, lo=1),
        deny_patterns=deny,
        pii_patterns=tuple(env.csv("GATEWAY_PII_PATTERNS")),
    )


def _storage(env: _Env) -> StorageSettings:
    settings = StorageSettings(
        mode=env.choice("GATEWAY_STORAGE_MODE", ("table", "memory"), "table"),
        connection_string=env.text("GATEWAY_STORAGE_CONNECTION_STRING"),
        table_endpoint=env.url("GATEWAY_TABLE_ENDPOINT"),
        table_prefix=env.text("GATEWAY_TABLE_PREFIX") or "gw",
        quota_mode=env.choice("GATEWAY_QUOTA_MODE", ("strict", "leased"), "strict"),
    )
    if settings.mode == "table" and not (settings.connection_string or settings.table_endpoint):
        env.problems.append("GATEWAY_TABLE_ENDPOINT (managed identity) or GATEWAY_STORAGE_CONNECTION_STRING (local) is required")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,20}", settings.table_prefix):
        env.problems.append("GATEWAY_TABLE_PREFIX: letters and digits only, starting with a letter, at most 21 characters")
    return settings


def _budget(env: _Env) -> BudgetSettings:
    thresholds: list[str] = env.csv("BUDGET_ALERT_THRESHOLDS") or ["50", "80", "100"]
    parsed: list[int] = []
    for item in thresholds:
        if item.isascii() and item.isdigit() and 0 < int(item) <= 1000:
            parsed.append(int(item))
        else:
            env.problems.append(f"BUDGET_ALERT_THRESHOLDS: '{item}' must be a whole percent between 1 and 1000")
    unresolved = (env.text("ALERT_WEBHOOK_URL") or "").startswith("@Microsoft.KeyVault(")
    schedule = env.text("BUDGET_ROLLUP_SCHEDULE") or "0 */5 * * * *"
    if len(schedule.split()) != 6:  # the host would refuse the timer; /api/health says why
        env.problems.append(f"BUDGET_ROLLUP_SCHEDULE: '{schedule}' is not an NCRONTAB expression (six fields: "
                            "second minute hour day month day-of-week)")
    return BudgetSettings(
        rollup_schedule=schedule,
        alert_thresholds=tuple(sorted(set(parsed))),
        enforcement=env.choice("BUDGET_ENFORCEMENT", ("none", "block", "downgrade"), "none"),
        downgrade_alias=env.text("BUDGET_DOWNGRADE_ALIAS"),
        rollup_max_rows=env.integer("BUDGET_ROLLUP_MAX_ROWS", 5000, lo=10),
        alert_webhook_url=None if unresolved else env.url("ALERT_WEBHOOK_URL"),
        alert_webhook_unresolved=unresolved,
    )


def _cross_checks(s: Settings, env: _Env) -> None:
    on_azure = env.on_azure
    if indexing := worker_indexing_problem(env.raw):
        env.problems.append(indexing)
    if on_azure and s.storage.mode == "memory":
        env.problems.append("GATEWAY_STORAGE_MODE=memory keeps quotas per process; it is refused in Azure")
    for name, url in (("AUTH_JWKS_URL", s.auth.jwks_url), ("AUTH_OPENID_CONFIG_URL", s.auth.openid_config_url)):
        if on_azure and url and not url.lower().startswith("https://"):  # keys over plain http can be swapped
            env.problems.append(f"{name} must be an https URL in Azure")
    if s.catalogue is None or s.tiers is None:
        return
    for name, spec in registry.specs().items():
        spec.check(s.providers.section(name), s.catalogue, env.problems)
    for tier in s.tiers.tiers.values():
        for alias in tier.models - {"*"}:
            if alias not in s.catalogue.aliases:
                env.problems.append(f"GATEWAY_TIERS: tier '{tier.name}' allows unknown model alias '{alias}'")
    if s.budget.enforcement == "downgrade" and s.budget.downgrade_alias not in s.catalogue.aliases:
        env.problems.append("BUDGET_DOWNGRADE_ALIAS must name a catalogue alias when BUDGET_ENFORCEMENT=downgrade")

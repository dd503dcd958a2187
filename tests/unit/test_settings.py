"""Settings validation: every bad value is a configuration problem naming its setting, never a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway_lib import runtime
from gateway_lib.config.settings import ConfigError, Settings
from gateway_lib.http import api

BASE = {"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
        "GATEWAY_STORAGE_MODE": "memory", "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9",
        "AZURE_OPENAI_AUTH": "api_key", "AZURE_OPENAI_API_KEY": "k"}


@pytest.mark.parametrize(("name", "value"), [
    ("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", "nan"),  # NaN passes every bound: each call then timed out at once
    ("GATEWAY_CONNECT_TIMEOUT_SECONDS", "inf"),
    ("AUTH_JWKS_URL", "http://[::1/keys"),  # urlparse raises on the unclosed bracket
    ("AUTH_JWKS_URL", "http://127.0.0.1:99999/keys"),
    ("ALERT_WEBHOOK_URL", "https://[hooks.example/secret-path"),
    ("BUDGET_ALERT_THRESHOLDS", "50,\u00b2"),  # "²".isdigit() is true; int("²") raises
    ("GATEWAY_MAX_BODY_BYTES", "9" * 400),  # past float range: the NaN check must not raise on it
])
def test_a_bad_value_is_a_configuration_problem_naming_its_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(BASE | {name: value})
    assert any(problem.startswith(name) for problem in raised.value.problems), raised.value.problems
    if "secret" in value:
        assert not any("secret" in problem for problem in raised.value.problems), "a webhook URL is a secret"


def test_settings_that_cannot_be_read_at_all_make_health_a_503_naming_no_values(monkeypatch: Any) -> None:
    def unreadable() -> Settings:
        raise ValueError("something validation did not foresee")

    monkeypatch.setattr(runtime, "get_settings", unreadable)
    monkeypatch.setattr(runtime, "_runtime", None)
    from starlette.requests import Request

    request = Request({"type": "http", "method": "GET", "path": "/api/health", "query_string": b"", "headers": []})
    response = asyncio.run(api.health(request))
    assert response.status_code == 503
    assert b"foresee" not in response.body and b"configuration" in response.body


def _models(change: Any) -> str:
    import json

    from gateway_lib.config.catalog import default_catalogue_json

    doc = json.loads(default_catalogue_json())
    change(doc)
    return json.dumps(doc)


def _tiers(change: Any) -> str:
    import json

    from gateway_lib.config.tiers import default_tiers_json

    doc = json.loads(default_tiers_json())
    change(doc)
    return json.dumps(doc)


@pytest.mark.parametrize(("name", "value"), [
    ("GATEWAY_MODELS", _models(lambda d: d["aliases"]["gpt-4o-mini"].update(targets=5))),
    ("GATEWAY_MODELS", _models(lambda d: d["aliases"]["gpt-4o-mini"].update(targets=[["aoai-gpt-4o-mini-eastus"]]))),
    ("GATEWAY_MODELS", _models(lambda d: d["targets"]["aoai-gpt-4o-mini-eastus"]["price"].update(
        output_per_1k="1E+30"))),  # accepted, it made every request's cost arithmetic raise
    ("GATEWAY_TIERS", _tiers(lambda d: d["tiers"]["standard"].update(models=[["gpt-4o-mini"]]))),
    ("GATEWAY_TIERS", _tiers(lambda d: d.update(tier_order=5))),
    ("GATEWAY_TIERS", _tiers(lambda d: d.update(tier_order=[{"name": "standard"}]))),
    ("GATEWAY_TIERS", _tiers(lambda d: d.update(team_claim=["groups"]))),  # passed, then every request was a 500
])
def test_a_malformed_catalogue_or_tier_policy_is_a_problem_naming_it_not_a_crash(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(BASE | {name: value})
    assert any(problem.startswith(name) for problem in raised.value.problems), raised.value.problems


def test_an_unresolved_key_vault_reference_turns_the_webhook_off_and_nothing_else() -> None:
    # App Service leaves a reference it cannot resolve as its literal text (a secret not stored yet, a role
    # assignment not effective yet): alerting is degraded, serving must not be.
    settings = Settings.from_env(BASE | {
        "ALERT_WEBHOOK_URL": "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/alert-webhook/)"})
    assert settings.budget.alert_webhook_url is None and settings.budget.alert_webhook_unresolved
    assert not Settings.from_env(BASE | {"ALERT_WEBHOOK_URL": "https://hooks.example/x"}).budget.alert_webhook_unresolved

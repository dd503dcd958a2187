"""Parse-level checks of infra/ (no Bicep CLI, no Azure): settings drift, policies, modules, parameters.

The Bicep "parser" here is deliberately small: comments are stripped outside strings, blocks are found by
brace matching. It is enough to hold the app settings, module parameters and parameter files together.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.config.settings import PLATFORM_SETTING_NAMES, SETTING_NAMES

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
FUNCTION = INFRA / "app" / "function.bicep"
POLICIES = INFRA / "apim" / "policies"
PARAMETER_FILES = sorted(INFRA.glob("main.parameters.*.json"))

# Host settings that only exist in Azure (identity-based host storage, Entra auth to App Insights).
AZURE_ONLY_PLATFORM = {
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}
# Flex Consumption rejects these as app settings: the runtime is set in functionAppConfig.
FLEX_FORBIDDEN = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE"}


def strip_comments(text: str) -> str:
    """Remove // and /* */ comments that are outside single-quoted Bicep strings."""
    out, i, quoted = [], 0, False
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                out.append(text[i : i + 2])
                i += 2
                continue
            quoted = ch != "'"
        elif ch == "'":
            quoted = True
        elif text.startswith("//", i):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def bicep(path: Path) -> str:
    return strip_comments(path.read_text())


def block_after(text: str, start: int) -> str:
    """The {...} block that opens at or after `start` (brace matching; strings hold no braces here)."""
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at : i + 1]
    raise ValueError("unbalanced braces")


def declared_params(path: Path) -> dict[str, bool]:
    """Parameter name -> has a default value."""
    params = {}
    for m in re.finditer(r"^param\s+(\w+)\s+\w+(\s*=)?", bicep(path), re.M):
        params[m.group(1)] = bool(m.group(2))
    return params


def function_app_settings() -> list[str]:
    return re.findall(r"\{\s*name:\s*'([^']+)'\s*[\n,]?\s*value:", bicep(FUNCTION))


def local_settings() -> dict[str, str]:
    return json.loads((ROOT / "local.settings.example.json").read_text())["Values"]


def modules_of_main(text: str | None = None) -> list[tuple[str, Path, str]]:
    text = bicep(MAIN) if text is None else strip_comments(text)
    modules = []
    for m in re.finditer(r"^module\s+(\w+)\s+'([^']+)'\s*=", text, re.M):
        modules.append((m.group(1), (INFRA / m.group(2)).resolve(), block_after(text, m.end())))
    return modules


def passed_params(module_block: str) -> set[str]:
    """The top-level names in a module call's params: { ... } (4-space indent, as main.bicep is formatted)."""
    params_block = block_after(module_block, module_block.index("params:"))
    return set(re.findall(r"^ {4}(\w+)\s*:", params_block, re.M))


def function_params_main_does_not_pass(main_text: str) -> set[str]:
    block = next(block for _, path, block in modules_of_main(main_text) if path == FUNCTION)
    return set(declared_params(FUNCTION)) - passed_params(block)


README = ROOT / "docs" / "configuration.md"  # every setting's row (the README lists the first few and links here)


def readme_setting_names(text: str | None = None) -> list[str]:
    """The names in the first column of the configuration table (`A` / `B` rows name two)."""
    text = README.read_text() if text is None else text
    section = text.split("\n| setting |", 1)[1].split("\n\n", 1)[0]
    names: list[str] = []
    for row in section.splitlines():
        if row.startswith("| `"):
            names += re.findall(r"`(\w+)`", row.split("|")[1])
    return names


# --- settings drift: SETTING_NAMES <-> function.bicep <-> local.settings.example.json ---


# Providers the template configures with parameters of its own; any other provider's settings are deployed
# through the providerSettings object, so adding a provider needs no template change.
TEMPLATE_PROVIDERS = ("azure_openai", "bedrock")


def settings_of_other_providers() -> set[str]:
    from gateway_lib.providers import registry

    return {n for name, spec in registry.specs().items() if name not in TEMPLATE_PROVIDERS for n in spec.setting_names}


@pytest.mark.parametrize("name", sorted(set(SETTING_NAMES) - settings_of_other_providers()))
def test_every_gateway_setting_is_an_app_setting_in_function_bicep(name: str) -> None:
    assert name in function_app_settings()


@pytest.mark.parametrize("name", sorted(settings_of_other_providers()))
def test_other_providers_settings_are_deployed_through_provider_settings(name: str) -> None:
    assert name not in function_app_settings(), f"{name}: one way in, providerSettings"
    function = bicep(FUNCTION)
    assert "appSettings: concat(gatewayAppSettings, providerAppSettings)" in function
    assert re.search(r"var providerAppSettings = \[for setting in items\(providerSettings\): "
                     r"\{ name: setting\.key, value: string\(setting\.value\) \}\]", function)
    block = next(block for _, path, block in modules_of_main(bicep(MAIN)) if path == FUNCTION)
    assert "providerSettings" in passed_params(block) and "param providerSettings object = {}" in bicep(MAIN)


def test_provider_settings_in_a_parameter_file_name_only_settings_the_template_leaves_out() -> None:
    builtin = set(function_app_settings())
    for path in PARAMETER_FILES:
        given = json.loads(path.read_text())["parameters"].get("providerSettings", {}).get("value", {})
        assert set(given) - set(SETTING_NAMES) == set(), f"{path.name}: unknown settings"
        assert set(given) & builtin == set(), f"{path.name}: set twice"


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_gateway_setting_is_in_local_settings_example(name: str) -> None:
    assert name in local_settings()


def test_function_bicep_sets_no_setting_the_gateway_does_not_know() -> None:
    known = set(SETTING_NAMES) | set(PLATFORM_SETTING_NAMES) | AZURE_ONLY_PLATFORM
    assert set(function_app_settings()) - known == set()


def test_local_settings_example_has_no_setting_the_gateway_does_not_know() -> None:
    assert set(local_settings()) - set(SETTING_NAMES) - set(PLATFORM_SETTING_NAMES) == set()


# --- settings drift: SETTING_NAMES <-> README's configuration table ---


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_every_gateway_setting_is_in_the_readme_table(name: str) -> None:
    assert name in readme_setting_names()


def test_readme_table_lists_no_setting_the_gateway_does_not_know() -> None:
    # Host settings (PLATFORM_SETTING_NAMES) may be listed too; they are documented below the table.
    assert set(readme_setting_names()) - set(SETTING_NAMES) - set(PLATFORM_SETTING_NAMES) == set()


def test_readme_table_lists_each_setting_once() -> None:
    names = readme_setting_names()
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_readme_table_parser_sees_a_missing_or_unknown_name() -> None:
    text = README.read_text()
    assert "| `GATEWAY_QUOTA_MODE` |" in text
    dropped = readme_setting_names(text.replace("| `GATEWAY_QUOTA_MODE` |", "| quota mode |"))
    assert "GATEWAY_QUOTA_MODE" not in dropped and len(dropped) == len(readme_setting_names()) - 1
    added = readme_setting_names(text.replace("| `GATEWAY_QUOTA_MODE` |", "| `GATEWAY_QUOTA_MODE` / `GATEWAY_NOPE` |"))
    assert "GATEWAY_NOPE" in added


def test_function_bicep_sets_each_app_setting_once() -> None:
    names = function_app_settings()
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_flex_app_does_not_set_settings_flex_rejects() -> None:
    assert FLEX_FORBIDDEN & set(function_app_settings()) == set()


def test_http_streams_are_enabled_in_azure() -> None:
    assert re.search(r"name:\s*'PYTHON_ENABLE_INIT_INDEXING',\s*value:\s*'1'", bicep(FUNCTION))


# --- keyless: identity-based host storage, no keys in settings or outputs ---


def test_host_storage_uses_the_managed_identity() -> None:
    text = bicep(FUNCTION)
    assert re.search(r"'AzureWebJobsStorage__credential',\s*value:\s*'managedidentity'", text)
    assert re.search(r"'AzureWebJobsStorage__clientId',\s*value:\s*identityClientId", text)
    assert "'AzureWebJobsStorage'" not in text  # a plain connection string would carry an account key
    assert re.search(r"type:\s*'UserAssignedIdentity'", text)  # Flex deployment storage


def test_storage_account_refuses_shared_keys() -> None:
    text = bicep(INFRA / "app" / "storage.bicep")
    assert re.search(r"allowSharedKeyAccess:\s*false", text)
    assert re.search(r"allowBlobPublicAccess:\s*false", text)
    assert re.search(r"minimumTlsVersion:\s*'TLS1_2'", text)


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.bicep")), ids=lambda p: p.name)
def test_no_account_keys_in_bicep(path: Path) -> None:
    text = bicep(path)
    assert "AccountKey=" not in text
    assert not re.search(r"connectionString\s*:.*listKeys", text, re.I)
    assert not re.search(r"\.listKeys\(\)|listKeys\([^)]*storage", text, re.I)


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.bicep")), ids=lambda p: p.name)
def test_outputs_carry_no_keys(path: Path) -> None:
    for line in re.findall(r"^output\s+.*$", bicep(path), re.M):
        assert not re.search(r"list\w*\(|\.value\b|primaryKey|secondaryKey|AccountKey|password", line, re.I), line


def test_list_keys_only_feeds_a_secret_named_value() -> None:
    for path in INFRA.rglob("*.bicep"):
        text = bicep(path)
        for m in re.finditer(r"listKeys\(", text):
            resource_start = text.rfind("\nresource ", 0, m.start())
            assert path.name == "apim.bicep", path
            assert re.search(r"secret:\s*true", block_after(text, resource_start)), "listKeys outside a secret"


def test_azure_openai_uses_the_managed_identity_in_azure() -> None:
    text = bicep(FUNCTION)
    assert re.search(r"'AZURE_OPENAI_AUTH',\s*value:\s*'managed_identity'", text)
    assert re.search(r"'AZURE_OPENAI_API_KEY',\s*value:\s*''", text)
    assert re.search(r"'AZURE_CLIENT_ID',\s*value:\s*identityClientId", text)


def test_quota_mode_is_a_deployment_parameter_with_the_values_the_gateway_accepts() -> None:
    """Set in the app settings from a parameter, so choosing leased mode survives the next deployment."""
    assert re.search(r"'GATEWAY_QUOTA_MODE',\s*value:\s*quotaMode\s*\}", bicep(FUNCTION))
    for path in (MAIN, FUNCTION):
        allowed = re.search(r"@allowed\(\[([^\]]*)\]\)\s*(?:@description\('[^']*'\)\s*)?param quotaMode string = 'strict'",
                            bicep(path))
        assert allowed is not None, path
        assert re.findall(r"'(\w+)'", allowed.group(1)) == ["strict", "leased"]  # settings.py: env.choice(...)
    function_module = next(block for name, _, block in modules_of_main() if name == "function")
    assert re.search(r"quotaMode:\s*quotaMode", function_module)


def test_app_insights_ingestion_uses_entra() -> None:
    assert "Authorization=AAD" in bicep(FUNCTION)
    monitoring = bicep(INFRA / "app" / "monitoring.bicep")
    assert re.search(r"param disableLocalAuth bool = true", monitoring)
    assert re.search(r"DisableLocalAuth:\s*disableLocalAuth", monitoring)


def test_gateway_tables_match_the_table_prefix() -> None:
    text = bicep(MAIN)
    prefix = re.search(r"var tablePrefix = '(\w+)'", text)
    assert prefix and prefix.group(1) == local_settings()["GATEWAY_TABLE_PREFIX"]
    tables = re.findall(r"'\$\{tablePrefix\}(\w+)'", text)
    assert sorted(tables) == ["alerts", "callers", "overrides", "responses", "rollup", "usage"]


# --- main.bicep composition and parameter files ---


def test_modules_referenced_by_main_exist() -> None:
    for name, path, _ in modules_of_main():
        assert path.is_file(), f"module {name}: {path} missing"


@pytest.mark.parametrize("module", modules_of_main(), ids=lambda m: m[0])
def test_module_calls_pass_declared_params_and_every_required_one(module: tuple[str, Path, str]) -> None:
    _, path, block = module
    params_block = block_after(block, block.index("params:"))
    passed = set(re.findall(r"^\s*(\w+)\s*:", params_block[1:-1], re.M))
    passed = {p for p in passed if re.search(rf"^\s{{4}}{p}\s*:", params_block, re.M)}  # top level only
    declared = declared_params(path)
    assert passed - set(declared) == set(), "passed but not declared"
    assert {p for p, has_default in declared.items() if not has_default} - passed == set(), "required, not passed"


def test_main_passes_every_param_function_bicep_declares() -> None:
    """A function.bicep param main.bicep does not pass keeps its default: its app setting (e.g.
    GATEWAY_DENY_PATTERNS) could then not be set by any deployment. Each one needs a main.bicep param."""
    assert function_params_main_does_not_pass(MAIN.read_text()) == set()


def test_the_pass_through_check_sees_a_param_main_does_not_pass() -> None:
    text = MAIN.read_text()
    assert "    denyPatterns: denyPatterns\n" in text
    assert function_params_main_does_not_pass(text.replace("    denyPatterns: denyPatterns\n", "")) == {"denyPatterns"}


@pytest.mark.parametrize("path", PARAMETER_FILES, ids=lambda p: p.name)
def test_parameter_files_match_main_params(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert doc["$schema"].endswith("deploymentParameters.json#")
    given = set(doc["parameters"])
    declared = declared_params(MAIN)
    assert given - set(declared) == set(), "unknown parameters"
    required = {p for p, has_default in declared.items() if not has_default}
    assert required - given == set(), "required parameters missing"


@pytest.mark.parametrize("path", PARAMETER_FILES, ids=lambda p: p.name)
def test_azure_openai_endpoint_is_an_account_the_gateway_is_granted(path: Path) -> None:
    """AZURE_OPENAI_ENDPOINT serves every target without an endpoint of its own: the identity needs a role there."""
    params = json.loads(path.read_text())["parameters"]
    host = params["azureOpenAiEndpoint"]["value"].split("://", 1)[-1].split("/", 1)[0]
    accounts = {account["name"] for account in params.get("azureOpenAiAccounts", {}).get("value", [])}
    assert host.split(".", 1)[0] in accounts


def test_there_are_dev_and_prod_parameter_files() -> None:
    assert {p.name for p in PARAMETER_FILES} >= {"main.parameters.dev.json", "main.parameters.prod.json"}


def test_prod_storage_is_geo_zone_redundant() -> None:
    prod = json.loads((INFRA / "main.parameters.prod.json").read_text())["parameters"]
    assert prod["storageSku"]["value"] == "Standard_GZRS"  # the cost ledger must survive a regional outage


def test_main_outputs_the_urls() -> None:
    outputs = set(re.findall(r"^output\s+(\w+)", bicep(MAIN), re.M))
    assert {"FUNCTION_APP_URL", "APIM_GATEWAY_URL", "CHAT_COMPLETIONS_URL"} <= outputs


# --- APIM policies ---


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.xml")), ids=lambda p: p.name)
def test_policy_files_parse_as_xml(path: Path) -> None:
    assert ET.parse(path).getroot().tag == "policies"


def test_policies_loaded_by_apim_bicep_exist() -> None:
    loaded = re.findall(r"loadTextContent\('([^']+)'\)", bicep(INFRA / "app" / "apim.bicep"))
    assert loaded
    for rel in loaded:
        assert (INFRA / "app" / rel).resolve().is_file(), rel


def test_stream_policy_forwards_without_buffering() -> None:
    forward = ET.parse(POLICIES / "chat-stream.xml").getroot().find("./backend/forward-request")
    assert forward is not None
    assert forward.get("buffer-response") == "false"
    assert int(forward.get("timeout", "0")) >= 230


def test_stream_policy_never_reads_the_response_body() -> None:
    policy = ET.tostring(ET.parse(POLICIES / "chat-stream.xml").getroot(), encoding="unicode")  # comments dropped
    assert "Response.Body" not in policy


def test_api_policy_validates_the_token_and_keeps_the_authorization_header() -> None:
    root = ET.parse(POLICIES / "api.xml").getroot()
    inbound = root.find("inbound")
    assert inbound is not None
    token = inbound.find("validate-jwt")
    assert token is not None and token.get("failed-validation-httpcode") == "401"
    assert token.get("require-signed-tokens") == "true" and token.get("require-expiration-time") == "true"
    assert [a.text for a in token.iterfind("./audiences/audience")] == ["{{gw-audience}}", "{{gw-audience-client-id}}"]
    set_headers = {h.get("name", "").lower(): h for h in inbound.iter("set-header")}
    assert "authorization" not in set_headers  # forwarded unchanged; the function re-validates it
    assert set_headers["x-functions-key"].findtext("value") == "{{gw-function-key}}"
    assert set_headers["x-apim-subscription"].get("exists-action") == "override"  # never client-supplied
    assert {"x-request-id", "traceparent"} <= set(set_headers)
    assert inbound.find("rate-limit-by-key") is not None
    assert int(root.find("./backend/forward-request").get("timeout", "0")) >= 230  # type: ignore[union-attr]


@pytest.mark.parametrize(("sku", "quota"), [("Developer", True), ("Premium", True), ("StandardV2", False),
                                            ("BasicV2", False)])
def test_quota_by_key_only_where_the_tier_has_it(sku: str, quota: bool) -> None:
    # The v2 tiers do not have quota-by-key (Microsoft's policy reference: Developer | Basic | Standard |
    # Premium); a policy naming it would be refused on prod's StandardV2.
    inbound = rendered_api_policy(["11111111-1111-1111-1111-111111111111"], sku=sku).find("inbound")
    assert inbound is not None and inbound.find("rate-limit-by-key") is not None
    found = inbound.find("quota-by-key")
    assert (found is not None) == quota
    if found is not None:
        assert found.get("calls") == "{{gw-quota-calls}}" and found.get("counter-key", "").startswith("@(")


def rendered_api_policy(tenants: list[str], extra_issuers: list[str] | None = None,
                        openid_config_url: str = "", sku: str = "Developer") -> ET.Element:
    """api.xml as apim.bicep deploys it, given its three parameters: the loops over tenants and extra
    issuers rendered from their templates, the two combining expressions pinned as written."""
    text = bicep(INFRA / "app" / "apim.bicep")
    loops = {name: (var, over, template) for name, var, over, template in
             re.findall(r"var (\w+) = \[for (\w+) in (\w+): empty\(\2\) \? '' : '([^']+)'\]", text)}
    assert set(loops) == {"tenantOpenIdConfigs", "tenantIssuers", "extraIssuerElements"}
    params = {"tenantIds": tenants, "extraIssuers": extra_issuers or [""], "openIdConfigUrl": openid_config_url}

    def joined(name: str) -> str:
        var, over, template = loops[name]
        return "".join(template.replace(f"${{{var}}}", item) for item in params[over] if item)

    assert "var openIdConfigs = empty(openIdConfigUrl) ? join(tenantOpenIdConfigs, '') : " \
           "'<openid-config url=\"${openIdConfigUrl}\" />'" in text
    assert "var issuers = '${join(tenantIssuers, '')}${join(extraIssuerElements, '')}'" in text
    assert "'<!-- gw:openid-configs -->', openIdConfigs), '<!-- gw:issuers -->', issuers)" in text
    assert "var classicTier = !endsWith(toLower(skuName), 'v2')" in text
    quota = re.search(r"var quotaPolicy = classicTier \? '((?:[^'\\]|\\')*)' : ''", text)
    assert quota is not None
    quota_placeholder = "<!-- gw:quota (quota-by-key on the classic tiers only: the v2 tiers do not have it) -->"
    assert f"'{quota_placeholder}', quotaPolicy)" in text
    values = {"<!-- gw:openid-configs -->": (f'<openid-config url="{openid_config_url}" />' if openid_config_url
                                             else joined("tenantOpenIdConfigs")),
              "<!-- gw:issuers -->": joined("tenantIssuers") + joined("extraIssuerElements"),
              quota_placeholder: quota.group(1).replace("\\'", "'") if not sku.lower().endswith("v2") else ""}
    policy = (POLICIES / "api.xml").read_text()
    for placeholder, value in values.items():
        assert policy.count(placeholder) == 1, placeholder
        policy = policy.replace(placeholder, value)
    return ET.fromstring(policy)


def auth_settings(tenants: list[str], extra_issuers: tuple[str, ...] = ()) -> Any:
    from gateway_lib.config.settings import AuthSettings

    return AuthSettings(tenant_ids=tuple(tenants), allowed_tenants=(), audiences=("api://gw",),
                        extra_issuers=extra_issuers, openid_config_url=None, jwks_url=None, algorithms=("RS256",),
                        leeway_seconds=60, jwks_cache_ttl_seconds=3600, jwks_min_refresh_seconds=60)


def test_api_policy_trusts_every_tenant_the_function_trusts() -> None:
    """One openid-config per tenant and each tenant's v1 and v2 issuer: the set gateway_lib.auth.authenticator accepts."""
    from gateway_lib.auth.authenticator import _trusted_issuers

    tenants = ["11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"]
    token = rendered_api_policy([*tenants, ""]).find("./inbound/validate-jwt")  # "": a trailing comma
    assert token is not None
    assert [c.get("url") for c in token.iterfind("openid-config")] == [
        f"https://login.microsoftonline.com/{t}/v2.0/.well-known/openid-configuration" for t in tenants]
    assert {i.text for i in token.iterfind("./issuers/issuer")} == set(_trusted_issuers(auth_settings(tenants)))
    # validate-jwt takes its children in the order of its policy statement.
    assert [c.tag for c in token] == ["openid-config", "openid-config", "audiences", "issuers"]


def test_api_policy_trusts_the_extra_issuers_with_the_configured_keys() -> None:
    """A sovereign cloud: AUTH_EXTRA_ISSUERS and AUTH_OPENID_CONFIG_URL reach APIM as they reach the function."""
    from gateway_lib.auth.authenticator import _trusted_issuers

    tenant = "33333333-3333-3333-3333-333333333333"
    extra = (f"https://login.microsoftonline.us/{tenant}/v2.0", f"https://sts.windows.net/{tenant}/")
    config = f"https://login.microsoftonline.us/{tenant}/v2.0/.well-known/openid-configuration"
    token = rendered_api_policy([tenant], [*extra, ""], config).find("./inbound/validate-jwt")
    assert token is not None
    assert [c.get("url") for c in token.iterfind("openid-config")] == [config]  # the function's one key source
    issuers = [i.text for i in token.iterfind("./issuers/issuer")]
    assert set(issuers) == set(_trusted_issuers(auth_settings([tenant], extra)))
    assert f"https://login.microsoftonline.us/{tenant}/v2.0" in issuers


def test_main_passes_every_tenant_to_apim_lowercased_without_spaces() -> None:
    apim = block_after(bicep(MAIN), bicep(MAIN).index("module apim "))
    assert re.search(r"tenantIds: split\(toLower\(replace\(authTenantIds, ' ', ''\)\), ','\)", apim)


def test_main_passes_the_issuer_settings_to_the_function_and_to_apim() -> None:
    """The same two parameters feed AUTH_EXTRA_ISSUERS / AUTH_OPENID_CONFIG_URL and APIM's validate-jwt."""
    main = bicep(MAIN)
    function = block_after(main, main.index("module function "))
    apim = block_after(main, main.index("module apim "))
    assert "authExtraIssuers: authExtraIssuers" in function and "authOpenIdConfigUrl: authOpenIdConfigUrl" in function
    assert "extraIssuers: split(replace(authExtraIssuers, ' ', ''), ',')" in apim  # issuers are exact: no toLower
    assert "openIdConfigUrl: authOpenIdConfigUrl" in apim
    settings = bicep(INFRA / "app" / "function.bicep")
    assert "{ name: 'AUTH_EXTRA_ISSUERS', value: authExtraIssuers }" in settings
    assert "{ name: 'AUTH_OPENID_CONFIG_URL', value: authOpenIdConfigUrl }" in settings


def test_checkov_can_read_the_templates() -> None:
    """Lambdas (map/filter with =>) make checkov's Bicep parser skip a whole file, silently but for a count."""
    for path in INFRA.rglob("*.bicep"):
        assert "=>" not in bicep(path), path


def test_api_policy_errors_answer_for_the_token_check_it_runs() -> None:
    root = rendered_api_policy(["11111111-1111-1111-1111-111111111111"], sku="Developer")
    conditions = [w.get("condition", "") for w in root.iterfind("./on-error/choose/when")]
    sources = {m for c in conditions for m in re.findall(r'LastError\.Source == "([\w-]+)"', c)}
    assert "validate-jwt" in sources
    inbound = {e.tag for e in root.find("inbound").iter()}  # type: ignore[union-attr]
    assert sources <= inbound  # no branch waits for an error from a policy the request never runs
    reasons = {m for c in conditions for m in re.findall(r'LastError\.Reason == "(\w+)"', c)}
    assert reasons == {"RateLimitExceeded", "QuotaExceeded"}  # APIM's documented reasons, whatever the source name


def test_named_values_used_by_policies_are_defined() -> None:
    used = set()
    for path in POLICIES.glob("*.xml"):
        used |= set(re.findall(r"\{\{([\w-]+)\}\}", path.read_text()))
    defined = set(re.findall(r"'(gw-[\w-]+)'", bicep(INFRA / "app" / "apim.bicep")))
    assert used - defined == set()


def test_api_diagnostics_log_no_bodies() -> None:
    text = bicep(INFRA / "app" / "apim.bicep")
    diagnostics = block_after(text, text.index("apis/diagnostics@"))
    assert re.findall(r"bytes:\s*(\d+)", diagnostics) == ["0", "0", "0", "0"]


# --- workbook and AWS federation ---


def test_workbook_queries_use_the_telemetry_names() -> None:
    workbook = json.loads((INFRA / "workbook.json").read_text())
    assert workbook["version"] == "Notebook/1.0"
    queries = " ".join(i["content"].get("query", "") for i in workbook["items"] if i["type"] == 3)
    known = {"requests", "latency_ms", "overhead_ms", "tokens_prompt", "tokens_completion", "cost_usd", "fallbacks"}
    assert set(re.findall(r'"gateway/(\w+)"', queries)) <= known
    assert "loadTextContent('../workbook.json')" in bicep(INFRA / "app" / "workbook.bicep")


def test_aws_role_trusts_only_the_gateway_identity_for_bedrock_invoke() -> None:
    template = json.loads((INFRA / "aws" / "bedrock-web-identity-role.json").read_text())
    role = template["Resources"]["BedrockRole"]["Properties"]
    trust = json.loads(role["AssumeRolePolicyDocument"]["Fn::Sub"][0])
    statement = trust["Statement"][0]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Condition"]["StringEquals"] == {
        "sts.windows.net/${TenantId}/:aud": "${Audience}",
        "sts.windows.net/${TenantId}/:sub": "${ManagedIdentityObjectId}",
    }
    provider = template["Resources"]["EntraOidcProvider"]["Properties"]
    assert provider["Url"] == {"Fn::Sub": "https://sts.windows.net/${TenantId}/"}
    actions = role["Policies"][0]["PolicyDocument"]["Statement"][0]["Action"]
    assert sorted(actions) == ["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]


def test_a_redeploy_without_the_webhook_secret_keeps_the_apps_reference_to_it() -> None:
    # The reference came from the secret's value, so a deploy without ALERT_WEBHOOK_URL blanked the app setting
    # (alerts silently stopped). It follows a plain flag now, which the parameter files keep.
    # The output reads the flag only (no output may derive from the @secure() URL); main.bicep sets the flag
    # when a URL is passed now.
    vault = bicep(INFRA / "app" / "keyvault.bicep")
    assert ("output alertWebhookSecretUri string = alertWebhookEnabled ? "
            "'${vault.properties.vaultUri}secrets/alert-webhook-url' : ''") in vault
    main = bicep(MAIN)
    assert "param alertWebhookEnabled bool = false" in main
    assert ("alertWebhookEnabled: alertWebhookEnabled || !empty(alertWebhookUrl)"
            in block_after(main, main.index("module keyVault ")))


def test_audit_logs_go_to_log_analytics() -> None:
    # Key Vault secret reads, writes and deletes on the quota and ledger tables, the function host's log and
    # APIM's gateway log: the audit trail a regulated deployment is asked for.
    diagnostics = bicep(INFRA / "app" / "diagnostics.bicep")
    scoped = dict(re.findall(r"resource \w+ 'Microsoft\.Insights/diagnosticSettings@[\w-]+' = \{[^}]*?scope: (\w+)"
                             r"[\s\S]*?category: '(\w+)'", diagnostics))
    assert scoped == {"vault": "AuditEvent", "tables": "StorageWrite", "site": "FunctionAppLogs"}
    assert "category: 'StorageDelete'" in diagnostics
    main = bicep(MAIN)
    wiring = block_after(main, main.index("module diagnostics "))
    for param in ("workspaceId: monitoring.outputs.workspaceId", "keyVaultName: keyVault.outputs.name",
                  "storageAccountName: storage.outputs.name", "functionAppName: function.outputs.name"):
        assert param in wiring
    assert "workspaceId: monitoring.outputs.workspaceId" in block_after(main, main.index("module apim "))
    assert "category: 'GatewayLogs'" in bicep(INFRA / "app" / "apim.bicep")

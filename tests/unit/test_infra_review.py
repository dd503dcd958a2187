"""Findings of an infra review, each pinned: APIM tiers and SKUs, Log Analytics auth, Key Vault outputs,
and deploy.sh's first-run judgement and publish retries (run against a fake `az` on PATH)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from tools.bicep_types import ROOT, find_resource_type

INFRA = ROOT / "infra"


def parsed(path: Path) -> dict[str, Any]:
    return dict(BicepParser().parse(file_path=path))


def test_tls_and_cipher_settings_only_on_classic_tiers() -> None:
    apim = parsed(INFRA / "app" / "apim.bicep")["resources"]["apim"]["config"]["properties"]
    custom = apim["customProperties"]
    assert custom["operator"]["type"] == "conditional", "v2 tiers refuse customProperties: set them conditionally"
    assert custom["operator"]["operands"]["condition"] == "classicTier"
    assert custom["operator"]["operands"]["false_value"] == {}


def apim_skus_at(version: str) -> set[str]:
    found = find_resource_type("Microsoft.ApiManagement/service", version)
    assert found is not None
    nodes, body = found
    deref = lambda ref: nodes[int(ref["$ref"].split("/")[-1])]  # noqa: E731
    sku = deref(deref(body["properties"]["sku"]["type"])["properties"]["name"]["type"])
    return {deref(e)["value"] for e in sku["elements"] if deref(e)["$type"] == "StringLiteralType"}


@pytest.mark.parametrize(("path", "param"), [(INFRA / "app" / "apim.bicep", "skuName"), (INFRA / "main.bicep", "apimSku")])
def test_every_offered_apim_sku_exists_at_the_pinned_api_version(path: Path, param: str) -> None:
    decorators = parsed(path)["parameters"][param]["decorators"]
    allowed = next(d["argument"] for d in decorators if d["type"] == "allowed")
    assert set(allowed) <= apim_skus_at("2024-05-01")


def test_log_analytics_local_auth_follows_the_parameter() -> None:
    workspace = parsed(INFRA / "app" / "monitoring.bicep")["resources"]["workspace"]["config"]
    assert workspace["properties"]["features"]["disableLocalAuth"] == "disableLocalAuth"


def _names(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {n for v in value.values() for n in _names(v)}
    if isinstance(value, list):
        return {n for v in value for n in _names(v)}
    return set(re.findall(r"\w+", value)) if isinstance(value, str) else set()


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.bicep")), ids=lambda p: p.name)
def test_no_output_is_an_expression_of_a_secure_parameter(path: Path) -> None:
    template = parsed(path)
    secure = {n for n, p in template.get("parameters", {}).items() if any(d["type"] == "secure" for d in p["decorators"])}
    for name, output in template.get("outputs", {}).items():
        assert not (_names(output["value"]) & secure), f"output {name} derives from {secure}"


def test_conditional_modules_and_resources_are_read_null_safely() -> None:
    for path in sorted(INFRA.rglob("*.bicep")):
        text = path.read_text()
        conditional = re.findall(r"^(?:module|resource) (\w+) '[^']+' = if \(", text, re.M)
        for name in conditional:
            unsafe = re.findall(rf"\b{name}\.(?:outputs|properties)\b", text)
            assert not unsafe, f"{path.name}: {name} is conditional; read it with {name}.?outputs / .?properties"


FAKE_AZ = r"""#!/usr/bin/env bash
echo "$*" >> "$AZ_LOG"
case "$*" in
  "account show"*) echo "sub	0000" ;;
  "deployment sub show"*provisioningState*) [[ -n "$AZ_STATE" ]] && echo "$AZ_STATE" || exit 3 ;;
  "deployment sub show"*AZURE_FUNCTION_NAME*) echo "func-app" ;;
  "deployment sub show"*AZURE_RESOURCE_GROUP*) echo "rg-app" ;;
  "deployment sub show"*) echo "value" ;;
  "functionapp function list"*) echo "$AZ_FUNCTIONS" ;;
  "functionapp deployment source config-zip"*)
    n=$(( $(cat "$AZ_LOG.publish" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$AZ_LOG.publish"
    (( n > AZ_PUBLISH_FAILURES )) || { echo "Forbidden (403)" >&2; exit 1; } ;;
esac
exit 0
"""


def run_deploy(tmp_path: Path, *args: str, state: str = "", functions: str = "0", failures: int = 0,
               attempts: int = 3) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "az").write_text(FAKE_AZ)
    (bin_dir / "az").chmod(0o755)
    log = tmp_path / "az.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "AZ_LOG": str(log), "AZ_STATE": state, "AZ_FUNCTIONS": functions,
           "AZ_PUBLISH_FAILURES": str(failures), "PUBLISH_BACKOFF_SECONDS": "0", "PUBLISH_ATTEMPTS": str(attempts),
           "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "deploy.sh"), "-e", "dev", "--yes", *args], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return out, log.read_text().splitlines() if log.exists() else []


def what_if_apim(calls: list[str]) -> str:
    what_if = next(c for c in calls if c.startswith("deployment sub what-if"))
    return re.search(r"deployApim=(\w+)", what_if).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize(("state", "functions", "apim"), [
    ("", "0", "false"),              # never deployed
    ("Failed", "0", "false"),        # a failed earlier run is still a first run
    ("Succeeded", "0", "false"),     # infra deployed, package never published: APIM could not read the host key
    ("Succeeded", "8", "true"),      # deployed and running code
])
def test_apim_waits_for_a_successful_deployment_with_a_published_package(tmp_path: Path, state: str, functions: str,
                                                                          apim: str) -> None:
    out, calls = run_deploy(tmp_path, "--what-if-only", state=state, functions=functions)
    assert out.returncode == 0, out.stderr
    assert what_if_apim(calls) == apim


def test_publishing_retries_a_403_until_roles_take_effect(tmp_path: Path) -> None:
    out, calls = run_deploy(tmp_path, state="Succeeded", functions="8", failures=2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sum(c.startswith("functionapp deployment source config-zip") for c in calls) == 3


def test_publishing_gives_up_after_a_bounded_number_of_attempts(tmp_path: Path) -> None:
    out, calls = run_deploy(tmp_path, state="Succeeded", functions="8", failures=99, attempts=3)
    assert out.returncode != 0
    assert "publishing failed 3 times" in out.stderr
    assert sum(c.startswith("functionapp deployment source config-zip") for c in calls) == 3

"""The token attack matrix end to end: HTTP → local host → Authenticator → JWKS served by the dev issuer."""

from __future__ import annotations

import pytest
import requests

from tests.attack_matrix import AttackCase, attack_cases
from tools.dev_issuer import DevIssuer
from tools.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def issuer(stack: Stack) -> DevIssuer:
    assert stack.data_dir is not None
    return DevIssuer(stack.data_dir / "dev-issuer")  # the same key the stack's JWKS serves


def test_every_attack_case_gets_its_status_through_the_host(base_url: str, issuer: DevIssuer) -> None:
    results: dict[str, tuple[int, int]] = {}
    for case in attack_cases(issuer):
        response = requests.get(f"{base_url}/v1/models", headers=case.headers, params=case.query, timeout=10)
        results[case.name] = (case.status, response.status_code)
        _check_shape(case, response)
    wrong = {name: got for name, got in results.items() if got[0] != got[1]}
    assert not wrong, f"(expected, got) per failing case: {wrong}"
    assert {"alg_none", "hs256_signed_with_public_key", "expired", "valid_v1_app_token", "valid_v2_app_token"} <= set(results)


def _check_shape(case: AttackCase, response: requests.Response) -> None:
    if case.status == 200:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, case.name
    token = case.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if len(token) > 20:
        assert token not in response.text, f"{case.name}: the token was echoed"
    if response.status_code == 401:
        assert response.headers["www-authenticate"].startswith("Bearer"), case.name
    if response.status_code == 403:
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"], case.name


def test_unsigned_identity_headers_are_never_trusted(base_url: str, token: str) -> None:
    # An APIM-style label header is recorded as a label only; identity comes from the signed token.
    spoof = {"Authorization": f"Bearer {token}", "x-ms-client-principal-id": "admin",
             "x-apim-subscription": "finance-team", "x-caller-id": "someone-else"}
    usage = requests.get(f"{base_url}/v1/usage", headers=spoof, timeout=10)
    assert usage.status_code == 200
    assert "someone-else" not in usage.text and "admin" not in usage.json()["caller"]
    admin_only = requests.get(f"{base_url}/admin/alerts", headers=spoof, timeout=10)
    assert admin_only.status_code == 403


def test_health_needs_no_token(base_url: str) -> None:
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200

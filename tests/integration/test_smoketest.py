"""scripts/smoketest.sh — the check an operator runs against a deployment — passes against the local stack."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_smoketest_script_passes_against_the_local_stack(base_url: str, token: str) -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "smoketest.sh"), base_url, token], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert token not in result.stdout + result.stderr, "the smoke test must not print the token"


def test_smoketest_script_fails_with_a_bad_token(base_url: str) -> None:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "smoketest.sh"), base_url, "not-a-token"], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0

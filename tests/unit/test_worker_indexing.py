"""PYTHON_ENABLE_INIT_INDEXING under the Functions host: a named failure, never a silent hang."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway_lib.config.settings import ConfigError, Settings, check_worker_indexing, worker_indexing_problem

EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "local.settings.example.json").read_text())["Values"]


@pytest.mark.parametrize("value", [None, "0", "true", ""])
def test_under_the_host_anything_but_1_is_a_named_problem(value: str | None) -> None:
    env = {k: v for k, v in EXAMPLE.items() if k != "PYTHON_ENABLE_INIT_INDEXING"}
    if value is not None:
        env["PYTHON_ENABLE_INIT_INDEXING"] = value
    with pytest.raises(ConfigError, match="PYTHON_ENABLE_INIT_INDEXING must be '1'"):
        check_worker_indexing(env)
    with pytest.raises(ConfigError) as raised:
        Settings.from_env(env | {"GATEWAY_STORAGE_MODE": "memory"})
    assert any(p.startswith("PYTHON_ENABLE_INIT_INDEXING") for p in raised.value.problems)


def test_1_under_the_host_and_anything_outside_it_are_fine() -> None:
    assert worker_indexing_problem(EXAMPLE) is None
    assert worker_indexing_problem({"GATEWAY_ENVIRONMENT": "local"}) is None
    assert worker_indexing_problem({"WEBSITE_INSTANCE_ID": "abc"}) is not None  # in Azure it is always needed

"""Azure OpenAI's dialect: which api-version values are taken, on the deployment and the v1 paths."""

from __future__ import annotations

import pytest

from gateway_lib.errors import InvalidRequest
from gateway_lib.http.azure_dialect import check_api_version


@pytest.mark.parametrize("version", ["2024-02-01", "2024-06-01", "2024-10-21", "2025-01-01-preview",
                                     "2024-12-01-preview", "2025-04-01-preview"])
def test_dated_ga_and_preview_versions_are_taken_everywhere(version: str) -> None:
    check_api_version(version, v1=False)
    check_api_version(version, v1=True)


@pytest.mark.parametrize("version", [None, "preview", "latest"])
def test_the_v1_paths_also_take_none_preview_and_latest(version: str | None) -> None:
    check_api_version(version, v1=True)


@pytest.mark.parametrize(("version", "code"), [
    (None, "missing_required_parameter"), ("", "invalid_value"), ("preview", "invalid_value"),
    ("2024-13-01", "invalid_value"), ("2024-02-30", "invalid_value"), ("2024-02-01-beta", "invalid_value"),
    ("24-02-01", "invalid_value"), ("2024-02-01 ", "invalid_value"), ("\uff12\uff10\uff12\uff14-02-01", "invalid_value"),
])
def test_a_deployment_path_needs_a_well_formed_dated_version(version: str | None, code: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_api_version(version, v1=False)
    assert (raised.value.status, raised.value.code, raised.value.param) == (400, code, "api-version")


def test_a_malformed_version_is_refused_on_the_v1_paths_too() -> None:
    with pytest.raises(InvalidRequest):
        check_api_version("v2", v1=True)

"""Every Bicep file checked against Azure's resource types (infra/.types, offline), and planted errors caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools import bicep_types

FILES = bicep_types.bicep_files()


def test_there_are_templates_to_check() -> None:
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(bicep_types.ROOT)))
def test_every_resource_type_and_property_exists_at_its_api_version(path: Path) -> None:
    assert [str(f) for f in bicep_types.check_file(path)] == []


PLANTED = """
param location string
resource st 'Microsoft.Storage/storageAccounts@2025-01-01' = {
  name: 'st${uniqueString(location)}'
  location: location
  kind: 'StorageV2'
  sku: {
    name: %(sku)s
  }
  properties: {
    %(extra)s
    minimumTlsVersion: 'TLS1_2'
  }
}
"""


def findings(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "planted.bicep"
    path.write_text(text)
    return [f"{f.path}: {f.message}" for f in bicep_types.check_file(path)]


def test_the_planted_template_is_clean_without_a_plant(tmp_path: Path) -> None:
    assert findings(tmp_path, PLANTED % {"sku": "'Standard_LRS'", "extra": ""}) == []


@pytest.mark.parametrize(("sku", "extra", "expected"), [
    ("'Standard_LRS'", "noSuchThing: true", "properties.noSuchThing: no such property at this API version"),
    ("'Standard_XYZ'", "", "sku.name: 'Standard_XYZ' is not one of"),
    ("'Standard_LRS'", "provisioningState: 'Succeeded'", "properties.provisioningState: read-only property written"),
    ("'Standard_LRS'", "allowSharedKeyAccess: 'no'", "properties.allowSharedKeyAccess: 'no' is not a boolean"),
])
def test_a_planted_error_is_caught(tmp_path: Path, sku: str, extra: str, expected: str) -> None:
    found = findings(tmp_path, PLANTED % {"sku": sku, "extra": extra})
    assert len(found) == 1 and found[0].startswith(expected), found


def test_an_unknown_api_version_is_caught(tmp_path: Path) -> None:
    text = (PLANTED % {"sku": "'Standard_LRS'", "extra": ""}).replace("@2025-01-01", "@2019-01-01")
    assert findings(tmp_path, text) == [
        "Microsoft.Storage/storageAccounts@2019-01-01: no such resource type at this API version"]

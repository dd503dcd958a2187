"""Check Bicep resources against Azure's resource type definitions, offline (no Bicep CLI, no Azure).

infra/.types/ holds the generated type files of Azure/bicep-types-az (MIT, LICENSE beside them) for the
providers and API versions infra/ uses. For every ``resource '<Type>@<version>'`` this finds the type at that
version and walks the properties the template sets: each must exist, literal values must have an accepted
type (and be one of the allowed strings where the type is an enum), and no read-only property may be written.
Values that are expressions (parameters, functions, interpolations) are checked no further than their place.

    python -m tools.bicep_types [files...]        # default: every infra/**/*.bicep; exit 1 on any finding
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pycep import BicepParser

ROOT = Path(__file__).resolve().parent.parent
TYPES = ROOT / "infra" / ".types" / "generated"
READ_ONLY, WRITE_ONLY = 2, 4
KEYWORDS = {"parent", "scope", "dependsOn"}  # Bicep's own, not part of the resource body


@dataclass(frozen=True)
class Finding:
    file: str
    resource: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.resource}: {self.path}: {self.message}"


@cache
def _type_files() -> dict[tuple[str, str], Path]:
    """(namespace, api version) -> types.json, from generated/<provider>/<namespace>/<version>/."""
    return {(p.parent.parent.name.lower(), p.parent.name): p for p in TYPES.glob("*/*/*/types.json")}


@cache
def _nodes(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))


def find_resource_type(type_name: str, version: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The type list and the body node of ``type_name@version``, or None when Azure has no such type."""
    path = _type_files().get((type_name.split("/")[0].lower(), version))
    if path is None:
        return None
    nodes = _nodes(path)
    wanted = f"{type_name}@{version}".lower()
    for node in nodes:
        if node["$type"] == "ResourceType" and node["name"].lower() == wanted:
            return nodes, _deref(nodes, node["body"])
    return None


def _deref(nodes: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, Any]:
    return nodes[int(ref["$ref"].split("/")[-1])]


class _Checker:
    def __init__(self, nodes: list[dict[str, Any]], symbols: set[str]) -> None:
        self.nodes, self.symbols = nodes, symbols

    def is_expression(self, value: Any) -> bool:
        if isinstance(value, dict):
            return "operator" in value or "function" in value
        return isinstance(value, str) and (value in self.symbols or "${" in value)

    def check(self, value: Any, node: dict[str, Any], path: str) -> list[str]:
        """Problems of ``value`` against the type ``node`` (``path: message`` strings)."""
        if self.is_expression(value):
            return []
        kind = node["$type"]
        if kind == "UnionType":
            elements = [_deref(self.nodes, e) for e in node["elements"]]
            allowed = [e["value"] for e in elements if e["$type"] == "StringLiteralType"]
            if isinstance(value, str) and allowed:  # an "extensible" enum still lists every value Azure knows
                known = value.lower() in (a.lower() for a in allowed)
                return [] if known else [f"{path}: {value!r} is not one of {sorted(allowed)}"]
            options = [self.check(value, e, path) for e in elements]
            return [] if any(not o for o in options) else [f"{path}: {value!r} is none of the accepted values/types"]
        if kind == "StringLiteralType":
            return [] if value == node["value"] else [f"{path}: {value!r} is not {node['value']!r}"]
        simple = {"StringType": str, "IntegerType": int, "BooleanType": bool, "ArrayType": list}
        if kind in simple:
            ok = isinstance(value, simple[kind]) and not (kind == "IntegerType" and isinstance(value, bool))
            if not ok:
                return [f"{path}: {value!r} is not a {kind.removesuffix('Type').lower()}"]
            if kind == "ArrayType":
                item = _deref(self.nodes, node["itemType"])
                return [p for i, v in enumerate(value) for p in self.check(v, item, f"{path}[{i}]")]
            return []
        if kind in ("ObjectType", "DiscriminatedObjectType"):
            return self.check_object(value, node, path)
        return []  # AnyType and the rest accept anything

    def check_object(self, value: Any, node: dict[str, Any], path: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object"]
        properties = dict(node.get("properties") or node.get("baseProperties") or {})
        if node["$type"] == "DiscriminatedObjectType":
            chosen = value.get(node["discriminator"])
            element = node["elements"].get(chosen) if isinstance(chosen, str) else None
            if element is None and not self.is_expression(chosen):
                return [f"{path}.{node['discriminator']}: {chosen!r} is not one of {sorted(node['elements'])}"]
            if element is not None:
                properties |= _deref(self.nodes, element).get("properties", {})
            properties[node["discriminator"]] = {"type": {"$ref": "#/0"}, "flags": 0, "any": True}
        extra = node.get("additionalProperties")
        problems = []
        for raw_key, item in value.items():
            key = raw_key.strip("'")
            where = f"{path}.{key}" if path else key
            if key in KEYWORDS and not path:
                continue
            spec = properties.get(key) or next((s for k, s in properties.items() if k.lower() == key.lower()), None)
            if spec is None:
                if extra is not None:
                    problems += self.check(item, _deref(self.nodes, extra), where)
                elif "${" not in key:
                    problems.append(f"{where}: no such property at this API version")
                continue
            if spec["flags"] & READ_ONLY and not spec["flags"] & WRITE_ONLY:
                problems.append(f"{where}: read-only property written")
            elif not spec.get("any"):
                problems += self.check(item, _deref(self.nodes, spec["type"]), where)
        return problems


def _symbols(template: dict[str, Any]) -> set[str]:
    names = set(template.get("parameters", {})) | set(template.get("variables", {}))
    names |= set(template.get("resources", {})) | set(template.get("modules", {}))
    for resource in template.get("resources", {}).values():
        loop = resource.get("config", {}).get("loop_type")
        if loop:
            names.add(loop["detail"].get("item_name", ""))
    return names


def check_file(path: Path) -> list[Finding]:
    template = BicepParser().parse(file_path=path)
    symbols = _symbols(template)
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    findings = []
    for name, resource in template.get("resources", {}).items():
        declared = f"{resource['type']}@{resource['api_version']}"
        found = find_resource_type(resource["type"], resource["api_version"])
        if found is None:
            findings.append(Finding(rel, name, declared, "no such resource type at this API version"))
            continue
        if resource.get("existing"):
            continue
        nodes, body = found
        config = resource["config"]
        while isinstance(config, dict) and "config" in config and ("condition" in config or "loop_type" in config):
            config = config["config"]  # `if (...)` and `[for ...]` wrap the body
        for problem in _Checker(nodes, symbols).check_object(config, body, ""):
            where, _, message = problem.partition(": ")
            findings.append(Finding(rel, name, where, message))
    return findings


def bicep_files() -> list[Path]:
    return sorted(p for p in (ROOT / "infra").rglob("*.bicep") if ".types" not in p.parts)


def main(argv: list[str] | None = None) -> int:
    files = [Path(a).resolve() for a in (argv if argv is not None else sys.argv[1:])] or bicep_files()
    findings = [f for path in files for f in check_file(path)]
    for finding in findings:
        print(finding)
    print(f"bicep_types: {len(files)} files, {len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

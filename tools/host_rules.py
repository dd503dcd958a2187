"""What the Azure Functions host does around a worker, as plain functions: app settings, %SETTING%
resolution, function keys and routing. Shared by the worker test host and the local host.

Routing follows the host's ASP.NET Core routes: literal segments match case-insensitively, a trailing
slash is the same route, and an unknown route or a method the function does not declare is an empty 404.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SETTING = re.compile(r"%([^%\s]+)%")


def app_settings(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """local.settings.json ``Values`` under the process environment, which wins (as ``func start`` skips a
    value "already defined in current environment variables")."""
    values = json.loads(path.read_text()).get("Values", {}) if path.is_file() else {}
    return {**{k: str(v) for k, v in values.items()}, **(os.environ if environ is None else environ)}


def settings_file(app_dir: Path) -> Path:
    """local.settings.json, or the committed example on a clone that has not made one."""
    own = app_dir / "local.settings.json"
    return own if own.is_file() else app_dir / "local.settings.example.json"


class UnresolvedSetting(ValueError):
    pass


def resolve(value: Any, settings: Mapping[str, str]) -> Any:
    """Replace %NAME% in binding strings with the app setting, as the host does before it loads a function."""
    if isinstance(value, dict):
        return {k: resolve(v, settings) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, settings) for v in value]
    if not isinstance(value, str):
        return value

    def setting(match: re.Match[str]) -> str:
        if match.group(1) not in settings:
            raise UnresolvedSetting(f"'%{match.group(1)}%' does not resolve to a value")
        return settings[match.group(1)]

    return _SETTING.sub(setting, value)


@dataclass(frozen=True)
class HttpRoute:
    function: str
    template: str  # without the routePrefix
    methods: frozenset[str]  # empty: every method
    auth_level: str  # anonymous | function | admin

    def match(self, path: str, prefix: str) -> dict[str, str] | None:
        """Route values when ``path`` is this route (case-insensitive literals), else None."""
        full = "/".join(p for p in (prefix.strip("/"), self.template.strip("/")) if p)
        want, got = full.split("/"), path.strip("/").split("/")
        if len(want) != len(got):
            return None
        values = {}
        for pattern, segment in zip(want, got, strict=True):
            param = re.fullmatch(r"\{(\w+)(?::[^}]*)?\??\}", pattern)
            if param:
                values[param.group(1)] = segment
            elif pattern.lower() != segment.lower():
                return None
        return values


def route_prefix(app_dir: Path) -> str:
    try:
        host = json.loads((app_dir / "host.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "api"
    return str(host.get("extensions", {}).get("http", {}).get("routePrefix", "api")).strip("/")


def find_route(routes: list[HttpRoute], method: str, path: str, prefix: str) -> tuple[HttpRoute, dict[str, str]] | None:
    """The route serving ``method path``; None (an empty 404) for an unknown path or an undeclared method."""
    for route in routes:
        values = route.match(path, prefix)
        if values is not None and (not route.methods or method.upper() in route.methods):
            return route, values
    return None


@dataclass(frozen=True)
class Keys:
    master: str
    host_default: str
    function_default: str

    def allows(self, auth_level: str, presented: str | None) -> bool:
        """Function level takes a function or host key (master included); admin level only the master key."""
        if auth_level == "anonymous":
            return True
        if not presented:
            return False
        if auth_level == "admin":
            return presented == self.master
        return presented in (self.master, self.host_default, self.function_default)


def presented_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    return headers.get("x-functions-key") or query.get("code")

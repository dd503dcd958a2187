"""What the Functions host does around the worker: settings, %SETTING%, keys and routes (tools/host_rules.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.host_rules import HttpRoute, Keys, UnresolvedSetting, app_settings, find_route, presented_key, resolve


def test_local_settings_values_yield_to_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": {"A": "from-file", "B": 2}}))
    assert app_settings(path, {"A": "from-env"}) == {"A": "from-env", "B": "2"}
    assert app_settings(tmp_path / "missing.json", {"A": "x"}) == {"A": "x"}


def test_settings_are_resolved_in_bindings_and_a_missing_one_is_named() -> None:
    bindings = [{"type": "timerTrigger", "schedule": "%SCHEDULE%", "runOnStartup": False}]
    assert resolve(bindings, {"SCHEDULE": "0 */5 * * * *"})[0]["schedule"] == "0 */5 * * * *"
    with pytest.raises(UnresolvedSetting, match="'%SCHEDULE%' does not resolve"):
        resolve(bindings, {})


ROUTES = [HttpRoute("chat", "api/v1/chat/completions", frozenset({"POST"}), "function"),
          HttpRoute("item", "api/items/{id:int}", frozenset(), "anonymous")]


@pytest.mark.parametrize(("method", "path", "found"), [
    ("POST", "/api/v1/chat/completions", ("chat", {})),
    ("POST", "/API/V1/Chat/Completions/", ("chat", {})),
    ("GET", "/api/v1/chat/completions", None),        # undeclared method: the host's empty 404
    ("POST", "/api/v1/chat", None),
    ("DELETE", "/api/items/Abc", ("item", {"id": "Abc"})),  # no methods declared: every method
])
def test_routes_match_like_the_host(method: str, path: str, found: tuple[str, dict[str, str]] | None) -> None:
    match = find_route(ROUTES, method, path, "")
    assert (None if match is None else (match[0].function, match[1])) == found


def test_route_prefix_is_part_of_the_path() -> None:
    assert find_route(ROUTES, "POST", "/api/api/v1/chat/completions", "api") is not None
    assert find_route(ROUTES, "POST", "/api/v1/chat/completions", "api") is None


def test_keys_by_auth_level() -> None:
    keys = Keys(master="m", host_default="h", function_default="f")
    assert keys.allows("anonymous", None)
    assert [keys.allows("function", k) for k in ("f", "h", "m", "x", None)] == [True, True, True, False, False]
    assert [keys.allows("admin", k) for k in ("f", "h", "m")] == [False, False, True]
    assert presented_key({"x-functions-key": "a"}, {"code": "b"}) == "a"
    assert presented_key({}, {"code": "b"}) == "b"

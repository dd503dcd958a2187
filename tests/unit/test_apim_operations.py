"""APIM's operations against the function app's HTTP routes: every route callers use is published with the
same methods and an equivalent template, every route that can stream forwards unbuffered, and nothing in
APIM points at a route the app does not have. The routes come from function_app itself, indexed as the
Functions host does (tests/host_invoke.py); the operations from infra/app/apim.bicep, read with pycep (the
parser checkov uses) and checked against Azure's operation type (tools/bicep_types.py).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import pytest
from pycep import BicepParser

from tests.host_invoke import registered_functions
from tests.unit.test_infra import INFRA, POLICIES
from tools import bicep_types
from tools.local_host import http_functions, route_prefix

APIM = INFRA / "app" / "apim.bicep"

# Registered HTTP functions deliberately not published through APIM, with the reason (docs/adr/0006).
NOT_THROUGH_APIM = {
    "admin_limits": "admin writes go to the function app with a function key and an admin token (runbook)",
    # The spend dashboard is reached on the function app (its URL is the SPA redirect URI, docs/auth.md): the
    # page loads without a token and calls its data routes relative to itself, and a browser can hold no
    # APIM subscription key, which this API requires.
    "admin_dashboard": "a browser page without a token; served by the function app (docs/auth.md)",
    "admin_dashboard_asset": "the dashboard's scripts; served by the function app with the page",
    "admin_spend": "called by the dashboard page on its own origin, the function app",
    "admin_callers": "called by the dashboard page on its own origin, the function app",
    "admin_chargeback": "called by the dashboard page on its own origin, the function app",
    "admin_alerts": "called by the dashboard page on its own origin, the function app",
}

# Routes whose answer can be Server-Sent Events ("stream": true): their operations must not buffer.
STREAMING = {"chat_completions", "azure_chat_completions", "azure_v1_chat_completions", "responses", "messages",
             "azure_v1_responses", "azure_responses"}


@dataclass(frozen=True)
class Operation:
    name: str
    method: str
    template: str  # relative to the API path
    parameters: tuple[str, ...]  # templateParameters names
    stream: bool


@dataclass(frozen=True)
class Route:
    function: str
    path: str  # as the caller's URL reaches the host: "/" + routePrefix + route
    methods: frozenset[str]


def apim_template() -> dict[str, Any]:
    return BicepParser().parse(file_path=APIM)


def operations(template: dict[str, Any] | None = None) -> list[Operation]:
    raw = (template or apim_template())["variables"]["operations"]["value"]
    return [Operation(op["name"], op["method"], op["urlTemplate"],
                      tuple(p["name"] for p in op["templateParameters"]), op["stream"]) for op in raw]


def backend_base(template: dict[str, Any] | None = None) -> str:
    """The path part of the API's serviceUrl: APIM forwards to serviceUrl + the operation's template."""
    service_url = (template or apim_template())["resources"]["api"]["config"]["properties"]["serviceUrl"]
    match = re.fullmatch(r"https://\$\{[^}]+\}(/[^?#]*)?", service_url)
    assert match, service_url
    return (match.group(1) or "").rstrip("/")


def routes() -> list[Route]:
    prefix = route_prefix()
    found = []
    for name, route, methods, _ in http_functions(list(registered_functions().values())):
        path = "/" + "/".join(part.strip("/") for part in (prefix, route) if part.strip("/"))
        found.append(Route(name, path, frozenset(methods)))
    return found


def drift(routes: list[Route], ops: list[Operation], base: str, excluded: dict[str, str]) -> list[str]:
    """Every difference between the app's routes and APIM's operations, as readable lines."""
    problems = []
    published: dict[str, set[str]] = {}
    for op in ops:
        published.setdefault(base + op.template, set()).add(op.method)
    by_path = {r.path: r for r in routes}
    for route in routes:
        methods = published.get(route.path, set())
        if route.function in excluded:
            if methods:
                problems.append(f"{route.function}: listed as not through APIM, but APIM publishes {route.path}")
        elif methods != route.methods:
            problems.append(f"{route.function}: {sorted(route.methods)} {route.path}, APIM has {sorted(methods)}")
    for op in ops:
        route = by_path.get(base + op.template)
        if route is None or op.method not in route.methods:
            problems.append(f"operation {op.name}: {op.method} {base + op.template} is no route of the app")
    for name in sorted(set(excluded) - {r.function for r in routes}):
        problems.append(f"{name}: listed as not through APIM, but the app has no such function")
    return problems


def test_every_route_callers_use_is_an_apim_operation_and_nothing_else_is() -> None:
    assert drift(routes(), operations(), backend_base(), NOT_THROUGH_APIM) == []


def test_the_drift_check_sees_a_removed_an_extra_and_a_stale_operation() -> None:
    ops, base = operations(), backend_base()
    without_embeddings = [op for op in ops if op.name != "embeddings"]
    assert drift(routes(), without_embeddings, base, NOT_THROUGH_APIM) == [
        "embeddings: ['POST'] /api/v1/embeddings, APIM has []"]
    without_delete = [op for op in ops if op.name != "delete-response"]
    assert drift(routes(), without_delete, base, NOT_THROUGH_APIM) == [
        "stored_response: ['DELETE', 'GET'] /api/v1/responses/{response_id}, APIM has ['GET']"]
    renamed = [Operation("gone", "GET", "/v1/models/{id}", ("id",), False), *ops]
    assert drift(routes(), renamed, base, NOT_THROUGH_APIM) == [
        "operation gone: GET /api/v1/models/{id} is no route of the app"]
    assert drift(routes(), ops, base, {**NOT_THROUGH_APIM, "usage": "x", "old_route": "y"}) == [
        "usage: listed as not through APIM, but APIM publishes /api/v1/usage",
        "old_route: listed as not through APIM, but the app has no such function"]


def test_operation_names_are_unique() -> None:
    names = [op.name for op in operations()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("op", operations(), ids=lambda op: op.name)
def test_template_parameters_are_exactly_the_templates_own(op: Operation) -> None:
    # APIM refuses an operation whose template names a parameter it does not define.
    assert tuple(re.findall(r"\{([^}]+)\}", op.template)) == op.parameters


@pytest.mark.parametrize("op", operations(), ids=lambda op: op.name)
def test_templates_leave_the_query_string_to_the_caller(op: Operation) -> None:
    # A query parameter in a template becomes a required one; api-version and ?caller= pass through as sent.
    assert "?" not in op.template and op.template.startswith("/")


def test_apim_does_not_consume_api_version() -> None:
    # An API in a version set with the query scheme would take api-version for itself instead of forwarding it.
    properties = apim_template()["resources"]["api"]["config"]["properties"]
    assert "apiVersionSetId" not in properties and "apiVersion" not in properties


def test_every_route_that_can_stream_forwards_unbuffered() -> None:
    by_function = {r.function: r for r in routes()}
    base = backend_base()
    assert {base + op.template for op in operations() if op.stream} == {by_function[name].path for name in STREAMING}
    template = apim_template()
    loop = template["resources"]["streamPolicies"]["config"]
    assert loop["loop_type"]["detail"] == {"item_name": "op", "index_name": "i", "array_name": "operations"}
    assert loop["condition"]["operator"] == {"type": "property_accessor", "operands": {"operand_1": "op", "operand_2": "stream"}}
    assert loop["config"]["parent"]["operator"] == {"type": "index_accessor", "operands": {"operand_1": "ops", "operand_2": "i"}}
    assert loop["config"]["properties"]["value"] == "streamPolicyXml"
    loaded = template["variables"]["streamPolicyXml"]["value"]["function"]["parameters"]["file_path"]
    assert (APIM.parent / loaded).resolve() == POLICIES / "chat-stream.xml"


def test_streaming_operations_still_run_the_api_policy() -> None:
    # validate-jwt, the limits and the function key come from the API policy through <base />.
    inbound = ET.parse(POLICIES / "chat-stream.xml").getroot().find("inbound")
    assert inbound is not None and inbound.find("base") is not None


def test_operations_carry_only_properties_azure_knows() -> None:
    found = bicep_types.find_resource_type("Microsoft.ApiManagement/service/apis/operations", "2024-05-01")
    assert found is not None
    nodes, body = found
    checker = bicep_types._Checker(nodes, set())
    for raw in apim_template()["variables"]["operations"]["value"]:
        properties = {k: v for k, v in raw.items() if k not in ("name", "stream")}
        assert checker.check_object({"name": raw["name"], "properties": properties}, body, "") == [], raw["name"]


def test_the_operations_loop_passes_every_field_azure_needs() -> None:
    properties = apim_template()["resources"]["ops"]["config"]["config"]["properties"]
    read = {key: value["operator"]["operands"]["operand_2"] for key, value in properties.items()}
    assert read == {"displayName": "displayName", "method": "method", "urlTemplate": "urlTemplate",
                    "templateParameters": "templateParameters"}


"""The APIM policies' C# expressions, compiled with Mono's mcs against the slice of APIM's ``context`` they
use, and run: a typo or a type error in a policy expression otherwise only shows when Azure refuses the
deployment, or at the first request that takes that branch.

The stub types below follow the policy expression reference (``context.Request.Headers`` maps a name to
its values, ``context.Variables`` is a read-only map with ``GetValueOrDefault<T>``, ``Jwt.Claims`` returns
the comma-joined values). APIM expressions are C# 7 with a fixed set of namespaces; mcs checks syntax and
types, not that allow-list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway_lib.operations.messages import _ERROR_TYPES as ANTHROPIC_TYPES
from tests.unit.test_infra import POLICIES, rendered_api_policy

pytestmark = pytest.mark.integration

STUBS = r"""
using System;
using System.Collections.Generic;
using System.Linq;

public class Url { public string Path = "/"; }
public class Request {
    public Dictionary<string, string[]> HeaderValues = new Dictionary<string, string[]>();
    public IReadOnlyDictionary<string, string[]> Headers { get { return HeaderValues; } }
    public Url Url = new Url();
    public string IpAddress = "203.0.113.7";
}
public class Subscription { public string Id = "sub-1"; public string Name = "team-a"; }
public class LastError { public string Source = ""; public string Reason = ""; }
public class Jwt {
    public Dictionary<string, string[]> ClaimValues = new Dictionary<string, string[]>();
    public IReadOnlyDictionary<string, string[]> Claims { get { return ClaimValues; } }
}
public class Context {
    public Request Request = new Request();
    public Guid RequestId = Guid.NewGuid();
    public Dictionary<string, object> VariableValues = new Dictionary<string, object>();
    public IReadOnlyDictionary<string, object> Variables { get { return VariableValues; } }
    public Subscription Subscription = new Subscription();
    public LastError LastError = new LastError();
}
public static class ApimExtensions {
    public static T GetValueOrDefault<T>(this IReadOnlyDictionary<string, object> map, string name, T fallback) {
        object found;
        return map.TryGetValue(name, out found) ? (T)found : fallback;
    }
    public static string GetValueOrDefault(this IReadOnlyDictionary<string, string[]> map, string name,
                                           string fallback) {
        string[] found;
        return map.TryGetValue(name, out found) ? string.Join(",", found) : fallback;
    }
}
"""

# Runs every expression on a context built from the command line: path, then name=value variables (a value
# "jwt:<azp>" is a token with that azp claim, "true"/"false" a bool); prints one JSON string per expression.
MAIN = r"""
public static class Program {
    public static void Main(string[] args) {
        var context = new Context();
        context.Request.Url.Path = args[0];
        foreach (var pair in args.Skip(1)) {
            var cut = pair.IndexOf('=');
            string name = pair.Substring(0, cut), value = pair.Substring(cut + 1);
            if (name == "lastError.Source") { context.LastError.Source = value; continue; }
            if (value.StartsWith("jwt:")) {
                var jwt = new Jwt(); jwt.ClaimValues["azp"] = new[] { value.Substring(4) };
                context.VariableValues[name] = jwt;
            } else if (value == "true" || value == "false") {
                context.VariableValues[name] = value == "true";
            } else {
                context.VariableValues[name] = value;
            }
        }
        for (var i = 0; i < Expressions.All.Length; i++) {
            string shown;
            try { shown = Convert.ToString(Expressions.All[i](context)); }
            catch (Exception e) { shown = "!" + e.GetType().Name; }
            Console.WriteLine("\"" + shown.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"");
        }
    }
}
"""


@dataclass(frozen=True)
class Expression:
    policy: str
    where: str  # element/attribute, for messages
    code: str  # as written, without the leading @

    def as_method(self, index: int) -> str:
        code = re.sub(r"\{\{(gw-[a-z-]+)\}\}", r"\1-value", self.code)  # named values are text substitutions
        body = f"return ({code[1:-1]});" if code.startswith("(") else code[1:-1]
        return f"    public static object E{index}(Context context) {{\n{body}\n    }}\n"


def expressions(root: ET.Element, policy: str) -> Iterator[Expression]:
    for element in root.iter():
        for name, value in element.attrib.items():
            if value.strip().startswith("@"):
                yield Expression(policy, f"{element.tag}@{name}", value.strip()[1:])
        if element.text and element.text.strip().startswith("@"):
            yield Expression(policy, element.tag, element.text.strip()[1:])


def all_expressions() -> list[Expression]:
    found = list(expressions(rendered_api_policy(["11111111-1111-1111-1111-111111111111"]), "api.xml"))
    for path in sorted(POLICIES.glob("*.xml")):
        if path.name != "api.xml":
            found += expressions(ET.parse(path).getroot(), path.name)
    return found


def source(found: list[Expression]) -> str:
    methods = "".join(e.as_method(i) for i, e in enumerate(found))
    table = ", ".join(f"E{i}" for i in range(len(found)))
    return (STUBS + "public static class Expressions {\n" + methods +
            f"    public static readonly Func<Context, object>[] All = {{ {table} }};\n}}\n" + MAIN)


def compile_program(found: list[Expression], out: Path) -> subprocess.CompletedProcess[str]:
    cs = out.with_suffix(".cs")
    cs.write_text(source(found))
    return subprocess.run(["mcs", "-target:exe", f"-out:{out}", str(cs)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in ("mcs", "mono") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (make test installs Mono with tools/install_mono.sh, as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("apim") / "policies.exe"
    built = compile_program(all_expressions(), exe)
    assert built.returncode == 0, built.stdout + built.stderr
    return exe


def run(program: Path, path: str, **variables: str) -> list[str]:
    args = [path, *(f"{name}={value}" for name, value in variables.items())]
    out = subprocess.run(["mono", str(program), *args], capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def bodies(program: Path, path: str, anthropic: bool) -> dict[str, dict[str, object]]:
    """Each error body the API policy makes, by the code of its OpenAI shape, as ``path`` would get it."""
    found = all_expressions()
    values = run(program, path, **{"gw-anthropic": "true" if anthropic else "false"})
    out: dict[str, dict[str, object]] = {}
    for expression, value in zip(found, values, strict=True):
        if expression.policy == "api.xml" and expression.where == "set-body":
            openai = json.loads(run_openai_literal(expression))
            out[str(openai["error"]["code"])] = json.loads(value)
    return out


def run_openai_literal(expression: Expression) -> str:
    """The OpenAI-shaped literal of a set-body expression (its ``: "..."`` branch)."""
    literal = re.search(r':\s*"((?:[^"\\]|\\.)*)"\)\s*$', expression.code)
    assert literal is not None, expression.code
    return json.loads(f'"{literal.group(1)}"')


def test_every_policy_expression_compiles(program: Path) -> None:
    assert len(all_expressions()) >= 20  # the API policy's, the health policy's and the quota's


def test_the_check_fails_on_a_broken_expression(tmp_path: Path) -> None:
    if shutil.which("mcs") is None:
        pytest.skip("mcs not installed")
    broken = Expression("planted.xml", "set-header", '(context.Request.Url.Paht.Contains("/v1/messages"))')
    built = compile_program([*all_expressions(), broken], tmp_path / "broken.exe")
    assert built.returncode != 0 and "Paht" in built.stdout + built.stderr


def index_of(what: str, where: str) -> int:
    return next(i for i, e in enumerate(all_expressions()) if what in e.code and e.where == where)


@pytest.mark.parametrize(("path", "anthropic"), [("/api/v1/messages", "True"), ("/api/v1/messages/count_tokens", "True"),
                                                 ("/api/v1/chat/completions", "False"), ("/api/v1/responses", "False")])
def test_the_anthropic_flag_is_set_on_the_messages_routes_only(program: Path, path: str, anthropic: str) -> None:
    assert run(program, path)[index_of("/v1/messages", "set-variable@value")] == anthropic


@pytest.mark.parametrize("path", ["/api/v1/messages", "/api/v1/messages/count_tokens"])
def test_errors_made_in_apim_on_the_messages_routes_are_in_anthropics_shape(program: Path, path: str) -> None:
    made = bodies(program, path, anthropic=True)
    expected = {"client_not_allowed": 403, "invalid_token": 401, "rate_limit_exceeded": 429, "insufficient_quota": 429}
    assert set(made) == set(expected)
    for code, status in expected.items():
        body = made[code]
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}  # type: ignore[arg-type]
        assert body["error"]["type"] == ANTHROPIC_TYPES[status]  # type: ignore[index]


def test_errors_made_in_apim_elsewhere_stay_in_the_openai_shape(program: Path) -> None:
    for code, body in bodies(program, "/api/v1/chat/completions", anthropic=False).items():
        assert set(body) == {"error"} and body["error"]["code"] == code  # type: ignore[index]
        assert set(body["error"]) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


def test_the_client_allow_list_refuses_an_unlisted_app(program: Path) -> None:
    index = index_of("gw-allowed-client-app-ids", "when@condition")
    # The named value is substituted as "gw-allowed-client-app-ids-value": an allow-list of one app id.
    assert run(program, "/api/v1/chat/completions", **{"gw-jwt": "jwt:some-other-app"})[index] == "True"
    assert run(program, "/api/v1/chat/completions", **{"gw-jwt": "jwt:gw-allowed-client-app-ids-value"})[index] \
        == "False"

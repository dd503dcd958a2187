"""The C# client (clients/dotnet), built with Mono's mcs and run under mono against a local stack of its own.

Every source but the Azure.Identity token source is compiled, so this is the same core (HTTP, SSE, JSON,
errors, Retry-After) that the .NET 8 build runs. Own stack: its upstream faults open circuits and a
one-request-a-minute tier refuses, neither of which may reach the shared session stack.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway_lib.config.tiers import default_tiers_json
from tests.stack_fixture import Sim, cleared_sim
from tools.stack import Ports, Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "dotnet"
AZURE_ONLY = "AzureIdentityTokenSource.cs"  # references Azure.Identity, which Mono cannot
REQUEST_ID = re.compile(r"^[0-9a-f-]{36}$")


def mono_sources() -> list[Path]:
    return sorted(p for p in (CLIENT / "src").rglob("*.cs") if p.name != AZURE_ONLY)


@pytest.fixture(scope="module")
def client_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in ("mcs", "mono") if shutil.which(tool) is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (make test installs Mono with tools/install_mono.sh, as root)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("dotnet") / "gateway-client.exe"
    build = subprocess.run(["mcs", "-warn:4", "-warnaserror", "-target:exe", f"-out:{exe}", "-r:System.Net.Http.dll",
                            *map(str, mono_sources())], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    return exe


def client_tiers() -> str:
    """The default tiers plus one that allows a single request a minute."""
    doc = json.loads(default_tiers_json())
    doc["tiers"]["rate1"] = {**doc["tiers"]["standard"], "requests_per_minute": 1}
    doc["role_tiers"] |= {"Test.Rate1": "rate1"}
    doc["tier_order"] += ["rate1"]
    return json.dumps(doc)


@pytest.fixture(scope="module")
def dn_stack() -> Iterator[Stack]:
    running = Stack(ports=Ports.free(), extra_env={"GATEWAY_TIERS": client_tiers()}).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture()
def dsim(dn_stack: Stack) -> Iterator[Sim]:
    with cleared_sim(dn_stack) as driver:
        yield driver


def client_env(stack: Stack, token: str | None = None, **extra: str) -> dict[str, str]:
    """Only what the client reads: nothing from the developer's shell (an APIM key, a real GATEWAY_URL)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "GATEWAY_URL": stack.base_url}
    return env | ({"GATEWAY_TOKEN": token} if token else {}) | extra


def run(exe: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mono", str(exe), *args], env=env, capture_output=True, text=True, timeout=90)


def fields(output: str) -> dict[str, str]:
    """The client's "name: value" lines (the last one wins)."""
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def first_seen(arrivals: list[tuple[float, bytes]], predicate: Callable[[bytes], bool]) -> float:
    """When the output read so far first satisfied ``predicate`` (seconds after the start)."""
    seen = b""
    for at, chunk in arrivals:
        seen += chunk
        if predicate(seen):
            return at
    raise AssertionError(f"never seen in {seen!r}")


def not_near_minute_end(margin: float = 25.0) -> None:
    """The one-request-a-minute tier counts within a UTC minute: start clear of its end (two Mono starts on a
    loaded machine can take several seconds each)."""
    second = time.time() % 60
    if second > 60 - margin:
        time.sleep(60 - second + 0.2)


def test_chat_prints_the_answer_with_its_request_id_and_rate_limit_headers(client_exe: Path, dn_stack: Stack,
                                                                           dsim: Sim) -> None:
    env = client_env(dn_stack, dn_stack.token("dn-chat", "Gateway.Standard"))
    first, second = run(client_exe, env, "chat", "Hello from C#"), run(client_exe, env, "chat", "Hello again")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    one, two = fields(first.stdout), fields(second.stdout)
    assert "Simulated reply from gpt-4o-mini: Hello from C#" in one["content"]
    assert REQUEST_ID.match(one["x-request-id"]) and one["x-request-id"] != two["x-request-id"]
    assert one["x-ratelimit-limit-requests"] == "120"  # the standard tier
    assert int(two["x-ratelimit-remaining-requests"]) == int(one["x-ratelimit-remaining-requests"]) - 1
    assert one["x-gateway-provider"] == "azure_openai"
    prompt, completion, total = map(int, re.findall(r"\d+", one["tokens"]))
    assert prompt > 0 and completion > 0 and total == prompt + completion
    assert dsim.count("gpt-4o-mini") + dsim.count("gpt-4o-mini-swc") == 2


def test_stream_prints_each_delta_as_it_arrives_not_at_the_end(client_exe: Path, dn_stack: Stack, dsim: Sim) -> None:
    # The simulator sends three frames, goes quiet for 1.5 s, then sends the rest: text printed before
    # the pause can only come from a client that reads and prints the SSE stream as it arrives.
    dsim.fault(target="gpt-4o-mini", mode="stall", delay_ms=1500, after_chunks=3, count=1)
    env = client_env(dn_stack, dn_stack.token("dn-stream", "Gateway.Standard"))
    started = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    with subprocess.Popen(["mono", str(client_exe), "--model", "gpt-4o-mini", "stream", "Count", "to", "three"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        while chunk := os.read(proc.stdout.fileno(), 4096):
            arrivals.append((time.monotonic() - started, chunk))
        errors = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, errors
    output = b"".join(chunk for _, chunk in arrivals).decode()
    first_delta = first_seen(arrivals, lambda out: b"content: " in out and bool(out.split(b"content: ", 1)[1].strip()))
    done = first_seen(arrivals, lambda out: b"[done]" in out)
    assert done - first_delta >= 1.2, arrivals
    got = fields(output)
    assert got["content"] == "Simulated reply from gpt-4o-mini: Count to three"
    assert REQUEST_ID.match(got["x-request-id"]) and got["x-ratelimit-limit-requests"] == "120"
    assert "tokens" in got and output.rstrip().endswith("[done]")


def test_task_api_prints_the_output_and_the_same_request_id_as_the_header(client_exe: Path, dn_stack: Stack,
                                                                          dsim: Sim) -> None:
    env = client_env(dn_stack, dn_stack.token("dn-task", "Gateway.Standard"))
    done = run(client_exe, env, "--task", "summarise", "generate", "The invoice total is 42 EUR.")
    assert done.returncode == 0, done.stderr
    got = fields(done.stdout)
    assert got["task"] == "summarise" and got["provider"] in ("azure_openai", "bedrock")
    assert got["request_id"] == got["x-request-id"] and REQUEST_ID.match(got["request_id"])
    assert float(got["estimated_cost_usd"]) > 0 and got["output"]


def test_usage_shows_the_calls_this_caller_made_with_a_token_from_a_file(client_exe: Path, dn_stack: Stack,
                                                                          dsim: Sim, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(dn_stack.token("dn-usage", "Gateway.Standard") + "\n")
    env = client_env(dn_stack, GATEWAY_TOKEN_FILE=str(token_file))
    not_near_minute_end()
    assert run(client_exe, env, "chat").returncode == 0
    shown = run(client_exe, env, "usage")
    assert shown.returncode == 0, shown.stderr
    got = fields(shown.stdout)
    assert got["tier"] == "standard" and got["status"] == "active"
    assert got["minute"].startswith("requests 1 of 120 (remaining 119), tokens ")
    assert REQUEST_ID.match(got["x-request-id"])


def test_401_is_one_clear_line_with_the_request_id(client_exe: Path, dn_stack: Stack, dsim: Sim) -> None:
    wrong_audience = dn_stack.token("dn-401", "Gateway.Standard", "--audience", "api://another-app")
    refused = run(client_exe, client_env(dn_stack, wrong_audience), "chat")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    message = refused.stderr.strip()
    assert re.fullmatch(r"error: HTTP 401 authentication_error/invalid_token: .+ \(check that the token is for the "
                        r"gateway's scope and has not expired\) \[x-request-id [0-9a-f-]{36}\]", message), message
    assert dsim.total() == 0


def test_429_with_retry_after_is_waited_out_and_retried(client_exe: Path, dn_stack: Stack, dsim: Sim) -> None:
    # Both gpt-4o-mini deployments throttle once, so the gateway answers 429 upstream_rate_limited with
    # their Retry-After; the client waits that long and its retry is answered.
    for deployment in ("gpt-4o-mini", "gpt-4o-mini-swc"):
        dsim.fault(target=deployment, mode="status", status=429, retry_after=2, count=1)
    env = client_env(dn_stack, dn_stack.token("dn-429", "Gateway.Standard"))
    started = time.monotonic()
    done = run(client_exe, env, "chat", "after the wait")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "Simulated reply from gpt-4o-mini: after the wait" in fields(done.stdout)["content"]
    assert re.search(r"HTTP 429 rate_limit_error/upstream_rate_limited: .*\(Retry-After: 2 s\).*; "
                     r"waiting 2 s as Retry-After asks, then retry 1 of 2", done.stderr), done.stderr
    assert elapsed >= 2.0
    assert dsim.count("gpt-4o-mini") + dsim.count("gpt-4o-mini-swc") == 3


def test_429_of_the_callers_own_rate_limit_is_reported_with_its_headers(client_exe: Path, dn_stack: Stack,
                                                                        dsim: Sim) -> None:
    env = client_env(dn_stack, dn_stack.token("dn-rate1", "Test.Rate1"))
    not_near_minute_end()
    assert run(client_exe, env, "chat").returncode == 0
    started = time.monotonic()
    refused = run(client_exe, env, "--max-retries", "0", "chat")
    assert time.monotonic() - started < 5, "no retries were allowed, so nothing may be waited for"
    assert refused.returncode == 1, refused.stdout
    got = fields(refused.stderr)
    assert re.match(r"HTTP 429 rate_limit_error/rate_limit_exceeded: .+\(Retry-After: \d+ s\)", got["error"])
    assert got["x-ratelimit-limit-requests"] == "1" and got["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(got["retry-after"]) <= 60
    assert dsim.total() == 1


def test_an_error_after_the_stream_started_is_reported_not_swallowed(client_exe: Path, dn_stack: Stack,
                                                                     dsim: Sim) -> None:
    dsim.fault(target="anthropic.claude-3-haiku-20240307-v1:0", mode="status", status=500, after_chunks=2, count=1)
    failed = run(client_exe, client_env(dn_stack, dn_stack.token("dn-cut", "Gateway.Standard")),
                 "--model", "claude-3-haiku", "stream")
    assert failed.returncode == 1, failed.stdout
    assert "== stream ==" in failed.stdout and "[done]" not in failed.stdout
    assert failed.stderr.startswith("error: stream failed after it started"), failed.stderr
    assert "Unhandled Exception" not in failed.stderr


def test_bad_usage_is_exit_2_with_the_usage_text(client_exe: Path, dn_stack: Stack) -> None:
    wrong = run(client_exe, client_env(dn_stack, "unused"), "complete")
    assert wrong.returncode == 2 and "unknown command 'complete'" in wrong.stderr and "usage:" in wrong.stderr
    no_token = run(client_exe, client_env(dn_stack), "chat")
    assert no_token.returncode == 2 and "set GATEWAY_SCOPE" in no_token.stderr

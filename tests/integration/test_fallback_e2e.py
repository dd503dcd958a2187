"""Fallback end to end: openai SDK → local host → gateway → simulator faults.

The module runs its own stack: circuit state is per gateway process, and a cooling target
must never leak into other modules' tests. Each scenario has its own alias (``fb-<name>``)
over its own two simulator deployments (``fb-<name>-a`` primary, ``fb-<name>-b`` fallback),
so one scenario's cooldowns never shape another's routing. The cooldown/recovery test uses
the real ``gpt-4o-mini`` alias of the default catalogue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from gateway_lib.config.catalog import default_catalogue_json
from tests.stack_fixture import Sim, cleared_sim
from tools.dev_issuer import DevIssuer
from tools.stack import Ports, Stack

pytestmark = pytest.mark.integration

UPSTREAM_TIMEOUT_S = 1  # the settings' minimum: a slow primary costs one second, not two minutes
AZURE_SCENARIOS = ("s500", "s503", "slow", "alldown", "all429", "badreq", "cut", "cutraw", "logs", "cutfirst",
                   "nodeploy", "stall")
BEDROCK_SCENARIOS = ("brkcut", "brkstart", "brkmal", "brkstall")


def _catalogue() -> str:
    """The default catalogue plus one two-target alias per scenario."""
    doc = json.loads(default_catalogue_json())
    templates = {"azure_openai": doc["targets"]["aoai-gpt-4o-mini-eastus"],
                 "bedrock": doc["targets"]["bedrock-claude-3-haiku-us-east-1"]}
    for provider, names in (("azure_openai", AZURE_SCENARIOS), ("bedrock", BEDROCK_SCENARIOS)):
        for name in names:
            ids = [f"fb-{name}-a", f"fb-{name}-b"]
            for target_id in ids:
                doc["targets"][target_id] = {**templates[provider], "deployment": target_id}
            doc["aliases"][f"fb-{name}"] = {"targets": ids, "description": f"fallback scenario {name}"}
    # Across providers: Azure, then Bedrock, then Azure again (the shape of chat-default).
    for alias in ("fb-mixed", "fb-img"):
        mixed = {f"{alias}-a": "azure_openai", f"{alias}-b": "bedrock", f"{alias}-c": "azure_openai"}
        for target_id, provider in mixed.items():
            doc["targets"][target_id] = {**templates[provider], "deployment": target_id}
        doc["aliases"][alias] = {"targets": list(mixed), "description": "fallback across providers"}
    return json.dumps(doc)


@pytest.fixture(scope="module")
def fb_stack() -> Iterator[Stack]:
    running = Stack(ports=Ports.free(), extra_env={
        "GATEWAY_UPSTREAM_TIMEOUT_SECONDS": str(UPSTREAM_TIMEOUT_S), "GATEWAY_MODELS": _catalogue()}).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def fb_token(fb_stack: Stack) -> str:
    assert fb_stack.data_dir is not None
    # Premium allows every alias, the scenario aliases included.
    return DevIssuer(fb_stack.data_dir / "dev-issuer").token(caller="fallback-e2e", roles=["Gateway.Premium"])


@pytest.fixture()
def fsim(fb_stack: Stack) -> Iterator[Sim]:
    with cleared_sim(fb_stack) as driver:
        yield driver


@pytest.fixture(scope="module")
def sdk(fb_stack: Stack, fb_token: str) -> Iterator[openai.OpenAI]:
    # One client, closed at the end: an unclosed client leaks its pooled sockets (warnings are errors).
    with openai.OpenAI(base_url=f"{fb_stack.base_url}/v1", api_key=fb_token, max_retries=0, timeout=30) as client:
        yield client


def ask(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Tell me about fallbacks please"}], **extra}


def post(stack: Stack, token: str, body: dict[str, Any], **headers: str) -> requests.Response:
    return requests.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}", **headers})


def test_primary_429_is_served_by_the_fallback_then_cooled_down_then_recovered(fsim: Sim, sdk: openai.OpenAI) -> None:
    fsim.fault(mode="status", status=429, retry_after=2, target="gpt-4o-mini", count=1)

    first = sdk.chat.completions.with_raw_response.create(**ask("gpt-4o-mini"))
    assert first.headers["x-gateway-target"] == "aoai-gpt-4o-mini-swedencentral"
    assert first.headers["x-gateway-provider"] == "azure_openai"
    assert first.parse().choices[0].message.content
    assert (fsim.count("gpt-4o-mini"), fsim.count("gpt-4o-mini-swc")) == (1, 1), "primary tried exactly once"

    # Inside the upstream's Retry-After the primary is not called at all.
    cooling = sdk.chat.completions.with_raw_response.create(**ask("gpt-4o-mini"))
    assert cooling.headers["x-gateway-target"] == "aoai-gpt-4o-mini-swedencentral"
    assert (fsim.count("gpt-4o-mini"), fsim.count("gpt-4o-mini-swc")) == (1, 2)

    time.sleep(2.3)
    recovered = sdk.chat.completions.with_raw_response.create(**ask("gpt-4o-mini"))
    assert recovered.headers["x-gateway-target"] == "aoai-gpt-4o-mini-eastus"
    assert (fsim.count("gpt-4o-mini"), fsim.count("gpt-4o-mini-swc")) == (2, 2)


@pytest.mark.parametrize("status", [500, 503])
def test_primary_server_error_is_served_by_the_fallback(fsim: Sim, sdk: openai.OpenAI, status: int) -> None:
    name = f"s{status}"
    fsim.fault(mode="status", status=status, target=f"fb-{name}-a")
    raw = sdk.chat.completions.with_raw_response.create(**ask(f"fb-{name}"))
    assert raw.headers["x-gateway-target"] == f"fb-{name}-b"
    assert raw.parse().choices[0].message.content
    assert (fsim.count(f"fb-{name}-a"), fsim.count(f"fb-{name}-b")) == (1, 1)


def test_fallback_crosses_providers_until_one_answers(fsim: Sim, sdk: openai.OpenAI) -> None:
    fsim.fault(mode="status", status=503, target="fb-mixed-a", count=1)
    fsim.fault(mode="status", status=429, target="fb-mixed-b", provider="bedrock", count=1)  # ThrottlingException
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-mixed"))
    assert (raw.headers["x-gateway-target"], raw.headers["x-gateway-provider"]) == ("fb-mixed-c", "azure_openai")
    assert [fsim.count(f"fb-mixed-{t}") for t in "abc"] == [1, 1, 1]


def test_slow_primary_times_out_and_the_fallback_answers(fsim: Sim, sdk: openai.OpenAI) -> None:
    fsim.fault(mode="slow", delay_ms=4000, target="fb-slow-a", count=1)
    started = time.monotonic()
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-slow"))
    elapsed = time.monotonic() - started
    assert raw.headers["x-gateway-target"] == "fb-slow-b"
    assert UPSTREAM_TIMEOUT_S * 0.9 <= elapsed < 3.5, f"took {elapsed:.2f}s: the timeout did not cut the wait"
    assert (fsim.count("fb-slow-a"), fsim.count("fb-slow-b")) == (1, 1)


def test_all_targets_down_is_a_503_naming_them_with_retry_after(fsim: Sim, sdk: openai.OpenAI) -> None:
    fsim.fault(mode="status", status=503, target="fb-alldown-a")
    fsim.fault(mode="status", status=500, target="fb-alldown-b")
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(**ask("fb-alldown"))
    response = caught.value.response
    assert response.status_code == 503
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "service_unavailable"
    assert "all 2 targets for model fb-alldown are unavailable" in error["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-request-id"]
    assert (fsim.count("fb-alldown-a"), fsim.count("fb-alldown-b")) == (1, 1)


def test_all_targets_rate_limited_is_a_429_upstream_rate_limited(fb_stack: Stack, fb_token: str, fsim: Sim) -> None:
    fsim.fault(mode="status", status=429, retry_after=1, target="fb-all429-a")
    fsim.fault(mode="status", status=429, retry_after=2, target="fb-all429-b")
    response = post(fb_stack, fb_token, ask("fb-all429"))
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_rate_limited"
    assert error["type"] == "rate_limit_error"
    assert "all 2 targets for model fb-all429 are rate limited" in error["message"]
    assert int(response.headers["retry-after"]) == 1  # the shortest upstream Retry-After
    assert (fsim.count("fb-all429-a"), fsim.count("fb-all429-b")) == (1, 1)


def test_callers_own_mistake_upstream_is_not_retried_elsewhere(fsim: Sim, sdk: openai.OpenAI) -> None:
    fsim.fault(mode="status", status=400, target="fb-badreq-a", count=1)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(**ask("fb-badreq"))
    assert caught.value.response.json()["error"]["code"] == "bad_request"
    assert (fsim.count("fb-badreq-a"), fsim.count("fb-badreq-b")) == (1, 0), "a 400 fails everywhere: no fallback"
    # The caller's 400 says nothing about the target: it still serves the next request.
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-badreq"))
    assert raw.headers["x-gateway-target"] == "fb-badreq-a"


def test_stream_cut_after_first_bytes_raises_in_the_sdk_without_fallback(fsim: Sim, sdk: openai.OpenAI) -> None:
    # Frame 0 is Azure's prompt-filter preamble (no event); frames 1-2 reach the caller before the cut.
    fsim.fault(mode="cut", after_chunks=3, target="fb-cut-a", count=1)
    seen: list[str] = []
    stream = sdk.chat.completions.create(**ask("fb-cut", stream=True))
    with pytest.raises(openai.APIError), stream:
        for chunk in stream:
            seen.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(seen), "the caller got content before the cut"
    assert (fsim.count("fb-cut-a"), fsim.count("fb-cut-b")) == (1, 0), "no fallback once bytes were sent"


def test_stream_cut_ends_with_an_error_event_and_no_done(fb_stack: Stack, fb_token: str, fsim: Sim) -> None:
    fsim.fault(mode="cut", after_chunks=3, target="fb-cutraw-a", count=1)
    with post(fb_stack, fb_token, ask("fb-cutraw", stream=True)) as response:
        assert response.status_code == 200
        frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] != "data: [DONE]", "a cut stream must not look complete"
    last = json.loads(frames[-1].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert any(json.loads(f[6:]).get("choices") for f in frames[:-1])
    assert fsim.count("fb-cutraw-b") == 0


@pytest.mark.parametrize("scenario,provider", [("stall", "azure_openai"), ("brkstall", "bedrock")])
def test_a_stream_that_goes_quiet_mid_way_ends_with_a_timeout_error_event(fb_stack: Stack, fb_token: str, fsim: Sim,
                                                                           scenario: str, provider: str) -> None:
    # The upstream stops sending after a few frames and holds the connection open: the gateway must not hold
    # the caller (and its reservation) for as long as the upstream likes. The read timeout ends it.
    fsim.fault(mode="stall", delay_ms=6000, after_chunks=3, target=f"fb-{scenario}-a", provider=provider, count=1)
    started = time.monotonic()
    with post(fb_stack, fb_token, ask(f"fb-{scenario}", stream=True)) as response:
        assert response.status_code == 200
        frames = [f for f in response.text.split("\n\n") if f]
    elapsed = time.monotonic() - started
    last = json.loads(frames[-1].removeprefix("data: "))
    assert last["error"]["code"] == "timeout" and frames[-2] != "data: [DONE]", frames[-2:]
    assert UPSTREAM_TIMEOUT_S * 0.9 <= elapsed < 4, f"took {elapsed:.2f}s: the read timeout did not end the wait"
    assert fsim.count(f"fb-{scenario}-b") == 0, "no fallback once bytes were sent"


def test_a_pause_shorter_than_the_timeout_is_just_a_slow_stream(fb_stack: Stack, fb_token: str, fsim: Sim) -> None:
    fsim.fault(mode="stall", delay_ms=400, after_chunks=3, target="fb-stall-a", count=1)
    with post(fb_stack, fb_token, ask("fb-stall", stream=True)) as response:
        frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"


def test_stream_failing_before_its_first_event_falls_back(fsim: Sim, sdk: openai.OpenAI) -> None:
    # Cut after the preamble only: nothing reached the caller yet, so the next target may still serve.
    fsim.fault(mode="cut", after_chunks=1, target="fb-cutfirst-a", count=1)
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-cutfirst", stream=True))
    assert raw.headers["x-gateway-target"] == "fb-cutfirst-b"
    with raw.parse() as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    assert (fsim.count("fb-cutfirst-a"), fsim.count("fb-cutfirst-b")) == (1, 1)


def test_a_missing_azure_deployment_falls_back_instead_of_blaming_the_caller(fsim: Sim, sdk: openai.OpenAI) -> None:
    # 404 DeploymentNotFound is the gateway's configuration, not the caller's request: the next target serves it.
    fsim.fault(mode="status", status=404, target="fb-nodeploy-a")
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-nodeploy"))
    assert raw.headers["x-gateway-target"] == "fb-nodeploy-b"
    assert (fsim.count("fb-nodeploy-a"), fsim.count("fb-nodeploy-b")) == (1, 1)


def test_a_target_that_cannot_take_the_request_is_passed_over_end_to_end(fsim: Sim, sdk: openai.OpenAI) -> None:
    # A remote image URL: Azure takes it, Bedrock cannot. With the first Azure target throttled, the request must
    # reach the second Azure target instead of ending on Bedrock's 400.
    fsim.fault(mode="status", status=429, target="fb-img-a", count=1)
    image = {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                          {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-img", messages=[image]))
    assert raw.headers["x-gateway-target"] == "fb-img-c"
    assert (fsim.count("fb-img-a"), fsim.count("fb-img-b"), fsim.count("fb-img-c")) == (1, 0, 1)


def test_a_bedrock_stream_failing_right_after_message_start_falls_back(fsim: Sim, sdk: openai.OpenAI) -> None:
    # messageStart carries no output: nothing was sent to the caller yet, so the next target may still serve it.
    fsim.fault(mode="status", status=503, after_chunks=1, target="fb-brkstart-a", count=1)
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-brkstart", stream=True))
    assert raw.headers["x-gateway-target"] == "fb-brkstart-b"
    with raw.parse() as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert (fsim.count("fb-brkstart-a"), fsim.count("fb-brkstart-b")) == (1, 1)


def test_bedrock_serves_an_assistant_first_conversation_and_a_replayed_tool_exchange(fsim: Sim,
                                                                                    sdk: openai.OpenAI) -> None:
    # The simulator enforces Converse's rules (user turn first, toolConfig with tool blocks), as Bedrock does.
    conversation = [
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4 C, rain"},
        {"role": "user", "content": "Summarise that in one line."}]
    raw = sdk.chat.completions.with_raw_response.create(**ask("chat-default", messages=conversation),
                                                        extra_body={"provider_hint": "bedrock"})
    assert raw.headers["x-gateway-provider"] == "bedrock"
    assert raw.parse().choices[0].message.content


def test_an_unreadable_bedrock_answer_is_an_upstream_failure_not_an_empty_answer(fsim: Sim,
                                                                                  sdk: openai.OpenAI) -> None:
    # botocore returns what it could parse of a truncated body (nothing): that must not be a free, empty 200.
    fsim.fault(mode="malformed", target="fb-brkmal-a", count=1)
    raw = sdk.chat.completions.with_raw_response.create(**ask("fb-brkmal"))
    assert raw.headers["x-gateway-target"] == "fb-brkmal-b"
    completion = raw.parse()
    assert completion.choices[0].message.content and completion.usage and completion.usage.completion_tokens > 0


def test_bedrock_stream_parses_through_the_sdk(fsim: Sim, sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        **ask("chat-default", stream=True, stream_options={"include_usage": True}),
        extra_body={"provider_hint": "bedrock"})
    assert raw.headers["x-gateway-provider"] == "bedrock"
    with raw.parse() as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert fsim.count("anthropic.claude-3-haiku-20240307-v1:0") == 1


def test_bedrock_stream_cut_mid_way_raises_in_the_sdk(fsim: Sim, sdk: openai.OpenAI) -> None:
    fsim.fault(mode="cut", after_chunks=3, target="fb-brkcut-a", count=1)
    seen: list[str] = []
    stream = sdk.chat.completions.create(**ask("fb-brkcut", stream=True))
    with pytest.raises(openai.APIError), stream:
        for chunk in stream:
            seen.extend(c.delta.content or "" for c in chunk.choices)
    assert (fsim.count("fb-brkcut-a"), fsim.count("fb-brkcut-b")) == (1, 0)


def test_every_attempt_of_a_fallback_request_is_in_the_host_log(fb_stack: Stack, fb_token: str, fsim: Sim) -> None:
    fsim.fault(mode="status", status=503, target="fb-logs-a", count=1)
    request_id = f"fb-logs-{time.monotonic_ns()}"
    response = post(fb_stack, fb_token, ask("fb-logs"), **{"x-request-id": request_id})
    assert response.status_code == 200 and response.headers["x-request-id"] == request_id
    assert response.headers["x-gateway-target"] == "fb-logs-b"
    line = _request_log_line(fb_stack, request_id)
    # An operator reading the log stream must see that the primary failed and the fallback served.
    assert "fb-logs-a" in line and "fb-logs-b" in line, f"attempts missing from the request record: {line!r}"


def _request_log_line(stack: Stack, request_id: str, timeout: float = 5.0) -> str:
    assert stack.log_dir is not None
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in (stack.log_dir / "host.log").read_text(errors="replace").splitlines()
                 if "gateway.request" in ln and request_id in ln]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(lines) == 1, f"expected one gateway.request record for {request_id}, got {lines}"
    return lines[0]

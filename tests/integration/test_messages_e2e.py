"""Anthropic Messages end to end: anthropic SDK (base_url <gateway>/api, the Entra token as auth_token) →
local host → gateway → Bedrock's InvokeModel on the simulator, in Anthropic's own format and error shape."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests

from tests import closing
from tests.integration.test_content_filter_e2e import cost_row
from tests.integration.test_fallback_e2e import _request_log_line
from tests.integration.test_quota_e2e import caller_key, ledger_state
from tests.integration.test_responses_e2e import _settled, day_tokens, slow_chunks
from tests.stack_fixture import Sim
from tools.sim_text import TOOL_TRIGGER
from tools.stack import Stack

pytestmark = pytest.mark.integration

CLAUDE, CLAUDE_ID = "claude-3-haiku", "anthropic.claude-3-haiku-20240307-v1:0"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def client(stack: Stack, token: str) -> anthropic.Anthropic:
    # base_url = <gateway>/api: the SDK adds /v1/messages. Retries off: a 429 must reach the test.
    sdk = anthropic.Anthropic(base_url=stack.base_url, auth_token=token, max_retries=0, timeout=30)
    return closing.keep(sdk)




def hello(**extra: Any) -> dict[str, Any]:
    return {"model": CLAUDE, "max_tokens": 100, "messages": [{"role": "user", "content": "Hello there gateway"}], **extra}


def test_a_message_is_served_by_bedrock_in_anthropics_format(stack: Stack, sim: Sim) -> None:
    token = stack.token("i20-messages-whole")
    raw = client(stack, token).messages.with_raw_response.create(**hello(system="Be brief"))
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "text"
    assert message.content[0].text and message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    sent = json.loads(sim.last(CLAUDE_ID)["body"]) if isinstance(sim.last(CLAUDE_ID)["body"], str) \
        else sim.last(CLAUDE_ID)["body"]
    assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent and sent["system"] == "Be brief"
    row = cost_row(stack, token, raw.headers["x-request-id"])
    assert (row.route, row.status, row.provider) == ("messages", "ok", "bedrock")
    assert day_tokens(stack, token) == message.usage.input_tokens + message.usage.output_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_beta_features_the_sdk_names_reach_bedrock_in_the_body(stack: Stack, token: str, sim: Sim,
                                                                stream: bool) -> None:
    # The SDK sends betas as the anthropic-beta header; Bedrock's InvokeModel takes them as anthropic_beta.
    betas = ["token-efficient-tools-2025-02-19", "interleaved-thinking-2025-05-14"]
    sdk = client(stack, token).beta.messages
    if stream:
        with sdk.stream(**hello(), betas=betas) as events:
            assert events.get_final_message().content[0].text
    else:
        assert sdk.create(**hello(), betas=betas).content[0].text
    body = sim.last(CLAUDE_ID)["body"]
    sent = json.loads(body) if isinstance(body, str) else body
    assert sent["anthropic_beta"] == betas


def test_without_betas_the_body_has_no_anthropic_beta(stack: Stack, token: str, sim: Sim) -> None:
    client(stack, token).messages.create(**hello())
    body = sim.last(CLAUDE_ID)["body"]
    assert "anthropic_beta" not in (json.loads(body) if isinstance(body, str) else body)


def test_a_malformed_beta_name_is_a_400_naming_the_header(stack: Stack, token: str, sim: Sim) -> None:
    before = sim.count(CLAUDE_ID)
    message = anthropic_error(post(stack, hello(), token=token, **{"anthropic-beta": "ok-2025, bad name!"}),
                              400, "invalid_request_error")
    assert "anthropic-beta" in message
    assert sim.count(CLAUDE_ID) == before  # refused before any upstream call


def test_a_streamed_message_relays_anthropics_events(stack: Stack) -> None:
    token = stack.token("i20-messages-stream")
    with client(stack, token).messages.stream(**hello()) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    assert day_tokens(stack, token) == final.usage.input_tokens + final.usage.output_tokens
    kinds = [event.type for event in client(stack, token).messages.create(**hello(), stream=True)]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_round_trip(stack: Stack, token: str, stream: bool) -> None:
    sdk = client(stack, token)
    ask = [{"role": "user", "content": f"What is the weather in Paris? {TOOL_TRIGGER}"}]
    first = _answer(sdk, stream, model=CLAUDE, max_tokens=200, tools=[WEATHER], messages=ask)
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict)
    follow_up = [*ask, {"role": "assistant", "content": first.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]}]
    second = _answer(sdk, stream, model=CLAUDE, max_tokens=200, tools=[WEATHER], messages=follow_up)
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"


def _answer(sdk: anthropic.Anthropic, stream: bool, **kwargs: Any) -> Any:
    if not stream:
        return sdk.messages.create(**kwargs)
    with sdk.messages.stream(**kwargs) as events:
        return events.get_final_message()


def test_count_tokens_answers_from_the_gateways_estimate_without_an_upstream_call_or_cost_row(
        stack: Stack, sim: Sim) -> None:
    token = stack.token("i20-count-tokens")
    sdk = client(stack, token)
    short = sdk.messages.count_tokens(model=CLAUDE, messages=[{"role": "user", "content": "Hello"}])
    longer = sdk.messages.count_tokens(model=CLAUDE, system="Be brief", tools=[WEATHER],  # type: ignore[list-item]
                                       messages=[{"role": "user", "content": "Hello " * 50}])
    assert 0 < short.input_tokens < longer.input_tokens
    assert sim.total() == 0
    assert ledger_state(stack, caller_key(stack, token))[1] == []


def test_a_counted_prompt_leaves_one_request_record_without_its_text(stack: Stack, token: str) -> None:
    request_id = f"i20-count-logged-{time.monotonic_ns()}"
    secret = "count-tokens-prompt-text-that-must-not-be-logged"
    response = post(stack, {"model": CLAUDE, "messages": [{"role": "user", "content": secret}]},
                    "/v1/messages/count_tokens", token, **{"x-request-id": request_id})
    assert response.status_code == 200, response.text
    line = _request_log_line(stack, request_id)
    assert " count_tokens 200 ok " in line and CLAUDE in line, line
    assert secret not in (stack.log_dir or Path(".")).joinpath("host.log").read_text(errors="replace")


def post(stack: Stack, body: Any, path: str = "/v1/messages", token: str | None = None,
         **headers: str) -> requests.Response:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{stack.base_url}{path}", data=data, timeout=30, stream=True,
                         headers={"Content-Type": "application/json", **auth, **headers})


def anthropic_error(response: requests.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    return str(body["error"]["message"])


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"model": CLAUDE, "messages": []}, 400, "invalid_request_error"),
    ({"model": CLAUDE, "max_tokens": 10, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request_error"),
    ({"model": "no-such-model", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, 404, "not_found_error"),
    ('{"model": ', 400, "invalid_request_error"),
])
def test_bad_input_gets_the_exact_status_in_anthropics_shape(stack: Stack, token: str, path: str, body: Any,
                                                             status: int, kind: str) -> None:
    if path.endswith("count_tokens") and isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "max_tokens"}
    anthropic_error(post(stack, body, path, token), status, kind)


def test_a_missing_max_tokens_is_named(stack: Stack, token: str) -> None:
    message = anthropic_error(post(stack, {"model": CLAUDE, "messages": [{"role": "user", "content": "x"}]},
                                   token=token), 400, "invalid_request_error")
    assert "max_tokens" in message


def test_a_model_without_anthropic_targets_is_a_400(stack: Stack, token: str, sim: Sim) -> None:
    anthropic_error(post(stack, hello(model="gpt-4o-mini"), token=token), 400, "invalid_request_error")
    assert sim.total() == 0


@pytest.mark.parametrize("model", ["gpt-4o-mini", "text-embedding-3-small"])
def test_count_tokens_refuses_a_model_messages_would_refuse(stack: Stack, token: str, sim: Sim, model: str) -> None:
    counted = post(stack, {"model": model, "messages": [{"role": "user", "content": "x"}]}, "/v1/messages/count_tokens",
                   token)
    sent = post(stack, hello(model=model), token=token)
    assert anthropic_error(counted, 400, "invalid_request_error") == anthropic_error(sent, 400, "invalid_request_error")
    assert sim.total() == 0


def test_auth_errors_are_anthropic_shaped_and_an_api_key_is_refused_plainly(stack: Stack) -> None:
    anthropic_error(post(stack, hello()), 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=stack.base_url, api_key=None, auth_token=None, max_retries=0,
                            default_headers={"x-api-key": "sk-ant-not-a-gateway-token"}).messages.create(**hello())
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "auth_token" in caught.value.body["error"]["message"]  # type: ignore[index]


def test_a_throttled_upstream_is_a_429_with_retry_after_in_anthropics_shape(stack: Stack, token: str, sim: Sim) -> None:
    sim.fault(mode="status", status=429, target=CLAUDE_ID, retry_after=7)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client(stack, token).messages.create(**hello())
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_a_failure_mid_stream_ends_with_an_anthropic_error_event_and_one_cost_row(stack: Stack, sim: Sim) -> None:
    token = stack.token("i20-messages-cut-upstream")
    sim.fault(mode="status", status=503, target=CLAUDE_ID, after_chunks=3, count=1)
    with post(stack, hello(stream=True), token=token, **{"x-request-id": "i20-messages-upstream-cut"}) as response:
        assert response.status_code == 200
        frames = [frame for frame in response.text.split("\n\n") if frame]
    assert frames[0].startswith("event: message_start\n")
    name, data = frames[-1].split("\n", 1)
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: "))["error"]["type"] in ("api_error", "overloaded_error")
    assert cost_row(stack, token, "i20-messages-upstream-cut").status == "upstream_cut"


def test_a_stream_the_caller_cuts_settles_with_one_cost_row(stack: Stack, sim: Sim) -> None:
    token = stack.token("i20-messages-hangup")
    with slow_chunks(stack):
        body = hello(stream=True, messages=[{"role": "user", "content": "Please ramble SIM_REPLY_WORDS=400"}])
        with post(stack, body, token=token, **{"x-request-id": "i20-messages-hangup"}) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()) == b"event: message_start"
        row = _settled(stack, token, "i20-messages-hangup")
    assert row.status == "client_disconnected" and row.route == "messages"
    assert row.prompt_tokens > 0 and row.cost_usd > 0

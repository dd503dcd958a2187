"""Anthropic Messages: the request model, its error shape, and the native Bedrock InvokeModel relay."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_lib.errors import AuthenticationFailed, InvalidRequest, ProviderError, QuotaExceeded, RateLimited
from gateway_lib.operations.messages import ANTHROPIC_MESSAGES, CountTokensRequest, MessagesRequest, error_body
from gateway_lib.operations.schema import parse_model
from gateway_lib.providers import registry
from gateway_lib.providers.base import MESSAGES, CallContext, Usage, streamed
from gateway_lib.providers.bedrock import is_anthropic
from gateway_lib.providers.bedrock import messages as bedrock
from tests.unit.test_responses_api import TARGET

TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}


def parse(**body: Any) -> MessagesRequest:
    return parse_model(MessagesRequest, {"model": "claude-3-haiku", "max_tokens": 100,
                                         "messages": [{"role": "user", "content": "Hi"}], **body})


def test_the_bedrock_body_is_the_request_less_what_bedrock_does_not_take() -> None:
    request = parse(system="Be brief", stream=True, metadata={"user_id": "u1"}, tools=[TOOL], priority="quality")
    kwargs = bedrock.invoke_kwargs(request, TARGET, CallContext("r", max_tokens=64))
    assert kwargs["modelId"] == TARGET.deployment and kwargs["contentType"] == "application/json"
    assert json.loads(kwargs["body"]) == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                                          "messages": [{"role": "user", "content": "Hi"}], "system": "Be brief",
                                          "tools": [TOOL]}


def test_a_tool_round_trip_reads_as_a_chat_tool_call_and_its_result() -> None:
    request = parse(tools=[TOOL], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking"},
                                          {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "sunny"}]}])
    view = request.prompt.messages
    assert [m.role for m in view] == ["user", "assistant", "tool"]
    assert view[1].tool_calls is not None and view[1].tool_calls[0].function.name == "get_weather"
    assert (view[2].tool_call_id, view[2].content) == ("tu_1", "sunny")


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"temperature": 1.5}, "temperature"),
    ({"max_token": 5}, "max_token"),
])
def test_bad_input_is_a_400_naming_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(**{k: v for k, v in body.items()})
    assert caught.value.param == param
    assert error_body(caught.value) == {"type": "error", "error": {"type": "invalid_request_error",
                                                                   "message": caught.value.message}}


def test_count_tokens_takes_no_max_tokens() -> None:
    request = parse_model(CountTokensRequest, {"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    assert request.prompt.messages[0].content == "Hi"
    with pytest.raises(InvalidRequest):
        parse_model(CountTokensRequest, {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})


@pytest.mark.parametrize(("error", "kind"), [
    (AuthenticationFailed("no"), "authentication_error"), (RateLimited("slow"), "rate_limit_error"),
    (QuotaExceeded("spent"), "rate_limit_error"),
    (ProviderError("down", provider="bedrock", kind="server_error", retryable=True), "api_error"),
])
def test_gateway_errors_take_anthropics_types(error: Any, kind: str) -> None:
    assert error_body(error)["error"]["type"] == kind


def test_messages_are_offered_only_by_bedrocks_anthropic_models() -> None:
    assert is_anthropic("anthropic.claude-3-haiku-20240307-v1:0") and is_anthropic("us.anthropic.claude-sonnet-4")
    assert is_anthropic("arn:aws:bedrock:us-east-1:1:inference-profile/eu.anthropic.claude-3")
    assert not is_anthropic("meta.llama3-70b-instruct-v1:0") and not is_anthropic("amazon.nova-pro")
    assert registry.capabilities(TARGET).lacks(streamed(MESSAGES), frozenset()) is None


def chunk(data: dict[str, Any]) -> dict[str, Any]:
    return {"chunk": {"bytes": json.dumps(data).encode()}}


ANTHROPIC_STREAM = [
    {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                          "usage": {"input_tokens": 15, "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 6}},
    {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 15, "outputTokenCount": 6}},
]


def test_the_stream_is_relayed_as_anthropics_events_with_usage_and_without_bedrocks_metrics() -> None:
    translator = bedrock.MessagesStreamTranslator()
    out = [event for data in ANTHROPIC_STREAM for event in translator.translate(chunk(data))]
    assert [e.name for e in out] == [d["type"] for d in ANTHROPIC_STREAM]
    assert out[0].more and not out[1].more  # message_start waits for the first block, then goes with it
    assert [e.usage for e in out if e.usage] == [Usage(15, 6)]
    frames = b"".join(ANTHROPIC_MESSAGES.frame(parse(), e) for e in out)
    assert b"event: content_block_delta\ndata: " in frames and b"invocationMetrics" not in frames
    assert "".join(ANTHROPIC_MESSAGES.stream_text(e) for e in out) == "Hi"


def test_errors_in_the_stream_raise_provider_errors() -> None:
    translator = bedrock.MessagesStreamTranslator()
    with pytest.raises(ProviderError) as caught:
        translator.translate(chunk({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}))
    assert caught.value.retryable
    with pytest.raises(ProviderError) as throttled:
        translator.translate({"throttlingException": {"message": "slow"}})
    assert throttled.value.kind == "rate_limited"


def test_an_unreadable_invoke_body_is_a_malformed_answer() -> None:
    assert bedrock.from_invoke(b'{"content": [], "usage": {"input_tokens": 2, "output_tokens": 3}}').usage == Usage(2, 3)
    with pytest.raises(ProviderError):
        bedrock.from_invoke(b'{"id": "msg_broken", "content": [')

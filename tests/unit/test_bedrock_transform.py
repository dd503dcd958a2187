"""OpenAI <-> Bedrock Converse transforms, against recorded Converse/ConverseStream shapes."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway_lib.config.catalog import Price, Target
from gateway_lib.errors import InvalidRequest, ProviderError
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import CallContext, Usage, usage_of
from gateway_lib.providers.bedrock.transform import (
    StreamTranslator,
    error_from_aws,
    from_converse_response,
    to_converse_request,
)

FIXTURES = Path(__file__).parent / "fixtures" / "bedrock"
TARGET = Target(id="bedrock-haiku", provider="bedrock", deployment="anthropic.claude-3-haiku-20240307-v1:0",
                model="claude-3-haiku", region="us-east-1", endpoint=None,
                price=Price(Decimal("0.00025"), Decimal("0.00125")), quality=55, context_window=200000,
                max_output_tokens=4096, tokenizer="claude")
CTX = CallContext(request_id="req-1")


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def build(**body: Any) -> dict[str, Any]:
    body.setdefault("model", "claude-3-haiku")
    ctx = body.pop("_ctx", CTX)
    return to_converse_request(ChatRequest.model_validate(body), TARGET, ctx)


CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER_TOOL = {"type": "function",
                "function": {"name": "get_weather", "description": "Weather for a city", "parameters": CITY_SCHEMA}}


# ---------------------------------------------------------------- request


def test_system_and_developer_messages_become_the_system_list() -> None:
    kwargs = build(messages=[{"role": "system", "content": "Be terse."}, {"role": "developer", "content": "No emoji."},
                             {"role": "user", "content": "Hi"}])
    assert kwargs["modelId"] == TARGET.deployment
    assert kwargs["system"] == [{"text": "Be terse."}, {"text": "No emoji."}]
    assert kwargs["messages"] == [{"role": "user", "content": [{"text": "Hi"}]}]


def test_consecutive_same_role_messages_are_merged_into_one_turn() -> None:
    kwargs = build(messages=[{"role": "user", "content": "a"},
                             {"role": "user", "content": [{"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}])
    assert kwargs["messages"] == [
        {"role": "user", "content": [{"text": "a"}, {"text": "b"}]},
        {"role": "assistant", "content": [{"text": "c"}]},
        {"role": "user", "content": [{"text": "d"}]},
    ]


def test_tool_round_trip_maps_to_tool_use_and_tool_result_blocks() -> None:
    kwargs = build(tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "20C"},
    ])
    assistant, results = kwargs["messages"][1], kwargs["messages"][2]
    assert assistant == {"role": "assistant", "content": [
        {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}},
        {"toolUse": {"toolUseId": "call_2", "name": "get_weather", "input": {"city": "Rome"}}}]}
    assert results == {"role": "user", "content": [
        {"toolResult": {"toolUseId": "call_1", "content": [{"text": "5C"}]}},
        {"toolResult": {"toolUseId": "call_2", "content": [{"text": "20C"}]}}]}
    assert kwargs["toolConfig"]["tools"][0] == {"toolSpec": {
        "name": "get_weather", "description": "Weather for a city",
        "inputSchema": {"json": CITY_SCHEMA}}}


def test_inference_config_uses_the_clamped_cap_and_maps_stop() -> None:
    kwargs = build(messages=[{"role": "user", "content": "x"}], max_tokens=4000, temperature=1.5, top_p=0.9,
                   stop="END", _ctx=CallContext(request_id="r", max_tokens=512))
    assert kwargs["inferenceConfig"] == {"maxTokens": 512, "temperature": 1.0, "topP": 0.9, "stopSequences": ["END"]}


def test_no_sampling_parameters_means_no_inference_config() -> None:
    assert "inferenceConfig" not in build(messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("choice", "expected"), [
    (None, {"auto": {}}), ("auto", {"auto": {}}), ("required", {"any": {}}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"tool": {"name": "get_weather"}}),
])
def test_tool_choice_maps_to_converse_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    kwargs = build(messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL], tool_choice=choice)
    assert kwargs["toolConfig"]["toolChoice"] == expected


def test_tool_choice_none_omits_tools() -> None:
    kwargs = build(messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL], tool_choice="none")
    assert "toolConfig" not in kwargs


def test_json_response_format_is_a_system_instruction() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    kwargs = build(messages=[{"role": "user", "content": "x"}],
                   response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert "JSON" in kwargs["system"][-1]["text"]
    assert json.dumps(schema) in kwargs["system"][-1]["text"]


def test_remote_image_urls_are_rejected_with_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        build(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    assert info.value.status == 400 and info.value.param == "messages[0].content"


@pytest.mark.parametrize("image_url", [{"url": None}, {"url": 5}, {"url": {"href": "x"}}, None])
def test_an_image_part_without_a_string_url_is_a_400(image_url: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        build(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": image_url}]}])
    assert info.value.status == 400 and info.value.param == "messages[0].content"


def test_data_url_images_become_image_blocks() -> None:
    data = base64.b64encode(b"\x89PNG").decode()
    kwargs = build(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}])
    assert kwargs["messages"][0]["content"][1] == {"image": {"format": "png", "source": {"bytes": b"\x89PNG"}}}


def test_an_assistant_greeting_first_gets_a_user_turn_before_it() -> None:
    # Converse requires a user turn first; chat UIs often open with the assistant's greeting.
    kwargs = build(messages=[{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hi! How can I help?"},
                             {"role": "user", "content": "Tell me a joke"}])
    assert [t["role"] for t in kwargs["messages"]] == ["user", "assistant", "user"]
    assert kwargs["messages"][0]["content"][0]["text"].strip()
    only_system = build(messages=[{"role": "system", "content": "Write a haiku."}])
    assert [t["role"] for t in only_system["messages"]] == ["user"]


TOOL_EXCHANGE = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4 C, rain"},
    {"role": "user", "content": "Summarise that."},
]


def test_a_tool_exchange_replayed_without_tools_goes_as_text() -> None:
    # Bedrock wants toolConfig whenever tool blocks are present; offering tools the caller did not would let the
    # model call them.
    kwargs = build(messages=TOOL_EXCHANGE)
    assert "toolConfig" not in kwargs
    blocks = [b for t in kwargs["messages"] for b in t["content"]]
    assert all(set(b) == {"text"} for b in blocks)
    assert any("get_weather" in b["text"] and "Oslo" in b["text"] for b in blocks)
    assert any("4 C, rain" in b["text"] for b in blocks)
    with_tools = build(tools=[WEATHER_TOOL], messages=TOOL_EXCHANGE)
    assert "toolConfig" in with_tools and any("toolUse" in b for t in with_tools["messages"] for b in t["content"])


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": None}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools[0]"),
])
def test_shapes_the_schema_lets_through_are_a_400_not_a_crash(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        build(messages=[{"role": "user", "content": "x"}], **extra)
    assert refused.value.param == param


@pytest.mark.parametrize("arguments", ["not json", "[1]", '{"x": NaN}', '{"x": 1e999}', '{"x": "\\ud800"}',
                                       '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"x": ' + "9" * 5000 + "}"])
def test_invalid_tool_call_arguments_are_a_400(arguments: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        build(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}])
    assert refused.value.param == "messages[1].tool_calls"


# ---------------------------------------------------------------- response


def test_text_response_becomes_a_chat_completion() -> None:
    completion = from_converse_response(fixture("converse_text.json"), TARGET, completion_id="chatcmpl-1", created=7)
    assert completion.body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "claude-3-haiku",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris is the capital of France."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30},
    }
    assert completion.usage.total_tokens == 30


def test_tool_use_response_carries_tool_calls_with_json_string_arguments() -> None:
    body = from_converse_response(fixture("converse_tool_use.json"), TARGET, completion_id="c", created=1).body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look that up."
    call = choice["message"]["tool_calls"][0]
    assert call["id"] == "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q" and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Seattle", "unit": "celsius"}


@pytest.mark.parametrize(("stop", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("guardrail_intervened", "content_filter"), ("content_filtered", "content_filter"),
])
def test_stop_reasons_map_to_openai_finish_reasons(stop: str, finish: str) -> None:
    response = {**fixture("converse_text.json"), "stopReason": stop}
    assert from_converse_response(response, TARGET, completion_id="c", created=1).body["choices"][0][
        "finish_reason"] == finish


def test_malformed_model_output_is_a_retryable_provider_error() -> None:
    response = {**fixture("converse_text.json"), "stopReason": "malformed_tool_use"}
    with pytest.raises(ProviderError) as info:
        from_converse_response(response, TARGET, completion_id="c", created=1)
    assert info.value.kind == "malformed" and info.value.retryable


# ---------------------------------------------------------------- stream


def translate_all(events: list[dict[str, Any]]) -> list[Any]:
    translator = StreamTranslator(TARGET, completion_id="chatcmpl-s", created=3)
    return [out for event in events for out in translator.translate(event)]


def test_text_stream_is_role_then_deltas_then_finish_then_usage() -> None:
    out = translate_all(fixture("converse_stream_text.json"))
    deltas = [e.chunk["choices"][0]["delta"] if e.chunk["choices"] else None for e in out]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": ", world"}, {}, None]
    assert [e.text for e in out] == ["", "Hello", ", world", "", ""]
    assert out[3].chunk["choices"][0]["finish_reason"] == "length"
    assert out[-1].chunk["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    assert out[-1].usage is not None and out[-1].usage.completion_tokens == 4
    assert all(e.chunk["object"] == "chat.completion.chunk" and e.chunk["model"] == "claude-3-haiku" for e in out)


def test_tool_stream_numbers_tool_calls_from_zero() -> None:
    out = translate_all(fixture("converse_stream_tool_use.json"))
    calls = [c for e in out if e.chunk["choices"] for c in e.chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": "tooluse_A1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    oslo = "".join(c["function"]["arguments"] for c in calls if c["index"] == 0)
    assert json.loads(oslo) == {"city": "Oslo"}
    assert calls[3]["index"] == 1 and calls[3]["id"] == "tooluse_B2"
    finish = [e.chunk["choices"][0]["finish_reason"] for e in out if e.chunk["choices"]]
    assert finish[-1] == "tool_calls"


def test_role_chunk_comes_first_even_without_message_start() -> None:
    out = translate_all([{"contentBlockDelta": {"delta": {"text": "x"}, "contentBlockIndex": 0}}])
    assert out[0].chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_exception_event_mid_stream_raises_provider_error() -> None:
    translator = StreamTranslator(TARGET, completion_id="c", created=1)
    translator.translate({"messageStart": {"role": "assistant"}})
    with pytest.raises(ProviderError) as info:
        translator.translate({"throttlingException": {"message": "slow down"}})
    assert info.value.kind == "rate_limited" and info.value.retryable


def test_message_start_alone_yields_nothing_so_a_failure_after_it_can_still_fall_back() -> None:
    # The fallback commits to a target at its first chunk; messageStart carries no model output.
    translator = StreamTranslator(TARGET, completion_id="c", created=1)
    assert translator.translate({"messageStart": {"role": "assistant"}}) == []
    assert translator.translate({"contentBlockStart": {"start": {}, "contentBlockIndex": 0}}) == []
    first = translator.translate({"contentBlockDelta": {"delta": {"text": "Hi"}, "contentBlockIndex": 0}})
    assert [e.chunk["choices"][0]["delta"] for e in first] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]


def test_streamed_tool_arguments_count_as_output_for_a_cut_stream() -> None:
    # A stream cut before its usage event is billed from the streamed text: tool arguments are output too.
    out = translate_all(fixture("converse_stream_tool_use.json"))
    streamed = "".join(e.text for e in out)
    assert '{"city"' in streamed.replace(" ", "") and "Oslo" in streamed


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("code", "status", "kind", "retryable"), [
    ("ThrottlingException", 429, "rate_limited", True),
    ("ServiceQuotaExceededException", 400, "rate_limited", True),
    ("ServiceUnavailableException", 503, "server_error", True),
    ("InternalServerException", 500, "server_error", True),
    ("ModelNotReadyException", 429, "server_error", True),
    ("modelStreamErrorException", None, "server_error", True),
    ("ModelTimeoutException", 408, "timeout", True),
    ("ValidationException", 400, "bad_request", False),
    ("AccessDeniedException", 403, "auth", True),
    ("UnrecognizedClientException", 403, "auth", True),
    ("SomethingNew", 502, "server_error", True),
    ("SomethingNew", 418, "bad_request", False),
])
def test_aws_error_codes_map_to_provider_error_kinds(code: str, status: int | None, kind: str, retryable: bool) -> None:
    error = error_from_aws(code, status, "details", retry_after=3.0)
    assert (error.kind, error.retryable, error.upstream_status, error.retry_after) == (kind, retryable, status, 3.0)


def test_only_validation_errors_show_upstream_text() -> None:
    assert "arn:aws" not in error_from_aws("AccessDeniedException", 403, "arn:aws:iam::123:role/x").message
    assert "too long" in error_from_aws("ValidationException", 400, "input is too long").message


@pytest.mark.parametrize("usage", [None, {}, {"inputTokens": "12", "outputTokens": 3}, {"inputTokens": -1,
                                                                                      "outputTokens": 3}])
def test_usage_that_is_missing_or_unreadable_is_reported_as_unknown_not_as_zero(usage: Any) -> None:
    response = dict(fixture("converse_text.json"))
    if usage is None:
        response.pop("usage", None)
    else:
        response["usage"] = usage
    completion = from_converse_response(response, TARGET, completion_id="c", created=1)
    assert completion.usage is None and "usage" not in completion.body  # the pipeline bills an estimate
    assert usage_of({"prompt_tokens": 7, "completion_tokens": 2}, "prompt_tokens", "completion_tokens") == Usage(7, 2)

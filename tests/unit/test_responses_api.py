"""The Responses API request model, its chat view, and its translation to and from Bedrock Converse."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.config.catalog import Price, Target
from gateway_lib.errors import InvalidRequest, ProviderError
from gateway_lib.operations.responses import RESPONSES_API, ResponsesRequest, stream_text, stream_usage
from gateway_lib.operations.schema import parse_model
from gateway_lib.providers.base import CallContext, StreamEvent, Usage
from gateway_lib.providers.bedrock import responses as bedrock

TARGET = Target(id="bedrock-claude", provider="bedrock", deployment="anthropic.claude-3-haiku-20240307-v1:0",
                model="claude-3-haiku", region="us-east-1", endpoint=None, price=Price(Decimal("0.00025"), Decimal("0.00125")),
                quality=50, context_window=200000, max_output_tokens=4096, tokenizer="claude")
TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def parse(**body: Any) -> ResponsesRequest:
    return parse_model(ResponsesRequest, {"model": "claude-3-haiku", **body})


def test_a_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    request = parse(input="Hello", instructions="Be brief", max_output_tokens=50)
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief"), ("user", "Hello")]
    assert request.requested_max_tokens == 50


def test_a_function_call_round_trip_becomes_a_tool_call_and_its_result() -> None:
    request = parse(tools=[TOOL], input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
    ])
    user, assistant, tool = request.messages
    assert user.content == [{"type": "text", "text": "Weather in Paris?"}]
    assert assistant.tool_calls is not None and assistant.tool_calls[0].id == "call_1"
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", '{"temp": 21}')
    kwargs = bedrock.to_converse(request, TARGET, CallContext("r", max_tokens=100))
    assert kwargs["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"
    assert kwargs["messages"][1]["content"][0]["toolUse"]["input"] == {"city": "Paris"}
    assert kwargs["messages"][2]["content"][0]["toolResult"]["toolUseId"] == "call_1"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_tokens": 5}, "max_tokens"),
    ({}, "input"),
])
def test_bad_input_is_a_400_naming_the_parameter_as_sent(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(**body)
    assert caught.value.status == 400 and caught.value.param == param


def test_text_format_json_schema_is_chat_response_format() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    request = parse(input="x", text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}})
    assert request.response_format == {"type": "json_schema", "json_schema": {"name": "place", "schema": schema,
                                                                             "strict": True}}
    system = bedrock.to_converse(request, TARGET, CallContext("r"))["system"]
    assert json.dumps(schema) in system[-1]["text"]


def test_wire_body_is_the_request_as_sent_with_the_gateway_cap_and_without_its_hints() -> None:
    request = parse(input="x", max_output_tokens=900, priority="low_cost", store=True)
    assert request.wire_body(500) == {"model": "claude-3-haiku", "input": "x", "max_output_tokens": 500, "store": True}
    assert request.features() == frozenset({"store"})
    assert parse(input="x", previous_response_id="resp_1").features() == frozenset({"previous_response_id"})
    assert parse(input="x", store=False).features() == frozenset()
    assert parse(input="x", reasoning={"effort": "low"}).features() == frozenset({"reasoning"})


def test_a_converse_answer_becomes_a_response_with_output_items_and_usage() -> None:
    converse = {"output": {"message": {"role": "assistant", "content": [
        {"text": "Let me check."}, {"toolUse": {"toolUseId": "tu_1", "name": "get_weather", "input": {"city": "Oslo"}}}]}},
        "stopReason": "tool_use", "usage": {"inputTokens": 12, "outputTokens": 7}}
    completion = bedrock.from_converse(converse, parse(input="x", tools=[TOOL]), TARGET, created=1)
    body = completion.body
    assert body["object"] == "response" and body["status"] == "completed" and body["id"].startswith("resp_")
    message, call = body["output"]
    assert message["content"][0] == {"type": "output_text", "text": "Let me check.", "annotations": [], "logprobs": []}
    assert (call["type"], call["call_id"], json.loads(call["arguments"])) == ("function_call", "tu_1", {"city": "Oslo"})
    assert body["usage"]["input_tokens"] == 12 and body["usage"]["total_tokens"] == 19
    assert completion.usage == Usage(12, 7) == RESPONSES_API.usage(body)
    assert RESPONSES_API.answer_text(body) == 'Let me check.get_weather{"city": "Oslo"}'


def test_a_converse_answer_cut_at_max_tokens_is_incomplete_and_a_malformed_one_raises() -> None:
    cut = {"output": {"message": {"content": [{"text": "a"}]}}, "stopReason": "max_tokens"}
    body = bedrock.from_converse(cut, parse(input="x"), TARGET, created=1).body
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    with pytest.raises(ProviderError):
        bedrock.from_converse({"output": {}}, parse(input="x"), TARGET, created=1)


CONVERSE_STREAM = [
    {"messageStart": {"role": "assistant"}},
    {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "Hel"}}},
    {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "lo"}}},
    {"contentBlockStop": {"contentBlockIndex": 0}},
    {"contentBlockStart": {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tu_9", "name": "get_weather"}}}},
    {"contentBlockDelta": {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"city":'}}}},
    {"contentBlockDelta": {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '"Rome"}'}}}},
    {"contentBlockStop": {"contentBlockIndex": 1}},
    {"messageStop": {"stopReason": "tool_use"}},
    {"metadata": {"usage": {"inputTokens": 20, "outputTokens": 9}}},
]


def translated(events: list[dict[str, Any]]) -> list[StreamEvent]:
    translator = bedrock.ResponsesStreamTranslator(parse(input="x", stream=True, tools=[TOOL]), TARGET, created=1)
    return [out for event in events for out in translator.translate(event)]


def test_a_converse_stream_becomes_the_responses_event_sequence_numbered_from_zero() -> None:
    events = translated(CONVERSE_STREAM)
    assert [e.name for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.chunk["sequence_number"] for e in events] == list(range(len(events)))
    assert all(e.chunk["type"] == e.name for e in events)
    final = events[-1].chunk["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello" == events[6].chunk["text"]
    assert final["output"][1]["arguments"] == '{"city":"Rome"}' and final["output"][1]["status"] == "completed"
    assert final["usage"]["output_tokens"] == 9 and stream_usage(events[-1]) == Usage(20, 9)
    assert "".join(stream_text(e) for e in events) == 'Hello{"city":"Rome"}'
    assert events[0].chunk["response"]["status"] == "in_progress" and events[0].chunk["response"]["output"] == []


def test_nothing_goes_out_before_the_first_output_so_a_failure_there_can_still_fall_back() -> None:
    translator = bedrock.ResponsesStreamTranslator(parse(input="x", stream=True), TARGET, created=1)
    assert translator.translate({"messageStart": {"role": "assistant"}}) == []
    with pytest.raises(ProviderError):
        translator.translate({"throttlingException": {"message": "slow down"}})


def test_a_relayed_stream_is_read_for_usage_and_text_from_its_own_events() -> None:
    completed = StreamEvent({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 4}}})
    delta = StreamEvent({"type": "response.output_text.delta", "delta": "hi"}, raw=b'{"type":"response.output_text.delta"}')
    assert stream_usage(completed) == Usage(3, 4) and stream_text(delta) == "hi"
    assert RESPONSES_API.frame(parse(input="x"), delta) == (b"event: response.output_text.delta\n"
                                                            b'data: {"type":"response.output_text.delta"}\n\n')


@pytest.mark.parametrize("content", [5, 1.5, True, "text", {"text": "x"}, None])
def test_an_answer_without_usage_is_read_for_its_text_whatever_its_items_hold(content: Any) -> None:
    # The relay checks only that "output" is a list; the text read here bills an answer without usage.
    body = {"output": [{"type": "message", "content": content}, "stray", {"type": "function_call", "name": "f",
                                                                        "arguments": "{}"},
                       {"type": "message", "content": [{"type": "output_text", "text": "hi"}, 7]}]}
    assert RESPONSES_API.answer_text(body) == "f{}hi"


@pytest.mark.parametrize("given", [1, 10, 15])
def test_max_output_tokens_below_openais_minimum_of_16_is_refused_in_openais_words(given: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(input="x", max_output_tokens=given)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "max_output_tokens",
                                                                           "integer_below_min_value")
    assert caught.value.message == ("Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16, "
                                    f"but got {given} instead.")
    assert parse(input="x", max_output_tokens=16).max_output_tokens == 16


def test_a_gateway_cap_below_16_goes_up_as_16_which_the_relayed_api_takes() -> None:
    # A cap from a nearly full context window can fall under the API's minimum; the model stops at the window anyway.
    assert parse(input="x").wire_body(3)["max_output_tokens"] == 16


F_TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


@pytest.mark.parametrize(("tool_choice", "tools"), [
    ("bogus", [F_TOOL]), ("any", [F_TOOL]),
    ({"type": "function", "name": "nope"}, [F_TOOL]), ({"type": "function", "name": "get_weather"}, None),
    ({"type": "function"}, [F_TOOL]), ({"type": "function", "name": 5}, [F_TOOL]), ({"name": "get_weather"}, [F_TOOL]),
])
def test_a_tool_choice_openai_refuses_is_a_400_on_every_target(tool_choice: Any, tools: Any) -> None:
    # Checked in the dialect: a relay would otherwise pass it on and a translating target judge it its own way.
    with pytest.raises(InvalidRequest) as caught:
        parse(input="x", tools=tools, tool_choice=tool_choice)
    assert (caught.value.status, caught.value.param) == (400, "tool_choice")


@pytest.mark.parametrize("tool_choice", ["none", "auto", "required", {"type": "function", "name": "get_weather"},
                                         {"type": "allowed_tools", "mode": "auto", "tools": []}])
def test_a_tool_choice_openai_takes_is_taken(tool_choice: Any) -> None:
    assert parse(input="x", tools=[F_TOOL], tool_choice=tool_choice).tool_choice == tool_choice

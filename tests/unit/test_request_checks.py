"""Checks at the JSON edge that OpenAI makes and a lenient parser would skip: repeated keys, cross-field
references, the body's media type, and where an unknown key is."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from gateway_lib.errors import GatewayError, InvalidRequest
from gateway_lib.http import edge, strict_json
from gateway_lib.operations.schema import ChatRequest, parse_model

HELLO: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(("text", "param"), [
    (b'{"model": "m", "max_tokens": -1, "max_tokens": 4}', "max_tokens"),
    (b'{"messages": [{"role": "user"}, {"role": "user", "content": "a", "content": "b"}]}', "messages[1].content"),
    (b'{"response_format": {"json_schema": {"schema": {"type": "object", "type": "array"}}}}',
     "response_format.json_schema.schema.type"),
    (b'{"a": [[{"x": 1, "x": 1}]]}', "a[0][0].x"),
])
def test_a_key_repeated_in_one_object_is_refused_naming_where_it_is(text: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        strict_json.loads(text)
    assert (info.value.code, info.value.param) == ("invalid_json", param)
    assert repr(param.rsplit(".", 1)[-1].split("[")[0]) in info.value.message


def test_the_same_key_in_different_objects_is_fine() -> None:
    assert strict_json.loads(b'{"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}') == {
        "a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}


def refusal(**extra: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_model(ChatRequest, HELLO | extra)
    return info.value


def test_a_json_schema_response_format_needs_its_schema() -> None:
    error = refusal(response_format={"type": "json_schema"})
    assert (error.code, error.param) == ("missing_required_parameter", "response_format.json_schema")
    parse_model(ChatRequest, HELLO | {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})


@pytest.mark.parametrize("tools", [None, WEATHER])
def test_a_tool_choice_naming_a_function_not_in_tools_is_refused(tools: list[dict[str, Any]] | None) -> None:
    error = refusal(tools=tools, tool_choice={"type": "function", "function": {"name": "stocks"}})
    assert (error.code, error.param) == ("invalid_value", "tool_choice")
    assert "stocks" in error.message
    parse_model(ChatRequest, HELLO | {"tools": WEATHER, "tool_choice": {"type": "function",
                                                                        "function": {"name": "weather"}}})


def test_a_tool_message_needs_its_tool_call_id() -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "weather"}}]},
                {"role": "tool", "content": "sunny"}]
    error = refusal(messages=messages)
    assert (error.code, error.param) == ("missing_required_parameter", "messages[2].tool_call_id")
    messages[2]["tool_call_id"] = "c1"
    parse_model(ChatRequest, HELLO | {"messages": messages})


@pytest.mark.parametrize(("extra", "param"), [
    ({"stream": True, "stream_options": {"": True}}, "stream_options."),
    ({"stream": True, "stream_options": {"Include": True}}, "stream_options.Include"),
    ({"": 1}, ""),
])
def test_an_unknown_key_is_named_by_its_path_even_when_empty(extra: dict[str, Any], param: str) -> None:
    error = refusal(**extra)
    assert (error.code, error.param) == ("unknown_parameter", param)


def read(headers: dict[str, str], body: bytes) -> Any:
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": raw}, receive)
    return asyncio.run(edge.read_json(request, 1_048_576))


@pytest.mark.parametrize(("headers", "param"), [
    ({"content-type": "application/json; charset=utf-16"}, "content-type"),
    ({"content-type": "application/json;charset=\"ISO-8859-1\""}, "content-type"),
    ({"content-type": "application/json", "content-encoding": "gzip"}, "content-encoding"),
    ({"content-type": "application/json", "content-encoding": "br"}, "content-encoding"),
])
def test_a_body_the_gateway_would_misread_is_a_415(headers: dict[str, str], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        read(headers, json.dumps(HELLO).encode())
    assert (info.value.status, info.value.code, info.value.param) == (415, "unsupported_media_type", param)


@pytest.mark.parametrize("headers", [
    {"content-type": "application/json"}, {"content-type": "application/json; charset=UTF-8"},
    {"content-type": "Application/JSON;charset=utf8"}, {"content-type": "application/json", "content-encoding": "identity"},
])
def test_utf8_json_uncompressed_is_read(headers: dict[str, str]) -> None:
    assert read(headers, json.dumps(HELLO).encode()) == HELLO

"""The simulator's chat answers like a model: structured output, forced tools, n, logprobs, the Azure v1 path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from tests.inproc_simulator import control
from tools import sim_text
from tools.provider_simulator import RunningSimulator

pytestmark = pytest.mark.integration

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-mini"
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
BOOKING_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "book", "parameters": {"type": "object", "required": ["seats", "when"], "properties": {
        "seats": {"type": "integer", "minimum": 2}, "when": {"type": "string", "format": "date-time"}}}}}


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user"]
    nickname: str | None
    born: datetime
    addresses: list[Address]


@pytest.fixture
def sim(thread_sim: RunningSimulator) -> RunningSimulator:
    return thread_sim


@pytest.fixture
def azure(sim: RunningSimulator) -> Iterator[openai.AzureOpenAI]:
    with openai.AzureOpenAI(api_key="k", azure_endpoint=sim.url, api_version=API_VERSION, max_retries=0,
                            timeout=10) as client:
        yield client


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model_gets_a_valid_instance(azure: openai.AzureOpenAI) -> None:
    result = azure.chat.completions.parse(model=DEPLOYMENT, messages=user("Describe Ada Lovelace"),
                                          response_format=Person)
    person = result.choices[0].message.parsed
    assert isinstance(person, Person)
    assert person.role == "admin" and person.addresses and person.addresses[0].city == "Describe Ada Lovelace"
    content = result.choices[0].message.content or ""
    assert result.usage is not None and result.usage.completion_tokens == sim_text.count_tokens(content)


def test_json_schema_answer_streams_as_valid_json(azure: openai.AzureOpenAI) -> None:
    schema = {"type": "object", "required": ["tags", "score"], "additionalProperties": False,
              "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 2},
                             "score": {"type": "number", "minimum": 3, "maximum": 4}}}
    stream = azure.chat.completions.create(model=DEPLOYMENT, messages=user("rate it"), stream=True,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "rating", "schema": schema, "strict": True}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text) == {"tags": ["a", "a"], "score": 3.0}


def test_json_object_answers_an_object_and_needs_the_word_json(azure: openai.AzureOpenAI) -> None:
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("answer in JSON please"),
                                           response_format={"type": "json_object"})
    assert json.loads(result.choices[0].message.content or "") == {"answer": "answer in JSON please"}
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"), response_format={"type": "json_object"})


def test_forced_tool_choice_calls_that_tool_with_valid_arguments(azure: openai.AzureOpenAI) -> None:
    tools: Any = [WEATHER_TOOL, BOOKING_TOOL]
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("table for friends"), tools=tools,
                                           tool_choice={"type": "function", "function": {"name": "book"}})
    call: Any = (result.choices[0].message.tool_calls or [])[0]
    assert result.choices[0].finish_reason == "tool_calls" and call.function.name == "book"
    arguments = json.loads(call.function.arguments)
    assert arguments["seats"] >= 2 and datetime.fromisoformat(arguments["when"])
    required = azure.chat.completions.create(model=DEPLOYMENT, messages=user("no trigger word"), tools=tools,
                                             tool_choice="required")
    assert required.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError, match="no function named 'nope'"):
        azure.chat.completions.create(model=DEPLOYMENT, messages=user("x"), tools=tools,
                                      tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tool_result_turn_is_answered_in_text(azure: openai.AzureOpenAI) -> None:
    tools: Any = [WEATHER_TOOL]
    first = azure.chat.completions.create(model=DEPLOYMENT, messages=user("CALL_TOOL Oslo"), tools=tools)
    call: Any = (first.choices[0].message.tool_calls or [])[0]
    messages: Any = [*user("CALL_TOOL Oslo"), first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = azure.chat.completions.create(model=DEPLOYMENT, messages=messages, tools=tools)
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content


def test_n_choices_are_all_counted_in_usage(azure: openai.AzureOpenAI) -> None:
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("pick a name"), n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    one = sim_text.count_tokens(result.choices[0].message.content or "")
    assert result.usage is not None and result.usage.completion_tokens == 3 * one
    with pytest.raises(openai.BadRequestError):
        azure.chat.completions.create(model=DEPLOYMENT, messages=user("x"), n=0)


def test_n_choices_stream_interleaved_with_usage(azure: openai.AzureOpenAI) -> None:
    chunks = list(azure.chat.completions.create(model=DEPLOYMENT, messages=user("pick"), n=2, stream=True,
                                                stream_options={"include_usage": True}))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)]
    assert texts[0] == texts[1] == f"Simulated reply from {DEPLOYMENT}: pick"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop", "stop"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 2 * sim_text.count_tokens(texts[0])


def test_logprobs_cover_every_token_whole_and_streamed(azure: openai.AzureOpenAI) -> None:
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("hello there"), logprobs=True,
                                           top_logprobs=2)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == result.choices[0].message.content
    first = logprobs.content[0]
    assert first.logprob < 0 and bytes(first.bytes or []) == first.token.encode()
    assert first.top_logprobs[0].token == first.token and len(first.top_logprobs) == 2
    chunks = list(azure.chat.completions.create(model=DEPLOYMENT, messages=user("hello there"), logprobs=True,
                                                stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in logprobs.content]
    assert all(t.top_logprobs == [] for t in streamed)


def test_azure_v1_path_takes_the_deployment_from_model(sim: RunningSimulator) -> None:
    with openai.OpenAI(api_key="k", base_url=f"{sim.url}/openai/v1/", max_retries=0, timeout=10) as client:
        result = client.chat.completions.create(model="gpt-4o", messages=user("hi"), store=True,
                                                metadata={"team": "blue"}, service_tier="auto", user="u-1",
                                                prompt_cache_key="k1", safety_identifier="s-1")
    assert result.model == "gpt-4o-2024-08-06"
    last = control(sim, "GET", "/_sim/stats")["targets"]["gpt-4o"]["last"]
    assert last["path"] == "/openai/v1/chat/completions" and last["query"] == {}
    assert last["body"]["metadata"] == {"team": "blue"} and last["body"]["safety_identifier"] == "s-1"


def test_structured_answers_keep_fault_injection(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "status", "status": 429, "count": 1})
    with pytest.raises(openai.RateLimitError):
        azure.chat.completions.parse(model=DEPLOYMENT, messages=user("x"), response_format=Person)
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "cut", "after_chunks": 2, "count": 1})
    with pytest.raises(openai.APIConnectionError):
        list(azure.chat.completions.create(model=DEPLOYMENT, messages=user("x"), n=2, logprobs=True, stream=True))

"""Azure OpenAI's Responses API on the simulator, through the openai SDK: whole, streamed, tools, state, faults."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.inproc_simulator import control
from tools import sim_text
from tools.provider_simulator import RunningSimulator

pytestmark = pytest.mark.integration

DEPLOYMENT = "gpt-4o-mini"
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": True,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False}}


class Forecast(BaseModel):
    city: str
    high: int
    sunny: bool


@pytest.fixture
def sim(thread_sim: RunningSimulator) -> RunningSimulator:
    return thread_sim


@pytest.fixture
def v1(sim: RunningSimulator) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="k", base_url=f"{sim.url}/openai/v1/", max_retries=0, timeout=10) as client:
        yield client


def expected_input_tokens(*texts: str, instructions: str = "", tools: Any = None) -> int:
    return (sum(sim_text.count_tokens(t) + sim_text.MESSAGE_OVERHEAD for t in texts)
            + sim_text.count_tokens(instructions) + sim_text.tool_definition_tokens(tools))


def test_create_answers_text_with_usage(sim: RunningSimulator, v1: openai.OpenAI) -> None:
    result = v1.responses.create(model=DEPLOYMENT, input="Tell me a story", instructions="Be brief.",
                                 temperature=0.2, metadata={"team": "blue"})
    assert result.id.startswith("resp_") and result.status == "completed"
    assert result.output_text == f"Simulated reply from {DEPLOYMENT}: Tell me a story"
    assert result.model == "gpt-4o-mini-2024-07-18" and result.temperature == 0.2
    assert result.usage is not None
    assert result.usage.input_tokens == expected_input_tokens("Tell me a story", instructions="Be brief.")
    assert result.usage.output_tokens == sim_text.count_tokens(result.output_text)
    assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    assert control(sim, "GET", "/_sim/stats")["targets"][DEPLOYMENT]["last"]["path"] == "/openai/v1/responses"


def test_stream_sends_the_event_sequence_with_sequence_numbers(v1: openai.OpenAI) -> None:
    events = list(v1.responses.create(model=DEPLOYMENT, input="stream this", stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-5:] == ["response.output_text.delta", "response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == f"Simulated reply from {DEPLOYMENT}: stream this"
    completed: Any = events[-1]
    assert completed.response.output_text == deltas and completed.response.usage.output_tokens > 0


def test_function_call_round_trip_whole_and_streamed(v1: openai.OpenAI) -> None:
    first = v1.responses.create(model=DEPLOYMENT, input="CALL_TOOL Oslo", tools=[WEATHER])
    call: Any = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Oslo"}
    assert first.usage is not None
    assert first.usage.input_tokens == expected_input_tokens("CALL_TOOL Oslo", tools=[WEATHER])
    follow: Any = [{"role": "user", "content": "CALL_TOOL Oslo"},
                   {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                   {"type": "function_call_output", "call_id": call.call_id, "output": "sunny and 20C"}]
    second = v1.responses.create(model=DEPLOYMENT, input=follow, tools=[WEATHER], stream=True)
    events = list(second)
    done: Any = events[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == f"Simulated reply from {DEPLOYMENT}: sunny and 20C"
    streamed = list(v1.responses.create(model=DEPLOYMENT, input="x", tools=[WEATHER], tool_choice="required",
                                        stream=True))
    arguments = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    finished: Any = next(e for e in streamed if e.type == "response.function_call_arguments.done")
    assert json.loads(arguments) == {"city": "x"} and finished.arguments == arguments


def test_unknown_call_output_is_refused(v1: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="No tool call found"):
        v1.responses.create(model=DEPLOYMENT, input=[{"type": "function_call_output", "call_id": "call_x",
                                                      "output": "1"}])


def test_text_format_json_schema_parses_into_the_model(v1: openai.OpenAI) -> None:
    parsed = v1.responses.parse(model=DEPLOYMENT, input="Forecast for Bergen", text_format=Forecast)
    assert parsed.output_parsed == Forecast(city="Forecast for Bergen", high=1, sunny=True)


def test_max_output_tokens_cuts_and_marks_incomplete(v1: openai.OpenAI) -> None:
    prompt = "SIM_REPLY_WORDS=100 long"
    result = v1.responses.create(model=DEPLOYMENT, input=prompt, max_output_tokens=16)
    assert result.status == "incomplete" and result.incomplete_details is not None
    assert result.incomplete_details.reason == "max_output_tokens"
    assert result.usage is not None and result.usage.output_tokens == 16
    events = list(v1.responses.create(model=DEPLOYMENT, input=prompt, max_output_tokens=16, stream=True))
    assert events[-1].type == "response.incomplete"
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        v1.responses.create(model=DEPLOYMENT, input="x", max_output_tokens=5)


def test_state_is_kept_read_back_and_continued(v1: openai.OpenAI) -> None:
    first = v1.responses.create(model=DEPLOYMENT, input="remember blue")
    assert v1.responses.retrieve(first.id).output_text == first.output_text
    assert first.usage is not None
    second = v1.responses.create(model=DEPLOYMENT, input="what colour?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.usage is not None
    assert second.usage.input_tokens == (expected_input_tokens("what colour?") + first.usage.input_tokens
                                         + first.usage.output_tokens)
    unstored = v1.responses.create(model=DEPLOYMENT, input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        v1.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError, match="Previous response with id 'resp_nope' not found"):
        v1.responses.create(model=DEPLOYMENT, input="x", previous_response_id="resp_nope")
    v1.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        v1.responses.retrieve(first.id)


def test_preview_path_through_the_azure_client(sim: RunningSimulator) -> None:
    with openai.AzureOpenAI(api_key="k", azure_endpoint=sim.url, api_version="2025-04-01-preview", max_retries=0,
                            timeout=10) as client:
        result = client.responses.create(model=DEPLOYMENT, input="hello")
        assert client.responses.retrieve(result.id).id == result.id
    last = control(sim, "GET", "/_sim/stats")["targets"]["responses"]["last"]
    assert last["path"] == f"/openai/responses/{result.id}" and last["query"]["api-version"] == "2025-04-01-preview"


def test_responses_fault_injection(sim: RunningSimulator, v1: openai.OpenAI) -> None:
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "status", "status": 429, "retry_after": 2,
                                          "count": 1})
    with pytest.raises(openai.RateLimitError):
        v1.responses.create(model=DEPLOYMENT, input="x")
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "status", "status": 500, "after_chunks": 3,
                                          "count": 1})
    events = list(v1.responses.create(model=DEPLOYMENT, input="x", stream=True))
    error: Any = events[-1]
    assert [e.type for e in events[:-1]] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert error.type == "error" and error.sequence_number == 3 and "server had an error" in error.message
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "cut", "after_chunks": 2, "count": 1})
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        for event in v1.responses.create(model=DEPLOYMENT, input="x", stream=True):
            received.append(event)
    assert len(received) == 2
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "malformed", "count": 1})
    with pytest.raises(json.JSONDecodeError):
        v1.responses.create(model=DEPLOYMENT, input="x")


def test_responses_stall_pauses_the_stream_then_completes(sim: RunningSimulator, v1: openai.OpenAI) -> None:
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "stall", "after_chunks": 2, "delay_ms": 300,
                                          "count": 1})
    started = time.monotonic()
    events = list(v1.responses.create(model=DEPLOYMENT, input="x", stream=True))
    assert time.monotonic() - started >= 0.3 and events[-1].type == "response.completed"
    control(sim, "POST", "/_sim/faults", {"target": DEPLOYMENT, "mode": "malformed", "after_chunks": 1, "count": 1})
    with pytest.raises(json.JSONDecodeError):
        list(v1.responses.create(model=DEPLOYMENT, input="x", stream=True))


def test_preview_path_needs_an_api_version(sim: RunningSimulator) -> None:
    request = urllib.request.Request(f"{sim.url}/openai/responses", method="POST", headers={"api-key": "k"},
                                     data=json.dumps({"model": DEPLOYMENT, "input": "x"}).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    with caught.value as error:
        assert error.code == 400 and json.loads(error.read())["error"]["param"] == "api-version"

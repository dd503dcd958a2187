"""The Responses API end to end: openai SDK → local host → gateway → simulator, on Azure OpenAI (relayed to
Azure's v1 Responses API) and on Bedrock (translated to Converse)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
import requests
from pydantic import BaseModel

from tests import closing
from tests.integration.test_content_filter_e2e import cost_row
from tests.stack_fixture import Sim
from tools.sim_text import TOOL_TRIGGER
from tools.stack import Stack

pytestmark = pytest.mark.integration

AZURE, BEDROCK = "gpt-4o-mini", "claude-3-haiku"
BEDROCK_MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def client(stack: Stack, token: str) -> openai.OpenAI:
    sdk = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0, timeout=30)
    return closing.keep(sdk)




@pytest.mark.parametrize("model", [AZURE, BEDROCK])
def test_a_response_is_served_whole_with_usage_and_shows_in_the_callers_usage(stack: Stack, sim: Sim,
                                                                             model: str) -> None:
    token = stack.token(f"i20-responses-{model}")
    raw = client(stack, token).responses.with_raw_response.create(
        model=model, instructions="Answer briefly.", input="Hello there gateway", max_output_tokens=60, temperature=0.2)
    response = raw.parse()
    assert response.object == "response" and response.status == "completed"
    assert response.output_text
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert sim.total() == 1
    row = cost_row(stack, token, raw.headers["x-request-id"])
    assert (row.route, row.status, row.prompt_tokens) == ("responses", "ok", response.usage.input_tokens)
    assert day_tokens(stack, token) == response.usage.total_tokens


def day_tokens(stack: Stack, token: str) -> int:
    usage = requests.get(f"{stack.base_url}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert usage.status_code == 200, usage.text
    return int(usage.json()["day"]["used"]["tokens"])


@pytest.mark.parametrize("model", [AZURE, BEDROCK])
def test_a_streamed_response_is_the_event_sequence_ending_in_completed_with_usage(stack: Stack, model: str) -> None:
    token = stack.token(f"i20-responses-stream-{model}")
    events = list(client(stack, token).responses.create(model=model, input="Hello stream", stream=True,
                                                        max_output_tokens=60))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and final.output_text == deltas
    assert final.usage is not None and final.usage.output_tokens > 0
    assert day_tokens(stack, token) == final.usage.total_tokens  # settled from the stream's own usage


@pytest.mark.parametrize("model", [AZURE, BEDROCK])
@pytest.mark.parametrize("stream", [False, True])
def test_a_function_tool_round_trip(stack: Stack, token: str, model: str, stream: bool) -> None:
    sdk = client(stack, token)
    ask = [{"role": "user", "content": f"What is the weather in Paris? {TOOL_TRIGGER}"}]
    first = _answer(sdk, stream, model=model, input=ask, tools=[WEATHER])
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
    # The caller feeds the call and its output back as input items, the SDK's own objects included.
    follow_up = [*ask, *first.output, {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}]
    second = _answer(sdk, stream, model=model, input=follow_up, tools=[WEATHER])
    assert second.output_text and not [item for item in second.output if item.type == "function_call"]


def _answer(sdk: openai.OpenAI, stream: bool, **kwargs: Any) -> Any:
    if not stream:
        return sdk.responses.create(**kwargs)
    events = list(sdk.responses.create(stream=True, **kwargs))
    assert events[-1].type == "response.completed"
    return events[-1].response


class Place(BaseModel):
    city: str
    country: str


def test_text_format_json_schema_is_followed_on_azure(stack: Stack, token: str) -> None:
    parsed = client(stack, token).responses.parse(model=AZURE, input="Where is the Eiffel tower?", text_format=Place)
    assert isinstance(parsed.output_parsed, Place)


@pytest.mark.parametrize("stream", [False, True])
def test_text_format_json_schema_reaches_bedrock_as_an_instruction(stack: Stack, token: str, sim: Sim,
                                                                   stream: bool) -> None:
    schema = Place.model_json_schema()
    text = {"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": False}}
    _answer(client(stack, token), stream, model=BEDROCK, input="Where is the Eiffel tower?", text=text)
    system = " ".join(block["text"] for block in sim.last(BEDROCK_MODEL_ID)["body"]["system"])
    assert json.dumps(schema) in system


def test_stored_responses_chain_on_azure(stack: Stack, token: str) -> None:
    sdk = client(stack, token)
    first = sdk.responses.create(model=AZURE, input="Remember the word apple", store=True)
    second = sdk.responses.create(model=AZURE, input="Which word?", previous_response_id=first.id)
    assert second.output_text and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]  # the history counts again


@pytest.mark.parametrize(("extra", "param"), [({"store": True}, "store"), ({"previous_response_id": "resp_1"},
                                                                           "previous_response_id")])
def test_state_on_a_target_that_keeps_none_is_a_400_naming_the_parameter(
        stack: Stack, token: str, sim: Sim, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(stack, token).responses.create(model=BEDROCK, input="Hello", **extra)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and caught.value.body["code"] == "unsupported_parameter"  # type: ignore[index]
    assert sim.total() == 0


def post(stack: Stack, token: str | None, body: Any, **headers: str) -> requests.Response:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{stack.base_url}/v1/responses", data=data, timeout=30,
                         headers={"Content-Type": "application/json", **auth, **headers})


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": AZURE}, 400, "input"),
    ({"model": AZURE, "input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id"),
    ({"model": AZURE, "input": "x", "max_output_tokens": "ten"}, 400, "max_output_tokens"),
    ({"model": AZURE, "input": "x", "messages": []}, 400, "messages"),
    ({"model": "no-such-model", "input": "x"}, 404, "model"),
    ('{"model": ', 400, None),
])
def test_bad_input_gets_the_exact_status_in_openais_shape(stack: Stack, token: str, body: Any, status: int,
                                                          param: str | None) -> None:
    response = post(stack, token, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_no_token_is_a_401_in_openais_shape(stack: Stack) -> None:
    response = post(stack, None, {"model": AZURE, "input": "x"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("model", [AZURE, BEDROCK])
def test_a_stream_the_caller_cuts_settles_with_one_cost_row(stack: Stack, sim: Sim, model: str) -> None:
    caller, request_id = stack.token(f"i20-responses-cut-{model}"), f"i20-responses-cut-{model}"
    with slow_chunks(stack):
        response = requests.post(
            f"{stack.base_url}/v1/responses", stream=True, timeout=30,
            headers={"Authorization": f"Bearer {caller}", "x-request-id": request_id},
            json={"model": model, "input": "Please ramble SIM_REPLY_WORDS=400", "stream": True})
        with response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith(b"event: response.created")
        # Closed after one event; the upstream would have streamed for ~20 s.
        row = _settled(stack, caller, request_id)
    assert row.status == "client_disconnected" and row.route == "responses"
    assert row.prompt_tokens > 0 and row.cost_usd > 0


@contextmanager
def slow_chunks(stack: Stack) -> Iterator[None]:
    config = f"http://127.0.0.1:{stack.ports.simulator}/_sim/config"
    requests.post(config, json={"chunk_delay_ms": 50}, timeout=5).raise_for_status()
    try:
        yield
    finally:
        requests.post(config, json={"chunk_delay_ms": 0}, timeout=5).raise_for_status()


def _settled(stack: Stack, token: str, request_id: str) -> Any:
    from tests.integration.test_quota_e2e import wait_for

    wait_for(lambda: _rows(stack, token, request_id), timeout=15)
    return cost_row(stack, token, request_id)


def _rows(stack: Stack, token: str, request_id: str) -> list[Any]:
    from tests.integration.test_quota_e2e import caller_key, ledger_state

    return [r for r in ledger_state(stack, caller_key(stack, token))[1] if r.request_id == request_id]


@pytest.mark.parametrize(("model", "target"), [(AZURE, "gpt-4o-mini"), (BEDROCK, BEDROCK_MODEL_ID)])
def test_a_failure_mid_stream_ends_with_an_error_event_and_one_cost_row(stack: Stack, sim: Sim, model: str,
                                                                        target: str) -> None:
    caller, request_id = stack.token(f"i20-responses-upstream-cut-{model}"), f"i20-responses-upstream-cut-{model}"
    sim.fault(mode="status", status=503, target=target, after_chunks=4, count=1)
    with slow_chunks(stack):  # the first event is read alone: once it is out, no fallback (else it would be right)
        events = list(client(stack, caller).responses.create(model=model, input="Hello there", stream=True,
                                                              extra_headers={"x-request-id": request_id}))
    assert events[0].type == "response.created"
    assert events[-1].type == "error" and events[-1].message  # the SDK hands the error event to the caller
    assert events[-1].sequence_number == events[-2].sequence_number + 1  # numbered on, as the upstream's were
    assert cost_row(stack, caller, request_id).status == "upstream_cut"

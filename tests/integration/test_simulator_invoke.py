"""Bedrock InvokeModel with Anthropic Messages bodies on the simulator, through boto3: whole, streamed, tools, faults."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.eventstream import ChecksumMismatch
from botocore.exceptions import ClientError, ConnectionClosedError, EventStreamError
from urllib3.exceptions import ProtocolError

from tests.inproc_simulator import control
from tools import sim_text
from tools.provider_simulator import RunningSimulator

pytestmark = pytest.mark.integration

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
VERSION = "bedrock-2023-05-31"
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city"]}}


@pytest.fixture
def sim(thread_sim: RunningSimulator) -> RunningSimulator:
    return thread_sim


@pytest.fixture
def bedrock(sim: RunningSimulator) -> Iterator[Any]:
    client = boto3.client("bedrock-runtime", endpoint_url=sim.url, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y", config=Config(retries={"total_max_attempts": 1}, read_timeout=10))
    yield client
    client.close()


def messages_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"anthropic_version": VERSION, "max_tokens": 200, "messages": [{"role": "user", "content": text}], **extra}


def invoke(bedrock: Any, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    response = bedrock.invoke_model(modelId=MODEL_ID, body=json.dumps(body))
    return json.loads(response["body"].read()), response["ResponseMetadata"]["HTTPHeaders"]


def stream_events(bedrock: Any, body: dict[str, Any], into: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Decode every chunk's bytes as Anthropic's event JSON (``into`` keeps what arrived before a failure)."""
    events = [] if into is None else into
    stream = bedrock.invoke_model_with_response_stream(modelId=MODEL_ID, body=json.dumps(body))["body"]
    try:
        for part in stream:
            events.append(json.loads(part["chunk"]["bytes"]))
    finally:
        stream.close()
    return events


def test_messages_answer_with_usage_in_body_and_headers(bedrock: Any) -> None:
    body, headers = invoke(bedrock, messages_body("Summarise this", system="Be brief."))
    text = body["content"][0]["text"]
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_bdrk_")
    assert body["model"] == "claude-3-haiku-20240307" and body["stop_reason"] == "end_turn"
    assert text == f"Simulated reply from {MODEL_ID}: Summarise this"
    expected_input = (sim_text.count_tokens("Summarise this") + sim_text.MESSAGE_OVERHEAD
                      + sim_text.count_tokens("Be brief."))
    assert body["usage"]["input_tokens"] == expected_input
    assert body["usage"]["output_tokens"] == sim_text.count_tokens(text)
    assert headers["x-amzn-bedrock-input-token-count"] == str(expected_input)
    assert headers["x-amzn-bedrock-output-token-count"] == str(body["usage"]["output_tokens"])
    assert int(headers["x-amzn-bedrock-invocation-latency"]) >= 0


def test_stop_sequence_and_max_tokens(bedrock: Any) -> None:
    stopped, _ = invoke(bedrock, messages_body("red green blue", stop_sequences=["blue", "green"]))
    assert stopped["stop_reason"] == "stop_sequence" and stopped["stop_sequence"] == "green"
    capped, _ = invoke(bedrock, {**messages_body("a b c"), "max_tokens": 3})
    assert capped["stop_reason"] == "max_tokens" and capped["usage"]["output_tokens"] == 3


def test_stream_is_anthropic_events_in_chunks_with_invocation_metrics(bedrock: Any) -> None:
    events = stream_events(bedrock, messages_body("stream this"))
    types = [e["type"] for e in events]
    assert types[:2] == ["message_start", "content_block_start"] and types[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == f"Simulated reply from {MODEL_ID}: stream this"
    assert events[-2]["usage"]["output_tokens"] == sim_text.count_tokens(text)
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    metrics = events[-1]["amazon-bedrock-invocationMetrics"]
    assert metrics["outputTokenCount"] == sim_text.count_tokens(text)
    assert metrics["inputTokenCount"] == events[0]["message"]["usage"]["input_tokens"]


def test_tool_use_round_trip_whole_and_streamed(bedrock: Any) -> None:
    first, _ = invoke(bedrock, messages_body("CALL_TOOL Oslo", tools=[WEATHER]))
    use = first["content"][0]
    assert first["stop_reason"] == "tool_use" and use["type"] == "tool_use" and use["id"].startswith("toolu_")
    assert use["input"] == {"city": "Oslo", "days": 1}
    follow = {"anthropic_version": VERSION, "max_tokens": 100, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "CALL_TOOL Oslo"}, {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "sunny"}]}]}
    second, _ = invoke(bedrock, follow)
    assert second["stop_reason"] == "end_turn" and second["content"][0]["text"].endswith(": sunny")
    events = stream_events(bedrock, messages_body("no trigger", tools=[WEATHER],
                                                  tool_choice={"type": "tool", "name": "get_weather"}))
    start = events[1]["content_block"]
    assert start["type"] == "tool_use" and start["name"] == "get_weather" and start["input"] == {}
    partial = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta")
    assert json.loads(partial) == {"city": "no trigger", "days": 1}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_forced_tool_gives_structured_output_for_its_schema(bedrock: Any) -> None:
    schema = {"type": "object", "required": ["sentiment", "score", "topics"], "properties": {
        "sentiment": {"enum": ["positive", "negative"]}, "score": {"type": "number", "minimum": 0, "maximum": 1},
        "topics": {"type": "array", "items": {"$ref": "#/$defs/topic"}, "minItems": 1}},
        "$defs": {"topic": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}}}}
    tool = {"name": "record", "input_schema": schema}
    body, _ = invoke(bedrock, messages_body("great product", tools=[tool], tool_choice={"type": "any"}))
    assert body["content"][0]["input"] == {"sentiment": "positive", "score": 1.0, "topics": [{"name": "great"}]}


def test_output_config_json_schema_answers_valid_json_text(bedrock: Any) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"], "additionalProperties": False}
    body, _ = invoke(bedrock, messages_body("Name a film", output_config={"format": {"type": "json_schema",
                                                                                     "schema": schema}}))
    assert json.loads(body["content"][0]["text"]) == {"title": "Name a film", "year": 1}


def test_bedrock_refuses_bodies_it_does_not_know(bedrock: Any) -> None:
    for body, needle in (({**messages_body("x"), "model": "claude"}, "extraneous key [model]"),
                         ({**messages_body("x"), "stream": True}, "extraneous key [stream]"),
                         ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "anthropic_version")):
        with pytest.raises(ClientError) as caught:
            invoke(bedrock, body)
        assert caught.value.response["Error"]["Code"] == "ValidationException"
        assert needle in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError, match="model identifier is invalid"):
        bedrock.invoke_model(modelId="meta.llama3-8b-instruct-v1:0", body=json.dumps({"prompt": "x"}))


def test_invoke_status_faults_and_mid_stream_exception(sim: RunningSimulator, bedrock: Any) -> None:
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "status", "status": 429, "count": 1})
    with pytest.raises(ClientError) as caught:
        invoke(bedrock, messages_body("x"))
    assert caught.value.response["Error"]["Code"] == "ThrottlingException"
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "status", "status": 408, "after_chunks": 2,
                                          "count": 1})
    received: list[dict[str, Any]] = []
    with pytest.raises(EventStreamError) as streamed:
        stream_events(bedrock, messages_body("x"), received)
    assert streamed.value.response["Error"]["Code"] == "modelTimeoutException" and len(received) == 2


def test_invoke_cut_and_malformed_faults(sim: RunningSimulator, bedrock: Any) -> None:
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "cut", "count": 1})
    with pytest.raises(ConnectionClosedError):
        invoke(bedrock, messages_body("x"))
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "cut", "after_chunks": 3, "count": 1})
    received: list[dict[str, Any]] = []
    with pytest.raises(ProtocolError):
        stream_events(bedrock, messages_body("x"), received)
    assert len(received) == 3
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "malformed", "count": 1})
    with pytest.raises(json.JSONDecodeError):
        invoke(bedrock, messages_body("x"))


def test_invoke_slow_and_malformed_stream_faults(sim: RunningSimulator, bedrock: Any) -> None:
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "slow", "delay_ms": 300, "count": 1})
    started = time.monotonic()
    invoke(bedrock, messages_body("x"))
    assert time.monotonic() - started >= 0.3
    control(sim, "POST", "/_sim/faults", {"target": MODEL_ID, "mode": "malformed", "after_chunks": 2, "count": 1})
    with pytest.raises(ChecksumMismatch):
        stream_events(bedrock, messages_body("x"))


def test_chunk_bytes_decode_to_json_and_content_type_is_reported(bedrock: Any) -> None:
    stream = bedrock.invoke_model_with_response_stream(modelId=MODEL_ID, body=json.dumps(messages_body("x")))
    first = next(iter(stream["body"]))
    stream["body"].close()
    assert json.loads(first["chunk"]["bytes"])["type"] == "message_start"  # botocore un-base64s the member
    assert stream["contentType"] == "application/json"  # from x-amzn-bedrock-content-type

"""The provider simulator speaks the real wire formats: the real openai and boto3 clients accept it."""

from __future__ import annotations

import asyncio
import base64
import json
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from botocore.exceptions import ClientError, ConnectionClosedError, EventStreamError
from urllib3.exceptions import ProtocolError

from tests.inproc_simulator import control
from tools import sim_text
from tools.provider_simulator import RunningSimulator
from tools.sim_eventstream import event_frame, exception_frame

pytestmark = pytest.mark.integration


@pytest.fixture
def sim(thread_sim: RunningSimulator) -> RunningSimulator:
    return thread_sim  # started once per module, reset for each test (tests/inproc_simulator.py)


API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-mini"
MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
ROLE_ARN = "arn:aws:iam::123456789012:role/gateway-bedrock"
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
BEDROCK_TOOLS = {"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather for a city",
                                         "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]}}}]}


# --- fixtures and helpers ----------------------------------------------------------------------------------------

def raw_post(sim: RunningSimulator, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(sim.url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def add_fault(sim: RunningSimulator, **fault: Any) -> None:
    control(sim, "POST", "/_sim/faults", fault)


@pytest.fixture
def azure(sim: RunningSimulator) -> Iterator[openai.AzureOpenAI]:
    with openai.AzureOpenAI(api_key="test-key", azure_endpoint=sim.url, api_version=API_VERSION,
                            max_retries=0, timeout=10) as client:
        yield client


def bedrock_client(sim: RunningSimulator, **config: Any) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=sim.url, region_name="us-east-1", aws_access_key_id="x",
                        aws_secret_access_key="y",
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=10, connect_timeout=5, **config))


@pytest.fixture
def bedrock(sim: RunningSimulator) -> Iterator[Any]:
    client = bedrock_client(sim)
    yield client
    client.close()


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


def converse_messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"text": text}]}]


def expected_prompt_tokens(*texts: str, tools: Any = None) -> int:
    """The simulator's documented rule: message overhead + text tokens + tool definition tokens."""
    return (sum(sim_text.count_tokens(t) + sim_text.MESSAGE_OVERHEAD for t in texts)
            + sim_text.tool_definition_tokens(tools))


def unsigned_jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def drain(stream: Any, into: list[Any]) -> None:
    """Iterate a botocore EventStream into ``into``, closing it even when iteration raises."""
    try:
        for event in stream:
            into.append(event)
    finally:
        stream.close()


def target_stats(sim: RunningSimulator, target: str) -> dict[str, Any]:
    return control(sim, "GET", "/_sim/stats")["targets"][target]


# --- Azure OpenAI ------------------------------------------------------------------------------------------------

def test_azure_completion_has_azure_shape_and_consistent_usage(azure: openai.AzureOpenAI) -> None:
    prompt = "Tell me about the weather in Paris, please."
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user(prompt))
    text = result.choices[0].message.content or ""
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.model == "gpt-4o-mini-2024-07-18"
    assert text == f"Simulated reply from {DEPLOYMENT}: {prompt}"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == expected_prompt_tokens(prompt)
    assert result.usage.completion_tokens == sim_text.count_tokens(text)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.model_extra and result.model_extra["prompt_filter_results"][0]["prompt_index"] == 0


def test_azure_max_tokens_truncates_with_length_finish(azure: openai.AzureOpenAI) -> None:
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("one two three four five"), max_tokens=4)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 4
    assert result.choices[0].message.content == "Simulated reply from gpt"


def test_azure_stop_sequence_ends_the_reply_before_it(azure: openai.AzureOpenAI) -> None:
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("alpha beta gamma"), stop=["beta"])
    assert result.choices[0].message.content == f"Simulated reply from {DEPLOYMENT}: alpha "
    assert result.choices[0].finish_reason == "stop"


def test_azure_async_stream_sends_chunks_then_usage(sim: RunningSimulator) -> None:
    async def run() -> tuple[list[Any], str]:
        async with openai.AsyncAzureOpenAI(api_key="k", azure_endpoint=sim.url, api_version=API_VERSION,
                                           max_retries=0, timeout=10) as client:
            stream = await client.chat.completions.create(
                model=DEPLOYMENT, messages=user("stream me please"), stream=True,
                stream_options={"include_usage": True}, extra_headers={"traceparent": "00-abc-def-01"})
            chunks = [chunk async for chunk in stream]
        return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    chunks, text = asyncio.run(run())
    assert chunks[0].choices == [] and chunks[0].model_extra and "prompt_filter_results" in chunks[0].model_extra
    assert chunks[1].choices[0].delta.role == "assistant"
    assert text == f"Simulated reply from {DEPLOYMENT}: stream me please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == sim_text.count_tokens(text)
    assert chunks[-1].usage.prompt_tokens == expected_prompt_tokens("stream me please")
    last = target_stats(sim, DEPLOYMENT)["last"]
    assert last["body"]["stream_options"] == {"include_usage": True}
    assert last["headers"]["traceparent"] == "00-abc-def-01"
    assert last["headers"]["api-key"] == "***"
    assert last["query"] == {"api-version": API_VERSION}


def test_azure_stream_without_include_usage_has_no_usage_chunk(azure: openai.AzureOpenAI) -> None:
    chunks = list(azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"), stream=True))
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_azure_tool_call_when_asked_in_json(azure: openai.AzureOpenAI) -> None:
    tools: Any = [WEATHER_TOOL]
    result = azure.chat.completions.create(model=DEPLOYMENT, messages=user("CALL_TOOL for Paris"), tools=tools)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    call: Any = (choice.message.tool_calls or [])[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "for Paris", "days": 1}
    assert result.usage is not None
    assert result.usage.prompt_tokens == expected_prompt_tokens("CALL_TOOL for Paris", tools=[WEATHER_TOOL])


def test_azure_tool_call_streams_as_deltas(azure: openai.AzureOpenAI) -> None:
    tools: Any = [WEATHER_TOOL]
    stream = azure.chat.completions.create(model=DEPLOYMENT, messages=user("CALL_TOOL now"), tools=tools,
                                           stream=True, stream_options={"include_usage": True})
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].function and calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(arguments) == {"city": "now", "days": 1}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_azure_requires_api_version_and_credentials(sim: RunningSimulator) -> None:
    path = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    status, body = raw_post(sim, path, {"messages": user("x")}, {"api-key": "k"})
    assert status == 400 and body["error"]["param"] == "api-version"
    status, body = raw_post(sim, f"{path}?api-version={API_VERSION}", {"messages": user("x")}, {})
    assert status == 401 and body["error"]["code"] == "401"
    status, _ = raw_post(sim, f"{path}?api-version={API_VERSION}", {"messages": user("x")},
                         {"Authorization": "Bearer entra-token"})
    assert status == 200


def test_azure_throttling_fault_carries_retry_after_and_spends_its_count(sim: RunningSimulator,
                                                                         azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target=DEPLOYMENT, mode="status", status=429, retry_after=2, count=1)
    with pytest.raises(openai.RateLimitError) as caught:
        azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"))
    assert caught.value.response.headers["retry-after"] == "2"
    assert azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi")).choices
    assert target_stats(sim, DEPLOYMENT)["count"] == 2


def test_azure_fault_on_another_target_does_not_apply(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target="gpt-4o", mode="status", status=503)
    assert azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi")).choices
    with pytest.raises(openai.InternalServerError):
        azure.chat.completions.create(model="gpt-4o", messages=user("hi"))


def test_azure_slow_fault_delays_the_answer(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target="*", mode="slow", delay_ms=300, count=1)
    started = time.monotonic()
    azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"))
    assert time.monotonic() - started >= 0.3
    with pytest.raises(openai.APITimeoutError):
        add_fault(sim, target="*", mode="slow", delay_ms=2000, count=1)
        azure.with_options(timeout=0.3).chat.completions.create(model=DEPLOYMENT, messages=user("hi"))


def test_azure_cut_drops_the_connection(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target=DEPLOYMENT, mode="cut", count=1)
    with pytest.raises(openai.APIConnectionError):
        azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"))
    add_fault(sim, target=DEPLOYMENT, mode="cut", after_chunks=3, count=1)
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"), stream=True):
            received.append(chunk)
    assert len(received) == 3


def test_azure_malformed_bodies_fail_to_parse(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target=DEPLOYMENT, mode="malformed", count=2)
    with pytest.raises(json.JSONDecodeError):
        azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"))
    with pytest.raises(json.JSONDecodeError):
        list(azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"), stream=True))


def test_azure_mid_stream_error_event_raises_api_error(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target=DEPLOYMENT, mode="status", status=500, after_chunks=2, count=1)
    with pytest.raises(openai.APIError, match="server had an error"):
        list(azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"), stream=True))


def test_global_latency_applies_to_every_answer(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    control(sim, "POST", "/_sim/config", {"latency_ms": 200})
    started = time.monotonic()
    azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"))
    assert time.monotonic() - started >= 0.2


# --- Bedrock Runtime ---------------------------------------------------------------------------------------------

def test_converse_answers_with_usage_and_decodes_the_model_id(sim: RunningSimulator, bedrock: Any) -> None:
    result = bedrock.converse(modelId=MODEL_ID, messages=converse_messages("Summarise this text"),
                              system=[{"text": "Be brief."}], inferenceConfig={"maxTokens": 200})
    text = result["output"]["message"]["content"][0]["text"]
    assert text == f"Simulated reply from {MODEL_ID}: Summarise this text"
    assert result["stopReason"] == "end_turn"
    usage = result["usage"]
    assert usage["inputTokens"] == expected_prompt_tokens("Summarise this text") + sim_text.count_tokens("Be brief.")
    assert usage["outputTokens"] == sim_text.count_tokens(text)
    assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    assert "latencyMs" in result["metrics"]
    last = target_stats(sim, MODEL_ID)["last"]
    assert last["path"].endswith("v1%3A0/converse")
    assert last["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=x/")
    assert last["headers"]["authorization"].endswith("Signature=***")


def test_converse_honours_max_tokens_and_stop_sequences(bedrock: Any) -> None:
    capped = bedrock.converse(modelId=MODEL_ID, messages=converse_messages("a b c"), inferenceConfig={"maxTokens": 3})
    assert capped["stopReason"] == "max_tokens" and capped["usage"]["outputTokens"] == 3
    stopped = bedrock.converse(modelId=MODEL_ID, messages=converse_messages("red green blue"),
                               inferenceConfig={"stopSequences": ["green"]})
    assert stopped["stopReason"] == "stop_sequence"
    assert stopped["output"]["message"]["content"][0]["text"].endswith(": red ")


def test_converse_stream_events_decode_through_botocore(bedrock: Any) -> None:
    response = bedrock.converse_stream(modelId=MODEL_ID, messages=converse_messages("stream this"))
    events = list(response["stream"])
    names = [next(iter(e)) for e in events]
    assert names[0] == "messageStart" and events[0]["messageStart"]["role"] == "assistant"
    assert names[-3:] == ["contentBlockStop", "messageStop", "metadata"]
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == f"Simulated reply from {MODEL_ID}: stream this"
    assert events[-2]["messageStop"]["stopReason"] == "end_turn"
    usage = events[-1]["metadata"]["usage"]
    assert usage["outputTokens"] == sim_text.count_tokens(text)
    assert usage["inputTokens"] == expected_prompt_tokens("stream this")


def test_converse_tool_use_in_json_and_stream(bedrock: Any) -> None:
    result = bedrock.converse(modelId=MODEL_ID, messages=converse_messages("CALL_TOOL Oslo"), toolConfig=BEDROCK_TOOLS)
    assert result["stopReason"] == "tool_use"
    use = result["output"]["message"]["content"][0]["toolUse"]
    assert use["name"] == "get_weather" and use["input"] == {"city": "Oslo", "days": 1}
    events = list(bedrock.converse_stream(modelId=MODEL_ID, messages=converse_messages("CALL_TOOL Oslo"),
                                          toolConfig=BEDROCK_TOOLS)["stream"])
    start = next(e["contentBlockStart"] for e in events if "contentBlockStart" in e)
    assert start["start"]["toolUse"]["name"] == "get_weather"
    arguments = "".join(e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events if "contentBlockDelta" in e)
    assert json.loads(arguments) == {"city": "Oslo", "days": 1}
    assert next(e["messageStop"] for e in events if "messageStop" in e)["stopReason"] == "tool_use"


@pytest.mark.parametrize(("status", "code"), [(429, "ThrottlingException"), (400, "ValidationException"),
                                              (408, "ModelTimeoutException"), (500, "InternalServerException"),
                                              (503, "ServiceUnavailableException")])
def test_converse_status_faults_raise_client_errors(sim: RunningSimulator, bedrock: Any, status: int,
                                                    code: str) -> None:
    add_fault(sim, target=MODEL_ID, mode="status", status=status, count=1)
    with pytest.raises(ClientError) as caught:
        bedrock.converse(modelId=MODEL_ID, messages=converse_messages("hi"))
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


def test_converse_stream_throttled_before_first_event(sim: RunningSimulator, bedrock: Any) -> None:
    add_fault(sim, target="*", provider="bedrock", mode="status", status=429, count=1)
    with pytest.raises(ClientError, match="ThrottlingException"):
        bedrock.converse_stream(modelId=MODEL_ID, messages=converse_messages("hi"))


def test_mid_stream_exception_event_raises_through_botocore(sim: RunningSimulator, bedrock: Any) -> None:
    add_fault(sim, target=MODEL_ID, mode="status", status=429, after_chunks=2, count=1)
    received: list[Any] = []
    with pytest.raises(EventStreamError) as caught:
        drain(bedrock.converse_stream(modelId=MODEL_ID, messages=converse_messages("hi"))["stream"], received)
    assert len(received) == 2
    assert caught.value.response["Error"]["Code"] == "throttlingException"


def test_bedrock_cut_faults_surface_as_connection_errors(sim: RunningSimulator, bedrock: Any) -> None:
    add_fault(sim, target=MODEL_ID, mode="cut", count=1)
    with pytest.raises(ConnectionClosedError):
        bedrock.converse(modelId=MODEL_ID, messages=converse_messages("hi"))
    add_fault(sim, target=MODEL_ID, mode="cut", after_chunks=2, count=1)
    received: list[Any] = []
    # botocore lets urllib3's error escape from a cut event stream, unwrapped.
    with pytest.raises(ProtocolError):
        drain(bedrock.converse_stream(modelId=MODEL_ID, messages=converse_messages("hi"))["stream"], received)
    assert len(received) == 2


def test_bedrock_malformed_faults(sim: RunningSimulator, bedrock: Any) -> None:
    add_fault(sim, target=MODEL_ID, mode="malformed", count=2)
    # botocore does not raise on a 200 whose body is not JSON: it returns a response without "output".
    assert "output" not in bedrock.converse(modelId=MODEL_ID, messages=converse_messages("hi"))
    with pytest.raises(ChecksumMismatch):
        drain(bedrock.converse_stream(modelId=MODEL_ID, messages=converse_messages("hi"))["stream"], [])


def test_bedrock_requires_a_signature(sim: RunningSimulator) -> None:
    client = bedrock_client(sim, signature_version=UNSIGNED)
    try:
        with pytest.raises(ClientError) as caught:
            client.converse(modelId=MODEL_ID, messages=converse_messages("hi"))
    finally:
        client.close()
    assert caught.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"


def test_bedrock_validation_error_for_empty_messages(sim: RunningSimulator) -> None:
    status, body = raw_post(sim, "/model/m/converse", {"messages": []}, {"Authorization": "AWS4-HMAC-SHA256 x"})
    assert status == 400 and "user message" in body["message"]


def test_event_stream_frames_decode_with_botocore_buffer() -> None:
    buffer = EventStreamBuffer()
    buffer.add_data(event_frame("messageStart", {"role": "assistant"}) + exception_frame("throttlingException", "slow"))
    first, second = list(buffer)
    assert first.headers[":event-type"] == "messageStart"
    assert json.loads(first.payload)["role"] == "assistant"
    assert second.headers[":message-type"] == "exception" and json.loads(second.payload) == {"message": "slow"}


# --- STS ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def sts(sim: RunningSimulator) -> Iterator[Any]:
    client = boto3.client("sts", endpoint_url=sim.url, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="y", config=Config(retries={"total_max_attempts": 1}))
    yield client
    client.close()


def test_sts_assume_role_with_web_identity_parses_and_records_claims(sim: RunningSimulator, sts: Any) -> None:
    control(sim, "POST", "/_sim/config", {"sts_expiry_seconds": 60})
    token = unsigned_jwt({"sub": "mi-object-id", "aud": "api://AzureADTokenExchange", "iss": "https://login"})
    result = sts.assume_role_with_web_identity(RoleArn=ROLE_ARN, WebIdentityToken=token, RoleSessionName="gw")
    credentials = result["Credentials"]
    assert credentials["AccessKeyId"].startswith("ASIA") and credentials["SessionToken"]
    remaining = credentials["Expiration"].timestamp() - time.time()
    assert 0 < remaining <= 61
    assert result["SubjectFromWebIdentityToken"] == "mi-object-id"
    assert result["AssumedRoleUser"]["Arn"] == "arn:aws:sts::123456789012:assumed-role/gateway-bedrock/gw"
    stats = control(sim, "GET", "/_sim/stats")
    assert stats["sts"]["count"] == 1 and stats["sts"]["last_claims"]["aud"] == "api://AzureADTokenExchange"
    assert stats["targets"]["sts"]["last"]["body"]["WebIdentityToken"] == "***"


def test_sts_rejects_a_token_for_another_audience(sim: RunningSimulator, sts: Any) -> None:
    control(sim, "POST", "/_sim/config", {"sts_audience": "api://AzureADTokenExchange"})
    with pytest.raises(ClientError) as caught:
        sts.assume_role_with_web_identity(RoleArn=ROLE_ARN, WebIdentityToken=unsigned_jwt({"aud": "other"}),
                                          RoleSessionName="gw")
    assert caught.value.response["Error"]["Code"] == "InvalidIdentityToken"


def test_sts_status_fault_is_an_sts_error(sim: RunningSimulator, sts: Any) -> None:
    add_fault(sim, target="sts", mode="status", status=403, count=1)
    with pytest.raises(ClientError) as caught:
        sts.assume_role_with_web_identity(RoleArn=ROLE_ARN, WebIdentityToken=unsigned_jwt({"aud": "a"}),
                                          RoleSessionName="gw")
    assert caught.value.response["Error"]["Code"] == "AccessDenied"


# --- control surface and command line ----------------------------------------------------------------------------

def test_reset_clears_stats_and_faults_expire_after_count(sim: RunningSimulator, azure: openai.AzureOpenAI) -> None:
    add_fault(sim, target="*", mode="status", status=500, count=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            azure.chat.completions.create(model=DEPLOYMENT, messages=user("hi"))
    assert control(sim, "GET", "/_sim/faults")["faults"] == []
    assert control(sim, "GET", "/_sim/stats")["total"] == 2
    control(sim, "POST", "/_sim/reset")
    assert control(sim, "GET", "/_sim/stats")["targets"] == {}


def test_bad_fault_is_refused(sim: RunningSimulator) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        control(sim, "POST", "/_sim/faults", {"mode": "explode"})
    with caught.value as error:
        assert error.code == 400


def test_command_line_prints_ready_line_and_serves() -> None:
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen([sys.executable, "-m", "tools.provider_simulator", "--port", "0", "--latency-ms", "5"],
                               cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)  # bounded: never hang on a dead child
        assert ready, "no ready line within 15 s"
        line = process.stdout.readline().strip()
        assert line.startswith("provider-simulator listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[-1]
        with urllib.request.urlopen(url + "/_sim/health", timeout=5) as response:
            assert json.loads(response.read())["latency_ms"] == 5
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()

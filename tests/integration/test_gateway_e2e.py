"""End to end over real HTTP: openai SDK → local host → gateway → simulator (Azure OpenAI and Bedrock routes)."""

from __future__ import annotations

import gzip
import json
import time

import openai
import pytest
import requests

from tests import closing

pytestmark = pytest.mark.integration




def client(base_url: str, token: str) -> openai.OpenAI:
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=token, max_retries=0, timeout=30)
    return closing.keep(sdk)




def hello(**extra: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there gateway"}], **extra}


def test_chat_completion_through_the_openai_sdk_is_served_by_azure_openai(base_url: str, token: str, sim) -> None:
    raw = client(base_url, token).chat.completions.with_raw_response.create(**hello())
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert raw.headers["x-gateway-provider"] == "azure_openai"
    assert raw.headers["x-gateway-model"] == "gpt-4o-mini"
    assert raw.headers["x-request-id"]
    float(raw.headers["x-gateway-overhead-ms"])
    assert sim.total() == 1


def test_streamed_chat_ends_with_done_and_carries_usage_only_when_asked(base_url: str, token: str, sim) -> None:
    with_usage = list(client(base_url, token).chat.completions.create(
        **hello(stream=True, stream_options={"include_usage": True})))
    assert with_usage[-1].usage is not None and with_usage[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in with_usage if c.choices)
    assert text
    without = list(client(base_url, token).chat.completions.create(**hello(stream=True)))
    assert all(c.usage is None for c in without)
    # The gateway always asks upstream for usage so it can account, whatever the caller asked.
    assert sim.last("gpt-4o-mini")["body"]["stream_options"] == {"include_usage": True}


def test_raw_sse_frames_are_openai_shaped(base_url: str, token: str) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                             json=hello(stream=True), stream=True, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("stream", [False, True])
def test_same_request_is_served_by_bedrock_when_hinted(base_url: str, token: str, stream: bool) -> None:
    body = {"model": "chat-default", "messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello from the hint test"}],
            "extra_body": {"provider_hint": "bedrock"}}  # gateway extensions travel in the SDK's extra_body
    sdk = client(base_url, token)
    if stream:
        streamed = sdk.chat.completions.with_raw_response.create(**body, stream=True,
                                                                 stream_options={"include_usage": True})
        assert streamed.headers["x-gateway-provider"] == "bedrock"
        with streamed.parse() as events:
            chunks = list(events)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        return
    raw = sdk.chat.completions.with_raw_response.create(**body)
    assert raw.headers["x-gateway-provider"] == "bedrock"
    assert raw.parse().choices[0].message.content


def test_models_lists_the_callers_tier(base_url: str, token: str, admin_token: str) -> None:
    standard = {m.id for m in client(base_url, token).models.list()}
    admin = {m.id for m in client(base_url, admin_token).models.list()}
    assert standard == {"gpt-4o-mini", "claude-3-haiku", "chat-default", "text-embedding-3-small", "titan-embed-text-v2"}
    assert standard < admin and "gpt-4o" in admin


@pytest.mark.parametrize(("path", "route", "model"), [("/v1/models", "models", None),
                                                    ("/v1/models/gpt-4o-mini", "models", "gpt-4o-mini"),
                                                    ("/v1/usage", "usage", None)])
def test_a_route_answered_without_the_pipeline_still_leaves_one_request_record(stack, token: str, path: str,
                                                                              route: str, model: str | None) -> None:
    from tests.integration.test_fallback_e2e import _request_log_line

    request_id = f"answered-{route}-{time.monotonic_ns()}"
    answer = requests.get(f"{stack.base_url}{path}", timeout=10,
                          headers={"Authorization": f"Bearer {token}", "x-request-id": request_id})
    assert answer.status_code == 200, answer.text
    line = _request_log_line(stack, request_id)
    assert f" {route} 200 ok " in line, line
    assert model is None or model in line


def test_health_reports_configuration_and_storage(base_url: str) -> None:
    response = requests.get(f"{base_url}/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["checks"]["configuration"]["status"] == "ok"
    assert body["checks"]["storage"]["status"] == "ok"
    assert "key" not in response.text.lower()


def _post(base_url: str, token: str, data: bytes | str, content_type: str | None = "application/json",
          path: str = "/v1/chat/completions") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    return requests.post(f"{base_url}{path}", data=data, headers=headers, timeout=30)


BAD_INPUT = [
    ("malformed json", b'{"model": "gpt-4o-mini", "messages": [', "application/json", 400, "invalid_json", None),
    ("wrong content type", json.dumps(hello()), "text/plain", 415, "unsupported_media_type", "content-type"),
    ("no content type", json.dumps(hello()), None, 415, "unsupported_media_type", "content-type"),
    ("empty body", b"", "application/json", 400, "invalid_body", None),
    ("not an object", b"[1, 2]", "application/json", 400, "invalid_body", None),
    ("missing messages", json.dumps({"model": "gpt-4o-mini"}), "application/json", 400,
     "missing_required_parameter", "messages"),
    ("missing model", json.dumps({"messages": [{"role": "user", "content": "x"}]}), "application/json", 400,
     "missing_required_parameter", "model"),
    ("empty messages", json.dumps(hello(messages=[])), "application/json", 400, "invalid_value", "messages"),
    ("bad role", json.dumps(hello(messages=[{"role": "robot", "content": "x"}])), "application/json", 400,
     "invalid_value", "messages[0].role"),
    ("temperature too high", json.dumps(hello(temperature=3)), "application/json", 400, "invalid_value",
     "temperature"),
    ("n above 128", json.dumps(hello(n=129)), "application/json", 400, "invalid_value", "n"),
    ("n above one on a model that cannot", json.dumps(hello(n=2, model="claude-3-haiku")), "application/json", 400,
     "unsupported_parameter", "n"),
    ("unknown field", json.dumps(hello(max_token=5)), "application/json", 400, "unknown_parameter", "max_token"),
    ("unknown model", json.dumps(hello(model="gpt-17")), "application/json", 404, "model_not_found", "model"),
    # Types are strict, as OpenAI's are, and a union's error names the field, not pydantic's branch:
    ("content of the wrong type", json.dumps(hello(messages=[{"role": "user", "content": 5}])), "application/json",
     400, "invalid_type", "messages[0].content"),
    ("a bad content part", json.dumps(hello(messages=[{"role": "user", "content": [5]}])), "application/json",
     400, "invalid_type", "messages[0].content[0]"),
    ("stop of the wrong type", json.dumps(hello(stop=5)), "application/json", 400, "invalid_type", "stop"),
    ("stream as a string", json.dumps(hello(stream="yes")), "application/json", 400, "invalid_type", "stream"),
    ("max_tokens as a boolean", json.dumps(hello(max_tokens=True)), "application/json", 400, "invalid_type",
     "max_tokens"),
    ("temperature as a string", json.dumps(hello(temperature="1.5")), "application/json", 400, "invalid_type",
     "temperature"),
    ("both token caps", json.dumps(hello(max_tokens=5, max_completion_tokens=5)), "application/json", 400,
     "invalid_value", "max_completion_tokens"),
    ("stream_options without stream", json.dumps(hello(stream_options={"include_usage": True})),
     "application/json", 400, "invalid_value", "stream_options"),
    # What Python's parser takes but JSON does not, and no SDK can send on:
    ("NaN", json.dumps(hello(temperature=float("nan"))), "application/json", 400, "invalid_json", None),
    ("Infinity in a free-form field", json.dumps(hello(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"maximum": float("inf")}}})), "application/json", 400, "invalid_json", None),
    ("number past a double", b'{"model": "gpt-4o-mini", "top_p": 1e400, "messages": [{"role": "user", '
     b'"content": "x"}]}', "application/json", 400, "invalid_json", None),
    ("lone surrogate", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "application/json", 400, "invalid_json", None),
    # JSON between systems is UTF-8 (RFC 8259 8.1); in UTF-16 the surrogate check above would see NULs instead.
    ("UTF-16 body", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\\ud800b"}]}'.encode(
        "utf-16"), "application/json", 400, "invalid_json", None),
    # An unknown field is named as the caller spelled it (a capital is no union tag of pydantic's):
    ("unknown capitalised field", json.dumps(hello(Temperature=1)), "application/json", 400, "unknown_parameter",
     "Temperature"),
    ("unknown nested field", json.dumps(hello(stream=True, stream_options={"Include": True})), "application/json",
     400, "unknown_parameter", "stream_options.Include"),
    ("empty nested field", json.dumps(hello(stream=True, stream_options={"": True})), "application/json",
     400, "unknown_parameter", "stream_options."),
    # A key twice: another hop keeping the first value would see a different request.
    ("repeated key", b'{"model": "gpt-4o-mini", "max_tokens": -1, "max_tokens": 4, "messages": [{"role": "user", '
     b'"content": "x"}]}', "application/json", 400, "invalid_json", "max_tokens"),
    ("json_schema without its schema", json.dumps(hello(response_format={"type": "json_schema"})), "application/json",
     400, "missing_required_parameter", "response_format.json_schema"),
    ("tool_choice naming no tool", json.dumps(hello(tools=[{"type": "function", "function": {"name": "a"}}],
                                                    tool_choice={"type": "function", "function": {"name": "b"}})),
     "application/json", 400, "invalid_value", "tool_choice"),
    ("tool message without its call id", json.dumps(hello(messages=[{"role": "user", "content": "x"},
                                                                    {"role": "tool", "content": "y"}])),
     "application/json", 400, "missing_required_parameter", "messages[1].tool_call_id"),
    ("a charset other than UTF-8", json.dumps(hello()), "application/json; charset=utf-16", 415,
     "unsupported_media_type", "content-type"),
]


@pytest.mark.parametrize(("name", "data", "content_type", "status", "code", "param"), BAD_INPUT,
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_its_exact_status_and_openai_error_shape(
        base_url: str, token: str, sim, name: str, data: bytes | str, content_type: str | None, status: int,
        code: str, param: str | None) -> None:
    response = _post(base_url, token, data, content_type)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert response.headers["x-request-id"]
    assert sim.total() == 0, "bad input must never reach a provider"


def test_a_compressed_body_is_a_415_not_invalid_json(base_url: str, token: str, sim) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", data=gzip.compress(json.dumps(hello()).encode()),
                             timeout=30, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                                  "Content-Encoding": "gzip"})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["param"] == "content-encoding"
    assert sim.total() == 0


def test_the_local_host_routes_like_the_functions_host(base_url: str, token: str) -> None:
    # The Functions host answers a method the function does not declare with an empty 404, not a 405.
    wrong_method = requests.get(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                                timeout=10)
    assert (wrong_method.status_code, wrong_method.content) == (404, b"")
    head = requests.head(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert head.status_code == 404, "a GET function is not served HEAD by the Functions host either"
    upper = requests.post(f"{base_url.replace('/api', '/API')}/V1/Chat/Completions", json=hello(), timeout=30,
                          headers={"Authorization": f"Bearer {token}"})
    assert upper.status_code == 200, "the host's routes are case-insensitive"
    slash = requests.post(f"{base_url}/v1/chat/completions/", json=hello(), timeout=30, allow_redirects=False,
                          headers={"Authorization": f"Bearer {token}"})
    assert slash.status_code == 200, "ASP.NET Core routing takes a trailing slash as the same route"


def test_null_stream_means_not_streamed_as_in_openai(base_url: str, token: str) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", json=hello(stream=None, temperature=1), timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_input_no_provider_could_be_sent_counts_against_no_target(base_url: str, token: str, sim) -> None:
    # A lone surrogate in a free-form field used to pass validation and fail inside the SDK: a 503 that
    # counted as a failure of every target, so the next caller's "chat-default" went to its fallback.
    unsendable = (b'{"model": "chat-default", "messages": [{"role": "user", "content": "x"}], '
                  b'"response_format": {"type": "json_schema", "json_schema": {"name": "\\udfff"}}}')
    for _ in range(6):
        assert _post(base_url, token, unsendable).status_code == 400
    response = requests.post(f"{base_url}/v1/chat/completions", json=hello(model="chat-default"), timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.headers["x-gateway-provider"] == "azure_openai"
    assert sim.total() == 1


def test_body_over_the_cap_is_rejected_before_parsing(base_url: str, token: str) -> None:
    oversized = b"{" + b" " * (1_048_576 + 10)  # not even valid JSON: parsing would say 400, the cap says 413
    response = _post(base_url, token, oversized)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_chunked_body_over_the_cap_is_rejected(base_url: str, token: str) -> None:
    def chunks():
        for _ in range(40):
            yield b" " * 32_768

    response = requests.post(f"{base_url}/v1/chat/completions", data=chunks(), timeout=30,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert response.status_code == 413


def test_caller_request_id_and_traceparent_are_honoured(base_url: str, token: str, sim) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = requests.post(f"{base_url}/v1/chat/completions", json=hello(), timeout=30, headers={
        "Authorization": f"Bearer {token}", "x-request-id": "caller-req-42",
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.headers["x-request-id"] == "caller-req-42"
    forwarded = sim.last("gpt-4o-mini")["headers"].get("traceparent", "")
    assert forwarded.startswith(f"00-{trace_id}-") and "00f067aa0ba902b7" not in forwarded


def test_malformed_request_id_is_replaced(base_url: str, token: str) -> None:
    response = requests.post(f"{base_url}/v1/chat/completions", json=hello(), timeout=30,
                             headers={"Authorization": f"Bearer {token}", "x-request-id": "bad id\u00e9"})
    assert response.headers["x-request-id"] != "bad id\u00e9"


def test_unknown_route_is_an_empty_404_like_the_functions_host(base_url: str, token: str) -> None:
    response = requests.get(f"{base_url}/v1/nothing-here", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert (response.status_code, response.content) == (404, b"")


def test_generate_runs_a_task_through_the_same_pipeline(base_url: str, token: str) -> None:
    response = requests.post(f"{base_url}/generate", timeout=30, headers={"Authorization": f"Bearer {token}"},
                             json={"prompt": "The invoice total is 42 EUR.", "task": "summarise",
                                   "priority": "low_cost"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output"] and body["task"] == "summarise"
    assert body["provider"] in ("azure_openai", "bedrock")
    assert body["usage"]["total_tokens"] > 0
    assert float(body["estimated_cost_usd"]) > 0
    assert body["request_id"] == response.headers["x-request-id"]


def test_generate_errors_name_the_prompt_the_caller_sent_not_the_chat_it_became(base_url: str, token: str) -> None:
    response = requests.post(f"{base_url}/generate", timeout=30, headers={"Authorization": f"Bearer {token}"},
                             json={"prompt": "x" * 400_001, "task": "summarise"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("prompt_too_large", "prompt")


def test_generate_requires_a_token_like_everything_else(base_url: str) -> None:
    response = requests.post(f"{base_url}/generate", json={"prompt": "x"}, timeout=10)
    assert response.status_code == 401


def test_function_key_in_code_query_parameter_still_works(base_url: str, token: str) -> None:
    # Direct callers of the Function endpoint may pass the function key as ?code=...; only JWTs are refused there.
    response = requests.post(f"{base_url}/v1/chat/completions?code=abcDEF123-function-key_==", json=hello(),
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body", [{"prompt": "0", "model": ""}, {"prompt": "x", "model": "m" * 300}])
def test_generate_with_a_bad_model_is_a_400_not_a_500(base_url: str, token: str, body: dict) -> None:
    # Found by the fuzzer: the task API's own fields must be validated like a chat request's.
    response = requests.post(f"{base_url}/generate", json=body, headers={"Authorization": f"Bearer {token}"},
                             timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"

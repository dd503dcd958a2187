"""Property-based fuzzing of the HTTP edge: whatever arrives, the gateway answers in its own terms.

Bodies (arbitrary JSON, chat-shaped JSON with random field types, raw bytes) and headers
(content-type variants, odd x-request-id / traceparent, Authorization garbage) go to the local
host of the shared stack. The properties: never a 500 (nor any 5xx: no fault is injected),
always the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}`` for >= 400,
and an ``x-request-id`` on every answer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tools.stack import Stack

pytestmark = pytest.mark.integration

# Local runs explore new examples every time (that is how bugs get found); CI (CI=true, set by .ci/run)
# replays a fixed, derandomized set, so a submission cannot pass or fail by the luck of the draw.
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ERROR_KEYS = {"message", "type", "param", "code"}
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# ---- strategies -------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)

roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), json_values)
contents = st.one_of(st.text(max_size=200), st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values}), json_values),
    max_size=3), json_values)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents},
                                   optional={"name": json_values, "tool_call_id": json_values,
                                             "tool_calls": json_values}), min_size=1, max_size=3),
    json_values)
models = st.one_of(st.sampled_from(["gpt-4o-mini", "chat-default", "claude-3-haiku", "gpt-4o", "", "x" * 300]),
                   json_values)
CHAT_OPTIONAL = {
    "temperature": st.one_of(st.floats(-5, 5), json_values), "top_p": json_values,
    "max_tokens": st.one_of(st.integers(-5, 10**9), json_values), "max_completion_tokens": json_values,
    "stop": st.one_of(st.lists(st.text(max_size=5), max_size=6), json_values), "n": json_values,
    "user": json_values, "stream": st.one_of(st.booleans(), json_values), "stream_options": json_values,
    "response_format": json_values, "tools": json_values, "tool_choice": json_values,
    "parallel_tool_calls": json_values, "presence_penalty": json_values, "frequency_penalty": json_values,
    "seed": json_values, "provider_hint": st.one_of(st.sampled_from(["azure_openai", "bedrock"]), json_values),
    "priority": st.one_of(st.sampled_from(["low_cost", "low_latency", "quality"]), json_values),
    "max_token": json_values, "functions": json_values,
    # The rest of the SDK's typed parameters (issue 19): semantic, advisory, and ones the gateway keeps as sent.
    "logprobs": json_values, "top_logprobs": st.one_of(st.integers(-3, 30), json_values), "logit_bias": json_values,
    "metadata": st.one_of(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=20), json_values),
    "store": json_values, "service_tier": json_values, "modalities": json_values, "audio": json_values,
    "prediction": json_values, "web_search_options": json_values, "function_call": json_values,
    "reasoning_effort": json_values, "verbosity": json_values, "prompt_cache_key": json_values,
    "safety_identifier": json_values, "moderation": json_values,
}
chat_bodies = st.fixed_dictionaries({"model": models, "messages": messages}, optional=CHAT_OPTIONAL)
generate_bodies = st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=200), json_values)}, optional={
    "task": st.one_of(st.sampled_from(["chat", "summarise", "extract", "classify", "rewrite"]), json_values),
    "model": models, "priority": json_values, "provider_hint": json_values,
    "max_tokens": st.one_of(st.integers(-5, 10**6), json_values), "temperature": json_values,
    "labels": st.one_of(st.lists(st.text(max_size=10), max_size=4), json_values),
    "fields": st.one_of(st.lists(st.text(max_size=10), max_size=4), json_values),
    "style": st.one_of(st.text(max_size=300), json_values), "stream": json_values,
})
embedding_models = st.one_of(st.sampled_from(["text-embedding-3-small", "titan-embed-text-v2",
                                               "cohere-embed-english-v3", "gpt-4o-mini", ""]), json_values)
embedding_inputs = st.one_of(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=4),
                             st.lists(st.integers(-5, 200_000), max_size=5),
                             st.lists(st.lists(st.integers(-5, 200_000), max_size=4), max_size=3), json_values)
embeddings_bodies = st.fixed_dictionaries({"model": embedding_models, "input": embedding_inputs}, optional={
    "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), json_values),
    "dimensions": st.one_of(st.sampled_from([256, 512, 1024, 300, 0, 256.0]), json_values), "user": json_values,
    "provider_hint": json_values, "stream": json_values,
})
api_versions = st.one_of(st.sampled_from(["2024-10-21", "2025-01-01-preview", "2024-13-45", "preview", ""]),
                         st.text(max_size=20))
# Deep nesting is valid JSON that a recursive parser may not survive.
deep = st.integers(min_value=900, max_value=20_000).map(lambda n: b"[" * n + b"]" * n)
raw_bytes = st.one_of(st.binary(max_size=300), deep, st.sampled_from(
    [b"", b" ", b"null", b"{", b'{"model":', b"\xff\xfe{}", b'"just a string"', b"1e999999", b"NaN", b"[]"]))


def encoded(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON text of ``bodies`` (Python's encoder: NaN/Infinity included), or raw bytes."""
    return st.one_of(bodies.map(lambda b: json.dumps(b).encode()), json_values.map(lambda b: json.dumps(b).encode()),
                     raw_bytes)


# Latin-1 without controls; requests refuses leading whitespace in a header value, so none is drawn.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=150).map(str.lstrip)
content_types = st.one_of(st.none(), st.sampled_from([
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/json ",
    "application/json;;;", "application/jsonx", "text/plain", "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded", ""]), header_text)
request_ids = st.one_of(st.none(), st.sampled_from(["", "a" * 128, "a" * 129, "ok-id_1.2:3", "../etc/passwd",
                                                    "id\twith\ttabs", "<script>"]), header_text)
traceparents = st.one_of(st.none(), st.sampled_from([
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", "00--", ""]), header_text)


def authorizations(valid: str) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), st.just(f"Bearer {valid}"), st.sampled_from([
        "", "Bearer", "Bearer ", "bearer " + valid, "Basic dXNlcjpwYXNz", f"Bearer {valid}x", f"Bearer {valid[:-5]}",
        "Bearer a.b.c", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", f"Bearer  {valid}", f"Bearer {valid} extra"]),
        header_text.map(lambda t: f"Bearer {t}"), header_text)


@st.composite
def headers(draw: st.DrawFn, valid_token: str) -> dict[str, str]:
    chosen = {"Content-Type": draw(content_types), "x-request-id": draw(request_ids),
              "traceparent": draw(traceparents), "Authorization": draw(authorizations(valid_token)),
              "x-apim-subscription": draw(st.one_of(st.none(), header_text))}
    return {k: v for k, v in chosen.items() if v is not None}


# ---- the property -----------------------------------------------------------------------------------

def check_answer(response: requests.Response, sent: dict[str, str]) -> None:
    where = f"status {response.status_code} for headers {sent!r}: {response.text[:300]!r}"
    assert response.status_code < 500, where
    assert response.headers.get("x-request-id"), where
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS, where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str) and error["type"], where
        assert error["code"] is None or isinstance(error["code"], str), where
        assert error["param"] is None or isinstance(error["param"], str), where


def fuzz_post(stack: Stack, path: str, body: bytes, sent: dict[str, str]) -> str:
    """Send, check the answer, return the x-request-id it carried."""
    with requests.post(f"{stack.base_url}{path}", data=body, headers=sent, timeout=30, stream=True) as response:
        response.content  # noqa: B018  # read it all: a stream must finish, not hang
        check_answer(response, sent)
        return str(response.headers["x-request-id"])


@pytest.fixture(scope="module")
def fuzz_token(stack: Stack) -> str:
    return stack.token("fuzz-caller", "Gateway.Premium")


def test_chat_completions_never_fail_with_a_500_whatever_the_body(stack: Stack, fuzz_token: str) -> None:
    @FUZZ
    @given(body=encoded(chat_bodies))
    @example(body=b"[" * 3000 + b"]" * 3000)
    @example(body=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                              "temperature": float("nan")}).encode())
    def run(body: bytes) -> None:
        sent = {"Content-Type": "application/json", "Authorization": f"Bearer {fuzz_token}"}
        fuzz_post(stack, "/v1/chat/completions", body, sent)

    run()


def test_generate_never_fails_with_a_500_whatever_the_body(stack: Stack, fuzz_token: str) -> None:
    @FUZZ
    @given(body=encoded(generate_bodies))
    @example(body=b'{"prompt":' * 3000)
    def run(body: bytes) -> None:
        sent = {"Content-Type": "application/json", "Authorization": f"Bearer {fuzz_token}"}
        fuzz_post(stack, "/generate", body, sent)

    run()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/generate"])
def test_odd_headers_never_fail_with_a_500(stack: Stack, fuzz_token: str, path: str) -> None:
    valid = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                       else {"prompt": "hi", "task": "summarise"}).encode()

    @FUZZ
    @given(sent=headers(fuzz_token), body=st.one_of(st.just(valid), encoded(chat_bodies)))
    def run(sent: dict[str, str], body: bytes) -> None:
        echoed = fuzz_post(stack, path, body, sent)
        assert SAFE_REQUEST_ID.fullmatch(echoed), f"unsafe x-request-id echoed: {echoed!r}"
        sent_id = sent.get("x-request-id", "").strip()
        if SAFE_REQUEST_ID.fullmatch(sent_id):
            assert echoed == sent_id, "a well-formed caller request id must be kept"

    run()


def test_embeddings_never_fail_with_a_500_whatever_the_body(stack: Stack, fuzz_token: str) -> None:
    @FUZZ
    @given(body=encoded(embeddings_bodies))
    @example(body=json.dumps({"model": "titan-embed-text-v2", "input": [[100_300]]}).encode())
    def run(body: bytes) -> None:
        sent = {"Content-Type": "application/json", "Authorization": f"Bearer {fuzz_token}"}
        fuzz_post(stack, "/v1/embeddings", body, sent)

    run()


def test_azure_dialect_never_fails_with_a_500(stack: Stack, fuzz_token: str) -> None:
    @FUZZ
    # Deployments that are one path segment: anything else is the host's routing, not the gateway's.
    @given(deployment=st.one_of(st.sampled_from(["gpt-4o-mini", "text-embedding-3-small", "nope"]),
                                st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._~-]{0,11}", fullmatch=True)),
           operation=st.sampled_from(["chat/completions", "embeddings"]), version=api_versions,
           body=st.one_of(encoded(chat_bodies), encoded(embeddings_bodies)),
           api_key=st.booleans())
    def run(deployment: str, operation: str, version: str, body: bytes, api_key: bool) -> None:
        sent = {"Content-Type": "application/json"} | (
            {"api-key": "k"} if api_key else {"Authorization": f"Bearer {fuzz_token}"})
        with requests.post(f"{stack.base_url}/openai/deployments/{deployment}/{operation}", data=body, timeout=30,
                           params={"api-version": version}, headers=sent, stream=True) as response:
            response.content  # noqa: B018
            check_answer(response, sent)

    run()

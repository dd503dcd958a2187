"""The chat parameter set is the installed openai SDK's: every typed key accepted, everything else refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway_lib.errors import InvalidRequest
from gateway_lib.operations import chat_params
from gateway_lib.operations.schema import ChatRequest, StreamOptions, parse_model
from tools import gen_chat_params

BASE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

# A valid value for every parameter the SDK types (new SDK parameters land in the extras and need none here).
VALUES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "logit_bias": {"50256": -100}, "logprobs": True,
    "max_completion_tokens": 10, "metadata": {"team": "search"}, "modalities": ["text"],
    "n": 2, "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"}, "presence_penalty": 0,
    "prompt_cache_key": "k", "reasoning_effort": "low", "response_format": {"type": "json_object"},
    "safety_identifier": "user-1", "seed": 1, "service_tier": "auto", "stop": ["\n"], "store": True,
    "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}, "temperature": 1,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}], "top_logprobs": 3,
    "top_p": 1, "user": "u", "verbosity": "low", "web_search_options": {},
}


def test_the_checked_in_parameter_list_is_the_installed_sdks() -> None:
    # The parameters, not the version they were read from: a release that types nothing new changes nothing.
    checked_in = json.loads(gen_chat_params.OUT.read_text())
    installed = gen_chat_params.from_sdk()
    checked_in.pop("sdk_version"), installed.pop("sdk_version")
    assert checked_in == installed, "the openai SDK's parameters changed: run `python -m tools.gen_chat_params`"


def test_stream_options_accept_exactly_the_sdks_keys() -> None:
    assert set(StreamOptions.model_fields) == chat_params.STREAM_OPTIONS


def test_every_modelled_field_is_an_sdk_or_gateway_parameter() -> None:
    assert set(ChatRequest.model_fields) <= chat_params.ACCEPTED


@pytest.mark.parametrize("name", sorted(chat_params.SDK_PARAMS - {"model", "messages", "max_tokens"}))
def test_every_sdk_parameter_is_accepted(name: str) -> None:
    value = VALUES.get(name, {"any": "value"})
    request = parse_model(ChatRequest, {**BASE, name: value, **({"stream": True} if name == "stream_options" else {})})
    assert getattr(request, name, None) is not None or request.model_extra == {name: value}


def test_an_sdk_parameter_the_gateway_does_not_model_is_kept_as_sent_for_the_relay() -> None:
    request = parse_model(ChatRequest, {**BASE, "prompt_cache_retention": "24h"})
    assert request.model_extra == {"prompt_cache_retention": "24h"}


@pytest.mark.parametrize("typo", ["max_token", "Temperature", "logprob", "meta_data"])
def test_a_key_the_sdk_does_not_type_is_a_400_naming_it(typo: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_model(ChatRequest, {**BASE, typo: 1})
    assert (raised.value.code, raised.value.param) == ("unknown_parameter", typo)


def test_an_integer_written_with_a_zero_fraction_is_an_integer() -> None:
    request = parse_model(ChatRequest, {**BASE, "seed": 12236.0, "n": 2.0, "max_tokens": 100.0,
                                        "logit_bias": {"50256": -100.0}})
    assert (request.seed, request.n, request.max_tokens) == (12236, 2, 100)
    assert all(type(v) is int for v in (request.seed, request.n, request.max_tokens, request.logit_bias["50256"]))
    with pytest.raises(InvalidRequest) as raised:
        parse_model(ChatRequest, {**BASE, "seed": 12236.5})
    assert raised.value.param == "seed"


@pytest.mark.parametrize(("extra", "features"), [
    ({}, set()),
    ({"n": 1}, set()),
    ({"n": 3}, {"n"}),
    ({"logprobs": True}, {"logprobs"}),
    ({"logprobs": False, "top_logprobs": 0}, {"logprobs"}),
    ({"modalities": ["text", "audio"]}, {"audio"}),
    ({"prediction": {"type": "content", "content": "x"}}, {"prediction"}),
    ({"function_call": "auto"}, {"functions"}),
    ({"store": True, "metadata": {"a": "b"}, "service_tier": "flex", "user": "u"}, set()),  # advisory
])
def test_semantic_parameters_are_the_features_a_target_must_have(extra: dict[str, Any], features: set[str]) -> None:
    assert parse_model(ChatRequest, {**BASE, **extra}).features() == features


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 0}, "n"), ({"n": 129}, "n"), ({"logit_bias": {"1": 101}}, "logit_bias.1"),
    ({"top_logprobs": 21}, "top_logprobs"), ({"store": "yes"}, "store"),
    ({"metadata": {"k": 1}}, "metadata.k"), ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"modalities": ["video"]}, "modalities[0]"), ({"stream": True, "stream_options": {"include_obfuscation": 1}},
                                                   "stream_options.include_obfuscation"),
])
def test_a_bad_value_of_a_known_parameter_is_a_400_naming_it(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_model(ChatRequest, {**BASE, **extra})
    assert raised.value.param == param

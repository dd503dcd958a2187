"""Which Chat Completions parameters the gateway accepts, and what each asks of a target.

The names are the installed ``openai`` SDK's typed ``CompletionCreateParams``, generated into
``chat_params.json`` by ``tools/gen_chat_params.py`` (a unit test holds the two equal), so a new SDK
brings its new parameters. Two kinds:

* semantic: the answer changes if a target ignores it (``n``, ``logprobs``...). They name a
  capability (``providers/<name>/__init__.py``); routing keeps only the targets that declare it, else
  a 400 naming the parameter.
* advisory: everything else the SDK types (``metadata``, ``store``, ``service_tier``, ``user``...).
  Accepted, forwarded as sent where the target's API takes them (the Azure OpenAI relay), dropped
  where it does not (Bedrock's Converse).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

_GENERATED = json.loads(resources.files("gateway_lib.operations").joinpath("chat_params.json").read_text("utf-8"))
SDK_PARAMS: frozenset[str] = frozenset(_GENERATED["chat"])
STREAM_OPTIONS: frozenset[str] = frozenset(_GENERATED["stream_options"])
GATEWAY_PARAMS = frozenset({"provider_hint", "priority"})  # the gateway's own routing hints
ACCEPTED = SDK_PARAMS | GATEWAY_PARAMS

# Integer parameters: a JSON number with a zero fraction ("seed": 12236.0) is an integer, as JSON Schema has it.
INTEGERS = ("n", "seed", "max_tokens", "max_completion_tokens", "top_logprobs")


def features(request: Any) -> frozenset[str]:
    """The semantic parameters a validated chat request sets, by the capability name each needs."""
    found = set()
    if (request.n or 1) > 1:
        found.add("n")
    if request.logprobs or request.top_logprobs is not None:
        found.add("logprobs")
    if request.audio is not None or "audio" in (request.modalities or ()):
        found.add("audio")
    if request.prediction is not None:
        found.add("prediction")
    if request.web_search_options is not None:
        found.add("web_search_options")
    if request.functions is not None or request.function_call is not None:
        found.add("functions")
    return frozenset(found)


def whole_numbers(payload: dict[str, Any], names: tuple[str, ...] = INTEGERS) -> dict[str, Any]:
    """``payload`` with integral floats of the integer parameters made ints (other values untouched)."""
    fixes = {k: int(v) for k in names if isinstance(v := payload.get(k), float) and v.is_integer()}
    return payload | fixes if fixes else payload


def unknown(payload: Mapping[str, Any]) -> str | None:
    """The first top-level key no SDK-typed or gateway parameter has (a typo like ``max_token``)."""
    return next((key for key in payload if key not in ACCEPTED), None)

"""Provider content safety end to end: openai SDK / raw HTTP → local host → gateway → simulator.

The simulator's trigger words (``tools/sim_text.py``) make Azure OpenAI's input filter refuse a
prompt (400 ``content_filter``) or either provider's output filter stop an answer part-way
(Azure ``finish_reason: content_filter``, Bedrock ``stopReason: content_filtered``). What the
gateway owes its caller: the OpenAI shapes, no fallback to another provider for a refused
prompt (a policy decision is not an outage), and a ledger that bills what was generated.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import requests

from gateway_lib.billing.ledger import CostRow
from tests.integration.test_quota_e2e import caller_key, ledger_state
from tests.stack_fixture import Sim
from tools.sim_text import FILTER_OUTPUT_TRIGGER, FILTER_PROMPT_TRIGGER
from tools.stack import Stack

pytestmark = pytest.mark.integration


def post(stack: Stack, token: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}"})


def ask(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def cost_row(stack: Stack, token: str, request_id: str) -> CostRow:
    counters, rows = ledger_state(stack, caller_key(stack, token))
    assert counters.in_flight_tokens == 0 and counters.in_flight_usd == 0, "a reservation was left behind"
    matching = [r for r in rows if r.request_id == request_id]
    assert len(matching) == 1, f"expected one cost row for {request_id}, got {len(matching)}"
    return matching[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_the_azure_filter_refuses_is_a_400_content_filter_and_not_sent_elsewhere(
        stack: Stack, token: str, sim: Sim, stream: bool) -> None:
    # chat-default is Azure, then Bedrock: a refused prompt must not be shopped around to the next provider.
    response = post(stack, token, ask("chat-default", f"please {FILTER_PROMPT_TRIGGER} this", stream=stream))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json"), "refused before any stream began"
    error = response.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": "messages",
                     "code": "content_filter"}
    assert "content filter refused the prompt" in error["message"] and FILTER_PROMPT_TRIGGER not in error["message"]
    assert sim.total() == 1 and sim.count("gpt-4o-mini") == 1, "only the first target was asked"

    row = cost_row(stack, token, response.headers["x-request-id"])
    assert (row.status, row.http_status, row.error_code, row.cost_usd) == ("error", 400, "content_filter", 0)
    assert row.attempts == 1
    assert (row.provider, row.model, row.deployment) == ("azure_openai", "gpt-4o-mini", "gpt-4o-mini"), \
        "the row names the provider that refused it"

    # The refusal says nothing about the target's health: the next request is served by it.
    again = post(stack, token, ask("chat-default", "an ordinary question"))
    assert again.status_code == 200 and again.headers["x-gateway-provider"] == "azure_openai"


@pytest.mark.parametrize("model,provider", [("gpt-4o-mini", "azure_openai"), ("claude-3-haiku", "bedrock")])
def test_an_answer_the_output_filter_stops_is_a_200_content_filter_and_billed(
        stack: Stack, token: str, sim: Sim, model: str, provider: str) -> None:
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=token, max_retries=0, timeout=30) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(**ask(model, f"tell me {FILTER_OUTPUT_TRIGGER} now"))
    completion = raw.parse()
    assert raw.headers["x-gateway-provider"] == provider
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert sim.total() == 1, "a filtered answer is an answer: no fallback"

    row = cost_row(stack, token, raw.headers["x-request-id"])
    assert row.status == "ok" and row.http_status == 200
    assert row.completion_tokens == completion.usage.completion_tokens and row.cost_usd > 0, "generated tokens bill"


@pytest.mark.parametrize("model,provider", [("gpt-4o-mini", "azure_openai"), ("claude-3-haiku", "bedrock")])
def test_a_stream_the_output_filter_stops_ends_with_finish_reason_content_filter_and_done(
        stack: Stack, token: str, sim: Sim, model: str, provider: str) -> None:
    body = ask(model, f"tell me {FILTER_OUTPUT_TRIGGER} in a stream", stream=True,
               stream_options={"include_usage": True})
    with requests.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30, stream=True,
                       headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status_code == 200 and response.headers["x-gateway-provider"] == provider
        frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]", "a filtered stream ends normally: the filter is the model's answer"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert not any("error" in c for c in chunks)
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes == ["content_filter"]
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text, "what was generated before the filter fired reached the caller"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] > 0
    assert sim.total() == 1

    row = cost_row(stack, token, response.headers["x-request-id"])
    assert row.status == "ok" and row.completion_tokens == usage["completion_tokens"] and row.cost_usd > 0


def test_generate_names_the_prompt_when_the_azure_filter_refuses_it(stack: Stack, token: str, sim: Sim) -> None:
    response = requests.post(f"{stack.base_url}/generate", timeout=30, headers={"Authorization": f"Bearer {token}"},
                             json={"prompt": f"summarise {FILTER_PROMPT_TRIGGER} this", "task": "summarise"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "content_filter"
    assert response.json()["error"]["param"] == "prompt", "the field the caller sent, not the chat it became"
    assert sim.total() == 1

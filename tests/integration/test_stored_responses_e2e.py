"""Stored responses belong to the caller that made them, end to end: openai SDK → local host → gateway →
simulator (Azure keeps responses; Bedrock keeps none), owners recorded in Azurite."""

from __future__ import annotations

import openai
import pytest

from tests.integration.test_content_filter_e2e import cost_row
from tests.integration.test_quota_e2e import caller_key, ledger_state
from tests.integration.test_responses_e2e import AZURE, client
from tests.stack_fixture import Sim
from tools.stack import Stack

pytestmark = pytest.mark.integration


def created(sdk: openai.OpenAI, stream: bool, **kwargs: object) -> tuple[str, str]:
    """(response id, x-request-id) of a create, whole or streamed (the id from ``response.completed``)."""
    if not stream:
        raw = sdk.responses.with_raw_response.create(model=AZURE, store=True, **kwargs)  # type: ignore[call-overload]
        return raw.parse().id, raw.headers["x-request-id"]
    with sdk.responses.with_streaming_response.create(model=AZURE, store=True, stream=True,  # type: ignore[call-overload]
                                                     **kwargs) as raw:
        events = list(raw.parse())
        request_id = raw.headers["x-request-id"]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[0].response.id == events[-1].response.id
    return events[-1].response.id, request_id


@pytest.mark.parametrize("stream", [False, True])
def test_the_owner_retrieves_and_chains_and_each_create_leaves_one_cost_row(stack: Stack, sim: Sim,
                                                                             stream: bool) -> None:
    token = stack.token(f"i20-stored-owner-{stream}")
    sdk = client(stack, token)
    first_id, first_request = created(sdk, stream, input="Remember the word apple")
    kept = sdk.responses.retrieve(first_id)
    assert kept.id == first_id and kept.output_text
    second_id, second_request = created(sdk, stream, input="Which word?", previous_response_id=first_id)
    # Either gpt-4o-mini target may answer the first (an earlier test can leave one cooling down); the chain is
    # pinned to whichever did, so exactly one of them saw both creates.
    served = [d for d in ("gpt-4o-mini", "gpt-4o-mini-swc") if d in sim.stats()["targets"]]
    assert len(served) == 1 and sim.count(served[0]) == 2
    assert sim.last(served[0])["body"]["previous_response_id"] == first_id
    assert sdk.responses.retrieve(second_id).previous_response_id == first_id
    assert cost_row(stack, token, first_request).status == "ok"
    assert cost_row(stack, token, second_request).status == "ok"
    _, rows = ledger_state(stack, caller_key(stack, token))
    assert len(rows) == 2  # the two creates; reading a stored response uses no tokens and leaves no row


def test_another_caller_gets_404_on_retrieve_and_400_on_chaining(stack: Stack, sim: Sim) -> None:
    owner, other = stack.token("i20-stored-alice"), stack.token("i20-stored-mallory")
    response_id, _ = created(client(stack, owner), False, input="A secret for alice only")
    sdk = client(stack, other)
    asked = sim.total()
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.responses.retrieve("resp_does_not_exist")
    with pytest.raises(openai.NotFoundError) as others:
        sdk.responses.retrieve(response_id)
    assert others.value.status_code == 404 and others.value.body["code"] == "not_found"  # type: ignore[index]
    assert others.value.message.replace(response_id, "X") == unknown.value.message.replace("resp_does_not_exist", "X")
    with pytest.raises(openai.BadRequestError) as chained:
        sdk.responses.create(model=AZURE, input="What was the secret?", previous_response_id=response_id)
    body = chained.value.body
    assert body["param"] == "previous_response_id" and body["code"] == "previous_response_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(response_id)
    assert sim.total() == asked  # nothing of another caller's reached the upstream
    assert client(stack, owner).responses.retrieve(response_id).id == response_id  # still there for its owner


def test_the_owner_deletes_its_response_and_then_it_is_gone(stack: Stack) -> None:
    sdk = client(stack, stack.token("i20-stored-deleter"))
    response_id, _ = created(sdk, False, input="Forget me")
    sdk.responses.delete(response_id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response_id)
    with pytest.raises(openai.BadRequestError) as chained:
        sdk.responses.create(model=AZURE, input="Again", previous_response_id=response_id)
    assert chained.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_a_response_created_with_store_false_is_not_retrievable(stack: Stack, token: str) -> None:
    sdk = client(stack, token)
    response = sdk.responses.create(model=AZURE, input="Keep nothing", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)

"""OpenAI embeddings to and from Bedrock ``InvokeModel`` bodies: Titan Text Embeddings v2 and Cohere Embed.

Pure transforms. Limits are the models' own (AWS model parameter pages): Titan v2 embeds one text per
call (up to 8,192 tokens or 50,000 characters; 256, 512 or 1024 dimensions), so the gateway fans a
list out into one call per text, at most ``TITAN_FAN_OUT`` of them; Cohere Embed takes up to 96 texts
of up to 2,048 characters each, with a fixed 1024 dimensions (v3). Token arrays arrive decoded
(``EmbeddingsRequest.texts``). Vectors come back as floats; base64 is the gateway's encoding.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from gateway_lib.errors import ProviderError
from gateway_lib.guardrails import tokens
from gateway_lib.operations.embeddings import embeddings_list
from gateway_lib.providers.base import EMBEDDINGS, CallContext, Completion, Unsupported, Usage
from gateway_lib.providers.bedrock.operation import BedrockOperation, Calls
from gateway_lib.providers.bedrock.transform import PROVIDER

if TYPE_CHECKING:
    from gateway_lib.config.catalog import Target
    from gateway_lib.operations.embeddings import EmbeddingsRequest

TITAN, COHERE = "titan", "cohere"
TITAN_FAN_OUT = 96  # the gateway's cap on Titan calls per request (Cohere's batch size, so both aliases agree)
TITAN_MAX_CHARS = 50_000
TITAN_DIMENSIONS = (256, 512, 1024)
COHERE_MAX_TEXTS = 96
COHERE_MAX_CHARS = 2048
COHERE_DIMENSIONS = 1024
TOKEN_COUNT_HEADER = "x-amzn-bedrock-input-token-count"


def family(target: Target) -> str | None:
    """The embeddings model family of a Bedrock model id (a cross-region profile prefix allowed)."""
    model_id = target.deployment.lower()
    if "amazon.titan-embed-text-v2" in model_id:
        return TITAN
    if "cohere.embed" in model_id:
        return COHERE
    return None


def check(request: EmbeddingsRequest, target: Target) -> Unsupported | None:
    """Whether ``target`` can embed these inputs: its model's limits on count, length and dimensions."""
    kind, texts = family(target), request.texts
    if kind is None:
        return Unsupported(f"Bedrock model '{target.deployment}' is not an embeddings model the gateway "
                           "translates (Titan Text Embeddings v2, Cohere Embed).", "model", "model_not_supported")
    most, chars = (TITAN_FAN_OUT, TITAN_MAX_CHARS) if kind == TITAN else (COHERE_MAX_TEXTS, COHERE_MAX_CHARS)
    if len(texts) > most:
        return Unsupported(f"'{target.model}' embeds at most {most} inputs per request; send {len(texts)} in "
                           "smaller batches.", "input", "invalid_value")
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    if len(texts[longest]) > chars:
        return Unsupported(f"'input[{longest}]' has {len(texts[longest])} characters; '{target.model}' takes at "
                           f"most {chars} per input.", "input", "invalid_value")
    allowed = TITAN_DIMENSIONS if kind == TITAN else (COHERE_DIMENSIONS,)
    if request.dimensions is not None and request.dimensions not in allowed:
        return Unsupported(f"'{target.model}' makes embeddings of {', '.join(map(str, allowed))} dimensions, not "
                           f"{request.dimensions}.", "dimensions", "invalid_value")
    return None


def invocations(request: EmbeddingsRequest, target: Target) -> list[dict[str, Any]]:
    """The InvokeModel bodies that embed every input, in input order."""
    if family(target) == TITAN:
        extra = {"dimensions": request.dimensions} if request.dimensions else {}
        return [{"inputText": text, "normalize": True, **extra} for text in request.texts]
    return [{"texts": request.texts, "input_type": "search_document", "truncate": "NONE"}]


def vectors(body: dict[str, Any]) -> list[list[float]]:
    """The float vectors of one InvokeModel answer (Titan: one; Cohere: one per text, either shape)."""
    if "embedding" in body:
        return [_floats(body["embedding"])]
    found = body.get("embeddings")
    if isinstance(found, dict):  # Cohere's "embeddings_by_type" answer
        found = found.get("float")
    if not isinstance(found, list):
        raise ValueError("no embeddings in the answer")
    return [_floats(v) for v in found]


def input_tokens(body: dict[str, Any], headers: dict[str, str]) -> int | None:
    """Tokens Bedrock counted for one call: Titan's body says; every model's response header does too."""
    counted = body.get("inputTextTokenCount")
    if isinstance(counted, int) and not isinstance(counted, bool) and counted >= 0:
        return counted
    header = headers.get(TOKEN_COUNT_HEADER, "")
    return int(header) if header.isascii() and header.isdigit() else None


def to_completion(request: EmbeddingsRequest, target: Target,
                  answers: list[tuple[dict[str, Any], dict[str, str]]]) -> Completion:
    """The OpenAI embeddings list for the answers of ``invocations`` (in the same order)."""
    found = [v for body, _ in answers for v in vectors(body)]
    if len(found) != len(request.texts):
        raise ValueError(f"{len(found)} embeddings for {len(request.texts)} inputs")
    counts = [input_tokens(body, headers) for body, headers in answers]
    if None in counts:  # unreported: counted here, so the caller's answer still carries usage
        prompt = sum(tokens.count_text(text, target.tokenizer) for text in request.texts)
    else:
        prompt = sum(c for c in counts if c is not None)
    body = embeddings_list(found, target.model, prompt, request.encoding_format)
    return Completion(body=body, usage=Usage(prompt, 0))


def _answered_tokens(bodies: list[dict[str, Any]], outcomes: list[Any], target: Target) -> int:
    """The input tokens of the calls that answered (as Bedrock counted them, else counted here)."""
    total = 0
    for body, outcome in zip(bodies, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            continue
        raw, headers = outcome
        try:
            counted = input_tokens(decode(raw), headers)
        except ValueError:
            counted = None
        texts = [body["inputText"]] if "inputText" in body else body.get("texts", [])
        total += counted if counted is not None else sum(tokens.count_text(t, target.tokenizer) for t in texts)
    return total


def decode(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the answer is not a JSON object")
    return body


def _floats(vector: Any) -> list[float]:
    if not isinstance(vector, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
        raise ValueError("an embedding is not a list of numbers")
    return [float(x) for x in vector]


async def complete(calls: Calls, request: EmbeddingsRequest, target: Target, ctx: CallContext,
                   created: int) -> Completion:
    """InvokeModel per body (Titan: one per input, concurrently in the pool), into one OpenAI list. Every call
    is waited for: when one fails, the tokens of those that answered are billed all the same (``consumed``)."""
    bodies = invocations(request, target)
    outcomes = await asyncio.gather(*(
        calls.invoke(ctx, target.region, {"modelId": target.deployment, "body": json.dumps(body),
                                          "contentType": "application/json", "accept": "application/json"})
        for body in bodies), return_exceptions=True)
    failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
    if failure is not None:
        if isinstance(failure, ProviderError):
            failure.consumed = (_answered_tokens(bodies, outcomes, target), 0)
        raise failure
    answers = [o for o in outcomes if not isinstance(o, BaseException)]
    try:
        return to_completion(request, target, [(decode(raw), headers) for raw, headers in answers])
    except ValueError as exc:
        raise ProviderError(f"Bedrock returned an unreadable embeddings answer ({exc}).", provider=PROVIDER,
                            kind="malformed", retryable=True) from exc


OPERATION = BedrockOperation(serves=lambda target: target.kind == EMBEDDINGS, complete=complete, check=check)

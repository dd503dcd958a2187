"""OpenAI Embeddings as an operation: the request model, its prompt view, usage and rendering.

``input`` is a string, a list of strings, a token array or a list of token arrays. Limits are
OpenAI's for the call (2,048 inputs, 8,192 tokens per input, no empty input); a provider with
tighter ones (Bedrock's Cohere Embed: 96 texts) says so in its adapter's ``check``. Embeddings
produce no output tokens: only the input is reserved and priced.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway_lib.errors import InvalidRequest
from gateway_lib.guardrails import tokens
from gateway_lib.operations.base import Operation
from gateway_lib.operations.chat_params import whole_numbers
from gateway_lib.operations.schema import Message, Priority, ProviderHint
from gateway_lib.providers.base import EMBEDDINGS, Usage

MAX_INPUTS = 2048  # OpenAI: inputs per call
MAX_INPUT_TOKENS = 8192  # OpenAI text-embedding-3 and Titan v2: tokens per input
TOKEN_ENCODING = "cl100k_base"  # the encoding token arrays are written in (text-embedding-3, ada-002)

Input = str | list[str] | list[int] | list[list[int]]


class EmbeddingsRequest(BaseModel):
    """OpenAI Embeddings request, plus the gateway's routing hints."""

    model_config = ConfigDict(extra="forbid", strict=True)
    operation: ClassVar[str] = EMBEDDINGS
    produces_output: ClassVar[bool] = False

    model: str = Field(min_length=1, max_length=256)
    input: Input
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    user: str | None = Field(default=None, max_length=256)
    provider_hint: ProviderHint = None
    priority: Priority | None = None

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, payload: Any) -> Any:
        return whole_numbers(payload, ("dimensions",)) if isinstance(payload, dict) else payload

    @model_validator(mode="after")
    def _within_limits(self) -> EmbeddingsRequest:
        items = self.items
        if not items:
            raise _invalid("'input' must not be empty.")
        if len(items) > MAX_INPUTS:
            raise _invalid(f"'input' has {len(items)} items; at most {MAX_INPUTS} are allowed per request.")
        for index, item in enumerate(items):
            if len(item) == 0:
                raise _invalid(f"'input[{index}]' must not be empty.")
            if isinstance(item, list) and not _decodable(item):
                raise _invalid(f"'input[{index}]' holds a token id outside the {TOKEN_ENCODING} vocabulary.")
            if _input_tokens(item) > MAX_INPUT_TOKENS:
                raise _invalid(f"'input[{index}]' is longer than {MAX_INPUT_TOKENS} tokens, the most one input may "
                               "have; split it.")
        return self

    # -- what the pipeline and adapters read --

    stream: ClassVar[bool] = False  # embeddings never stream
    requested_max_tokens: ClassVar[int | None] = None
    max_completion_tokens: ClassVar[int | None] = None
    tools: ClassVar[None] = None
    response_format: ClassVar[None] = None
    choices: ClassVar[int] = 1

    def features(self) -> frozenset[str]:
        return frozenset()

    @property
    def items(self) -> Sequence[str | list[int]]:
        """The inputs as a list: strings, or token arrays."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]  # type: ignore[list-item]  # one token array
        return self.input  # type: ignore[return-value]  # a list of strings or of token arrays

    @cached_property
    def texts(self) -> list[str]:
        """Every input as text (token arrays decoded), for screening, estimates and text-only providers."""
        return [item if isinstance(item, str) else tokens.encoding(TOKEN_ENCODING).decode(item)
                for item in self.items]

    @property
    def messages(self) -> Sequence[Message]:
        """One message holding every input: screened and counted once, whatever the number of inputs."""
        return [Message(role="user", content="\n".join(self.texts))]

    def wire_body(self, max_tokens: int | None = None) -> dict[str, Any]:
        """The OpenAI embeddings body as the caller set it, without the gateway's fields (a relay adds model)."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"model", "provider_hint", "priority"})


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for 'input': {message}", code="invalid_value", param="input")


def _decodable(item: list[int]) -> bool:
    """Every id names a token: the vocabulary's ids have gaps (cl100k_base assigns none to 100256, 100261-100275)."""
    encoding = tokens.encoding(TOKEN_ENCODING)
    if any(t < 0 or t > encoding.max_token_value for t in item):
        return False
    try:
        encoding.decode_bytes(item)
    except KeyError:
        return False
    return True


def _input_tokens(item: str | list[int]) -> int:
    if isinstance(item, list):
        return len(item)
    # A token is at least one byte and a character at most four: only long texts need counting.
    return 0 if len(item) * 4 <= MAX_INPUT_TOKENS else tokens.count_text(item, TOKEN_ENCODING)


# -- the answer: OpenAI's list shape --

def answer_usage(body: dict[str, Any]) -> Usage | None:
    reported = body.get("usage")
    prompt = reported.get("prompt_tokens") if isinstance(reported, dict) else None
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 0:
        return None
    return Usage(prompt, 0)


def encoded(vector: Sequence[float], encoding_format: str | None) -> list[float] | str:
    """One embedding as the caller asked: floats, or base64 of little-endian float32 (OpenAI's base64)."""
    if encoding_format != "base64":
        return list(vector)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_list(vectors: Sequence[Sequence[float]], model: str, prompt_tokens: int,
                    encoding_format: str | None) -> dict[str, Any]:
    """An OpenAI ``list`` of ``embedding`` objects."""
    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v, encoding_format)}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


EMBEDDINGS_OP: Operation[EmbeddingsRequest] = Operation(
    name=EMBEDDINGS, route="embeddings", prompt=lambda request: request, usage=answer_usage,
    answer_text=lambda body: "",
)

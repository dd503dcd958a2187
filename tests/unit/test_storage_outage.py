"""A storage freeze: one caller's queued requests are answered within a bound, and the ledger still balances.

``scenario_frozen_storage`` drives the real request path (``pipeline.complete``: override read, row lock,
reservation, a provider that answers at once, settle) of a strict and a leased runtime side by side while
their store is frozen: calls hang, as a stopped storage process leaves them. Here on the memory store with
the storage bounds shrunk; tests/integration/test_storage_outage_azurite.py freezes Azurite (SIGSTOP) for
45 s with the real bounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing import ledger
from gateway_lib.config.settings import Settings
from gateway_lib.errors import ServiceUnavailable
from gateway_lib.guardrails import tokens
from gateway_lib.http.edge import Scope
from gateway_lib.operations import pipeline
from gateway_lib.operations.chat import CHAT_COMPLETIONS
from gateway_lib.operations.schema import ChatRequest
from gateway_lib.providers.base import Completion, Usage
from gateway_lib.providers.mock import Call, MockProvider
from gateway_lib.quota.counters import Counters
from gateway_lib.runtime import Runtime, build_runtime
from gateway_lib.storage.memory import MemoryTableStore

BASE_ENV = {"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
            "GATEWAY_ENVIRONMENT": "test", "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9", "AZURE_OPENAI_AUTH": "api_key",
            "AZURE_OPENAI_API_KEY": "k"}
CHAT = ChatRequest.model_validate({"model": "chat-default", "messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 20})
CONCURRENT = 20


def runtime(env: Mapping[str, str]) -> Runtime:
    rt = build_runtime(Settings.from_env(BASE_ENV | dict(env)))
    def answer(call: Call) -> Completion:  # at once: the request's time is the gateway's own
        return Completion(body={"choices": [{"message": {"role": "assistant", "content": "ok"}}]}, usage=Usage(9, 3))

    return dataclasses.replace(rt, providers={name: MockProvider(answer, name=name) for name in rt.providers})


def caller_of(rt: Runtime, app: str) -> Caller:
    tier = rt.settings.tiers.tiers["standard"]
    return Caller(app_id=app, tenant_id="00000000-0000-4000-8000-000000000de0", user_id=None, tier=tier,
                  roles=frozenset(), scopes=frozenset(), is_admin=False)


async def one_request(rt: Runtime, caller: Caller, n: int) -> tuple[str, float]:
    """One non-streamed chat request through the pipeline: ("ok" | "503", seconds to its answer)."""
    started = time.monotonic()
    scope = Scope(request_id=f"{caller.app_id}-{n}", trace_id="0" * 32, traceparent="", route="chat")
    try:
        await pipeline.complete(rt, scope, caller, CHAT_COMPLETIONS, CHAT)
    except ServiceUnavailable as error:
        assert error.code == "storage_unavailable" and error.retry_after, error.body()
        return "503", time.monotonic() - started
    return "ok", time.monotonic() - started


async def balanced(rt: Runtime, caller: Caller) -> tuple[bool, str]:
    """Counters match the cost rows exactly, and nothing is left reserved."""
    prefix = rt.settings.storage.table_prefix
    entity = await rt.store.get(ledger.usage_table(prefix), ledger.table_key(caller.key), "counters")
    counters = Counters.from_entity(entity).rolled(datetime.now(UTC))
    rows = [r async for r in ledger.iter_cost_rows(rt.store, prefix, caller.key, limit=10_000)]
    tokens, usd = sum(r.total_tokens for r in rows), sum((r.cost_usd for r in rows), Decimal(0))
    state = (f"counters {counters.day_tokens} tokens / {counters.day_usd} USD, in flight {counters.in_flight_tokens}; "
             f"{len(rows)} cost rows, {tokens} tokens / {usd} USD")
    return (counters.day_tokens, counters.day_usd, counters.in_flight_tokens) == (tokens, usd, 0), state


async def scenario_frozen_storage(runtimes: dict[str, Runtime], freeze: Callable[[], None],
                                  thaw: Callable[[], None], frozen_for: float, bound: float) -> None:
    """Two waves of ``CONCURRENT`` requests of one caller per runtime during the freeze (its start, its middle):
    each answered (served or 503 storage_unavailable) within ``bound``; served again after the thaw; and the
    counters balance the cost rows, nothing in flight, once the process has settled what it owed."""
    callers = {mode: caller_of(rt, f"outage-{mode}") for mode, rt in runtimes.items()}
    for mode, rt in runtimes.items():  # warm: tables made, the counters row known, a lease held in leased mode
        for n in range(3):
            assert (await one_request(rt, callers[mode], n))[0] == "ok"

    async def wave(first: int) -> list[tuple[str, str, float]]:
        answers = await asyncio.gather(*(one_request(rt, callers[mode], first + i) for mode, rt in runtimes.items()
                                         for i in range(CONCURRENT)))
        modes = [mode for mode in runtimes for _ in range(CONCURRENT)]
        return [(mode, outcome, took) for mode, (outcome, took) in zip(modes, answers, strict=True)]

    freeze()
    frozen_at = time.monotonic()
    try:
        answered = await wave(100)
        await asyncio.sleep(max(0.0, frozen_at + frozen_for / 2 - time.monotonic()))
        answered += await wave(200)
        await asyncio.sleep(max(0.0, frozen_at + frozen_for - time.monotonic()))
    finally:
        thaw()
    slowest = max(took for _, _, took in answered)
    assert slowest <= bound, f"a request waited {slowest:.1f} s for storage (bound {bound} s): {sorted(answered)[-3:]}"
    for mode in runtimes:
        outcomes = [outcome for m, outcome, _ in answered if m == mode]
        assert "503" in outcomes, f"{mode}: nothing refused during the freeze: {outcomes}"

    for mode, rt in runtimes.items():  # recovery needs no help: the next request probes
        recovered_by = time.monotonic() + 3 * bound
        while (await one_request(rt, callers[mode], 300))[0] != "ok":
            assert time.monotonic() < recovered_by, f"{mode}: not serving again after the thaw"
            await asyncio.sleep(0.2)

    settled_by = time.monotonic() + 90  # reservations of unknown outcome resolved, journals committed, leases back
    for mode, rt in runtimes.items():
        while not (result := await balanced(rt, callers[mode]))[0]:
            assert time.monotonic() < settled_by, f"{mode}: the ledger does not balance: {result[1]}"
            await asyncio.sleep(0.5)


@pytest.fixture
def shrunk_bounds(monkeypatch: pytest.MonkeyPatch) -> float:
    """Storage bounds a tenth of production's, so a unit test freezes for seconds; returns the request bound.
    The tokenizer's tables are built first: inside the bound the first request would build them."""
    from gateway_lib.storage import circuit

    tokens.preload(("o200k_base",))
    monkeypatch.setattr(circuit, "CALL_SECONDS", 0.5)
    monkeypatch.setattr(circuit, "HOLD_SECONDS", 0.5)
    monkeypatch.setattr(circuit, "REQUEST_SECONDS", 0.8)
    return 0.8


def test_a_frozen_store_answers_one_callers_queued_requests_within_the_bound(shrunk_bounds: float) -> None:
    async def go() -> None:
        runtimes = {mode: runtime({"GATEWAY_STORAGE_MODE": "memory", "GATEWAY_QUOTA_MODE": mode})
                    for mode in ("strict", "leased")}
        stores = [getattr(rt.store, "inner", rt.store) for rt in runtimes.values()]
        assert all(isinstance(s, MemoryTableStore) for s in stores)
        try:
            await scenario_frozen_storage(runtimes, lambda: [s.freeze() for s in stores] and None,
                                          lambda: [s.thaw() for s in stores] and None, frozen_for=4.0,
                                          bound=shrunk_bounds + 0.4)
        finally:
            for rt in runtimes.values():
                await rt.aclose()

    asyncio.run(go())


def test_storage_known_down_refuses_at_once_and_calls_during_the_probe_wait_for_its_verdict() -> None:
    # A burst arriving as storage comes back meets the probe in flight (the first call to a restarted server is
    # slow): it is served once the probe answers, not refused.
    from gateway_lib.storage.circuit import Circuit, GuardedStore, StorageDown

    async def go() -> None:
        inner = MemoryTableStore()
        store = GuardedStore(inner, Circuit(hold=1.0), call_seconds=0.2)
        await store.ensure_tables(["t"])
        inner.freeze()
        with pytest.raises(StorageDown):  # timed out: down for as long as that cost (0.2 s)
            await store.get("t", "p", "r")
        started = time.monotonic()
        with pytest.raises(StorageDown) as refused:
            await store.get("t", "p", "r")
        assert time.monotonic() - started < 0.05 and refused.value.retry_after >= 1
        await asyncio.sleep(0.25)  # the hold is over: the next call probes, still frozen for a moment
        probe = asyncio.ensure_future(store.get("t", "p", "r"))
        await asyncio.sleep(0.02)
        meanwhile = [asyncio.ensure_future(store.get("t", "p", "r")) for _ in range(5)]
        await asyncio.sleep(0.05)
        inner.thaw()
        assert await probe is None and [await m for m in meanwhile] == [None] * 5
        assert store.circuit.down_for() is None

    asyncio.run(go())

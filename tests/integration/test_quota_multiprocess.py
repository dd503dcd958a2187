"""Several OS processes (each its own store and Admission, like Function instances) hammer one caller.

Afterwards the counters must equal the sum of the cost rows exactly (no lost update) and the
admitted spend must stay within the budget plus the documented bound (docs/storage.md): zero
here, because every actual cost stays within its reservation.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import CostRow
from gateway_lib.errors import QuotaExceeded, RateLimited
from gateway_lib.quota.admission import Admission, Counters, Reservation
from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import StorageError
from tests.unit.test_quota import cost_rows, counters_of, make_caller, make_row, make_settings, make_tier

pytestmark = pytest.mark.integration

PROCESSES, TASKS, REQUESTS = 4, 6, 8  # 192 requests, 24 in flight at once on one counters row
BUDGET = Decimal("0.0500")
RESERVED_USD, RESERVED_TOKENS = Decimal("0.0020"), 2000
NOW = datetime(2025, 3, 14, 12, 0, 10, tzinfo=UTC)  # one fixed clock: windows never roll mid-test


def _caller() -> Caller:
    return make_caller(make_tier(usd_per_day=BUDGET, requests_per_minute=10_000))


@dataclass
class Outcome:
    ok: int = 0
    contention: int = 0  # 429 after losing the ETag race RESERVE_ATTEMPTS times
    quota: int = 0  # 429 insufficient_quota: the budget said no
    excess: Decimal = Decimal(0)  # sum of max(0, actual - reserved): the documented overspend bound
    round_trips: list[int] = field(default_factory=list)


def worker(connection_string: str, prefix: str, seed: int) -> Outcome:
    """One 'instance': its own event loop, store and Admission."""
    from tools import netguard

    netguard.install()
    return asyncio.run(_worker(connection_string, prefix, seed))


async def _worker(connection_string: str, prefix: str, seed: int) -> Outcome:
    store = AzureTableStore.from_connection_string(connection_string)
    outcome = Outcome()
    try:
        adm = Admission(store, make_settings(prefix), clock=lambda: NOW, rng=random.Random(seed))
        rng = random.Random(seed)
        await asyncio.gather(*(_requests(adm, rng, f"p{seed}t{t}", outcome) for t in range(TASKS)))
    finally:
        await store.aclose()
    return outcome


async def _requests(adm: Admission, rng: random.Random, name: str, outcome: Outcome) -> None:
    caller = _caller()
    for i in range(REQUESTS):
        request_id = f"{name}r{i}"
        try:
            res = await adm.reserve(caller, tokens=RESERVED_TOKENS, usd=RESERVED_USD, request_id=request_id)
        except RateLimited:
            outcome.contention += 1
            continue
        except QuotaExceeded:
            outcome.quota += 1
            continue
        await asyncio.sleep(rng.uniform(0, 0.01))  # "the provider call"
        prompt, completion = rng.randint(100, 1000), rng.randint(0, 1000)
        cost = (Decimal(prompt + completion) / RESERVED_TOKENS * RESERVED_USD).quantize(Decimal("0.0000000001"))
        outcome.round_trips.append(await _settle(adm, res, make_row(caller, request_id, NOW, prompt, completion, cost)))
        outcome.ok += 1
        outcome.excess += max(Decimal(0), cost - RESERVED_USD)


async def _settle(adm: Admission, res: Reservation, row: CostRow) -> int:
    for _ in range(5):  # what a caller of settle may do on StorageError: retry (settle is idempotent)
        try:
            return (await adm.settle(res, row)).round_trips
        except StorageError:
            pass
    raise AssertionError("settle never succeeded")


def test_many_processes_never_lose_an_update_or_overspend(azurite_connection_string: str, table_prefix: str) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(PROCESSES, mp_context=context) as pool:
        futures = [pool.submit(worker, azurite_connection_string, table_prefix, seed) for seed in range(PROCESSES)]
        results = [f.result(timeout=240) for f in futures]

    async def read_back() -> tuple[Counters, list[CostRow]]:
        store = AzureTableStore.from_connection_string(azurite_connection_string)
        try:
            key = _caller().key
            return await counters_of(store, key, table_prefix), await cost_rows(store, key, table_prefix)
        finally:
            await store.aclose()

    counters, rows = asyncio.run(read_back())
    admitted = sum(r.ok for r in results)
    excess = sum((r.excess for r in results), Decimal(0))
    spent = sum((r.cost_usd for r in rows), Decimal(0))
    trips = sorted(t for r in results for t in r.round_trips)
    print(f"\nadmitted={admitted} spent={spent} budget={BUDGET} quota={[r.quota for r in results]} "
          f"contention={[r.contention for r in results]} round_trips median={trips[len(trips) // 2]} max={trips[-1]}")
    assert admitted + sum(r.quota + r.contention for r in results) == PROCESSES * TASKS * REQUESTS
    assert len(rows) == admitted > 0
    assert counters.day_usd == spent and counters.month_usd == spent
    assert counters.day_tokens == sum(r.total_tokens for r in rows)
    assert counters.in_flight_tokens == 0 and counters.in_flight_usd == 0
    assert excess == 0 and spent <= BUDGET + excess
    assert sum(r.quota for r in results) > 0  # the budget, not luck, stopped the spending

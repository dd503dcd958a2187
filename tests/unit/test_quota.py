"""Admission reserve -> settle on the in-memory store, with an injected clock."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.auth.identity import Caller
from gateway_lib.billing import ledger
from gateway_lib.billing.ledger import CostRow, usage_table
from gateway_lib.config.settings import Settings
from gateway_lib.config.tiers import Tier
from gateway_lib.errors import InvalidRequest, QuotaExceeded, RateLimited, ServiceUnavailable
from gateway_lib.quota.admission import Admission, Reservation, tables, team_partition
from gateway_lib.quota.counters import EPOCH_SECONDS, Counters, epoch_of
from gateway_lib.quota.overrides import Override, get_override, put_override
from gateway_lib.storage.base import StorageError, TableStore, TransactionFailed
from gateway_lib.storage.memory import MemoryTableStore

T0 = datetime(2025, 3, 14, 12, 0, 10, tzinfo=UTC)


def make_settings(prefix: str = "t") -> Settings:
    return Settings.from_env({"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
                              "GATEWAY_STORAGE_MODE": "memory", "GATEWAY_TABLE_PREFIX": prefix,
                              "GATEWAY_ENVIRONMENT": "test", "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9"})


def make_tier(**limits: Any) -> Tier:
    base = make_settings().tiers.tiers["basic"]
    return replace(base, **{"requests_per_minute": 1000, "tokens_per_minute": 10**7, "tokens_per_day": 10**8,
                            "tokens_per_month": 10**9, "usd_per_day": Decimal(1000), "usd_per_month": Decimal(10000),
                            **limits})


def make_caller(tier: Tier | None = None, app: str = "app1", team: str | None = None) -> Caller:
    return Caller(app_id=app, tenant_id="tid", user_id=None, tier=tier or make_tier(), roles=frozenset(),
                  scopes=frozenset(), is_admin=False, team=team)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def make_row(caller: Caller, request_id: str, when: datetime, prompt: int, completion: int, cost: Decimal,
             status: str = "ok", http_status: int = 200) -> CostRow:
    return CostRow.for_caller(
        caller, request_id=request_id, time=when, route="chat.completions", task=None, alias="chat-default",
        provider="azure_openai", model="gpt-4o-mini", deployment="d", region="eastus", prompt_tokens_estimated=prompt,
        completion_tokens_estimated=completion, prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost,
        price_version="v1", latency_ms=12.5, status=status, http_status=http_status)


async def new_admission(store: TableStore | None = None, clock: Clock | None = None, prefix: str = "t",
                        **kwargs: Any) -> tuple[TableStore, Admission]:
    store = store or MemoryTableStore()
    admission = Admission(store, make_settings(prefix), clock=clock or Clock(), sleep=_no_sleep,
                          rng=random.Random(7), **kwargs)
    return store, admission


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


async def counters_of(store: TableStore, caller_key: str, prefix: str = "t") -> Counters:
    return Counters.from_entity(await store.get(usage_table(prefix), ledger.table_key(caller_key), "counters"))


async def cost_rows(store: TableStore, caller_key: str, prefix: str = "t") -> list[CostRow]:
    return [row async for row in ledger.iter_cost_rows(store, prefix, caller_key, limit=10_000)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- admission -------------------------------------------------------------------------------------

def test_admission_reserves_worst_case_and_returns_rate_headers() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        caller = make_caller(make_tier(requests_per_minute=10, tokens_per_minute=1000))
        res = await adm.reserve(caller, tokens=300, usd=Decimal("0.01"), request_id="r1")
        assert res.headers == {
            "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",
            "x-ratelimit-reset-requests": "50s", "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "700", "x-ratelimit-reset-tokens": "50s"}
        c = await counters_of(store, caller.key)
        assert (c.minute_requests, c.minute_tokens) == (1, 300)
        assert (c.in_flight_tokens, c.in_flight_usd) == (300, Decimal("0.01"))

    run(scenario())


def test_requests_per_minute_limit_is_429_until_the_next_minute() -> None:
    async def scenario() -> None:
        clock = Clock()
        _, adm = await new_admission(clock=clock)
        caller = make_caller(make_tier(requests_per_minute=2))
        for i in range(2):
            await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id=f"r{i}")
        with pytest.raises(RateLimited) as limited:
            await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="r3")
        assert limited.value.status == 429 and limited.value.retry_after == 50
        assert limited.value.headers["x-ratelimit-remaining-requests"] == "0"
        clock.advance(seconds=50)
        await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="r4")

    run(scenario())


def test_tokens_per_minute_counts_the_reservation_not_just_the_prompt() -> None:
    async def scenario() -> None:
        _, adm = await new_admission()
        caller = make_caller(make_tier(tokens_per_minute=1000))
        await adm.reserve(caller, tokens=600, usd=Decimal(0), request_id="a")
        with pytest.raises(RateLimited) as limited:
            await adm.reserve(caller, tokens=401, usd=Decimal(0), request_id="b")
        assert limited.value.code == "rate_limit_exceeded"
        await adm.reserve(caller, tokens=400, usd=Decimal(0), request_id="c")

    run(scenario())


def test_daily_token_quota_is_insufficient_quota_until_midnight() -> None:
    async def scenario() -> None:
        clock = Clock()
        _, adm = await new_admission(clock=clock)
        caller = make_caller(make_tier(tokens_per_day=1000))
        res = await adm.reserve(caller, tokens=800, usd=Decimal(0), request_id="a")
        await adm.settle(res, make_row(caller, "a", clock.now, 500, 300, Decimal(0)))
        with pytest.raises(QuotaExceeded) as spent:
            await adm.reserve(caller, tokens=201, usd=Decimal(0), request_id="b")
        assert (spent.value.status, spent.value.type, spent.value.code) == (429, "insufficient_quota",
                                                                            "insufficient_quota")
        assert spent.value.retry_after == (12 * 3600 - 10)
        clock.now = datetime(2025, 3, 15, 0, 0, 1, tzinfo=UTC)
        await adm.reserve(caller, tokens=1000, usd=Decimal(0), request_id="c")

    run(scenario())


def test_usd_budget_counts_in_flight_reservations() -> None:
    async def scenario() -> None:
        _, adm = await new_admission()
        caller = make_caller(make_tier(usd_per_month=Decimal("1.00")))
        await adm.reserve(caller, tokens=10, usd=Decimal("0.60"), request_id="a")
        with pytest.raises(QuotaExceeded) as spent:
            await adm.reserve(caller, tokens=10, usd=Decimal("0.41"), request_id="b")
        assert "monthly USD budget" in spent.value.message and spent.value.retry_after == 17 * 86400 + 12 * 3600 - 10
        await adm.reserve(caller, tokens=10, usd=Decimal("0.40"), request_id="c")

    run(scenario())


# ---- settle / release --------------------------------------------------------------------------------

def test_settle_replaces_the_reservation_with_actual_usage_in_two_round_trips() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        caller = make_caller()
        first = await adm.reserve(caller, tokens=1000, usd=Decimal("0.5"), request_id="r1")
        await adm.settle(first, make_row(caller, "r1", clock.now, 100, 50, Decimal("0.0123")))
        res = await adm.reserve(caller, tokens=1000, usd=Decimal("0.5"), request_id="r2")
        done = await adm.settle(res, make_row(caller, "r2", clock.now, 100, 50, Decimal("0.0123")))
        # The process remembers the row it last wrote: reserve = one conditional update, settle = one
        # transaction. (A write by another instance in between costs a 412 and a re-read.)
        assert done.round_trips == 2 and not done.already_settled  # the request's total
        c = await counters_of(store, caller.key)
        assert (c.day_tokens, c.month_usd, c.in_flight_tokens, c.in_flight_usd, c.minute_tokens) == (
            300, Decimal("0.0246"), 0, Decimal(0), 300)

    run(scenario())


def test_first_request_of_a_process_pays_for_tables_override_and_directory() -> None:
    async def scenario() -> int:
        clock = Clock()
        _, adm = await new_admission(clock=clock)
        caller = make_caller()
        res = await adm.reserve(caller, tokens=10, usd=Decimal(0), request_id="r1")
        return (await adm.settle(res, make_row(caller, "r1", clock.now, 5, 5, Decimal(0)))).round_trips

    assert run(scenario()) == 3 + 1 + 2 + 2 + 1  # tables, override read, get + insert, directory read + listing, transaction


def test_retried_settle_is_counted_once() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        caller = make_caller()
        res = await adm.reserve(caller, tokens=100, usd=Decimal("0.1"), request_id="r1")
        row = make_row(caller, "r1", clock.now, 10, 20, Decimal("0.002"))
        assert not (await adm.settle(res, row)).already_settled
        assert (await adm.settle(res, row)).already_settled
        c = await counters_of(store, caller.key)
        assert (c.day_tokens, c.day_usd) == (30, Decimal("0.002"))
        assert [r.request_id for r in await cost_rows(store, caller.key)] == ["r1"]

    run(scenario())


def test_release_drops_the_reservation_and_still_writes_one_cost_row() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        caller = make_caller()
        res = await adm.reserve(caller, tokens=100, usd=Decimal("0.1"), request_id="r1")
        row = replace(make_row(caller, "r1", clock.now, 0, 0, Decimal(0)), status="error", http_status=502,
                      error_code="bad_gateway", provider=None)
        await adm.release(res, row)
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.day_tokens, c.minute_requests, c.minute_tokens) == (0, 0, 1, 0)
        [stored] = await cost_rows(store, caller.key)
        assert (stored.status, stored.http_status, stored.error_code, stored.provider) == (
            "error", 502, "bad_gateway", None)

    run(scenario())


def test_settle_after_the_minute_rolled_leaves_the_new_minute_alone() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        caller = make_caller()
        res = await adm.reserve(caller, tokens=100, usd=Decimal(0), request_id="r1")
        clock.advance(seconds=60)
        await adm.settle(res, make_row(caller, "r1", clock.now, 10, 10, Decimal(0)))
        c = await counters_of(store, caller.key)
        assert (c.minute_requests, c.minute_tokens, c.day_tokens, c.in_flight_tokens) == (0, 0, 20, 0)

    run(scenario())


def test_leaked_reservations_expire_after_two_epochs() -> None:
    async def scenario() -> None:
        clock = Clock()
        _, adm = await new_admission(clock=clock)
        caller = make_caller(make_tier(tokens_per_day=1000))
        await adm.reserve(caller, tokens=1000, usd=Decimal(0), request_id="crashed")  # never settled
        clock.advance(seconds=EPOCH_SECONDS)
        with pytest.raises(QuotaExceeded):
            await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="still-blocked")
        clock.advance(seconds=EPOCH_SECONDS)
        await adm.reserve(caller, tokens=1000, usd=Decimal(0), request_id="after-expiry")

    run(scenario())


def test_a_request_whose_epoch_turns_before_its_write_is_settled_from_the_generation_it_went_to() -> None:
    # Found by the leased-mode interleaving test: the reservation went into the row's current generation
    # but carried the epoch of its start, so its settlement took it out of the previous one (clamped at 0),
    # leaving room held that nobody owned and taking other requests' room early.
    async def scenario() -> None:
        boundary = datetime.fromtimestamp((epoch_of(T0) + 1) * EPOCH_SECONDS, UTC)
        clock = Clock(boundary - timedelta(seconds=1))
        store, adm = await new_admission(clock=clock)
        caller = make_caller()
        await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="held")  # stays in flight
        ready = adm._ensure_tables

        async def epoch_turns_meanwhile() -> int:
            trips = await ready()
            clock.advance(seconds=2)
            return trips

        adm._ensure_tables = epoch_turns_meanwhile  # type: ignore[method-assign]
        straddler = await adm.reserve(caller, tokens=300, usd=Decimal("0.03"), request_id="straddler")
        assert straddler.epoch == epoch_of(T0), "the scenario needs a reservation stamped before the turn"
        await adm.settle(straddler, make_row(caller, "straddler", clock.now, 3, 4, Decimal("0.02")))
        c = await counters_of(store, caller.key)
        assert (c.reserved_tokens, c.prev_reserved_tokens) == (0, 100), "only the held request is in flight"
        assert c.in_flight_usd == Decimal("0.01") and c.day_usd == Decimal("0.02")

    run(scenario())


@pytest.mark.parametrize("mode", ["strict", "leased"])
def test_a_reservation_whose_epoch_is_gone_from_the_row_is_refused_and_holds_nothing(mode: str) -> None:
    # Found by the interleaving test run across the storage thread, whose clock outran storage: a reservation
    # written two epoch turns after it was stamped landed in the current generation, and its settlement (from
    # the long-gone generation of its epoch) took nothing back: room held by nobody until it expired.
    from gateway_lib.quota.leases import LeasedAdmission

    async def scenario() -> None:
        clock = Clock()
        store = MemoryTableStore()
        kind = LeasedAdmission if mode == "leased" else Admission
        adm = kind(store, make_settings(), clock=clock, sleep=_no_sleep, rng=random.Random(7))
        caller = make_caller()
        first = await adm.reserve(caller, tokens=100, usd=Decimal("0.01"), request_id="first")
        await adm.settle(first, make_row(caller, "first", clock.now, 3, 4, Decimal("0.005")))
        if isinstance(adm, LeasedAdmission):
            await adm._return_leases(idle_for=0.0)  # so that the next request asks the row for room
        await adm.flush()
        before = await counters_of(store, caller.key)
        ready = adm._ensure_tables

        async def two_epochs_pass_meanwhile() -> int:  # e.g. an instance whose clock lags the row's writers
            trips = await ready()
            clock.advance(seconds=2 * EPOCH_SECONDS + 1)
            return trips

        adm._ensure_tables = two_epochs_pass_meanwhile  # type: ignore[method-assign]
        with pytest.raises(ServiceUnavailable) as refused:
            await adm.reserve(caller, tokens=300, usd=Decimal("0.03"), request_id="stale")
        assert refused.value.status == 503 and refused.value.retry_after == 1
        after = await counters_of(store, caller.key)
        assert after.in_flight_usd == before.in_flight_usd == 0, "nothing held for a request that was refused"
        assert after.day_usd == Decimal("0.005")
        await adm.aclose()

    run(scenario())


def test_concurrent_requests_never_lose_an_update_or_pass_a_limit() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        caller = make_caller(make_tier(requests_per_minute=30))
        outcomes: list[str] = []

        async def one(i: int) -> None:
            try:
                res = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"r{i}")
            except RateLimited:
                outcomes.append("429")
                return
            await asyncio.sleep(0)
            await adm.settle(res, make_row(caller, f"r{i}", clock.now, 3, 4, Decimal("0.0007")))
            outcomes.append("ok")

        await asyncio.gather(*(one(i) for i in range(60)))
        admitted = outcomes.count("ok")
        c = await counters_of(store, caller.key)
        rows = await cost_rows(store, caller.key)
        assert 0 < admitted <= 30 and c.minute_requests == admitted == len(rows)
        assert c.day_tokens == sum(r.total_tokens for r in rows) == 7 * admitted
        assert c.day_usd == sum((r.cost_usd for r in rows), Decimal(0)) and c.in_flight_tokens == 0

    run(scenario())


def test_two_instances_racing_on_one_caller_lose_no_update() -> None:
    # Within an instance requests queue on a per-row lock; across instances only the ETag protects the
    # counters. Two Admission objects on one store are two Function instances.
    async def scenario() -> None:
        clock = Clock()
        store, first = await new_admission(clock=clock)
        _, second = await new_admission(store=store, clock=clock)
        caller = make_caller(make_tier(requests_per_minute=1000))
        conflicts = 0
        real_update = store.update

        async def counting_update(table: str, entity: Any, etag: str) -> Any:
            nonlocal conflicts
            try:
                return await real_update(table, entity, etag)
            except Exception:
                conflicts += 1
                raise

        store.update = counting_update  # type: ignore[method-assign]

        admitted = 0

        async def one(adm: Admission, i: int) -> None:
            nonlocal admitted
            try:
                res = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"r{i}")
            except RateLimited:  # lost the race too often: the caller is told to slow down, nothing counted
                return
            admitted += 1
            await asyncio.sleep(0)
            await adm.settle(res, make_row(caller, f"r{i}", clock.now, 3, 4, Decimal("0.0007")))

        await asyncio.gather(*(one(first if i % 2 else second, i) for i in range(40)))
        c = await counters_of(store, caller.key)
        rows = await cost_rows(store, caller.key)
        assert conflicts > 0, "the two instances must really have raced on the row"
        assert admitted > 20 and len(rows) == c.minute_requests == admitted and c.in_flight_tokens == 0
        assert c.day_tokens == sum(r.total_tokens for r in rows) == 7 * admitted

    run(scenario())


# ---- overrides ------------------------------------------------------------------------------------

def test_override_limits_apply_after_the_cache_ttl() -> None:
    async def scenario() -> None:
        ticks = [0.0]
        store, adm = await new_admission(monotonic=lambda: ticks[0])
        caller = make_caller(make_tier(requests_per_minute=100))
        await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="a")
        await put_override(store, "t", caller.key, Override({"requests_per_minute": 1}))
        await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="b")  # cached: the tier limit still applies
        ticks[0] = 31.0
        with pytest.raises(RateLimited):
            await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="c")

    run(scenario())


def test_blocked_caller_gets_insufficient_quota_and_downgraded_caller_a_new_alias() -> None:
    async def scenario() -> None:
        _, adm = await new_admission()
        blocked, downgraded = make_caller(app="b"), make_caller(app="d")
        await adm.put_overrides(blocked.key, {"status": "blocked", "reason": "budget: spent"}, changed_by="admin")
        await adm.put_overrides(downgraded.key, {"status": "downgraded", "alias": "gpt-4o-mini"}, changed_by="admin")
        with pytest.raises(QuotaExceeded):
            await adm.reserve(blocked, tokens=1, usd=Decimal(0), request_id="a")
        assert await adm.effective_alias(downgraded, "gpt-4o") == "gpt-4o-mini"
        assert await adm.effective_alias(blocked, "gpt-4o") == "gpt-4o"

    run(scenario())


def test_admin_put_merges_and_validates() -> None:
    async def scenario() -> None:
        store, adm = await new_admission()
        key = "tid:app/#?:-"
        saved = await adm.put_overrides(key, {"limits": {"usd_per_day": "2.50", "requests_per_minute": 5}},
                                        changed_by="admin1")
        assert saved["limits"] == {"usd_per_day": "2.50", "requests_per_minute": 5} and saved["status"] == "active"
        await adm.put_overrides(key, {"status": "blocked"}, changed_by="admin2")
        saved = await adm.put_overrides(key, {"limits": {"requests_per_minute": None}}, changed_by="admin3")
        assert saved["limits"] == {"usd_per_day": "2.50"} and saved["status"] == "blocked"
        assert saved["updated_by"] == "admin3"
        stored = await get_override(store, "t", key)
        assert stored is not None and stored.limits == {"usd_per_day": Decimal("2.50")}
        bad_input = [  # (body, the param the 400 names)
            ({"limits": {"rpm": 1}}, "limits.rpm"), ({"limits": {"tokens_per_day": -1}}, "limits.tokens_per_day"),
            ({"limits": {"tokens_per_day": 1.9}}, "limits.tokens_per_day"),
            ({"limits": {"tokens_per_day": True}}, "limits.tokens_per_day"),
            ({"limits": {"tokens_per_day": "12"}}, "limits.tokens_per_day"),
            ({"limits": {"tokens_per_day": 10**16}}, "limits.tokens_per_day"),
            ({"limits": {"usd_per_day": "NaN"}}, "limits.usd_per_day"),
            ({"limits": {"usd_per_day": [1]}}, "limits.usd_per_day"),
            ({"limits": [1, 2]}, "limits"), ({"limits": "abc"}, "limits"),
            ({"status": "downgraded"}, "status"), ({"status": "paused"}, "status"),
            ({"status": "downgraded", "alias": 5}, "alias"), ({"status": "downgraded", "alias": "no-such"}, "alias"),
            ({"reason": {"a": 1}}, "reason"), ({"reason": "x" * 501}, "reason"),
            ({"oops": 1}, None),
        ]
        for bad, param in bad_input:
            with pytest.raises(InvalidRequest) as refused:
                await adm.put_overrides(key, bad, changed_by="admin")
            assert refused.value.param == param, bad
        saved = await adm.put_overrides(key, {"limits": {"tokens_per_day": 1e6, "usd_per_month": 12.5}},
                                        changed_by="admin")
        assert saved["limits"] == {"usd_per_day": "2.50", "tokens_per_day": 1_000_000, "usd_per_month": "12.5"}
        assert saved["status"] == "blocked", "nothing above was stored"

    run(scenario())


# ---- teams --------------------------------------------------------------------------------------------

def test_team_budget_is_shared_and_a_team_refusal_undoes_the_caller_reservation() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        await store.ensure_tables(tables("t"))
        await put_override(store, "t", "red", Override({"usd_per_day": Decimal("1.00")}), kind="team")
        alice, bob = make_caller(app="alice", team="red"), make_caller(app="bob", team="red")
        res = await adm.reserve(alice, tokens=10, usd=Decimal("0.70"), request_id="a1")
        assert res.round_trips == 3 + 1 + 2 + 1 + 2  # tables, caller override, caller counters, team override+counters
        with pytest.raises(QuotaExceeded) as spent:
            await adm.reserve(bob, tokens=10, usd=Decimal("0.40"), request_id="b1")
        assert "team red" in spent.value.message
        bob_counters = await counters_of(store, bob.key)
        assert (bob_counters.in_flight_usd, bob_counters.minute_requests) == (Decimal(0), 0)
        await adm.settle(res, make_row(alice, "a1", clock.now, 5, 5, Decimal("0.10")))
        team = Counters.from_entity(await store.get(usage_table("t"), team_partition("red"), "counters"))
        assert (team.day_usd, team.in_flight_usd) == (Decimal("0.10"), Decimal(0))
        await adm.reserve(bob, tokens=10, usd=Decimal("0.40"), request_id="b2")

    run(scenario())


def test_a_team_refusal_after_the_minute_turned_leaves_the_new_minutes_count_alone() -> None:
    async def scenario() -> None:
        clock = Clock(T0.replace(second=59))
        store, adm = await new_admission(clock=clock)
        _, other = await new_admission(store=store, clock=clock)  # another instance
        await store.ensure_tables(tables("t"))
        await put_override(store, "t", "red", Override({"usd_per_day": Decimal("1.00")}), kind="team")
        alice = make_caller(app="alice", team="red")
        lookup = adm._cached_override

        async def minute_turns_before_the_team_check(subject: str, kind: str, res: Reservation | None) -> Any:
            if kind == "team" and res is not None and res.request_id == "a1":
                clock.advance(seconds=2)  # 12:01:01, and another instance admits a request of the new minute
                await other.reserve(alice, tokens=10, usd=Decimal("0.20"), request_id="a2")
            return await lookup(subject, kind, res)

        adm._cached_override = minute_turns_before_the_team_check  # type: ignore[method-assign]
        with pytest.raises(QuotaExceeded):  # admitted by alice's row in minute 12:00, refused by the team in 12:01
            await adm.reserve(alice, tokens=10, usd=Decimal("0.90"), request_id="a1")
        c = await counters_of(store, alice.key)
        assert (c.minute, c.minute_requests) == ("2025-03-14T12:01", 1), "a2 still counts in the new minute"
        assert c.in_flight_usd == Decimal("0.20")

    run(scenario())


# ---- storage down -------------------------------------------------------------------------------------

def test_storage_down_fails_closed_with_503() -> None:
    async def scenario() -> None:
        store, adm = await new_admission()
        assert isinstance(store, MemoryTableStore)
        store.down = True
        with pytest.raises(ServiceUnavailable) as down:
            await adm.reserve(make_caller(), tokens=1, usd=Decimal(0), request_id="a")
        assert down.value.status == 503
        assert down.value.message == "quota storage is unavailable; request refused (fail-closed)"
        assert down.value.code == "storage_unavailable"

    run(scenario())


def test_fail_open_tier_is_admitted_unaccounted_and_its_row_says_so() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        assert isinstance(store, MemoryTableStore)
        caller = make_caller(make_tier(fail_open=True))
        store.down = True
        res: Reservation = await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="a")
        assert not res.accounted and res.headers == {}
        await adm.settle(res, make_row(caller, "a", clock.now, 1, 1, Decimal("0.01")))  # lost, logged, no raise
        res = await adm.reserve(caller, tokens=1, usd=Decimal(0), request_id="b")
        store.down = False
        await adm.settle(res, make_row(caller, "b", clock.now, 1, 1, Decimal("0.01")))
        [row] = await cost_rows(store, caller.key)
        assert (row.request_id, row.accounted) == ("b", False)
        assert (await counters_of(store, caller.key)).day_tokens == 0

    run(scenario())


def test_usage_view_reports_used_limits_and_remaining() -> None:
    async def scenario() -> None:
        clock = Clock()
        _, adm = await new_admission(clock=clock)
        caller = make_caller(make_tier(requests_per_minute=10, usd_per_day=Decimal("2")))
        res = await adm.reserve(caller, tokens=100, usd=Decimal("0.5"), request_id="a")
        await adm.settle(res, make_row(caller, "a", clock.now, 10, 20, Decimal("0.25")))
        view = await adm.usage_view(caller)
        assert view["minute"]["used"] == {"requests": 1, "tokens": 30}
        assert view["minute"]["remaining"]["requests"] == 9
        assert view["day"]["used"]["usd"] == "0.25" and view["day"]["remaining"]["usd"] == "1.75"
        assert view["status"] == "active" and view["in_flight"] == {"tokens": 0, "usd": "0"}
        by_key = await adm.usage_view(caller.key)
        assert by_key["tier"] == "basic" and by_key["day"]["used"]["tokens"] == 30
        unknown = await adm.usage_view("tid:someone-else:-")  # an admin asking about a caller never seen
        assert unknown["tier"] is None and unknown["day"]["limit"] == {"tokens": None, "usd": None}

    run(scenario())


class _LosesSettleRaces(MemoryTableStore):
    """Every settle transaction fails with 412 ``losses`` times before one is let through: a hot caller."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses

    async def transact(self, table: str, ops: Any) -> Any:
        if self.losses > 0:
            self.losses -= 1
            raise TransactionFailed("simulated 412", index=1, reason="precondition")
        return await super().transact(table, ops)


def test_a_settle_that_keeps_losing_the_etag_race_persists_instead_of_losing_the_cost_row() -> None:
    # 40 lost races is far past what a fixed retry count allowed; the settle keeps going until its deadline.
    async def scenario() -> None:
        clock = Clock()
        store = _LosesSettleRaces(losses=40)
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller()
        res = await adm.reserve(caller, tokens=1000, usd=Decimal("0.5"), request_id="hot-1")
        await adm.settle(res, make_row(caller, "hot-1", clock.now, 100, 50, Decimal("0.01")))
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.day_usd) == (0, Decimal("0.01"))
        assert [r.request_id for r in await cost_rows(store, caller.key)] == ["hot-1"]

    run(scenario())


def test_a_settle_gives_up_only_at_its_deadline() -> None:
    async def scenario() -> None:
        ticks = iter(range(0, 10_000, 5))  # each look at the monotonic clock moves it 5 s on
        store = _LosesSettleRaces(losses=10**6)
        _, adm = await new_admission(store=store, monotonic=lambda: float(next(ticks)))
        caller = make_caller()
        res = await adm.reserve(caller, tokens=10, usd=Decimal("0.01"), request_id="r")
        with pytest.raises(StorageError, match="kept losing the ETag race"):
            await adm.settle(res, make_row(caller, "r", T0, 1, 1, Decimal("0.001")))
        assert store.losses > 10**6 - 100, "bounded: it stopped at the deadline, not after a million tries"

    run(scenario())


def test_a_settle_rides_out_a_short_storage_outage() -> None:
    # Storage goes away after the reservation and comes back a few retries later: the cost row still lands.
    async def scenario() -> None:
        clock = Clock()
        store = MemoryTableStore()
        _, adm = await new_admission(store=store, clock=clock)
        caller = make_caller()
        res = await adm.reserve(caller, tokens=100, usd=Decimal("0.1"), request_id="blip")
        store.down = True
        sleeps = 0
        real_sleep = adm._rows._sleep

        async def sleep_then_recover(seconds: float) -> None:
            nonlocal sleeps
            sleeps += 1
            if sleeps == 3:
                store.down = False
            await real_sleep(0)

        adm._rows._sleep = sleep_then_recover
        await adm.settle(res, make_row(caller, "blip", clock.now, 10, 5, Decimal("0.002")))
        c = await counters_of(store, caller.key)
        assert sleeps == 3 and c.in_flight_tokens == 0 and c.day_usd == Decimal("0.002")
        assert [r.request_id for r in await cost_rows(store, caller.key)] == ["blip"]

    run(scenario())


def test_windows_only_roll_forward_so_a_lagging_clock_never_resets_a_newer_day() -> None:
    # Another instance, whose clock is ahead, already wrote today's counters: ours, seconds behind at
    # midnight, must not wipe the day's spend (the daily budget could then be spent twice).
    from gateway_lib.quota.counters import Counters

    today = Counters(minute="2026-03-11T00:00", minute_requests=3, minute_tokens=30, day="2026-03-11",
                     day_tokens=300, day_usd=Decimal("0.5"), month="2026-03", month_tokens=900,
                     month_usd=Decimal("2"))
    lagging = today.rolled(datetime(2026, 3, 10, 23, 59, 58, tzinfo=UTC))
    assert (lagging.minute_requests, lagging.day_usd, lagging.month_usd) == (3, Decimal("0.5"), Decimal("2"))
    moved_on = today.rolled(datetime(2026, 3, 11, 0, 1, tzinfo=UTC))
    assert (moved_on.minute_requests, moved_on.day_usd) == (0, Decimal("0.5"))


def test_losing_the_etag_race_every_time_is_a_429_for_the_callers_own_concurrency() -> None:
    from gateway_lib.storage.base import PreconditionFailed

    class AlwaysRaced(MemoryTableStore):
        async def update(self, table: str, entity: Any, etag: str) -> Any:
            raise PreconditionFailed("another instance wrote")

    async def scenario() -> None:
        store = AlwaysRaced()
        _, adm = await new_admission(store=store)
        caller = make_caller()
        await adm.reserve(caller, tokens=1, usd=Decimal("0.001"), request_id="first")  # creates the row
        with pytest.raises(RateLimited) as refused:
            await adm.reserve(caller, tokens=1, usd=Decimal("0.001"), request_id="second")
        assert refused.value.status == 429 and refused.value.retry_after == 1

    run(scenario())


def test_an_override_update_is_conditional_on_the_etag_it_read() -> None:
    # The admin route and budget enforcement edit the same row; neither may silently undo the other.
    from gateway_lib.quota.overrides import Override, get_override, put_override
    from gateway_lib.storage.base import PreconditionFailed

    async def scenario() -> None:
        store = MemoryTableStore()
        await store.ensure_tables(["toverrides"])
        await put_override(store, "t", "c", Override(status="active"))
        read = await get_override(store, "t", "c")
        assert read is not None and read.etag
        await put_override(store, "t", "c", replace(read, status="blocked", status_by="budget"))
        with pytest.raises(PreconditionFailed):
            await put_override(store, "t", "c", replace(read, reason="admin edit on a stale read"))
        stored = await get_override(store, "t", "c")
        assert stored is not None and stored.status == "blocked"

    run(scenario())


def test_a_commit_that_finds_its_counters_row_created_since_its_read_redoes_it_instead_of_calling_it_settled() -> None:
    # Only a cost row that exists means "already settled"; a counters row another writer inserted since
    # the read (the transaction's last op) is a lost race, redone on fresh numbers.
    from types import SimpleNamespace

    from gateway_lib.quota.counter_rows import AlreadySettled
    from gateway_lib.storage.base import PreconditionFailed

    async def scenario() -> None:
        store, adm = await new_admission()
        await store.ensure_tables([usage_table("t")])
        caller = make_caller()
        pk = ledger.table_key(caller.key)
        await store.insert(usage_table("t"), Counters().to_entity(pk))  # created by another instance
        row = make_row(caller, "r1", T0, 3, 4, Decimal("0.0007"))
        counted = SimpleNamespace(request_id="r1", round_trips=0)
        with pytest.raises(PreconditionFailed):
            await adm._rows.commit(None, Counters().to_entity(pk), [row], counted)
        await adm._rows.commit(await store.get(usage_table("t"), pk, "counters"), Counters().to_entity(pk),
                               [row], counted)
        with pytest.raises(AlreadySettled):  # the same row again: settled
            await adm._rows.commit(await store.get(usage_table("t"), pk, "counters"), Counters().to_entity(pk),
                                   [row], counted)

    run(scenario())


def test_the_caller_directory_follows_a_callers_tier_and_team_and_keeps_its_first_sighting() -> None:
    async def scenario() -> None:
        store = MemoryTableStore()
        await store.ensure_tables([ledger.callers_table("t")])
        directory = ledger.CallerDirectory(store, "t")
        assert await directory.register("k", None, "basic", T0) == 2  # read, list
        assert await directory.register("k", None, "basic", T0) == 0  # remembered
        assert await ledger.CallerDirectory(store, "t").register("k", None, "basic", T0) == 1  # another process
        assert await directory.register("k", "search", "standard", T0 + timedelta(days=1)) == 2
        [listed] = await ledger.list_callers(store, "t")
        assert (listed.team, listed.tier, listed.first_seen) == ("search", "standard", T0.isoformat())

    run(scenario())

"""Leased admission (GATEWAY_QUOTA_MODE=leased): blocks of quota, usage written behind.

The invariants are strict mode's: after the journal is committed the counters equal the sum of the
cost rows, every admitted request has exactly one row, nothing stays in flight, and no limit is passed.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest

from gateway_lib.billing import ledger
from gateway_lib.billing.ledger import table_key
from gateway_lib.config.settings import ConfigError, Settings
from gateway_lib.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway_lib.quota import leases
from gateway_lib.quota.admission import team_partition
from gateway_lib.quota.leases import LeasedAdmission
from gateway_lib.runtime import build_runtime
from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import StorageUnavailable, TableStore
from gateway_lib.storage.circuit import GuardedStore
from gateway_lib.storage.memory import MemoryTableStore
from gateway_lib.storage.threaded import StorageThread
from tests.unit.test_quota import (
    Clock,
    _no_sleep,
    cost_rows,
    counters_of,
    make_caller,
    make_row,
    make_settings,
    make_tier,
    run,
)
from tools.azurite import connection_string as azurite_connection_string


def leased(store: TableStore | None = None, clock: Clock | None = None, prefix: str = "t",
           flush_interval: float = 3600, **kwargs: Any) -> LeasedAdmission:
    """Leased admission whose flusher, by default, never ticks: tests flush by hand."""
    return LeasedAdmission(store or MemoryTableStore(), make_settings(prefix), clock=clock or Clock(), sleep=_no_sleep,
                           rng=random.Random(7), flush_interval=flush_interval, **kwargs)


async def idle(turns: int = 50) -> None:
    """Let every task that can run, run (the tests' stores answer without real I/O)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def serve(adm: LeasedAdmission, caller: Any, clock: Clock, i: int, cost: str = "0.0007") -> bool:
    """One request: reserve, yield, settle; False when refused."""
    try:
        res = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"r{i}")
    except (RateLimited, QuotaExceeded):
        return False
    await asyncio.sleep(0)
    await adm.settle(res, make_row(caller, f"r{i}", clock.now, 3, 4, Decimal(cost)))
    return True


def test_many_requests_cost_a_few_round_trips_and_every_row_lands_once() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=10_000))
        await serve(adm, caller, clock, 0)  # the first request pays for tables, override, directory
        before = store.round_trips
        served = [await serve(adm, caller, clock, i) for i in range(1, 401)]
        await adm.flush()
        trips = store.round_trips - before
        print(f"{trips} round trips for 400 requests")
        assert all(served)
        assert trips <= 400 * 0.1, f"{trips} round trips for 400 requests: leases and batches must amortise them"
        await adm.aclose()
        c = await counters_of(store, caller.key)
        rows = await cost_rows(store, caller.key)
        assert sorted(r.request_id for r in rows) == sorted(f"r{i}" for i in range(401))
        assert c.minute_requests == 401 and c.day_tokens == 7 * 401 == sum(r.total_tokens for r in rows)
        assert c.day_usd == sum((r.cost_usd for r in rows), Decimal(0)) and c.in_flight_tokens == 0
        assert c.in_flight_usd == 0 and c.minute_tokens == 7 * 401

    run(scenario())


def test_settlement_is_written_behind_and_the_usage_view_reads_its_own_writes() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller()
        assert await serve(adm, caller, clock, 1)
        assert await cost_rows(store, caller.key) == [], "the row waits for the journal"
        view = await adm.usage_view(caller)
        assert view["day"]["used"]["tokens"] == 7
        assert [r.request_id for r in await cost_rows(store, caller.key)] == ["r1"]

    run(scenario())


def test_limits_refuse_exactly_where_strict_mode_does() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=5))
        served = [await serve(adm, caller, clock, i) for i in range(8)]
        assert served == [True] * 5 + [False] * 3
        clock.advance(seconds=50)  # the next minute: a new lease, the old remainder given back
        assert await serve(adm, caller, clock, 9)
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.minute_requests == 1 and c.in_flight_tokens == 0 and len(await cost_rows(store, caller.key)) == 6

    run(scenario())


def test_a_budget_is_never_passed_by_concurrent_requests_on_two_instances() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        first, second = leased(store, clock), leased(store, clock)
        # 30 requests' worst case fits the daily budget; the actual cost is well below it.
        caller = make_caller(make_tier(usd_per_day=Decimal("0.030")))
        outcomes = await asyncio.gather(*(serve(first if i % 2 else second, caller, clock, i, "0.0005")
                                          for i in range(100)))
        await first.aclose()
        await second.aclose()
        admitted = sum(outcomes)
        c = await counters_of(store, caller.key)
        rows = await cost_rows(store, caller.key)
        assert 0 < admitted <= 30 and len(rows) == admitted == c.minute_requests
        assert c.day_usd == Decimal("0.0005") * admitted and c.in_flight_usd == 0

    run(scenario())


def test_two_instances_racing_lose_no_update() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        first, second = leased(store, clock), leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=100_000))

        async def worker(adm: LeasedAdmission, base: int) -> None:
            for i in range(100):
                assert await serve(adm, caller, clock, base + i)
                if i % 10 == 0:
                    await adm.flush()

        await asyncio.gather(*(worker(first if w % 2 else second, w * 1000) for w in range(8)))
        await first.aclose()
        await second.aclose()
        c = await counters_of(store, caller.key)
        rows = await cost_rows(store, caller.key)
        assert len(rows) == 800 == len({r.request_id for r in rows}) == c.minute_requests
        assert c.day_tokens == 7 * 800 and c.in_flight_tokens == 0 and c.in_flight_usd == 0

    run(scenario())


def ticking() -> Any:
    """A monotonic clock that moves 1 s per look: an outage outlasts the flush's patience at once."""
    ticks = iter(range(10**9))
    return lambda: float(next(ticks))


def test_a_journal_survives_a_storage_outage_and_lands_once() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock, monotonic=ticking())
        caller = make_caller()
        for i in range(5):
            assert await serve(adm, caller, clock, i)
        store.down = True
        await adm.flush()  # fails: kept for the next tick
        store.down = False
        await adm.flush()
        await adm.aclose()
        rows = await cost_rows(store, caller.key)
        c = await counters_of(store, caller.key)
        assert sorted(r.request_id for r in rows) == [f"r{i}" for i in range(5)]
        assert c.day_tokens == 35 and c.in_flight_tokens == 0

    run(scenario())


def test_rows_committed_after_an_outage_are_marked_late_and_indexed_once_each() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock, monotonic=ticking())
        caller = make_caller(make_tier(requests_per_minute=10_000))
        for i in range(120):  # more late rows than fit one transaction with their twins
            assert await serve(adm, caller, clock, i)
        store.down = True
        await adm.flush()  # kept for the next tick
        store.down = False
        clock.advance(minutes=3)  # the outage outlasted LATE_AFTER: the rollup may have passed these rows
        transactions: list[int] = []
        real_transact = store.transact

        async def counted(table: str, ops: Any) -> Any:
            transactions.append(len(ops))
            return await real_transact(table, ops)

        store.transact = counted  # type: ignore[method-assign]
        assert await serve(adm, caller, clock, 120)  # settled just now: on time
        await adm.flush()
        await adm.aclose()
        rows = {r.request_id: r for r in await cost_rows(store, caller.key)}
        index = [r async for r in ledger.iter_late_rows(store, "t", caller.key, limit=10_000)]
        assert len(rows) == 121 and not rows["r120"].late
        assert all(rows[f"r{i}"].late for i in range(120))
        assert sorted(x.row.request_id for x in index) == sorted(f"r{i}" for i in range(120)), "one twin per late row"
        assert all(x.committed_at == clock.now and x.row.cost_usd == rows[x.row.request_id].cost_usd for x in index)
        assert max(transactions) <= 100, transactions
        c = await counters_of(store, caller.key)
        assert c.day_tokens == 7 * 121 and c.in_flight_tokens == 0, "twins are an index, not usage"

    run(scenario())


@pytest.mark.parametrize("then", ["tick", "blip", "shutdown"])
@pytest.mark.parametrize("minutes_later", [0, 2])
def test_a_batch_that_landed_unconfirmed_and_is_then_cut_differently_loses_no_row(minutes_later: int,
                                                                                  then: str) -> None:
    # A batch lands but its reply is lost and storage stays away past the flush's patience: the journal keeps
    # it. The next flush cuts afresh: a longer batch (requests served since) or, once late, 49-row ones, which
    # overlap the landed rows only in part. Exactly the rows that landed are done; the rest are committed,
    # also when that flush's own first attempt is lost before it lands ("blip": the refusal that follows is
    # not its own attempt's doing) and when it is a shutdown's one flush, with no tick after it.
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock, monotonic=ticking())
        caller = make_caller(make_tier(requests_per_minute=10_000))
        for i in range(50):
            assert await serve(adm, caller, clock, i)
        real_transact = store.transact

        async def landed_then_outage(table: str, ops: Any) -> Any:
            await real_transact(table, ops)
            store.transact = real_transact  # type: ignore[method-assign]
            store.down = True
            raise StorageUnavailable("connection reset after commit")

        async def reset_before_it_lands(table: str, ops: Any) -> Any:
            store.transact = real_transact  # type: ignore[method-assign]
            raise StorageUnavailable("connection reset before commit")

        store.transact = landed_then_outage  # type: ignore[method-assign]
        await adm.flush()
        store.down = False
        clock.advance(minutes=minutes_later)
        for i in range(50, 80):
            assert await serve(adm, caller, clock, i)
        if then == "blip":
            store.transact = reset_before_it_lands  # type: ignore[method-assign]
        if then != "shutdown":
            await adm.flush()
        await adm.aclose()
        rows = await cost_rows(store, caller.key)
        c = await counters_of(store, caller.key)
        assert sorted(r.request_id for r in rows) == sorted(f"r{i}" for i in range(80))
        assert c.day_tokens == 7 * 80 and c.in_flight_tokens == 0, "every settlement applied once"
        assert not any(j.entries for j in adm._journals.values())

    run(scenario())


def test_a_shutdown_whose_batch_turns_late_while_it_waits_for_its_row_commits_every_row() -> None:
    # 99 rows, 40 s old when the shutdown's flush cuts them into one batch (on time even 15 s ahead). The row
    # is locked for 30 s (a lease write riding out a slow store): at its attempt the rows are late and, with
    # their twins, no longer fit one transaction. It is cut again at once: a shutdown has no next tick.
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=10_000))
        for i in range(99):
            assert await serve(adm, caller, clock, i)
        clock.advance(seconds=40)
        lock = adm._rows.lock(table_key(caller.key))
        await lock.acquire()
        closing = asyncio.create_task(adm.aclose())
        await asyncio.sleep(0.01)  # its flush has cut the batch and waits for the row
        clock.advance(seconds=30)
        lock.release()
        await closing
        rows = await cost_rows(store, caller.key)
        index = [r async for r in ledger.iter_late_rows(store, "t", caller.key, limit=1000)]
        assert (len(rows), len(index)) == (99, 99) and all(r.late for r in rows)
        assert not any(j.entries for j in adm._journals.values())

    run(scenario())


def test_requests_that_share_a_request_id_get_a_late_twin_each() -> None:
    # The request id may be the client's own x-request-id: a client retrying with the same id settles two
    # rows (their keys differ by settle time). Committed late together, each needs a twin of its own: a
    # twin keyed by request id alone would put one key twice in the transaction, refused on every tick.
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock, monotonic=ticking())
        caller = make_caller(make_tier(requests_per_minute=10_000))
        for _ in range(2):
            res = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="client-retry")
            await adm.settle(res, make_row(caller, "client-retry", clock.now, 3, 4, Decimal("0.0007")))
            clock.advance(seconds=1)
        clock.advance(minutes=3)  # an outage: committed late
        view = await adm.usage_view(caller)  # reads its own writes: commits the journal first
        rows = await cost_rows(store, caller.key)
        index = [r async for r in ledger.iter_late_rows(store, "t", caller.key, limit=100)]
        assert len(rows) == 2 and sorted(x.row.time for x in index) == sorted(r.time for r in rows)
        assert view["day"]["used"]["tokens"] == 14 and view["in_flight"]["tokens"] == 0

    run(scenario())


@pytest.mark.parametrize("late", [False, True])
def test_a_batch_whose_reply_was_lost_is_not_counted_twice(late: bool) -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller()
        for i in range(3):
            assert await serve(adm, caller, clock, i)
        if late:
            clock.advance(minutes=2)  # committed late: each row brings a twin for the rollup's late index
        real_transact = store.transact
        lost = 0

        async def committed_but_reply_lost(table: str, ops: Any) -> Any:
            nonlocal lost
            result = await real_transact(table, ops)
            if not lost:
                lost += 1
                clock.advance(seconds=1)  # a retry would build its twins under a later commit time
                raise StorageUnavailable("connection reset after commit")
            return result

        store.transact = committed_but_reply_lost  # type: ignore[method-assign]
        await adm.flush()
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert lost == 1 and len(await cost_rows(store, caller.key)) == 3
        assert c.day_tokens == 21 and c.in_flight_tokens == 0
        index = [r async for r in ledger.iter_late_rows(store, "t", caller.key, limit=100)]
        assert sorted(x.row.request_id for x in index) == (["r0", "r1", "r2"] if late else []), "one twin per row"

    run(scenario())


def test_a_long_outage_refuses_new_requests_instead_of_buffering_without_end(monkeypatch: Any) -> None:
    monkeypatch.setattr(leases, "MAX_PENDING_ROWS", 4)

    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock, monotonic=ticking())
        caller = make_caller()
        for i in range(4):
            assert await serve(adm, caller, clock, i)
        store.down = True
        await adm.flush()
        with pytest.raises(ServiceUnavailable) as refused:
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="r9")
        assert refused.value.code == "storage_unavailable"
        store.down = False
        await adm.flush()
        assert await serve(adm, caller, clock, 10)

    run(scenario())


def test_idle_leases_go_back_to_the_row() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        now = [0.0]
        adm = leased(store, clock, monotonic=lambda: now[0])
        caller = make_caller()
        for i in range(3):  # quick succession: the third request's lease is several requests deep
            assert await serve(adm, caller, clock, i)
        await adm.flush()
        held = await counters_of(store, caller.key)
        assert held.in_flight_tokens > 0, "an unused lease remainder is held on the row"
        await adm._return_leases(idle_for=leases.LEASE_IDLE_SECONDS)
        assert (await counters_of(store, caller.key)).in_flight_tokens == held.in_flight_tokens, "not idle yet"
        now[0] += leases.LEASE_IDLE_SECONDS
        await adm._return_leases(idle_for=leases.LEASE_IDLE_SECONDS)
        c = await counters_of(store, caller.key)
        assert c.in_flight_tokens == 0 and c.minute_requests == 3

    run(scenario())


def test_a_renewal_that_waited_for_the_row_keeps_its_callers_idle_time() -> None:
    # Found by the three-host load test through a storage outage: renewals queued behind a commit that rode out
    # the outage landed after the callers had gone quiet, and a renewal counted as a use, so their room stayed
    # reserved for another LEASE_IDLE_SECONDS past the last request.
    async def scenario() -> None:
        clock, store = Clock(), GatedStore()
        now = [0.0]
        adm = leased(store, clock, monotonic=lambda: now[0])
        adm._lease_size = lambda old: 8  # type: ignore[method-assign]
        caller = make_caller()
        pk = table_key(caller.key)
        admitted = [await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"r{i}") for i in range(2)]
        store.gate = asyncio.Event()
        admitted.append(await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="r2"))
        await store.held.wait()  # a quarter used: the renewal's write waits for the row
        current = adm._leases[pk]
        now[0] += leases.LEASE_IDLE_SECONDS  # the caller has gone quiet meanwhile
        gate, store.gate = store.gate, None
        gate.set()
        await idle()
        assert adm._leases[pk] is not current, "the renewal landed"
        await adm._return_leases(idle_for=leases.LEASE_IDLE_SECONDS)
        assert pk not in adm._leases, "its successor is as idle as the lease it replaced"
        for res in admitted:
            await adm.settle(res, make_row(caller, res.request_id, clock.now, 3, 4, Decimal("0.0007")))
        await adm.flush()
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.in_flight_usd, c.minute_requests) == (0, 0, 3)

    run(scenario())


class SlowPartitionStore(MemoryTableStore):
    """Holds every transaction on one partition (``slow``) until ``gate`` is set: a row riding out an outage."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: str | None = None
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    async def transact(self, table: str, ops: Any) -> Any:
        if ops[0].entity.partition_key == self.slow:
            self.held.set()
            await self.gate.wait()
        return await super().transact(table, ops)


def test_a_row_stuck_in_its_commit_holds_back_no_other_rows_commits_or_lease_returns() -> None:
    # The flusher's tick used to await every row's commit: one row riding out an outage (up to
    # SETTLE_OUTAGE_SECONDS) stopped every other caller's commits and lease returns on the instance.
    async def scenario() -> None:
        clock, store = Clock(), SlowPartitionStore()
        now = [0.0]
        adm = leased(store, clock, flush_interval=0.001, monotonic=lambda: now[0])
        stuck, other = make_caller(app="stuck"), make_caller(app="other")
        store.slow = table_key(stuck.key)
        assert await serve(adm, stuck, clock, 0)
        await asyncio.wait_for(store.held.wait(), 5)  # its commit waits for storage
        for i in range(1, 4):
            assert await serve(adm, other, clock, i)
            await asyncio.sleep(0.02)  # ticks go by
            assert len(await cost_rows(store, other.key)) == i, "the other row commits at every tick"
        now[0] += leases.LEASE_IDLE_SECONDS
        await asyncio.sleep(0.02)
        c = await counters_of(store, other.key)
        assert (c.in_flight_tokens, c.in_flight_usd) == (0, 0), "the other caller's idle lease went back"
        store.gate.set()
        await adm.aclose()
        c = await counters_of(store, stuck.key)
        assert (c.in_flight_tokens, c.day_tokens, len(await cost_rows(store, stuck.key))) == (0, 7, 1)

    run(scenario())


def test_team_counters_follow_and_a_team_refusal_returns_the_callers_room() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(team="blue")
        for i in range(4):
            assert await serve(adm, caller, clock, i)
        await adm.aclose()
        team = await counters_of(store, team_partition("blue"))
        assert team.day_tokens == 28 and team.in_flight_tokens == 0

        from gateway_lib.quota.overrides import Override, put_override

        await put_override(store, "t", "blue", Override(limits={"requests_per_minute": 4}), kind="team")
        adm = leased(store, clock)
        with pytest.raises(RateLimited):
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="r9")
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.minute_requests == 4 and c.in_flight_tokens == 0, "the refused request left nothing behind"

    run(scenario())


def test_a_request_a_held_lease_fits_is_admitted_and_settled_without_a_task_or_a_storage_call() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=10_000), team="blue")
        for i in range(3):  # the first requests grant the caller's and the team's leases
            assert await serve(adm, caller, clock, i)
        created: list[Any] = []
        loop = asyncio.get_running_loop()

        def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            created.append(coro)
            return asyncio.Task(coro, loop=lp, **kw)

        loop.set_task_factory(factory)
        trips = store.round_trips
        res = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="fast")
        await adm.settle(res, make_row(caller, "fast", clock.now, 3, 4, Decimal("0.0007")))
        loop.set_task_factory(None)
        assert (store.round_trips, created) == (trips, [])
        assert res.headers["x-ratelimit-limit-requests"] == "10000"

        # A fresh override that blocks the caller is not admitted from the lease: the full path refuses it.
        await adm.put_overrides(caller.key, {"status": "blocked", "reason": "budget: spent"}, changed_by="admin")
        await adm._cached_override(caller.key, "caller", None)
        with pytest.raises(QuotaExceeded):
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="blocked")
        await adm.aclose()
        assert sorted(r.request_id for r in await cost_rows(store, caller.key)) == ["fast", "r0", "r1", "r2"]
        team = await counters_of(store, team_partition("blue"))
        assert team.day_tokens == 28 and team.in_flight_tokens == 0

    run(scenario())


RUNTIME_ENV = {"AUTH_TENANT_IDS": "00000000-0000-4000-8000-000000000de0", "AUTH_AUDIENCES": "api://x",
               "GATEWAY_STORAGE_MODE": "memory", "GATEWAY_ENVIRONMENT": "test",
               "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9", "AZURE_OPENAI_AUTH": "api_key",
               "AZURE_OPENAI_API_KEY": "k"}


def test_the_runtime_picks_leased_admission_from_settings() -> None:
    env = RUNTIME_ENV
    assert Settings.from_env(env).storage.quota_mode == "strict"
    rt = build_runtime(Settings.from_env(env | {"GATEWAY_QUOTA_MODE": "leased"}), store=MemoryTableStore())
    assert isinstance(rt.admission, LeasedAdmission)
    with pytest.raises(ConfigError, match="GATEWAY_QUOTA_MODE"):
        Settings.from_env(env | {"GATEWAY_QUOTA_MODE": "eventual"})


def test_leased_mode_keeps_table_storage_on_a_thread_of_its_own_and_strict_mode_does_not() -> None:
    env = RUNTIME_ENV | {"GATEWAY_STORAGE_MODE": "table",  # never dialled: the clients connect lazily
                         "GATEWAY_STORAGE_CONNECTION_STRING": azurite_connection_string(9)}

    async def stores() -> tuple[object, object]:
        strict = build_runtime(Settings.from_env(env))
        leased_rt = build_runtime(Settings.from_env(env | {"GATEWAY_QUOTA_MODE": "leased"}))
        kinds = (strict.store, leased_rt.store)
        await strict.aclose()
        await leased_rt.aclose()
        return kinds

    strict_store, leased_store = run(stores())
    assert isinstance(strict_store, GuardedStore) and isinstance(leased_store, GuardedStore)  # both bounded
    assert isinstance(strict_store.inner, AzureTableStore) and isinstance(leased_store.inner, StorageThread)


def test_a_flush_commits_what_it_found_and_leaves_later_arrivals_for_the_next_tick() -> None:
    # Chasing entries that arrive during a commit turned the journal into back-to-back 2-row transactions.
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller()
        for i in range(10):
            assert await serve(adm, caller, clock, i)
        sizes: list[int] = []
        real_transact = store.transact

        async def slow_transact(table: str, ops: Any) -> Any:
            sizes.append(len(ops))
            for _ in range(5):
                await asyncio.sleep(0)  # while the commit is on the wire, more requests settle
            return await real_transact(table, ops)

        store.transact = slow_transact  # type: ignore[method-assign]
        flushing = asyncio.ensure_future(adm.flush())
        await asyncio.sleep(0)  # the flush starts and sees 10 entries
        for i in range(10, 15):
            assert await serve(adm, caller, clock, i)
        await flushing
        assert sizes == [11], "10 cost rows + the counters row, and nothing that arrived meanwhile"
        await adm.flush()
        assert sizes == [11, 6]

    run(scenario())


def test_a_half_used_lease_is_renewed_in_the_background_so_requests_never_wait_for_a_grant() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=100_000))
        foreground = 0
        real_grant = adm._grant

        async def counting_grant(*args: Any, **kwargs: Any) -> Any:
            nonlocal foreground
            foreground += 1
            return await real_grant(*args, **kwargs)

        adm._grant = counting_grant  # type: ignore[method-assign]
        for i in range(300):
            assert await serve(adm, caller, clock, i)
        assert foreground <= 3, f"{foreground} requests waited for a grant: renewals must run ahead of need"
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.minute_requests == 300 and c.in_flight_tokens == 0 and c.day_tokens == 7 * 300

    run(scenario())


class GatedStore(MemoryTableStore):
    """Holds every conditional update at ``gate`` once one is set: a grant caught in the middle of its write."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def update(self, table: str, entity: Any, etag: str) -> Any:
        if self.gate is not None:
            self.held.set()
            await self.gate.wait()
        return await super().update(table, entity, etag)


def test_a_lease_being_replaced_is_out_of_reach_until_its_remainder_is_given_back() -> None:
    # Found by the three-host load test (a budget passed by 8e-8 USD): a request too big for the lease asks
    # for a new one, whose write gives the old remainder back; smaller requests kept taking from the old
    # lease during that write, admitted on room the row no longer held.
    async def scenario() -> None:
        clock, store = Clock(), GatedStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller()
        admitted = [await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")]
        store.gate = asyncio.Event()
        big = asyncio.create_task(adm.reserve(caller, tokens=10, usd=Decimal("0.05"), request_id="b"))
        await store.held.wait()  # the new lease's write is under way, giving back 9 small requests' room
        small = [asyncio.create_task(adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"c{i}"))
                 for i in range(3)]
        idle_return = asyncio.create_task(adm._return_leases(idle_for=0.0))  # must not give it back twice
        for _ in range(5):
            await asyncio.sleep(0)
        assert not any(t.done() for t in small), "no request may take from the lease being replaced"
        store.gate.set()
        admitted += [await big, *await asyncio.gather(*small)]
        await idle_return
        lease = adm._leases[table_key(caller.key)]
        c = await counters_of(store, caller.key)
        assert c.in_flight_usd == sum((r.usd for r in admitted), Decimal(0)) + lease.usd, (
            "the row holds exactly what admitted requests and the live lease hold")
        assert c.minute_requests == len(admitted) + lease.requests
        for res in admitted:
            await adm.settle(res, make_row(caller, res.request_id, clock.now, 3, 4, Decimal("0.0007")))
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.in_flight_usd == 0 and c.day_usd == Decimal("0.0007") * 5 and c.minute_requests == 5

    run(scenario())


class ReplyLostStore(MemoryTableStore):
    """The next conditional update fails as unreachable storage, after landing (``landed``) or not."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next: bool | None = None  # None: behave; else the next update lands (True) or not (False)

    async def update(self, table: str, entity: Any, etag: str) -> Any:
        landed, self.fail_next = self.fail_next, None
        if landed is None:
            return await super().update(table, entity, etag)
        if landed:
            await super().update(table, entity, etag)
        raise StorageUnavailable("connection reset")


@pytest.mark.parametrize("landed", [False, True], ids=["write-not-landed", "reply-lost"])
def test_a_lease_replaced_during_an_outage_gives_its_room_back_exactly_once(landed: bool) -> None:
    # Found by the three-host load test with load running through a storage outage: a grant whose write failed
    # dropped the old lease, whose room, given back by that same write, stayed reserved on the row until its
    # epoch ended (15 min of blocked budget) when the write had not landed.
    async def scenario() -> None:
        clock, store = Clock(), ReplyLostStore()
        adm = leased(store, clock)
        adm._lease_size = lambda old: 10  # type: ignore[method-assign]
        caller = make_caller()
        pk = table_key(caller.key)
        first = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="a")  # a lease of 10
        store.fail_next = landed
        with pytest.raises(ServiceUnavailable):  # too big for the lease: a new grant, whose write fails
            await adm.reserve(caller, tokens=10, usd=Decimal("0.05"), request_id="b")
        assert pk not in adm._leases or not landed
        await adm._rows._resolvers[pk]  # the doubt is settled by the next read that storage answers
        await adm._return_leases(idle_for=0.0)
        c = await counters_of(store, caller.key)
        assert (c.in_flight_tokens, c.in_flight_usd) == (first.tokens, first.usd), (
            "the row holds what the admitted request holds: the old lease's room given back once, the new "
            "block's (if its write landed) too")
        await adm.settle(first, make_row(caller, "a", clock.now, 3, 4, Decimal("0.0007")))
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert c.in_flight_usd == 0 and c.in_flight_tokens == 0 and c.day_usd == Decimal("0.0007")

    run(scenario())


def test_a_doubtful_write_counts_as_missed_only_when_the_history_proves_it() -> None:
    from gateway_lib.quota.counter_rows import Doubt
    from gateway_lib.quota.counters import WRITERS_KEPT, Release

    room = Release("m", 1, 1, 10, Decimal("0.001"))
    after_x = Doubt("ours", room, "x", room)  # written on a row whose newest marker was "x"
    assert after_x.surely_missed(["y", "x", "w"])  # "x" still listed: ours would sit in front of it
    assert not after_x.surely_missed(["ours", "x"])  # it landed
    assert not after_x.surely_missed([f"m{i}" for i in range(WRITERS_KEPT)])  # "x" pushed out: unknown
    first = Doubt("ours", room, None, room)  # the row's first write
    assert first.surely_missed(["y"]) and first.surely_missed([""])  # nothing ever dropped: proof
    assert not first.surely_missed([f"m{i}" for i in range(WRITERS_KEPT)])


def test_a_lease_takes_at_most_half_the_room_left_so_other_instances_are_served_too() -> None:
    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        first, second = leased(store, clock), leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=40))
        for i in range(3):  # a busy caller on the first instance: its next lease is sized for many requests
            assert await serve(first, caller, clock, i)
        held = (await counters_of(store, caller.key)).minute_requests
        assert 3 + 1 < held <= 3 + (40 - 3) // 2, f"the first instance holds {held} of 40: a block, at most half the room"
        served_second = [await serve(second, caller, clock, 100 + i) for i in range(40)]
        assert served_second[0], "the other instance finds room while the first holds its lease"
        served_first = [await serve(first, caller, clock, 200 + i) for i in range(40)]
        await first.aclose()
        await second.aclose()
        # Everything the limit allows is served, by one instance or the other, and nothing more.
        assert 3 + sum(served_second) + sum(served_first) == 40
        c = await counters_of(store, caller.key)
        assert c.minute_requests == 40 and c.in_flight_tokens == 0 and len(await cost_rows(store, caller.key)) == 40

    run(scenario())


def test_a_journal_that_falls_behind_holds_new_requests_until_a_commit_lands(monkeypatch: Any) -> None:
    # Write-behind must not outrun storage: on a busy loop a commit can take longer than the caller's
    # traffic needs to fill another batch, and the journal then grew without end.
    monkeypatch.setattr(leases, "JOURNAL_MAX_BEHIND", 20)

    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)  # no flusher tick in tests: only the backpressure starts commits here
        caller = make_caller(make_tier(requests_per_minute=100_000))
        real_transact, longest = store.transact, 0

        async def slow_transact(table: str, ops: Any) -> Any:
            for _ in range(30):
                await asyncio.sleep(0)  # a slow commit: the workers keep settling meanwhile
            return await real_transact(table, ops)

        store.transact = slow_transact  # type: ignore[method-assign]

        async def worker(first: int) -> None:
            nonlocal longest
            for i in range(first, first + 40):
                assert await serve(adm, caller, clock, i)
                longest = max(longest, sum(len(j.entries) for j in adm._journals.values()))

        await asyncio.gather(*(worker(100 * w) for w in range(8)))
        assert 20 <= longest <= 20 + 8, f"the journal reached {longest} rows behind"
        await adm.aclose()
        c = await counters_of(store, caller.key)
        assert len(await cost_rows(store, caller.key)) == 320 == c.minute_requests and c.in_flight_tokens == 0

    run(scenario())


def test_requests_held_for_a_full_journal_are_let_in_oldest_first_and_newcomers_queue_behind(
        monkeypatch: Any) -> None:
    # Waking every held request on each commit let newcomers, which found room first, overtake them
    # until the wait ran out: under sustained load some requests were refused although commits landed.
    monkeypatch.setattr(leases, "JOURNAL_MAX_BEHIND", 4)

    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller(make_tier(requests_per_minute=100_000))
        for i in range(4):
            assert await serve(adm, caller, clock, i)  # the journal is full
        real_transact, allowed = store.transact, asyncio.Semaphore(0)

        async def gated_transact(table: str, ops: Any) -> Any:
            await allowed.acquire()  # one commit lands each time the test lets it
            return await real_transact(table, ops)

        store.transact = gated_transact  # type: ignore[method-assign]
        admitted: list[int] = []

        async def request(i: int) -> None:
            res = await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id=f"r{i}")
            admitted.append(i)
            await adm.settle(res, make_row(caller, f"r{i}", clock.now, 3, 4, Decimal("0.0007")))

        held = [asyncio.create_task(request(i)) for i in range(10, 20)]
        await idle()
        assert admitted == [], "the journal is full: all ten are held"
        assert len(adm._tasks) == 1, "one commit started for all of them, not one each"
        allowed.release()  # four rows land: the four oldest go in
        await idle()
        newcomer = asyncio.create_task(request(99))  # arrives to a journal with room, but six wait before it
        await idle()
        assert admitted == [10, 11, 12, 13]
        for _ in range(3):
            allowed.release()
            await idle()
        await asyncio.gather(*held, newcomer)
        assert admitted == [*range(10, 20), 99]
        store.transact = real_transact  # type: ignore[method-assign]
        await adm.aclose()
        assert len(await cost_rows(store, caller.key)) == 15

    run(scenario())


def test_a_teams_full_journal_holds_its_members_and_each_landed_team_commit_lets_them_in(monkeypatch: Any) -> None:
    # The team's row is written behind like a caller's: members held for it must not wait for a tick that
    # may be far off, and rows settled while they wait are committed at once.
    monkeypatch.setattr(leases, "JOURNAL_MAX_BEHIND", 4)
    monkeypatch.setattr(leases, "BEHIND_WAIT_SECONDS", 2.0)

    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)  # no flusher tick in tests
        members = [make_caller(make_tier(requests_per_minute=100_000), app=f"app{i}", team="blue") for i in range(10)]
        for i, member in enumerate(members[:4]):
            assert await serve(adm, member, clock, i)  # the team's journal is full; each member's holds one row
        real_update, allowed, team_commits = store.update, asyncio.Semaphore(0), 0

        async def gated_update(table: str, entity: Any, etag: str) -> Any:
            nonlocal team_commits
            if entity.partition_key == team_partition("blue") and adm._journals[entity.partition_key].flushing.locked():
                await allowed.acquire()  # a team commit (a lease grant of the team's row passes freely)
                team_commits += 1
            return await real_update(table, entity, etag)

        store.update = gated_update  # type: ignore[method-assign]
        held = [asyncio.create_task(serve(adm, member, clock, 10 + i)) for i, member in enumerate(members[4:])]
        await idle()
        assert not any(task.done() for task in held), "six members wait for the team's row"
        allowed.release()  # four team rows land: four members go in, and their rows join the team's journal,
        allowed.release()  # which is committed without a tick: the last two go in
        assert all(await asyncio.gather(*held))
        assert team_commits == 2
        store.update = real_update  # type: ignore[method-assign]
        await adm.aclose()
        team = await counters_of(store, team_partition("blue"))
        assert team.minute_requests == 10 and team.in_flight_tokens == 0

    run(scenario())


def test_a_journal_behind_an_outage_refuses_new_requests_after_a_bounded_wait(monkeypatch: Any) -> None:
    monkeypatch.setattr(leases, "JOURNAL_MAX_BEHIND", 5)
    monkeypatch.setattr(leases, "BEHIND_WAIT_SECONDS", 0.05)

    async def scenario() -> None:
        clock, store = Clock(), MemoryTableStore()
        adm = leased(store, clock)
        caller = make_caller()
        for i in range(5):
            assert await serve(adm, caller, clock, i)
        store.down = True
        with pytest.raises(ServiceUnavailable) as refused:
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="r9")
        assert refused.value.code == "storage_unavailable"
        store.down = False
        assert await serve(adm, caller, clock, 10), "storage back: the journal drains and requests pass again"
        await adm.aclose()
        assert len(await cost_rows(store, caller.key)) == 6

    run(scenario())


def test_a_lease_fits_a_request_only_within_its_minute_epoch_and_room() -> None:
    from gateway_lib.quota.admission import Reservation
    from gateway_lib.quota.counters import Counters
    from gateway_lib.quota.leases import Lease

    lease = Lease(minute="2026-03-10T10:00", epoch=7, requests=2, tokens=100, usd=Decimal("0.01"), granted=2,
                  granted_at=0.0, used_at=0.0, seen=Counters())

    def res(**changes: Any) -> Reservation:
        base = {"tokens": 100, "usd": Decimal("0.01"), "minute": "2026-03-10T10:00", "epoch": 7}
        values = base | changes
        return Reservation("k", "r", "standard", None, values["tokens"], values["usd"], values["minute"],
                           values["epoch"])

    assert lease.fits(res())  # exactly the room left
    assert not lease.fits(res(tokens=101))  # token room: past it the caller's token limits would be overspent
    assert not lease.fits(res(usd=Decimal("0.0101")))
    assert not lease.fits(res(minute="2026-03-10T10:01"))  # a new minute: the per-minute limits start again
    assert not lease.fits(res(epoch=8))

"""The TableStore contract, pinned on MemoryTableStore.

``CONTRACT`` holds backend-agnostic scenarios; tests/integration/test_azure_store.py runs
the same list against Azurite, so the fake and the real thing cannot drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal

import pytest

from gateway_lib.storage.base import (
    Entity,
    EntityExists,
    EntityNotFound,
    Op,
    PreconditionFailed,
    StorageError,
    TableNotFound,
    TableStore,
    TransactionFailed,
)
from gateway_lib.storage.memory import MemoryTableStore

Scenario = Callable[[TableStore, str], Awaitable[None]]
CONTRACT: list[Scenario] = []


def contract(fn: Scenario) -> Scenario:
    CONTRACT.append(fn)
    return fn


@contract
async def insert_then_get_round_trips_values_and_types(store: TableStore, table: str) -> None:
    props = {"n": 5, "big": 2**40, "s": "x", "yes": True, "f": 1.5, "usd": Decimal("0.0000000012"), "none": None}
    written = await store.insert(table, Entity("p", "r", props))
    got = await store.get(table, "p", "r")
    assert got is not None and got.etag == written.etag and written.etag
    assert dict(got.properties) == {"n": 5, "big": 2**40, "s": "x", "yes": True, "f": 1.5, "usd": "0.0000000012"}
    assert await store.get(table, "p", "missing") is None


@contract
async def duplicate_insert_raises_entity_exists(store: TableStore, table: str) -> None:
    await store.insert(table, Entity("p", "r", {"a": 1}))
    with pytest.raises(EntityExists):
        await store.insert(table, Entity("p", "r", {"a": 2}))


@contract
async def every_write_changes_the_etag_and_stale_etags_fail(store: TableStore, table: str) -> None:
    first = await store.insert(table, Entity("p", "r", {"a": 1}))
    second = await store.update(table, Entity("p", "r", {"a": 2}), first.etag or "")
    assert second.etag != first.etag
    with pytest.raises(PreconditionFailed):
        await store.update(table, Entity("p", "r", {"a": 3}), first.etag or "")
    third = await store.upsert(table, Entity("p", "r", {"a": 4}))
    assert third.etag not in (first.etag, second.etag)
    got = await store.get(table, "p", "r")
    assert got is not None and dict(got.properties) == {"a": 4}


@contract
async def update_replaces_whole_entity_and_missing_row_is_not_found(store: TableStore, table: str) -> None:
    first = await store.insert(table, Entity("p", "r", {"a": 1, "b": 2}))
    await store.update(table, Entity("p", "r", {"a": 9}), first.etag or "")
    got = await store.get(table, "p", "r")
    assert got is not None and dict(got.properties) == {"a": 9}
    with pytest.raises(EntityNotFound):
        await store.update(table, Entity("p", "nope", {"a": 1}), first.etag or "")


@contract
async def update_escapes_odd_keys_keeps_value_types_and_names_a_missing_table(store: TableStore, table: str) -> None:
    """The single conditional update (written on the wire by the Azure store) as the transaction's update."""
    pk, rk = "tenant's team ü", "it's (1) + 2%20=;"
    values = {"n": 2**40, "whole": 2.0, "yes": True, "s": "ü \"q\" ';", "usd": Decimal("0.10")}
    first = await store.insert(table, Entity(pk, rk, {"a": 1}))
    second = await store.update(table, Entity(pk, rk, values), first.etag or "")
    got = await store.get(table, pk, rk)
    assert got is not None and got.etag == second.etag != first.etag
    assert dict(got.properties) == values | {"usd": "0.10"}
    assert type(got.properties["whole"]) is float and type(got.properties["n"]) is int
    with pytest.raises(TableNotFound):
        await store.update(table + "missing", Entity(pk, rk, {"a": 1}), second.etag or "")


@contract
async def delete_checks_the_etag_and_ignores_missing_rows(store: TableStore, table: str) -> None:
    first = await store.insert(table, Entity("p", "r", {"a": 1}))
    await store.update(table, Entity("p", "r", {"a": 2}), first.etag or "")
    with pytest.raises(PreconditionFailed):
        await store.delete(table, "p", "r", first.etag)
    await store.delete(table, "p", "r")
    await store.delete(table, "p", "r")
    assert await store.get(table, "p", "r") is None


@contract
async def query_returns_one_partition_in_row_key_order_within_range(store: TableStore, table: str) -> None:
    for pk, rk in (("a", "3"), ("a", "1"), ("a", "2"), ("b", "1")):
        await store.insert(table, Entity(pk, rk, {"v": f"{pk}{rk}"}))
    assert [e.row_key for e in await store.query(table, "a")] == ["1", "2", "3"]
    assert [e.row_key for e in await store.query(table, "a", row_key_from="2", row_key_to="3")] == ["2"]
    assert [e.row_key for e in await store.query(table, "a", limit=2)] == ["1", "2"]
    assert [(e.partition_key, e.row_key) for e in await store.query(table)] == [
        ("a", "1"), ("a", "2"), ("a", "3"), ("b", "1")]
    assert all(e.etag for e in await store.query(table, "b"))


@contract
async def transaction_commits_all_ops_and_returns_new_etags(store: TableStore, table: str) -> None:
    counters = await store.insert(table, Entity("p", "counters", {"n": 1}))
    done = await store.transact(table, [Op("insert", Entity("p", "row1", {"x": 1})),
                                        Op("update", Entity("p", "counters", {"n": 2}), etag=counters.etag)])
    assert done[1].etag and done[1].etag != counters.etag
    got = await store.get(table, "p", "counters")
    assert got is not None and got.properties["n"] == 2 and got.etag == done[1].etag
    assert await store.get(table, "p", "row1") is not None


@contract
async def failed_transaction_changes_nothing_and_names_the_cause(store: TableStore, table: str) -> None:
    counters = await store.insert(table, Entity("p", "counters", {"n": 1}))
    await store.insert(table, Entity("p", "dup", {}))
    await store.update(table, Entity("p", "counters", {"n": 2}), counters.etag or "")
    cases = [
        ([Op("insert", Entity("p", "new1", {})), Op("insert", Entity("p", "dup", {}))], 1, "exists"),
        ([Op("insert", Entity("p", "new2", {})), Op("update", Entity("p", "counters", {"n": 3}), etag=counters.etag)],
         1, "precondition"),
        ([Op("update", Entity("p", "missing", {}))], 0, "not_found"),
    ]
    for ops, index, reason in cases:
        with pytest.raises(TransactionFailed) as failed:
            await store.transact(table, ops)
        assert (failed.value.index, failed.value.reason) == (index, reason)
    assert [e.row_key for e in await store.query(table, "p")] == ["counters", "dup"]
    got = await store.get(table, "p", "counters")
    assert got is not None and got.properties["n"] == 2


@contract
async def transaction_ops_of_every_kind_keep_values_types_and_odd_keys(store: TableStore, table: str) -> None:
    """Each op kind in one transaction, keys the entity URL must escape, values the wire must type."""
    pk = "tenant's team/ü".replace("/", "-")  # a quote, a space and non-ASCII in the partition key
    values = {"n": 7, "big": 2**40, "neg": -(2**63), "whole": 2.0, "f": -0.5, "yes": False, "s": "ü \"q\" ';",
              "usd": Decimal("1.10")}
    old = await store.insert(table, Entity(pk, "old row", {"a": 1}))
    kept = await store.insert(table, Entity(pk, "it's", {"a": 1}))
    done = await store.transact(table, [
        Op("insert", Entity(pk, "new", values)),
        Op("update", Entity(pk, "it's", {"a": 2}), etag=kept.etag),
        Op("upsert", Entity(pk, "upserted", {"b": 3})),
        Op("delete", Entity(pk, "old row"), etag=old.etag),
    ])
    assert [e.row_key for e in done] == ["new", "it's", "upserted", "old row"]
    assert all(e.etag for e in done[:3])
    got = await store.get(table, pk, "new")
    assert got is not None and got.etag == done[0].etag
    assert dict(got.properties) == values | {"usd": "1.10"}
    assert type(got.properties["whole"]) is float and type(got.properties["big"]) is int
    updated = await store.get(table, pk, "it's")
    assert updated is not None and updated.properties == {"a": 2} and updated.etag == done[1].etag
    assert [e.row_key for e in await store.query(table, pk)] == ["it's", "new", "upserted"]
    with pytest.raises(TransactionFailed) as failed:  # a stale ETag on a delete names that op
        await store.transact(table, [Op("insert", Entity(pk, "later", {})),
                                     Op("delete", Entity(pk, "it's"), etag=kept.etag)])
    assert (failed.value.index, failed.value.reason) == (1, "precondition")
    assert await store.get(table, pk, "later") is None


@contract
async def transaction_rules_are_checked_before_sending(store: TableStore, table: str) -> None:
    with pytest.raises(ValueError):
        await store.transact(table, [Op("insert", Entity("p", "a", {})), Op("insert", Entity("q", "b", {}))])
    with pytest.raises(ValueError):
        await store.transact(table, [Op("insert", Entity("p", str(i), {})) for i in range(101)])
    with pytest.raises(ValueError):
        await store.insert(table, Entity("p/x", "r", {}))
    hundred = await store.transact(table, [Op("insert", Entity("p", f"{i:03}", {})) for i in range(100)])
    assert len(hundred) == 100


@contract
async def a_missing_table_is_a_storage_error_not_a_missing_row(store: TableStore, table: str) -> None:
    with pytest.raises(StorageError) as raised:
        await store.get(table + "missing", "p", "r")
    assert not isinstance(raised.value, EntityNotFound)
    with pytest.raises(TableNotFound):  # a transaction too (the service answers 202 with the 404 inside)
        await store.transact(table + "missing", [Op("insert", Entity("p", "r", {}))])


@contract
async def ensure_tables_is_idempotent(store: TableStore, table: str) -> None:
    await store.insert(table, Entity("p", "r", {}))
    await store.ensure_tables([table])
    assert await store.get(table, "p", "r") is not None
    await store.ping()


async def _with_memory(scenario: Scenario) -> None:
    store = MemoryTableStore()
    await store.ensure_tables(["contract"])
    await scenario(store, "contract")


@pytest.mark.parametrize("scenario", CONTRACT, ids=[f.__name__ for f in CONTRACT])
def test_memory_store_contract(scenario: Scenario) -> None:
    asyncio.run(_with_memory(scenario))


def test_concurrent_conditional_updates_let_exactly_one_writer_win() -> None:
    async def scenario() -> tuple[int, int]:
        store = MemoryTableStore()
        await store.ensure_tables(["t"])
        row = await store.insert("t", Entity("p", "r", {"n": 0}))

        async def bump() -> bool:
            try:
                await store.update("t", Entity("p", "r", {"n": 1}), row.etag or "")
                return True
            except PreconditionFailed:
                return False

        results = await asyncio.gather(*(bump() for _ in range(10)))
        return results.count(True), results.count(False)

    assert asyncio.run(scenario()) == (1, 9)


def test_simulated_outage_raises_storage_error_and_counts_round_trips() -> None:
    async def scenario() -> None:
        store = MemoryTableStore()
        await store.ensure_tables(["t"])
        await store.insert("t", Entity("p", "r", {}))
        assert store.round_trips == 2
        store.down = True
        with pytest.raises(StorageError):
            await store.get("t", "p", "r")
        store.down = False
        assert await store.get("t", "p", "r") is not None

    asyncio.run(scenario())


def test_returned_entities_cannot_change_stored_rows() -> None:
    async def scenario() -> None:
        store = MemoryTableStore()
        await store.ensure_tables(["t"])
        got = await store.insert("t", Entity("p", "r", {"n": 1}))
        with pytest.raises(TypeError):
            got.properties["n"] = 2  # type: ignore[index]

    asyncio.run(scenario())

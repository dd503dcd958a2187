"""The TableStore contract (tests/unit/test_memory_store.py) against both the fake and Azurite."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from typing import Any

import pytest

from gateway_lib.storage.azure_tables import AzureTableStore
from gateway_lib.storage.base import (
    Entity,
    EntityNotFound,
    Op,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
    TableNotFound,
    TableStore,
)
from gateway_lib.storage.memory import MemoryTableStore
from gateway_lib.storage.threaded import StorageThread
from tests.unit.test_memory_store import CONTRACT, Scenario
from tools.azurite import connection_string, free_port

pytestmark = pytest.mark.integration


async def _run(scenario: Scenario, store: TableStore, table: str) -> None:
    try:
        await store.ensure_tables([table])
        await scenario(store, table)
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", ["memory", "azurite", "azurite-on-storage-thread"])
@pytest.mark.parametrize("scenario", CONTRACT, ids=[f.__name__ for f in CONTRACT])
def test_contract(scenario: Scenario, backend: str, request: pytest.FixtureRequest, table_prefix: str) -> None:
    if backend == "memory":
        store: TableStore = MemoryTableStore()
    else:
        store = AzureTableStore.from_connection_string(request.getfixturevalue("azurite_connection_string"))
        if backend == "azurite-on-storage-thread":  # leased mode's store: the same contract across the thread
            store = StorageThread(store)
    asyncio.run(_run(scenario, store, table_prefix + "contract"))


def test_refused_connection_fails_fast_as_storage_error() -> None:
    async def scenario() -> float:
        store = AzureTableStore.from_connection_string(connection_string(free_port()))
        started = time.monotonic()
        try:
            with pytest.raises(StorageError):
                await store.get("anytable", "p", "r")
        finally:
            await store.aclose()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 3


def test_unresponsive_storage_times_out_within_the_read_timeout() -> None:
    """A server that accepts but never answers (a hung dependency) must not hang the hot path."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)

        async def scenario() -> float:
            store = AzureTableStore.from_connection_string(connection_string(silent.getsockname()[1]),
                                                           read_timeout=0.5)
            started = time.monotonic()
            try:
                with pytest.raises(StorageError):
                    await store.insert("anytable", Entity("p", "r", {}))
            finally:
                await store.aclose()
            return time.monotonic() - started

        assert asyncio.run(scenario()) < 5  # two attempts (retry_total=1) of 0.5 s plus backoff


class _Answering(http.server.BaseHTTPRequestHandler):
    """A Table endpoint that answers every request with one canned status and OData error."""

    status, code = 503, "ServerBusy"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"odata.error": {"code": self.code, "message": {"value": "canned"}}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_GET = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "code", "expected"), [
    (503, "ServerBusy", StorageUnavailable), (500, "InternalError", StorageUnavailable),
    (412, "UpdateConditionNotSatisfied", PreconditionFailed), (404, "ResourceNotFound", EntityNotFound),
    (404, "TableNotFound", TableNotFound), (403, "AuthorizationFailure", StorageError),
])
def test_error_answers_to_our_own_requests_map_like_the_sdks(status: int, code: str,
                                                             expected: type[StorageError]) -> None:
    """The conditional update and a batch refused as a whole are written by us, not the SDK: their error
    answers must become the same store errors the SDK's exceptions do."""
    handler = type("Handler", (_Answering,), {"status": status, "code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def scenario() -> list[StorageError]:
        store = AzureTableStore.from_connection_string(connection_string(server.server_address[1]),
                                                       retry_backoff_factor=0.01)
        raised = []
        try:
            for call in (store.update("t", Entity("p", "r", {"n": 1}), 'W/"1"'),
                         store.transact("t", [Op("insert", Entity("p", "s", {}))])):
                with pytest.raises(StorageError) as caught:
                    await call
                raised.append(caught.value)
        finally:
            await store.aclose()
        return raised

    try:
        update_error, batch_error = asyncio.run(scenario())
    finally:
        server.shutdown()
        server.server_close()
    assert type(update_error) is expected and type(batch_error) is expected
    assert str(status) in str(update_error) and code in str(update_error)


_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _without_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def test_storage_calls_hop_to_no_thread_without_a_proxy(azurite_connection_string: str, table_prefix: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Trusting the environment makes aiohttp read ~/.netrc and the proxy variables in a worker thread on
    every request; with no proxy configured, no storage call may leave the event loop's thread."""
    _without_proxies(monkeypatch)

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        hops: list[object] = []
        run_in_executor = loop.run_in_executor

        def counted(executor: object, func: Any, *args: object) -> Any:
            hops.append(func)
            return run_in_executor(executor, func, *args)  # type: ignore[arg-type]

        loop.run_in_executor = counted  # type: ignore[method-assign]  # asyncio.to_thread lands here too
        store = AzureTableStore.from_connection_string(azurite_connection_string)
        table = table_prefix + "hops"
        try:
            await store.ensure_tables([table])
            stored = await store.insert(table, Entity("p", "r", {"n": 1}))
            await store.update(table, Entity("p", "r", {"n": 2}), stored.etag or "*")
            await store.transact(table, [Op("insert", Entity("p", "s", {"n": 3}))])
            assert [e.row_key for e in await store.query(table, "p")] == ["r", "s"]
        finally:
            await store.aclose()
        return hops

    assert asyncio.run(scenario()) == []


def test_a_proxy_in_the_environment_is_still_used(azurite_connection_string: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS_PROXY/HTTP_PROXY keep working: with one set (here a loopback port nobody listens on), storage
    calls go to it, and fail as unavailable, instead of straight to the account."""
    _without_proxies(monkeypatch)

    async def get_fails_with(error: type[StorageError]) -> None:
        store = AzureTableStore.from_connection_string(azurite_connection_string)
        try:
            with pytest.raises(error):
                await store.get("anytable", "p", "r")
        finally:
            await store.aclose()

    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    asyncio.run(get_fails_with(StorageUnavailable))
    monkeypatch.delenv("HTTP_PROXY")
    asyncio.run(get_fails_with(TableNotFound))  # without the proxy the call reaches the account: it was the cause


def test_round_trips_are_counted_per_request(azurite_connection_string: str, table_prefix: str) -> None:
    async def scenario() -> int:
        store = AzureTableStore.from_connection_string(azurite_connection_string)
        try:
            await store.ensure_tables([table_prefix + "rt"])
            before = store.round_trips
            await store.insert(table_prefix + "rt", Entity("p", "r", {}))
            await store.get(table_prefix + "rt", "p", "r")
            return store.round_trips - before
        finally:
            await store.aclose()

    assert asyncio.run(scenario()) == 2


class _LosesOneReply:
    """An aiohttp transport that forwards every request and, for the first one ``armed`` matches, loses the
    answer after the service committed it: a reset connection, or a 500 "may or may not have succeeded"."""

    def __new__(cls, armed: Any, as_500: bool) -> Any:
        from azure.core.exceptions import ServiceResponseError
        from azure.core.pipeline.transport import AioHttpTransport

        class Transport(AioHttpTransport):  # type: ignore[misc]
            async def send(self, request: Any, **kwargs: Any) -> Any:
                nonlocal armed
                response = await super().send(request, **kwargs)
                if armed is not None and armed(request):
                    armed = None
                    await response.load_body()
                    if as_500:
                        response.status_code = 500
                        return response
                    raise ServiceResponseError("simulated: connection reset before the reply was read")
                return response

        return Transport()


@pytest.mark.parametrize(("kind", "as_500"), [("update", False), ("insert", False), ("insert", True),
                                              ("transact", False), ("transact", True)],
                         ids=["update-reply-lost", "insert-reply-lost", "insert-500-after-commit",
                              "transact-reply-lost", "transact-500-after-commit"])
def test_a_retried_write_refused_by_its_own_first_attempt_is_an_unknown_outcome(
        azurite_connection_string: str, table_prefix: str, kind: str, as_500: bool) -> None:
    # azure-core retries a PUT after a lost reply and a POST after a 500; if the first attempt had landed, the
    # retry is refused (412 / 409). Reported as a lost race, the caller would apply its write again (a
    # reservation counted twice); it must be "outcome unknown" for the writer-marker check to decide.
    method = "PUT" if kind == "update" else "POST"  # (a PUT after a 500 takes the PUT's reply-lost path)

    async def scenario() -> None:
        plain = AzureTableStore.from_connection_string(azurite_connection_string)
        await plain.ensure_tables([table_prefix])
        first = await plain.insert(table_prefix, Entity("p", "counters", {"n": 1}))
        lossy = AzureTableStore.from_connection_string(
            azurite_connection_string, transport=_LosesOneReply(lambda r: r.method == method, as_500))
        try:
            with pytest.raises(StorageUnavailable):  # a POST whose reply is lost is not retried: unreachable
                if kind == "update":
                    await lossy.update(table_prefix, Entity("p", "counters", {"n": 2}), first.etag or "")
                elif kind == "insert":
                    await lossy.insert(table_prefix, Entity("p", "new", {"n": 2}))
                else:
                    await lossy.transact(table_prefix, [Op("insert", Entity("p", "new", {"n": 2})),
                                                        Op("update", Entity("p", "counters", {"n": 2}), first.etag)])
            landed = {e.row_key: e.properties["n"] for e in await plain.query(table_prefix, "p")}
            assert landed["counters"] == 2 or landed.get("new") == 2, "the first attempt had landed"
        finally:
            await lossy.aclose()
            await plain.aclose()

    asyncio.run(scenario())

"""``GuardedStore``: every storage call bounded in time, and a circuit that answers at once while storage is down.

The SDK's timeouts bound one call, not a request: one caller's requests queue for their counters row's
lock, and against a store that does not answer each would spend the whole timeout in turn. Here:

* every call ends within ``CALL_SECONDS``, and within what is left of the request's storage deadline
  (``deadline``), which also bounds the request's waits for a row lock (``quota.counter_rows``);
* a call that times out or cannot connect marks the store down for as long as that call took, at most
  ``HOLD_SECONDS``: calls made meanwhile raise ``StorageDown`` at once, and so do requests waiting for a
  row lock (``Circuit.opened``). Holding as long as the failure cost keeps a dead store from costing each
  request a timeout, while a refused connection (cheap to retry) is probed again soon;
* after the hold, one call goes through as a probe, and calls made meanwhile wait for its verdict (within
  their own bound): its answer closes the circuit and lets them through, its failure holds again and
  refuses them. Recovery needs nobody: the next request, or a background write, is the probe.

docs/storage.md ("Storage outages") states the bound.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from gateway_lib.storage.base import Entity, Op, StorageError, StorageUnavailable, StorageUnreachable, TableStore

T = TypeVar("T")

CALL_SECONDS = 5.0  # one storage call, the SDK's own retry included
HOLD_SECONDS = 5.0  # the most storage counts as down after a call timed out or could not connect
REQUEST_SECONDS = 8.0  # one request's admission: its row lock waits and storage calls together

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("storage_deadline", default=None)


class StorageDown(StorageUnreachable):
    """Storage is known to be down (a call timed out or failed to connect moments ago): not tried."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@contextmanager
def deadline(seconds: float | None = None) -> Iterator[None]:
    """Storage calls and row lock waits in this context (and tasks started in it) end within ``seconds``
    (``REQUEST_SECONDS``); nested, the earlier deadline wins."""
    ends = time.monotonic() + (REQUEST_SECONDS if seconds is None else seconds)
    current = _deadline.get()
    token = _deadline.set(ends if current is None else min(current, ends))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left of this context's storage deadline; None when it has none (background work)."""
    ends = _deadline.get()
    return None if ends is None else ends - time.monotonic()


def background_context() -> contextvars.Context:
    """A copy of the current context without a storage deadline: for tasks that outlive their request."""
    context = contextvars.copy_context()
    context.run(_deadline.set, None)
    return context


class Circuit:
    """Closed, down until a time, then one probe. Per process and per store; used from one event loop."""

    def __init__(self, hold: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._hold, self._clock = hold, clock
        self._down_until: float | None = None
        self._verdict: asyncio.Future[None] | None = None  # the probe in flight, done when it has one
        self._waiters: set[asyncio.Future[None]] = set()

    def down_for(self) -> float | None:
        """Seconds until the next probe while storage is known to be down, else None."""
        if self._down_until is None:
            return None
        left = self._down_until - self._clock()
        return left if left > 0 else None

    async def enter(self) -> bool:
        """Before a call: raises ``StorageDown`` while down, waits for the verdict of a probe in flight; True if
        this call is the probe."""
        while self._down_until is not None:
            wait = self.down_for()
            if wait is not None:
                raise StorageDown("storage is unavailable (a call timed out or failed moments ago)", max(wait, 1.0))
            if self._verdict is None:
                self._verdict = asyncio.get_running_loop().create_future()
                return True
            await asyncio.shield(self._verdict)  # then closed, down again, or the probe gave no verdict: look again
        return False

    def answered(self, probe: bool) -> None:
        if probe or self._down_until is not None:
            self._down_until = None
            self._settle_probe()

    def _settle_probe(self) -> None:
        if self._verdict is not None and not self._verdict.done():
            self._verdict.set_result(None)
        self._verdict = None

    def failed(self, probe: bool, took: float) -> None:
        """A call timed out or could not connect after ``took`` seconds: down for as long (at most the hold)."""
        hold = HOLD_SECONDS if self._hold is None else self._hold
        self._down_until = self._clock() + min(hold, took)
        self._settle_probe()  # those waiting for a probe's verdict have it: down
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def released(self, probe: bool) -> None:
        """A probe that ended without a verdict (cancelled, cut by its request's deadline)."""
        if probe:
            self._settle_probe()

    def opened(self) -> asyncio.Future[None]:
        """A future set when storage is next marked down (a row lock waiter races it)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        return waiter


class GuardedStore:
    """A ``TableStore`` whose calls are bounded in time and pass through ``circuit`` (see the module doc)."""

    def __init__(self, inner: TableStore, circuit: Circuit | None = None, call_seconds: float | None = None) -> None:
        self.inner = inner
        self.circuit = circuit or Circuit()
        self._call_seconds = call_seconds

    @property
    def round_trips(self) -> int:  # benchmarks read the inner store's count
        return int(getattr(self.inner, "round_trips", 0))

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        left = remaining()
        if left is not None and left <= 0:
            raise StorageUnavailable("the request's time for storage is spent")
        own = CALL_SECONDS if self._call_seconds is None else self._call_seconds
        limit = own if left is None else min(own, left)
        started, probe = time.monotonic(), False
        try:
            async with asyncio.timeout(limit):  # a wait for a probe's verdict included
                probe = await self.circuit.enter()
                result = await call()
        except TimeoutError:
            if limit >= own:  # the call's own bound, not a request that had little time left
                self.circuit.failed(probe, limit)
                down = StorageDown(f"storage did not answer within {limit:.0f} s", self.circuit.down_for() or 1.0)
                raise down from None
            self.circuit.released(probe)
            raise StorageUnavailable("the request's time for storage ran out during a call") from None
        except StorageDown:
            raise  # refused by the circuit itself: no new verdict
        except StorageUnreachable:
            self.circuit.failed(probe, time.monotonic() - started)
            raise
        except StorageError:  # an answer, even a refusal or a 5xx: storage is up
            self.circuit.answered(probe)
            raise
        except BaseException:  # cancelled, or a bug: no verdict on storage
            self.circuit.released(probe)
            raise
        self.circuit.answered(probe)
        return result

    async def get(self, table: str, partition_key: str, row_key: str) -> Entity | None:
        return await self._guarded(lambda: self.inner.get(table, partition_key, row_key))

    async def insert(self, table: str, entity: Entity) -> Entity:
        return await self._guarded(lambda: self.inner.insert(table, entity))

    async def update(self, table: str, entity: Entity, etag: str) -> Entity:
        return await self._guarded(lambda: self.inner.update(table, entity, etag))

    async def upsert(self, table: str, entity: Entity) -> Entity:
        return await self._guarded(lambda: self.inner.upsert(table, entity))

    async def delete(self, table: str, partition_key: str, row_key: str, etag: str | None = None) -> None:
        await self._guarded(lambda: self.inner.delete(table, partition_key, row_key, etag))

    async def query(
        self, table: str, partition_key: str | None = None, *, row_key_from: str | None = None,
        row_key_to: str | None = None, limit: int | None = None,
    ) -> list[Entity]:
        return await self._guarded(lambda: self.inner.query(
            table, partition_key, row_key_from=row_key_from, row_key_to=row_key_to, limit=limit))

    async def transact(self, table: str, ops: Sequence[Op]) -> list[Entity]:
        return await self._guarded(lambda: self.inner.transact(table, ops))

    async def ensure_tables(self, tables: Sequence[str]) -> None:
        await self._guarded(lambda: self.inner.ensure_tables(tables))

    async def ping(self) -> None:
        await self._guarded(self.inner.ping)

    async def aclose(self) -> None:
        await self.inner.aclose()

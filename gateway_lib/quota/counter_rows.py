"""Writing counters rows: conditional writes under a per-process row lock, and lost replies.

Admission (quota.py, leases.py) decides *what* a counters row should say; this module gets it
written. Every write is conditional on the ETag of the row it was computed from, so a lost race
surfaces as ``PreconditionFailed`` and is redone on fresh numbers. A write whose reply is lost
(``StorageUnavailable``) may or may not have committed: each write stamps a marker into the row's
short history of writers, and the next read tells whether it landed. Layout: docs/storage.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway_lib.billing.ledger import CostRow
from gateway_lib.quota.counters import COUNTERS_ROW, WRITERS_KEPT, Counters, Release, stamped, writers
from gateway_lib.storage import circuit
from gateway_lib.storage.base import (
    Entity,
    EntityExists,
    Op,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
    TableStore,
    TransactionFailed,
)
from gateway_lib.storage.circuit import StorageDown

log = logging.getLogger(__name__)

# The caller's settle is bounded by time, not tries: giving up loses the request's cost row and
# leaves its reservation on the counters, while a lost *reserve* only costs the caller a 429.
# Under one caller's heavy concurrency a settle can lose the ETag race dozens of times.
SETTLE_DEADLINE_SECONDS = 30.0
SETTLE_BACKOFF_CAP_SECONDS = 0.5
SETTLE_OUTAGE_SECONDS = 10.0  # how long a settle rides out unreachable storage before giving up (logged)
LATEST_ROWS_KEPT = 10_000  # counters rows remembered per process (a few hundred bytes each)
DOUBT_RESOLVE_SECONDS = 60.0  # how long a process keeps trying to learn whether such a write landed

Write = Callable[[Entity | None, str], Awaitable[Entity]]


class Counted(Protocol):
    """What a write is charged to: a request's reservation, or a background job's stand-in."""

    request_id: str
    round_trips: int


@dataclass
class _Probe:
    request_id: str
    round_trips: int = 0


class AlreadySettled(Exception):
    """The request's cost row is already there: an earlier try of this settle committed."""


@dataclass(frozen=True)
class Doubt:
    """A write whose reply was lost: its marker, the room it reserved, the newest marker of the row it replaced
    (``latest``) and the room it gave back in the same write, if any. A give-back never sent (storage was down
    throughout) has no marker: it surely missed."""

    marker: str | None
    release: Release | None
    latest: str | None
    gives_back: Release | None
    earlier: tuple[tuple[str, str | None], ...] = ()  # earlier tries of the same write whose replies were lost too

    def landed(self, history: list[str]) -> bool:
        return self.marker is not None and self.marker in history

    def surely_missed(self, history: list[str]) -> bool:
        return (self.marker is None or surely_missed(self.marker, self.latest, history)) and all(
            surely_missed(m, latest, history) for m, latest in self.earlier)


def surely_missed(marker: str, latest: str | None, history: list[str]) -> bool:
    """Whether the write stamped ``marker`` surely did not land, judged by the row's marker history (newest
    first, the oldest dropped past ``WRITERS_KEPT``). A conditional write lands right after the row it read
    (whose newest marker was ``latest``), so had it landed, its marker would sit in front of ``latest``: while
    ``latest`` is still listed, so would be ours. With nothing ever dropped from the history, its absence is
    proof too."""
    if marker in history:
        return False
    if latest is not None:
        return latest in history
    return len([m for m in history if m]) < WRITERS_KEPT


class WriteInDoubt(StorageError):
    """A write that only gives room back, whose reply was lost and whose marker later writes have pushed out
    of the row's history: whether it landed cannot be told, so it is not applied again (see ``until_written``)."""


class CounterRows:
    """The counters rows of one table, as this process writes them. One per process; concurrency-safe."""

    def __init__(self, store: TableStore, table: str, *, clock: Callable[[], datetime],
                 monotonic: Callable[[], float], sleep: Callable[[float], Awaitable[None]],
                 rng: random.Random) -> None:
        self._store, self._table = store, table
        self._circuit: circuit.Circuit | None = getattr(store, "circuit", None)  # a GuardedStore's
        self._clock, self._monotonic, self._sleep, self._rng = clock, monotonic, sleep, rng
        # One lock per counters row *within this process*: requests of one caller on one instance queue
        # for the row instead of racing for its ETag (64 racers on one row made every write a 412 and
        # throughput collapse). Across instances the ETag condition still decides; a weak map lets the
        # lock of an idle caller go away.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # The counters entity (with its ETag) this process last wrote per row, used optimistically under
        # the row lock: if no other instance wrote since, a reserve needs no read (2 round trips per
        # request instead of 3); if one did, the ETag condition fails and we re-read. Bounded LRU.
        self._latest: OrderedDict[str, Entity] = OrderedDict()
        self._markers: dict[str, str] = {}  # row -> marker of the write in flight (row lock held)
        self._doubts: dict[str, list[Doubt]] = {}  # row -> reserving writes of unknown outcome
        self._resolvers: dict[str, asyncio.Task[None]] = {}

    def lock(self, pk: str) -> asyncio.Lock:
        lock = self._locks.get(pk)
        if lock is None:
            lock = self._locks[pk] = asyncio.Lock()
        return lock

    def down_for(self) -> float | None:
        """Seconds until storage is probed again while it is known to be down, else None."""
        return self._circuit.down_for() if self._circuit is not None else None

    @asynccontextmanager
    async def locked(self, pk: str) -> AsyncIterator[None]:
        """The row lock, for a request: its wait ends with the request's storage deadline, and at once when
        storage is known to be down (``StorageDown``), whatever the request's place in the queue."""
        lock = self.lock(pk)
        if not lock.locked():
            await lock.acquire()  # free: taken without suspending
        else:
            await self._wait_for(lock)
        try:
            yield
        finally:
            lock.release()

    async def _wait_for(self, lock: asyncio.Lock) -> None:
        if self._circuit is not None and (wait := self._circuit.down_for()) is not None:
            raise StorageDown("storage is unavailable (a call timed out or failed moments ago)", max(wait, 1.0))
        acquiring = asyncio.ensure_future(lock.acquire())
        opened = self._circuit.opened() if self._circuit is not None else asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({acquiring, opened}, timeout=circuit.remaining(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            if not acquiring.done():
                acquiring.cancel()
                with suppress(asyncio.CancelledError):
                    await acquiring
        if acquiring.cancelled() or not acquiring.done():
            if opened.done() and not opened.cancelled():
                raise StorageDown("storage is unavailable (a call timed out while this request waited)",
                                  max(self._circuit.down_for() or 1.0, 1.0) if self._circuit else 1.0)
            raise StorageUnavailable("the request's time for storage ran out waiting for its counters row")

    def known(self, pk: str) -> Entity | None:
        """The row as this process last wrote or read it (possibly stale: the ETag condition catches that)."""
        return self._latest.get(pk)

    def remember(self, pk: str, entity: Entity | None) -> None:
        if entity is None or entity.etag is None:
            self._latest.pop(pk, None)
            return
        self._latest[pk] = entity
        self._latest.move_to_end(pk)
        while len(self._latest) > LATEST_ROWS_KEPT:
            self._latest.popitem(last=False)

    def doubts(self, pk: str) -> list[Doubt]:
        return self._doubts.get(pk, [])

    async def get(self, pk: str, counted: Counted) -> Entity | None:
        """A fresh read of the row (row lock held); settles any doubt about this process's earlier writes."""
        counted.round_trips += 1
        entity = await self._store.get(self._table, pk, COUNTERS_ROW)
        return await self._settle_doubts(pk, entity, counted) if self._doubts.get(pk) else entity

    async def write(self, read: Entity | None, new: Entity, counted: Counted) -> Entity:
        """Conditional write; raises ``PreconditionFailed`` when the row changed (or was created) since ``read``."""
        counted.round_trips += 1
        new = self._stamped(read, new)
        with self._marker_kept_while_unknown(new.partition_key):
            try:
                if read is not None and read.etag is not None:
                    return await self._store.update(self._table, new, read.etag)
                return await self._store.insert(self._table, new)
            except EntityExists as exc:  # two first requests raced to create the row: the same as losing the race
                raise PreconditionFailed(str(exc)) from exc

    async def reserving_write(self, pk: str, read: Entity | None, new: Entity, counted: Counted,
                              release: Release, gives_back: Release | None = None) -> Entity:
        """A write that adds reserved room. If its reply is lost the request is refused (503), so the room must
        not stay reserved if the write did land: remember it, and find out once storage answers again. If the
        write also gave room back (``gives_back``) and surely did not land, that room is given back then."""
        try:
            return await self.write(read, new, counted)
        except StorageUnavailable:
            marker = self._markers.pop(pk, None)
            if marker is not None:
                latest = next(iter(writers(read)), "")
                self._doubts.setdefault(pk, []).append(Doubt(marker, release, latest or None, gives_back))
                self._start_resolver(pk)
            raise

    async def commit(self, read: Entity | None, counters: Entity, rows: list[CostRow], counted: Counted,
                     index: Sequence[Entity] = ()) -> Entity:
        """The cost rows (and their late-index twins) and the settled counters row in one entity-group
        transaction; returns the counters row written. Rows go first: a retry of a transaction that already
        committed fails on op 0 as "exists" (``AlreadySettled``), since counting it again would double it."""
        counters = self._stamped(read, counters)
        new = Op("insert", counters) if read is None or read.etag is None else Op("update", counters, etag=read.etag)
        inserts = [Op("insert", r.to_entity()) for r in rows] + [Op("insert", e) for e in index]
        counted.round_trips += 1
        with self._marker_kept_while_unknown(counters.partition_key):
            try:
                return (await self._store.transact(self._table, [*inserts, new]))[-1]
            except TransactionFailed as exc:
                if exc.reason == "exists" and exc.index is not None and exc.index < len(inserts):
                    raise AlreadySettled from exc
                # "exists" past the inserts: the counters row, inserted by another writer since our read
                if exc.reason in ("exists", "precondition", "not_found"):
                    raise PreconditionFailed(str(exc)) from exc
                raise

    async def until_written(self, counted: Counted, pk: str, write: Write, what: str,
                            gives_back_only: bool = False, owed: Release | None = None) -> None:
        """Apply ``write`` to a counters row until it lands, under the row lock.

        Bounded by time, not tries: giving up loses the request's cost row and leaves its reservation
        behind, while the loser of a race only has to re-read and go again. After a lost reply, a write whose
        marker is not on the row is applied again, unless it only gives room back (a lease's return, an undo)
        and the row's history no longer proves it missed: giving room back twice could let a limit be passed,
        while room not given back only waits for its epoch to end. That raises ``WriteInDoubt``. ``owed``: the
        room such a write gives back; if the outage outlasts this call, the write is not lost but left to the
        doubt resolver, which gives the room back once a read shows the write surely missed. Landed cost rows
        refuse a second commit (``AlreadySettled``); a team settlement's limit is in docs/storage.md.
        """
        async with self.lock(pk):
            entity = self.known(pk)
            started = self._monotonic()
            deadline, attempt, outages = started + SETTLE_DEADLINE_SECONDS, 0, 0
            # Each try whose reply was lost: its marker and the newest marker of the row it replaced. Every one
            # is looked for, not just the last: a try can land after the row was read again, and the next try
            # then meets a 412 whose reply may be lost too.
            lost: list[tuple[str, str | None]] = []
            while True:
                try:
                    if entity is None:
                        entity = await self.get(pk, counted)
                        if _landed(entity, lost, gives_back_only, f"{what} of {counted.request_id}"):
                            self.remember(pk, entity)  # it had landed: applying it again would count twice
                            return
                    self.remember(pk, await write(entity, pk))
                    return
                except AlreadySettled:
                    if not lost:
                        raise  # a settle of this request made before this call
                    # This call's own transaction had landed, its marker since pushed out of the row's history
                    # by later writes: done (raising would skip the rest of the settle, e.g. the team's counters).
                    self.remember(pk, None)
                    return
                except StorageUnavailable:
                    # A blip (a storage node failing over, a connection reset) must not cost the cost row.
                    # A write whose reply was lost may have committed: re-read, and its marker on the row
                    # (or, for a settle, the cost row's key) says so.
                    if (marker := self._markers.pop(pk, None)) is not None:
                        lost.append((marker, next(iter(writers(entity)), "") or None))
                    if self._monotonic() >= started + SETTLE_OUTAGE_SECONDS:
                        if owed is not None:
                            self._leave_to_resolver(pk, lost, owed)
                        raise
                    self.remember(pk, None)
                    entity = None
                    await self._sleep(min(1.0, 0.05 * 2 ** min(outages, 5)))
                    outages += 1
                except PreconditionFailed as exc:  # another instance wrote since: redo on fresh numbers
                    if self._monotonic() >= deadline:
                        raise StorageError(f"{what} of {counted.request_id} kept losing the ETag race for "
                                           f"{SETTLE_DEADLINE_SECONDS:.0f} s ({attempt + 1} tries)") from exc
                    self.remember(pk, None)
                    entity = None
                    if attempt:  # the first miss is usually just our stale copy: re-read at once
                        await self.backoff(attempt, cap=SETTLE_BACKOFF_CAP_SECONDS)
                    attempt += 1

    def _leave_to_resolver(self, pk: str, lost: list[tuple[str, str | None]], owed: Release) -> None:
        """Room a write owes back, left to the doubt resolver when an outage outlasts the write."""
        doubt, latest = lost[-1] if lost else (None, None)
        self._doubts.setdefault(pk, []).append(Doubt(doubt, None, latest, owed, tuple(lost[:-1])))
        self._start_resolver(pk)

    async def backoff(self, attempt: int, cap: float = 0.2) -> None:
        # Full jitter: instances that collided once must not collide again in lock-step.
        await self._sleep(self._rng.uniform(0, min(cap, 0.01 * 2 ** min(attempt, 16))))

    def aclose(self) -> None:
        """Stop looking for the outcome of lost writes."""
        for task in self._resolvers.values():
            task.cancel()
        self._resolvers.clear()

    # -- internals --

    def _stamped(self, read: Entity | None, new: Entity) -> Entity:
        """``new`` with a fresh writer marker in front of the row's recent ones."""
        marker = uuid.uuid4().hex[:12]
        self._markers[new.partition_key] = marker
        return stamped(new, marker, read)

    @contextmanager
    def _marker_kept_while_unknown(self, pk: str) -> Iterator[None]:
        """A counters write's marker outlives the write only when its outcome is unknown (its reply was lost):
        a marker left behind by a write that surely failed would later be taken for a doubt and looked for
        instead of the one that matters (tests/unit/test_quota_interleavings.py pins it)."""
        unknown = False
        try:
            yield
        except StorageUnavailable:
            unknown = True
            raise
        finally:
            if not unknown:
                self._markers.pop(pk, None)

    async def _settle_doubts(self, pk: str, entity: Entity | None, counted: Counted) -> Entity | None:
        """Give back the room of doubtful reserving writes that did land, and the room that those which surely
        did not land were to give back; forget the rest (a write whose marker may have been pushed out of the
        row's history counts as neither: conservative, its room then drops out with its reservation epoch)."""
        doubts = self._doubts.pop(pk, [])
        history = writers(entity)
        landed = [d for d in doubts if d.landed(history)]
        missed = [d for d in doubts if d.gives_back is not None and d not in landed and d.surely_missed(history)]
        if not (landed or missed) or entity is None:
            return entity
        counters = Counters.from_entity(entity).rolled(self._clock())
        for release in [d.release for d in landed] + [d.gives_back for d in missed]:
            if release is None:
                continue
            counters = release.apply(counters)
        try:
            written = await self.write(entity, counters.to_entity(pk), counted)
        except PreconditionFailed:  # another instance wrote first: nothing given back yet, try on the next read
            self._doubts.setdefault(pk, []).extend(landed + missed)
            return await self._store.get(self._table, pk, COUNTERS_ROW)
        except StorageError:  # unknown again: giving it back twice would be worse than letting it expire
            self._markers.pop(pk, None)
            log.warning("reservation of unknown outcome left to expire with its epoch", extra={"partition": pk})
            raise
        log.info("reservation of a request refused during a storage outage given back",
                 extra={"partition": pk, "count": len(landed) + len(missed)})
        self.remember(pk, written)
        return written

    def _start_resolver(self, pk: str) -> None:
        task = self._resolvers.get(pk)
        if task is None or task.done():
            self._resolvers[pk] = asyncio.get_running_loop().create_task(
                self._resolve(pk), name="quota-doubt", context=circuit.background_context())  # not the request's

    async def _resolve(self, pk: str) -> None:
        """Retry the fresh read that settles a doubt until storage answers (a caller may not come back soon)."""
        probe = _Probe("doubt")
        started = self._monotonic()
        while self._doubts.get(pk) and self._monotonic() - started < DOUBT_RESOLVE_SECONDS:
            await asyncio.sleep(0.5)
            try:
                async with self.lock(pk):
                    self.remember(pk, await self.get(pk, probe))
            except StorageError:
                continue
        if self._doubts.pop(pk, None):
            log.warning("reservation of unknown outcome left to expire with its epoch", extra={"partition": pk})


def _landed(entity: Entity | None, lost: list[tuple[str, str | None]], gives_back_only: bool, what: str) -> bool:
    """Whether a try whose reply was lost is on the row just read. A give-back whose fate the row's history can
    no longer prove is a ``WriteInDoubt``: applying it again could give room back twice."""
    history = writers(entity)
    if any(marker in history for marker, _ in lost):
        return True
    if lost and gives_back_only and not all(surely_missed(m, before, history) for m, before in lost):
        raise WriteInDoubt(f"{what}: its reply was lost and more writes since leave its outcome unknown")
    return False

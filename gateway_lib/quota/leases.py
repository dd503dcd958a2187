"""Leased admission (``GATEWAY_QUOTA_MODE=leased``): quota reserved in blocks, usage written behind.

Strict admission (``quota.Admission``) puts two storage round trips on every request: a conditional
write to reserve, one transaction to settle. With Table Storage that is most of what the gateway adds
to a request, and one caller's requests queue on its single counters row. Here:

* **Leases.** A process reserves room for several requests at once on the caller's counters row,
  exactly as strict mode reserves one (the same conditional write, the same limit checks), and admits
  requests from that block locally until it is used up, the minute or reservation epoch turns, or the
  caller goes idle. The block is sized from the caller's recent rate on this process (half a second
  of its traffic, longer when grants are slow, at most ``LEASE_MAX_REQUESTS``) and takes at most half
  the room the row has left; when fewer than two requests fit, the process asks for exactly one
  request's worth, so refusals happen where strict mode refuses.
* **Write-behind.** A request's settlement (its cost row and its counters change) joins a journal
  that a background task commits every ``FLUSH_INTERVAL_SECONDS``, up to 99 cost rows plus the
  counters row in one entity-group transaction (idempotent per batch, like strict settle per row).
  A row committed over ``ledger.LATE_AFTER`` after it settled (after an outage) is marked late and
  indexed for the budget rollup in the same transaction (docs/budgets.md, "Rows committed late").

Each request is still admitted against its reserved worst case on the shared row, so the overspend
bound of docs/storage.md is unchanged. What changes: other instances see a lease as in-flight spend
(a caller near its limit may be refused on one instance while another holds unused room, for at most
``LEASE_IDLE_SECONDS``); counters and cost rows lag by up to a flush interval; and a process killed
without warning loses the journal it had not yet committed (at most ``FLUSH_INTERVAL_SECONDS`` of
cost rows; its leases drop out with the reservation epochs). A storage outage keeps the journal in
memory and retries; past ``MAX_PENDING_ROWS`` new requests are refused (503) rather than buffered. A row
whose journal falls ``JOURNAL_MAX_BEHIND`` rows behind (storage slower than the caller's traffic) makes
that caller's new requests wait for a commit: write-behind never outruns storage by more than that.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from contextlib import suppress
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from gateway_lib.auth.identity import Caller
from gateway_lib.billing.ledger import CostRow, as_committed, is_late, table_key
from gateway_lib.errors import GatewayError
from gateway_lib.quota.admission import (
    Admission,
    Reservation,
    Settlement,
    _Stale,
    _unavailable,
    background,
    team_partition,
)
from gateway_lib.quota.counter_rows import AlreadySettled
from gateway_lib.quota.counters import Counters, Limits, Release, check, rate_headers
from gateway_lib.quota.journal import Entry, Journal
from gateway_lib.quota.lease import Lease
from gateway_lib.storage import circuit
from gateway_lib.storage.base import Entity, StorageError
from gateway_lib.storage.circuit import StorageDown

log = logging.getLogger(__name__)

LEASE_MAX_REQUESTS = 1024
# A lease holds about this much of the caller's recent traffic on this process, and at least
# LEASE_RUNWAY_GRANTS times as long as the last grant took to write (row lock wait included): the successor
# is reserved when a quarter is used, and the rest must outlast its grant, however slow grants get under load
# (ADR 0007).
LEASE_HORIZON_SECONDS = 0.5
LEASE_HORIZON_MAX_SECONDS = 2.0
LEASE_RUNWAY_GRANTS = 4
LEASE_IDLE_SECONDS = 1.0  # an unused remainder goes back to the row after this long
FLUSH_INTERVAL_SECONDS = 0.05  # also the most a hard crash can lose
TRANSACTION_OPS = 100  # the most an entity-group transaction holds
BATCH_ROWS = TRANSACTION_OPS - 1  # 99 cost rows + the counters row
LATE_BATCH_ROWS = 49  # late rows come with their twins: 49 rows + 49 twins + the counters row
LATE_CUT_MARGIN = timedelta(seconds=15)  # a batch with rows about to be late is cut small already
MAX_PENDING_ROWS = 20_000
# Backpressure. One row's journal is committed one transaction at a time, so a caller settling faster than
# its commits land would grow it without end. Past this many rows behind (~20 transactions), that row's new
# requests wait for a commit; past BEHIND_WAIT_SECONDS, 503 (docs/storage.md, "Leased mode").
JOURNAL_MAX_BEHIND = 20 * BATCH_ROWS
BEHIND_WAIT_SECONDS = 5.0


class LeasedAdmission(Admission):
    """``Admission`` with leased reservations and write-behind settlement (see the module docstring)."""

    def __init__(self, *args: Any, flush_interval: float = FLUSH_INTERVAL_SECONDS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._leases: dict[str, Lease] = {}
        self._journals: dict[str, Journal] = {}
        self._pending_rows = 0
        self._flush_interval = flush_interval
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # renewals, early flushes: the loop keeps only weak references
        self._closing = asyncio.Event()
        self._grant_seconds = 0.0  # how long the last lease took to write, waiting for the row included

    # -- admission --

    def _reserve_now(self, caller: Caller, tokens: int, usd: Decimal, request_id: str) -> Reservation | None:
        """Admit from leases this process holds (the caller's and its team's) when that needs no storage call:
        the common case, served without a task or a wait. None sends the request down the full path."""
        if not self._tables_ready:
            return None
        override = self._fresh_override(caller.key, "caller")
        team_override = self._fresh_override(caller.team, "team") if caller.team else None
        if isinstance(override, _Stale) or isinstance(team_override, _Stale):
            return None
        if override is not None and override.status == "blocked":
            return None  # the full path says why
        res = self._reservation(caller, tokens, usd, request_id, self._clock())
        pk = table_key(caller.key)
        team_pk = team_partition(caller.team) if caller.team else None
        if not (self._lease_ready(pk, res) and (team_pk is None or self._lease_ready(team_pk, res))):
            return None
        res.headers = self._take(pk, Limits.of(caller.tier, override), res, caller.display)
        if team_pk is not None:
            self._take(team_pk, Limits.of(None, team_override), res, f"team {caller.team}")
        return res

    def _lease_ready(self, pk: str, res: Reservation) -> bool:
        journal = self._journals.get(pk)
        lease = self._leases.get(pk)
        return (self._pending_rows < MAX_PENDING_ROWS and (journal is None or not journal.holds_newcomers())
                and lease is not None and lease.fits(res))

    def _take(self, pk: str, limits: Limits, res: Reservation, who: str) -> dict[str, str]:
        """Admit ``res`` from the row's lease, which fits it; returns the x-ratelimit-* headers."""
        self._start_flusher()
        lease = self._leases[pk]
        headers = rate_headers(lease.take(res, self._monotonic()), limits, self._clock())
        if lease.requests * 4 < lease.granted * 3 and not lease.renewing:
            # A quarter used: reserve the successor now, in the background, so no request waits for a grant
            # (a grant queues behind a journal commit on the row lock).
            lease.renewing = True
            self._background(self._renew(pk, limits, res, who, lease))
        return headers

    async def _admit(self, pk: str, limits: Limits, res: Reservation, who: str) -> dict[str, str]:
        if self._pending_rows >= MAX_PENDING_ROWS:
            raise _unavailable()  # storage has been down for a while: refuse rather than buffer without end
        journal = self._journals.get(pk)
        if journal is not None and journal.holds_newcomers():
            await self._caught_up(pk, journal)
        self._start_flusher()
        lease = self._leases.get(pk)
        if lease is not None and lease.fits(res):
            return self._take(pk, limits, res, who)
        now = self._monotonic()
        async with self._rows.locked(pk):
            lease = self._leases.get(pk)  # another request of this caller may have renewed it meanwhile
            if lease is not None and lease.fits(res):
                return rate_headers(lease.take(res, now), limits, self._clock())
            headers = await self._grant(pk, limits, res, who, lease)
            self._grant_seconds = self._monotonic() - now  # the wait for the row lock included
            return headers

    async def _caught_up(self, pk: str, journal: Journal) -> None:
        """Wait in turn for the row's journal to have room (see ``JOURNAL_MAX_BEHIND``): each batch that lands
        lets held requests in, oldest first, so a request held longest is never overtaken by newer ones."""
        if (down := self._rows.down_for()) is not None:  # storage is known to be down: no commit is coming
            raise _unavailable(StorageDown("storage is unavailable", down))
        self._ask_flush(pk, journal)
        try:
            await journal.wait_in_turn(min(BEHIND_WAIT_SECONDS, circuit.remaining() or BEHIND_WAIT_SECONDS))
        except TimeoutError:
            raise _unavailable() from None  # storage is down, or far slower than this caller's traffic

    def _ask_flush(self, pk: str, journal: Journal) -> None:
        """Commit the row's journal now, not at the next tick: requests are held for it (one commit asked at a
        time; one under way is followed by the asked one)."""
        if not journal.flush_asked:
            journal.flush_asked = True
            self._background(self._flush_row(pk))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, context=circuit.background_context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _grant(self, pk: str, limits: Limits, res: Reservation, who: str, old: Lease | None) -> dict[str, str]:
        """Write a new lease (returning the old one's remainder in the same write) and admit ``res`` from it."""
        if old is not None:
            # The write gives back what ``old`` holds when the write is planned. A request taking from ``old``
            # meanwhile (a smaller one that still fits) would be admitted on room no longer reserved, and a budget
            # could be passed: ``old`` is out of reach until the write ends.
            del self._leases[pk]
        gives_back = old.remainder() if old is not None else None
        try:
            lease = await self._new_lease(pk, limits, res, who, old, gives_back)
        except GatewayError:  # refused, or lost the ETag race every time: nothing was written, ``old`` stands
            if old is not None:
                self._leases[pk] = old
            raise
        except StorageError:
            # A write whose reply was lost is in doubt: it may have landed and given ``old``'s room back already.
            # Its resolver gives that room back once a read shows the write surely did not land (counter_rows.Doubt);
            # otherwise it drops out with its reservation epoch (blocked budget, never overspend). A failure of
            # any other kind wrote nothing, so ``old`` still holds its room and stands.
            in_doubt = any(d.gives_back is gives_back for d in self._rows.doubts(pk))
            if old is not None and not in_doubt:
                self._leases[pk] = old
            raise
        self._leases[pk] = lease
        return rate_headers(lease.take(res, self._monotonic()), limits, self._clock())

    async def _renew(self, pk: str, limits: Limits, res: Reservation, who: str, current: Lease) -> None:
        """Reserve a successor while ``current`` is still in use; it takes over what is left of ``current``
        the moment it exists (both are room on the row for the same minute and epoch)."""
        started = self._monotonic()
        try:
            async with self._rows.lock(pk):
                if self._leases.get(pk) is not current:
                    return  # replaced meanwhile: the caller already has a fresh lease
                successor = await self._new_lease(pk, limits, res, who, old=None, rate_of=current)
                if self._leases.get(pk) is current:  # else the idle return took it while the write waited
                    successor.absorb(current)  # same minute and epoch: those of ``res``, which ``current`` fitted
                # A renewal is not a use: one that waited out an outage for the row must not keep the room of a
                # caller gone quiet meanwhile for another LEASE_IDLE_SECONDS.
                successor.used_at = current.used_at
                self._leases[pk] = successor
                self._grant_seconds = self._monotonic() - started
        except (GatewayError, StorageError) as exc:  # the request that finds the lease empty will ask itself
            log.debug("lease renewal skipped", extra={"partition": pk, "error": type(exc).__name__})
        finally:
            current.renewing = False

    async def _new_lease(self, pk: str, limits: Limits, res: Reservation, who: str, old: Lease | None,
                         gives_back: Release | None = None, rate_of: Lease | None = None) -> Lease:
        """Write a block sized like ``res`` (and give back ``old``'s remainder, ``gives_back``, in the same write)."""
        wanted = self._lease_size(rate_of or old)

        def plan(counters: Counters, now: datetime) -> tuple[Counters, Release]:
            counters = old.release(counters) if old is not None else counters
            if rate_of is not None and counters.minute != rate_of.minute:
                raise _MinuteGone()  # it would absorb a lease of the minute the row has left: room counted twice
            size = _fitting_size(counters, limits, res, who, wanted, now)
            # Stamped with the minute the row counts it in, which is the request's only if the minute did not
            # turn while the grant waited for the row: room stamped with the old minute would stay counted in
            # the new one after it is given back (``Counters.released`` only lowers the minute it names).
            return counters, Release(counters.minute, res.epoch, size, size * res.tokens, size * res.usd)

        admitted, block, _ = await self._reserve_on_row(pk, res, who, plan, gives_back)
        clock = self._monotonic()
        return Lease(block.minute, res.epoch, block.requests, block.tokens, block.usd, block.requests, clock, clock,
                     block.apply(admitted))

    def _lease_size(self, old: Lease | None) -> int:
        """The rate at which the previous lease was used up, times the horizon (see LEASE_RUNWAY_GRANTS)."""
        if old is None:
            return 1
        used = old.granted - old.requests
        lasted = max(self._monotonic() - old.granted_at, 1e-3)
        horizon = min(LEASE_HORIZON_MAX_SECONDS, max(LEASE_HORIZON_SECONDS, LEASE_RUNWAY_GRANTS * self._grant_seconds))
        return max(1, min(LEASE_MAX_REQUESTS, math.ceil(used / lasted * horizon)))

    async def _undo(self, res: Reservation, pk: str | None = None) -> None:
        """A reservation not used after all (the team refused, the caller left): its room goes back to the
        row's lease it came from."""
        lease = self._leases.get(pk or table_key(res.caller_key))
        if lease is not None and lease.minute == res.minute and lease.epoch == res.epoch:
            lease.give_back(res)
            return
        await super()._undo(res, pk)

    # -- settlement, written behind --

    def settle_now(self, res: Reservation, row: CostRow) -> Settlement | None:
        """Journal the settlement (written behind); None for a fail-open request, which has no counters."""
        if not res.accounted:
            return None
        self._journal_entry(table_key(res.caller_key), (res, row), team=False)
        self._pending_rows += 1
        if res.team:
            self._journal_entry(team_partition(res.team), (res, row), team=True)
        return Settlement(False, res.round_trips)

    def _journal_entry(self, pk: str, entry: Entry, team: bool) -> None:
        journal = self._journal(pk, team)
        journal.entries.append(entry)
        if journal.waiting:  # requests are held for this row's commits: no waiting for the tick
            self._ask_flush(pk, journal)

    async def _finish(self, res: Reservation, row: CostRow) -> Settlement:
        return self.settle_now(res, row) or await super()._finish(res, row)

    async def usage_view(self, subject: Caller | str, now: datetime | None = None) -> dict[str, Any]:
        """Read-your-writes on this instance: commit what it owes the row before reading it."""
        key = subject if isinstance(subject, str) else subject.key
        await self.flush(table_key(key))
        return await super().usage_view(subject, now)

    async def flush(self, pk: str | None = None) -> None:
        """Commit the journal of one row (or of every row), batch by batch."""
        pks = [pk] if pk is not None else list(self._journals)
        # Only journals with entries: a task per idle caller on every tick would cost more than the commits.
        await asyncio.gather(*(self._flush_row(p) for p in pks if p in self._journals and self._journals[p].entries))

    async def _commit_buffered(self) -> None:
        """Stop the flusher, commit every journal and give every lease back (``aclose``)."""
        if self._flusher is not None:
            # Stopped between ticks, not cancelled: a write cancelled in flight loses the knowledge of whether it
            # landed (a team commit applied twice by the flush below, a lease return's room never given back).
            self._closing.set()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._tasks:  # a renewal in flight may still be writing its lease: let it land first
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        await self._return_leases(idle_for=0.0)

    async def _flush_row(self, pk: str) -> None:
        """Commit what the journal held when called: entries that arrive during a commit wait for the next
        tick (chasing them would turn the journal into one small transaction after another), unless requests
        are held for the row, which ask for the next commit at once (``_ask_flush``)."""
        journal = self._journals[pk]
        async with journal.flushing:
            journal.flush_asked = False
            owed = len(journal.entries)
            while owed > 0:
                batch = journal.entries[:min(owed, BATCH_ROWS)]
                soon = self._clock() + LATE_CUT_MARGIN
                if not journal.team and any(is_late(row, soon) for _, row in batch):
                    batch = batch[:LATE_BATCH_ROWS]  # each late row brings its twin into the transaction
                try:
                    done = await self._commit(pk, batch, journal.team)
                except StorageError as exc:  # kept: the next tick retries (a batch cut afresh from the journal)
                    log.warning("usage journal not committed; retrying",
                                extra={"rows": len(journal.entries), "error": type(exc).__name__})
                    return
                if done is None:
                    continue  # its rows turned late while it waited: cut again at once (a late cut always fits)
                if not done:
                    return  # refused, yet none of its rows is there: the next tick reads the row afresh
                owed -= len(done)  # rows an earlier commit had not landed stay owed: a shutdown flush commits them
                gone = {id(entry) for entry in done}
                journal.entries[:] = [entry for entry in journal.entries if id(entry) not in gone]
                # A held request in for each row that landed: the rows of those let in are on their way, and
                # counting them as there keeps the journal near its bound.
                journal.make_room(len(done))
                if not journal.team:
                    self._pending_rows -= len(done)
                    await self._list_callers(batch)

    async def _commit(self, pk: str, batch: list[Entry], team: bool) -> list[Entry] | None:
        """One transaction: the batch's cost rows and the counters row settled for all of them. Returns the
        entries that are now committed: the batch, or those of its rows an earlier commit had landed; None
        when the batch has to be cut smaller.

        A row settled over ``LATE_AFTER`` ago (the journal waited out an outage) may land behind the budget
        rollup's checkpoint: it is marked late and indexed by this attempt's time, so the rollup counts it
        once, through the index. Decided at each attempt, under the row lock: a wait for the lock must not
        let a row judged on time land late. A retry after a lost reply builds new twins, but the
        transaction that landed first makes the retry fail on its rows (``AlreadySettled``). Such a refusal
        is always settled by reading which rows exist, even after this call's own attempt was in doubt: the
        rows found may be those of an earlier, differently cut batch that landed unconfirmed.
        """
        async def write(entity: Entity | None, pk: str) -> Entity:
            counters = Counters.from_entity(entity).rolled(self._clock())
            for res, row in batch:
                counters = counters.settle(res, row.total_tokens, row.cost_usd)
            if team:
                return await self._rows.write(entity, counters.to_entity(pk), batch[0][0])
            rows, index = as_committed([row for _, row in batch], self._clock())
            if len(rows) + len(index) + 1 > TRANSACTION_OPS:
                raise _CutSmaller
            try:
                return await self._rows.commit(entity, counters.to_entity(pk), rows, batch[0][0], index)
            except AlreadySettled as exc:  # not for until_written, which would take it for its own doubted attempt
                raise _Refused from exc

        try:
            await self._rows.until_written(batch[0][0], pk, write, "team flush" if team else "flush")
        except _CutSmaller:
            return None
        except _Refused:
            # An earlier commit whose reply was lost landed some of these rows, and its outcome was not
            # known when this batch was cut: a tick that gave up on it, then a batch cut differently
            # (more rows since, or fewer once they were late). Exactly the rows found landed are done.
            self._rows.remember(pk, None)
            return await self._landed(pk, batch)
        return batch

    async def _landed(self, pk: str, batch: list[Entry]) -> list[Entry]:
        keys = sorted(row.row_key for _, row in batch)
        found = await self._store.query(self._table, pk, row_key_from=keys[0], row_key_to=f"{keys[-1]} ")
        present = {entity.row_key for entity in found}
        landed = [entry for entry in batch if entry[1].row_key in present]
        log.warning("usage journal batch partly committed earlier; committing the rest",
                    extra={"partition": pk, "landed": len(landed), "batch": len(batch)})
        return landed

    async def _list_callers(self, batch: list[Entry]) -> None:
        res, row = batch[0]
        try:  # the rollup's caller directory (remembered per process: 0 round trips after the first)
            await self._directory.register(res.caller_key, res.team, res.tier, row.time, tenant=row.tenant_id,
                                           names=res.names)
        except StorageError:
            log.warning("caller not yet listed for the budget rollup", extra={"caller": res.caller_key})

    # -- the background task --

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_forever(), name="usage-journal", context=circuit.background_context())

    async def _flush_forever(self) -> None:
        while not self._closing.is_set():
            with suppress(TimeoutError):  # real time, whatever clock the tests inject
                await asyncio.wait_for(self._closing.wait(), self._flush_interval)
            if self._closing.is_set():
                return  # aclose commits what is left
            try:
                self._tick()
            except Exception:  # the loop must outlive any one bad tick; the journal stays for the next
                log.exception("usage journal flush failed")

    def _tick(self) -> None:
        """Start a commit for each journal with entries and none under way, and the return of each idle lease.
        Each runs on its own: one row riding out an outage or an ETag storm delays no other row's commits or
        returns."""
        for pk, journal in self._journals.items():
            if journal.entries and not journal.flushing.locked():
                self._ask_flush(pk, journal)
        for pk, lease in self._idle_leases(LEASE_IDLE_SECONDS):
            self._background(self._return_lease(pk, lease))

    def _idle_leases(self, idle_for: float) -> list[tuple[str, Lease]]:
        """The leases unused for ``idle_for`` seconds, taken out of use at once: from here on, their callers'
        requests take new ones, and a later tick cannot pick them again."""
        now = self._monotonic()
        idle = [(pk, lease) for pk, lease in self._leases.items() if now - lease.used_at >= idle_for]
        for pk, _ in idle:
            del self._leases[pk]
        return idle

    async def _return_leases(self, idle_for: float) -> None:
        await asyncio.gather(*(self._return_lease(pk, lease) for pk, lease in self._idle_leases(idle_for)))

    async def _return_lease(self, pk: str, lease: Lease) -> None:
        """Give ``lease``'s remainder back to the row (``lease`` was taken out of use by ``_idle_leases``)."""
        if lease.requests == 0 and lease.tokens == 0 and lease.usd == 0:
            return
        probe = background(pk, "lease-return")

        async def write(entity: Entity | None, pk: str) -> Entity:
            released = lease.release(Counters.from_entity(entity).rolled(self._clock()))
            return await self._rows.write(entity, released.to_entity(pk), probe)

        try:
            await self._rows.until_written(probe, pk, write, "lease return", gives_back_only=True,
                                           owed=lease.remainder())
        except StorageError:  # given back once storage answers (the doubt resolver), or dropped with its epoch
            log.warning("lease remainder not returned yet", extra={"partition": pk})

    def _journal(self, pk: str, team: bool) -> Journal:
        journal = self._journals.get(pk)
        if journal is None:
            journal = self._journals[pk] = Journal(team, JOURNAL_MAX_BEHIND)
        return journal


class _MinuteGone(GatewayError):
    """A renewal planned after the row's minute turned: its successor would fit no request of the new minute."""

    def __init__(self) -> None:
        super().__init__("the minute turned before the lease was renewed")


class _Refused(Exception):
    """The batch's commit was refused as "exists": ``_landed`` finds out which of its rows are there."""


class _CutSmaller(Exception):
    """Rows of the batch became late while it waited for its row: with their twins it no longer fits."""


def _fitting_size(counters: Counters, limits: Limits, res: Reservation, who: str, wanted: int, now: datetime) -> int:
    """The block to reserve: up to ``wanted`` requests' worth, but at most half the room the row has left, so
    the caller's other instances find room too; exactly this request when fewer than two would fit (the
    refusal then comes from the same check strict mode makes)."""
    size = wanted
    while size > 1:
        try:
            check(counters, limits, 2 * size * res.tokens, 2 * size * res.usd, now, who, 2 * size)
            return size
        except GatewayError:
            size //= 2
    check(counters, limits, res.tokens, res.usd, now, who)
    return 1

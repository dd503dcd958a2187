"""A row's journal: settlements written behind, and the requests held while it is too far behind
(leased admission, ``quota/leases.py``)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from gateway_lib.billing.ledger import CostRow
from gateway_lib.quota.admission import Reservation

Entry = tuple[Reservation, CostRow]  # a settlement waiting in a journal


@dataclass
class Journal:
    """Settlements of one counters row waiting to be committed, oldest first."""

    team: bool  # a team's row: counters only (the cost rows live in the callers' partitions)
    max_behind: int  # past this many entries, the row's new requests wait for commits
    entries: list[Entry] = field(default_factory=list)
    flushing: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)  # requests held for room, oldest first
    flush_asked: bool = False  # a held request has started a commit not yet under way (one is enough)

    def holds_newcomers(self) -> bool:
        """New requests of the row wait: the journal is full, or others wait already (they go first)."""
        return len(self.entries) >= self.max_behind or bool(self.waiting)

    async def wait_in_turn(self, timeout: float) -> None:
        """Wait behind the requests held before this one until ``make_room`` lets it in; TimeoutError past
        ``timeout``."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        await asyncio.wait_for(waiter, timeout)

    def make_room(self, room: int) -> None:
        """Let up to ``room`` held requests in, oldest first."""
        while room > 0 and self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():  # not timed out meanwhile
                waiter.set_result(None)
                room -= 1

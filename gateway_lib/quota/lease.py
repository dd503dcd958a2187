"""A lease: room reserved on one counters row for this process, handed out request by request
(leased admission, ``quota/leases.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from gateway_lib.quota.admission import Reservation
from gateway_lib.quota.counters import Counters, Release


@dataclass
class Lease:
    """Room reserved on one counters row for this process, not yet handed to a request."""

    minute: str
    epoch: int
    requests: int
    tokens: int
    usd: Decimal
    granted: int  # requests the block was sized for (the rate estimate of the next one)
    granted_at: float
    used_at: float
    seen: Counters  # the row as written at grant time, plus what this process admitted since (headers)
    renewing: bool = False  # a successor is being reserved in the background

    def fits(self, res: Reservation) -> bool:
        # A lease of a later minute than the request's serves it: the row, rolled forward by an instance whose
        # clock runs ahead, counts the block in that minute (never one of an earlier minute: that one is gone).
        return (self.minute >= res.minute and self.epoch == res.epoch and self.requests >= 1
                and self.tokens >= res.tokens and self.usd >= res.usd)

    def take(self, res: Reservation, now: float) -> Counters:
        self.requests -= 1
        self.tokens -= res.tokens
        self.usd -= res.usd
        self.used_at = now
        self.seen = self.seen.reserve(res.tokens, res.usd)
        return self.seen

    def give_back(self, res: Reservation) -> None:
        self.requests += 1
        self.tokens += res.tokens
        self.usd += res.usd

    def release(self, counters: Counters) -> Counters:
        return self.remainder().apply(counters)

    def remainder(self) -> Release:
        """The unused room, as what giving it back releases on the row."""
        return Release(self.minute, self.epoch, self.requests, self.tokens, self.usd)

    def absorb(self, old: Lease) -> None:
        """Take over ``old``'s unused room (same minute and epoch: the same reservation on the row)."""
        self.requests += old.requests
        self.tokens += old.tokens
        self.usd += old.usd
        old.requests, old.tokens, old.usd = 0, 0, Decimal(0)

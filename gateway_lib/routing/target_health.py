"""Per-process target health: a latency EWMA and a circuit breaker per target.

This is per process **on purpose**. Health is an observation ("the last call from
here failed"), not a quota: every instance may learn it on its own, at the cost of
one failed call each, and sharing it through storage would add a round trip to every
request and a new way to fail. Quotas, which must hold across instances, live in
``quota``.

Circuit: ``closed`` -> ``open`` on a retryable failure, for a cooldown of the
upstream's Retry-After when given, else 2s doubling per consecutive failure up to
60s. After the cooldown the circuit is ``half_open``: one caller takes the single
probe slot; its success closes the circuit, its failure opens it again for longer.
A probe that never reports back (a crashed task) frees its slot after a lease.

All times are from the injectable ``clock`` (monotonic seconds); the router gets an
immutable ``HealthView`` and the same clock's ``now``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

Circuit = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class TargetStatus:
    latency_ms: float | None = None  # EWMA of successful calls; None until the first success
    circuit: Circuit = "closed"
    open_until: float = 0.0  # clock time the cooldown ends (meaningful when open)
    probe_taken: bool = False  # half-open and its one probe is in flight
    upstream_hold: bool = False  # the cooldown is the upstream's own Retry-After
    failures: int = 0  # consecutive
    reason: str | None = None  # the failure that started the cooldown (a ProviderError kind: "rate_limited", ...)

    def circuit_at(self, now: float) -> Circuit:
        """The circuit as seen at ``now``: an open circuit whose cooldown ended is half-open."""
        if self.circuit == "open" and now >= self.open_until:
            return "half_open"
        return self.circuit

    def admits_at(self, now: float) -> bool:
        circuit = self.circuit_at(now)
        return circuit == "closed" or (circuit == "half_open" and not self.probe_taken)

    def retry_in(self, now: float) -> float:
        return max(0.0, self.open_until - now) if self.circuit != "closed" else 0.0


UNKNOWN = TargetStatus()
MAX_UPSTREAM_HOLD = 600.0  # seconds: a Retry-After beyond this (a proxy's odd header) is not honoured in full


@dataclass(frozen=True)
class HealthView:
    """An immutable snapshot for the pure router."""

    statuses: Mapping[str, TargetStatus]

    def status(self, target_id: str) -> TargetStatus:
        return self.statuses.get(target_id, UNKNOWN)


class TargetHealth:
    """The mutable per-process store behind ``HealthView`` snapshots (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, alpha: float = 0.3,
                 base_cooldown: float = 2.0, max_cooldown: float = 60.0, probe_lease: float = 60.0) -> None:
        self._clock = clock
        self._alpha = alpha
        self._base = base_cooldown
        self._cap = max_cooldown
        self._lease = probe_lease
        self._probe_started: dict[str, float] = {}
        self._statuses: dict[str, TargetStatus] = {}
        # Adapters run blocking SDK calls in threads; a lock keeps read-modify-write whole.
        self._lock = threading.Lock()

    def view(self) -> HealthView:
        with self._lock:
            self._expire_leases(self._clock())
            return HealthView(MappingProxyType(dict(self._statuses)))

    def admit(self, target_id: str, *, force: bool = False) -> bool:
        """May a call go to this target now? A half-open target hands out its one probe slot. ``force`` (every
        target of the route is cooling down) probes before the cooldown ends, but still one call at a time:
        the callers who arrive meanwhile must not all pile onto a failing upstream."""
        with self._lock:
            now = self._clock()
            self._expire_leases(now)
            status = self._statuses.get(target_id, UNKNOWN)
            circuit = status.circuit_at(now)
            if circuit == "closed":
                return True
            if status.probe_taken or (not force and not status.admits_at(now)):
                return False
            self._statuses[target_id] = replace(status, circuit="half_open", probe_taken=True)
            self._probe_started[target_id] = now
            return True

    def record_success(self, target_id: str, latency_ms: float) -> None:
        with self._lock:
            status = self._statuses.get(target_id, UNKNOWN)
            ewma = latency_ms if status.latency_ms is None else (
                self._alpha * latency_ms + (1 - self._alpha) * status.latency_ms)
            self._statuses[target_id] = TargetStatus(latency_ms=ewma)
            self._probe_started.pop(target_id, None)

    def record_failure(self, target_id: str, retry_after: float | None = None, reason: str | None = None) -> None:
        """A retryable failure: open the circuit (again) for the cooldown, remembering why (``reason``)."""
        with self._lock:
            now = self._clock()
            status = self._statuses.get(target_id, UNKNOWN)
            failures = status.failures + 1
            cooldown = min(retry_after, MAX_UPSTREAM_HOLD) if retry_after else min(
                self._base * 2 ** (failures - 1), self._cap)
            self._statuses[target_id] = TargetStatus(
                latency_ms=status.latency_ms, circuit="open", open_until=now + cooldown,
                upstream_hold=bool(retry_after), failures=failures, reason=reason)
            self._probe_started.pop(target_id, None)

    def release(self, target_id: str) -> None:
        """The call ended without a verdict on the target (cancelled, or the caller's own 4xx)."""
        with self._lock:
            status = self._statuses.get(target_id)
            if status is not None and status.probe_taken:
                self._statuses[target_id] = replace(status, probe_taken=False)
            self._probe_started.pop(target_id, None)

    def _expire_leases(self, now: float) -> None:
        for target_id, started in list(self._probe_started.items()):
            if now - started >= self._lease:
                self._statuses[target_id] = replace(self._statuses[target_id], probe_taken=False)
                del self._probe_started[target_id]

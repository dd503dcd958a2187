"""How many output tokens a request is expected to use, for tokens-per-minute admission.

Reserving every request's whole output cap refuses bursts of short answers a caller never asked to be
long. Token windows therefore count the prompt plus an expected output: twice the caller's recent
average answer (an exponentially weighted mean, per process), ``DEFAULT_OUTPUT_TOKENS`` before its first
answer, never above the request's cap. Settling replaces it with the actual usage. USD budgets are still
reserved at the worst case; the overshoot this allows on token windows is bounded in docs/storage.md.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

DEFAULT_OUTPUT_TOKENS = 1024  # a caller's first requests, until its answers are known
HEADROOM = 2.0  # expect up to twice the recent average: answers vary
MIN_OUTPUT_TOKENS = 16
WEIGHT = 0.2  # of the newest answer in the average
MAX_CALLERS = 10_000  # averages kept per process (least recently answered dropped first)


class ExpectedOutput:
    """Per-caller averages of answer length; safe to share between the requests of one process."""

    def __init__(self) -> None:
        self._average: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def tokens(self, caller_key: str, cap: int) -> int:
        """Output tokens to count for one answer of at most ``cap`` tokens (0 when no output is produced)."""
        with self._lock:
            average = self._average.get(caller_key)
        guess = DEFAULT_OUTPUT_TOKENS if average is None else math.ceil(average * HEADROOM)
        return min(cap, max(guess, MIN_OUTPUT_TOKENS))

    def observe(self, caller_key: str, completion_tokens: float) -> None:
        """Learn from one answer's length (per choice)."""
        with self._lock:
            average = self._average.pop(caller_key, None)
            self._average[caller_key] = (completion_tokens if average is None
                                         else (1 - WEIGHT) * average + WEIGHT * completion_tokens)
            if len(self._average) > MAX_CALLERS:
                self._average.popitem(last=False)

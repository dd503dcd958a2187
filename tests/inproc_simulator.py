"""Helpers for tests that drive the provider simulator directly in a thread (not through a stack).

Also a pytest plugin (``pytest_plugins`` in tests/conftest.py): ``thread_sim`` is a simulator running in
a thread for the test module, reset to no faults and fresh stats before each test that asks for it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tools.provider_simulator import RunningSimulator, start_in_thread


@pytest.fixture(scope="module")
def _thread_sim_server() -> Iterator[RunningSimulator]:
    with start_in_thread() as running:
        yield running


@pytest.fixture
def thread_sim(_thread_sim_server: RunningSimulator) -> RunningSimulator:
    reset(_thread_sim_server)
    return _thread_sim_server


def control(sim: RunningSimulator, method: str, path: str, body: Any = None) -> Any:
    """Call the simulator's /_sim control API."""
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(sim.url + path, data=data, method=method), timeout=5) as r:
        return json.loads(r.read())


def reset(sim: RunningSimulator) -> None:
    """No faults, fresh stats, default latency and STS settings."""
    control(sim, "DELETE", "/_sim/faults")
    control(sim, "POST", "/_sim/reset")
    control(sim, "POST", "/_sim/config", {"latency_ms": 0, "chunk_delay_ms": 0, "sts_audience": None,
                                          "sts_expiry_seconds": 900})

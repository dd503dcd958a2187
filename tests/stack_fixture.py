"""Session fixtures: the whole local stack (Azurite, simulator, dev issuer, local host) on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests

from tools.stack import Ports, Stack


class Sim:
    """Drives the provider simulator's fault-injection and stats API."""

    def __init__(self, base: str) -> None:
        self.base = base

    @classmethod
    def of(cls, stack: Stack) -> Sim:
        return cls(f"http://127.0.0.1:{stack.ports.simulator}")

    def fault(self, **spec: object) -> None:
        requests.post(f"{self.base}/_sim/faults", json=spec, timeout=5).raise_for_status()

    def clear(self) -> None:
        requests.delete(f"{self.base}/_sim/faults", timeout=5).raise_for_status()
        requests.post(f"{self.base}/_sim/reset", timeout=5).raise_for_status()

    def stats(self) -> dict:
        response = requests.get(f"{self.base}/_sim/stats", timeout=5)
        response.raise_for_status()
        return response.json()

    def total(self) -> int:
        return int(self.stats()["total"])

    def count(self, target: str) -> int:
        return int(self.stats()["targets"].get(target, {}).get("count", 0))

    def last(self, target: str) -> dict:
        """The last request the simulator received for a deployment / model id."""
        return self.stats()["targets"][target]["last"]


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    running = Stack(ports=Ports.free()).start()
    try:
        yield running
        assert running.log_dir is not None
        host_log = (running.log_dir / "host.log").read_text(errors="replace")
        assert "netguard:" not in host_log, "the gateway tried to leave loopback: " + host_log[-2000:]
    finally:
        running.stop()


@pytest.fixture(scope="session")
def base_url(stack: Stack) -> str:
    return stack.base_url


@contextmanager
def cleared_sim(stack: Stack) -> Iterator[Sim]:
    """The stack's simulator with no faults and fresh stats, cleared again afterwards."""
    driver = Sim.of(stack)
    driver.clear()
    try:
        yield driver
    finally:
        driver.clear()


@pytest.fixture()
def sim(stack: Stack) -> Iterator[Sim]:
    with cleared_sim(stack) as driver:
        yield driver


@pytest.fixture(scope="session")
def token(stack: Stack) -> str:
    return stack.token("e2e-alice", "Gateway.Standard")


@pytest.fixture(scope="session")
def admin_token(stack: Stack) -> str:
    return stack.token("e2e-admin", "Gateway.Admin")

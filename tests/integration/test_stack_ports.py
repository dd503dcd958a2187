"""The local stack's port handling: distinct picks, and no taking someone else's listener for our process."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tools.azurite import HOST, free_ports
from tools.stack import Ports, Stack


def test_ports_picked_together_are_distinct() -> None:
    for _ in range(5000):  # picked one by one, a just-released port comes back now and then (a CI run hit it)
        picked = free_ports(4)
        assert len(set(picked)) == 4, picked
    ports = Ports.free()
    assert len({ports.host, ports.simulator, ports.issuer, ports.azurite}) == 4, ports


def test_a_process_is_not_started_on_a_port_someone_else_listens_on(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = Stack(ports=Ports(host=port, simulator=port, issuer=port, azurite=port), data_dir=tmp_path,
                      storage_mode="memory")
        with pytest.raises(RuntimeError, match=f"simulator: port {port} is already in use"):
            stack.start()
    assert stack.procs == {}

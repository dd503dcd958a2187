import socket

import pytest

from tools import netguard


@pytest.mark.parametrize("host", ["169.254.169.254", "10.0.0.1", "8.8.8.8", "login.microsoftonline.com"])
def test_non_loopback_connections_are_refused(host: str) -> None:
    with pytest.raises(netguard.NonLoopbackConnection):
        socket.create_connection((host, 80), timeout=1)
    assert netguard.refused[-1].startswith(host)
    netguard.refused.clear()  # deliberate: not a leak for the session check


def test_loopback_is_allowed() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=1):
        pass
    server.close()

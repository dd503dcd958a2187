"""Refuse every outbound connection that is not to loopback.

Installed by the test suite (tests/conftest.py) and by the local host, so that nothing
here can reach a real cloud endpoint, the Azure instance metadata service
(169.254.169.254) included, even by accident.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any, NoReturn

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
_installed = False
# Every refusal, even one some library caught and swallowed (credential chains, exporters): the test
# session fails at the end if this is not empty.
refused: list[str] = []


class NonLoopbackConnection(ConnectionRefusedError):
    """Raised instead of connecting to anything but loopback."""


def is_loopback(host: str) -> bool:
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check(address: Any) -> None:
    if isinstance(address, tuple) and address and isinstance(address[0], str) and not is_loopback(address[0]):
        _refuse(f"{address[0]}:{address[1]}", "connection to")


def _refuse(where: str, what: str) -> NoReturn:
    refused.append(where)
    message = f"netguard: {what} {where} refused (loopback only)"
    print(message, file=sys.stderr, flush=True)  # lands in a server's log even if a library swallows the error
    raise NonLoopbackConnection(message)


def install() -> None:
    """Patch socket connect/resolve paths. Idempotent."""
    global _installed
    if _installed:
        return
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        _check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if host is not None and not is_loopback(str(host)):
            _refuse(str(host), "name lookup of")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign, assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign, assignment]
    socket.getaddrinfo = getaddrinfo
    _installed = True

"""Clients a test module opens, closed when the module ends: an unclosed SDK client leaks its sockets,
a ResourceWarning, which this suite treats as an error. ``tests/conftest.py`` closes them per module."""

from __future__ import annotations

from typing import Any, TypeVar

C = TypeVar("C")
_open: list[Any] = []


def keep(client: C) -> C:
    """``client``, to be closed when its test module ends."""
    _open.append(client)
    return client


def close_all() -> None:
    while _open:
        _open.pop().close()

"""Pytest fixtures for Azurite (registered by ``pytest_plugins`` in tests/conftest.py).

``azurite``: one Azurite Table process for the whole session, on a free port, data in a
temp dir. ``azurite_connection_string``: its connection string. ``table_prefix``: a fresh
prefix per test, so tests share the process but never a table. ``own_azurite``: a private
process for tests that stop and restart storage mid-run (leaving the shared one alone).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.azurite import BINARY, Azurite, free_port


def _require_node() -> None:
    # A failure, not a skip: a run without Azurite would pass while testing none of the storage paths.
    if not BINARY.exists() and shutil.which("npm") is None:
        pytest.fail("Azurite is not installed and npm is unavailable (Node 18+ needed; `make test` installs it)")


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    _require_node()
    with Azurite(free_port(), Path(tmp_path_factory.mktemp("azurite"))) as server:
        yield server


@pytest.fixture(scope="session")
def azurite_connection_string(azurite: Azurite) -> str:
    return azurite.connection_string


@pytest.fixture
def own_azurite(tmp_path: Path) -> Iterator[Azurite]:
    _require_node()
    with Azurite(free_port(), tmp_path / "azurite") as server:
        yield server


@pytest.fixture
def table_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]

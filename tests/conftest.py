"""Suite-wide guard: no test may open a connection to anything but loopback."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from tests import closing  # noqa: E402
from tools import netguard  # noqa: E402

netguard.install()

pytest_plugins = ["tests.stack_fixture", "tests.azurite_fixture", "tests.inproc_simulator"]


@pytest.fixture(autouse=True, scope="module")
def _close_module_clients() -> Iterator[None]:
    yield
    closing.close_all()


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    """Fail the run if anything tried to leave loopback, even where a library swallowed the refusal."""
    if netguard.refused:
        print(f"\nnetguard refused non-loopback connections: {sorted(set(netguard.refused))}")
        session.exitstatus = 1  # type: ignore[attr-defined]

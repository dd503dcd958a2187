"""Spend reports on Azurite: the scenarios of tests/unit/test_reports.py against real Table Storage (real key
ranges, paging, ETags and entity-group transactions), rows settled through the admission path."""

from __future__ import annotations

import pytest

from tests import conftest
from tests.integration.test_budget_azurite import on_azurite
from tests.unit.test_reports import (
    scenario_chargeback_is_reproducible_and_exact,
    scenario_pages_of_callers_add_up_to_the_whole,
    scenario_reports_equal_the_ledger_through_every_rollup_state,
)

if "tests.azurite_fixture" not in getattr(conftest, "pytest_plugins", ()):
    from tests.azurite_fixture import azurite, azurite_connection_string, table_prefix  # noqa: F401

pytestmark = pytest.mark.integration


def test_reports_equal_the_ledger_through_every_rollup_state(azurite_connection_string: str, table_prefix: str) -> None:
    on_azurite(azurite_connection_string,
               lambda store: scenario_reports_equal_the_ledger_through_every_rollup_state(store, table_prefix))


def test_pages_of_callers_add_up_to_the_whole(azurite_connection_string: str, table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_pages_of_callers_add_up_to_the_whole(store, table_prefix))


def test_chargeback_is_reproducible_and_exact(azurite_connection_string: str, table_prefix: str) -> None:
    on_azurite(azurite_connection_string, lambda store: scenario_chargeback_is_reproducible_and_exact(store, table_prefix))

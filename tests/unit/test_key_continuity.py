"""Keys built from names stay what they were for every name that fitted before the cap on long names (rows
already written keep being found: a team's spent budget stays spent)."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal

import pytest

from gateway_lib.billing.ledger import table_key, usage_table
from gateway_lib.errors import QuotaExceeded
from gateway_lib.quota.admission import tables
from gateway_lib.quota.counters import Counters, epoch_of, minute_key
from gateway_lib.quota.overrides import Override, get_override, put_override
from tests.unit.test_quota import Clock, make_caller, new_admission, run

TEAM = "research-" + "x" * 241  # a 250-character team claim: its key (255 chars) was always valid in Azure


def test_a_long_team_names_counters_keep_their_partition_across_the_upgrade() -> None:
    async def scenario() -> None:
        clock = Clock()
        store, adm = await new_admission(clock=clock)
        await store.ensure_tables(tables("t"))
        await put_override(store, "t", TEAM, Override({"tokens_per_day": 100}), "team")
        # What the previous release wrote for this team today: its whole day's quota used.
        old_pk = table_key(f"team:{TEAM}")
        assert len(old_pk) < 1024
        spent = Counters(minute=minute_key(clock.now), day=clock.now.astimezone(UTC).strftime("%Y-%m-%d"),
                         day_tokens=100, month=clock.now.strftime("%Y-%m"), month_tokens=100, epoch=epoch_of(clock.now))
        await store.insert(usage_table("t"), spent.to_entity(old_pk))
        caller = make_caller(team=TEAM)
        with pytest.raises(QuotaExceeded):
            await adm.reserve(caller, tokens=10, usd=Decimal("0.001"), request_id="after-upgrade")

    run(scenario())


def test_a_team_name_past_a_kibibyte_still_has_its_override_read_and_written() -> None:
    # A team comes from a token claim: a name whose key would pass Azure's 1 KiB made every request of the
    # team's callers fail on the override read.
    async def scenario() -> None:
        store, _ = await new_admission()
        await store.ensure_tables(tables("t"))
        team = "t" * 2_000
        await put_override(store, "t", team, Override(limits={"usd_per_day": Decimal("5")}), kind="team")
        stored = await get_override(store, "t", team, kind="team")
        assert stored is not None and stored.limits["usd_per_day"] == Decimal("5")

    run(scenario())

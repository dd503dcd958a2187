"""Spend periods, budget thresholds and the burn-rate forecast: pure functions of the budget rollup."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from gateway_lib.quota.counters import next_day, next_month

MIN_FORECAST_WINDOW = timedelta(hours=1)  # a single early request must not forecast a burn


def day_period(moment: datetime) -> str:
    return f"day|{moment.astimezone(UTC):%Y%m%d}"


def month_period(moment: datetime) -> str:
    return f"month|{moment.astimezone(UTC):%Y%m}"


def period_start(period: str) -> datetime:
    unit, stamp = period.split("|", 1)
    return datetime.strptime(stamp, "%Y%m%d" if unit == "day" else "%Y%m").replace(tzinfo=UTC)


def period_end(period: str) -> datetime:
    unit, stamp = period.split("|", 1)
    if unit == "day":
        return next_day(datetime.strptime(stamp, "%Y%m%d").replace(tzinfo=UTC))
    return next_month(datetime.strptime(stamp, "%Y%m").replace(tzinfo=UTC))


def crossed_thresholds(spend: Decimal, budget: Decimal | None, thresholds: Sequence[int]) -> list[int]:
    """Thresholds (percent) that ``spend`` has reached; exact arithmetic, no float rounding."""
    if budget is None or budget <= 0:
        return []
    return [t for t in thresholds if spend * 100 >= budget * t]


def forecast_exhaustion(
    month_spend: Decimal, budget: Decimal | None, recent_spend: Decimal, window_start: datetime | None,
    as_of: datetime,
) -> datetime | None:
    """When the monthly budget runs out at the recent rate, if that is before the month ends.

    rate = recent_spend / max(as_of - window_start, 1h); exhaustion = as_of + (budget - spend) / rate.
    """
    if budget is None or budget <= 0 or month_spend >= budget or recent_spend <= 0 or window_start is None:
        return None
    seconds = Decimal(max(as_of - window_start, MIN_FORECAST_WINDOW).total_seconds())
    rate = recent_spend / seconds
    left = (budget - month_spend) / rate  # seconds until the budget runs out
    month_end = next_month(as_of.astimezone(UTC))
    # Compared before building a datetime: a tiny rate puts the date past year 9999 (OverflowError).
    if left >= Decimal((month_end - as_of).total_seconds()):
        return None
    return as_of + timedelta(seconds=float(left))

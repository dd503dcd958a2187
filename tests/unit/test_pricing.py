from decimal import Decimal

import pytest

from gateway_lib.billing.pricing import COST_QUANTUM, cost, estimate, worst_price
from gateway_lib.config.catalog import Price

MINI = Price(Decimal("0.00015"), Decimal("0.0006"))


def test_cost_is_price_per_thousand_tokens_in_each_direction() -> None:
    assert cost(MINI, 1000, 1000) == Decimal("0.0007500000")
    assert cost(MINI, 0, 0) == Decimal("0E-10")


def test_cost_is_quantised_to_ten_places_half_up() -> None:
    odd = Price(Decimal("0.00000000015"), Decimal(0))  # 1.5e-13 per token
    assert cost(odd, 1000, 0) == Decimal("0.0000000002")  # 1.5e-10 rounds half up
    assert cost(odd, 999, 0).as_tuple().exponent == COST_QUANTUM.as_tuple().exponent


def test_one_token_at_the_cheapest_price_is_not_rounded_to_zero() -> None:
    assert cost(Price(Decimal("0.0000001"), Decimal(0)), 1, 0) > 0


def test_large_counts_stay_exact() -> None:
    assert cost(MINI, 10**12, 10**12) == Decimal("750000.0000000000")


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        cost(MINI, -1, 0)


def test_estimate_bounds_every_actual_within_the_reservation() -> None:
    bound = estimate(MINI, 500, 256)
    assert all(cost(MINI, p, c) <= bound for p in (0, 250, 500) for c in (0, 100, 256))


def test_worst_price_takes_the_dearest_direction_of_each_target() -> None:
    other = Price(Decimal("0.001"), Decimal("0.0002"))
    assert worst_price([MINI, other]) == Price(Decimal("0.001"), Decimal("0.0006"))
    with pytest.raises(ValueError):
        worst_price([])

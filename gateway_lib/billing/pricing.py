"""What a call costs, in USD, as ``Decimal``.

Catalogue prices are USD per 1,000 tokens. A cost is quantised to 10 decimal places
(``COST_QUANTUM``) with ROUND_HALF_UP: fine enough that a one-token call at the cheapest
catalogue price is not rounded to zero, coarse enough to store as a short string, and
the same rule everywhere so that counters and cost rows add up to the same total.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Context, Decimal

from gateway_lib.config.catalog import Price

COST_QUANTUM = Decimal("0.0000000001")  # 10 decimal places
_THOUSAND = Decimal(1000)
# Wide enough that price x tokens never rounds before the final quantise.
_CONTEXT = Context(prec=40, rounding=ROUND_HALF_UP)


def cost(price: Price, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """USD for the given token counts, quantised to 10 places (ROUND_HALF_UP)."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    ctx = _CONTEXT
    raw = ctx.add(ctx.multiply(price.input_per_1k, Decimal(prompt_tokens)),
                  ctx.multiply(price.output_per_1k, Decimal(completion_tokens)))
    return ctx.divide(raw, _THOUSAND).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP, context=ctx)


def estimate(price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """Upper bound for a reservation: the estimated prompt plus every token ``max_tokens`` allows.

    Cost is monotonic in both counts, so a call whose actual counts stay within the
    estimate never costs more than this.
    """
    return cost(price, prompt_tokens, max_tokens)


def worst_price(prices: Iterable[Price]) -> Price:
    """Per-direction maximum over the targets a request may fall back to: reserve for the dearest."""
    items = list(prices)
    if not items:
        raise ValueError("at least one price is needed")
    return Price(max(p.input_per_1k for p in items), max(p.output_per_1k for p in items))

"""Settlements that outlive their request (cancelled, or no longer waiting): their cost rows and give-backs still get written."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway_lib.shielded import Shielded

log = logging.getLogger("gateway.accounting")

_pending: set[asyncio.Future[Any]] = set()  # settlements outliving their cancelled request: kept from the GC


async def drain() -> None:
    """Let the settlements under way now finish (graceful shutdown). Those started meanwhile are not waited
    for: another runtime of the process may be serving, and its traffic would keep this from returning."""
    pending = list(_pending)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def within(settling: Shielded[Any], seconds: float) -> bool:
    """Wait at most ``seconds`` for ``settling``; True if it finished (its exception raised here). Past that, or
    if the waiting request is cancelled, it goes on in the background and is drained on shutdown."""
    _pending.add(settling.task)
    settling.task.add_done_callback(_pending.discard)
    try:
        async with asyncio.timeout(seconds) as bound:
            await settling
    except TimeoutError:
        if not bound.expired():
            raise  # the settlement's own
        return False
    except asyncio.CancelledError:
        log.info("request cancelled; its settlement continues in the background")
        raise
    return True

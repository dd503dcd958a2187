"""Settlements that outlive their request: a cancelled request's cost row and give-back still get written."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

log = logging.getLogger("gateway.accounting")
T = TypeVar("T")

_pending: set[asyncio.Future[Any]] = set()  # settlements outliving their cancelled request: kept from the GC


async def drain() -> None:
    """Let the settlements under way now finish (graceful shutdown). Those started meanwhile are not waited
    for: another runtime of the process may be serving, and its traffic would keep this from returning."""
    pending = list(_pending)
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def shielded(task: asyncio.Future[T]) -> T:
    """Await ``task`` even if the awaiting request is cancelled; the task then completes in the background."""
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        log.info("request cancelled; its settlement continues in the background")
        raise

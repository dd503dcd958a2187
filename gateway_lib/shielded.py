"""``Shielded``: a coroutine in a task of its own, which its waiter's cancellation does not reach.

``asyncio.shield(task)`` hands the task's outcome on from a done callback, a loop turn after the task ends,
and the waiter resumes a turn after that. Here the task's last step hands the outcome over itself, so the
waiter resumes on the next turn: one turn less for every reservation and settlement that writes to storage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Shielded(Generic[T]):
    """Await it for the outcome; cancelling the waiter cancels only the wait. ``task`` runs on regardless."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        loop = asyncio.get_running_loop()
        self.outcome: asyncio.Future[T] = loop.create_future()
        self.task: asyncio.Task[T] = loop.create_task(self._run(coro))  # in a copy of the caller's context
        self.task.add_done_callback(_retrieve)

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            result = await coro
        except asyncio.CancelledError:
            self.outcome.cancel()
            raise
        except BaseException as exc:
            if not self.outcome.done():
                self.outcome.set_exception(exc)
            raise
        if not self.outcome.done():  # done: its waiter gave up waiting
            self.outcome.set_result(result)
        return result

    def __await__(self) -> Generator[Any, None, T]:
        return self.outcome.__await__()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """The waiter saw the exception through ``outcome``: the task's copy is not "never retrieved"."""
    if not task.cancelled():
        task.exception()

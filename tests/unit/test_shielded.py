"""Shielded: the waiter's cancellation does not reach the work, outcomes arrive whole, one loop turn sooner."""
from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from gateway_lib.shielded import Shielded


async def answer() -> int:
    await asyncio.sleep(0)
    return 42


async def refuse() -> int:
    await asyncio.sleep(0)
    raise ValueError("refused")


def test_the_waiter_gets_the_result_or_the_exception() -> None:
    async def go() -> None:
        assert await Shielded(answer()) == 42
        with pytest.raises(ValueError, match="refused"):
            await Shielded(refuse())

    asyncio.run(go())


def test_cancelling_the_waiter_leaves_the_work_running_to_its_end() -> None:
    async def go() -> None:
        release, finished = asyncio.Event(), []

        async def write() -> str:
            await release.wait()
            finished.append("written")
            return "row"

        work = Shielded(write())

        async def wait() -> str:
            return await work

        waiter = asyncio.ensure_future(wait())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not work.task.done()
        release.set()
        assert await work.task == "row" and finished == ["written"]

    asyncio.run(go())


def test_an_exception_the_waiter_saw_is_not_logged_as_never_retrieved(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        with pytest.raises(ValueError):
            await Shielded(refuse())
        await asyncio.sleep(0)  # the task's done callbacks

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(go())
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_the_waiter_resumes_a_loop_turn_sooner_than_through_asyncio_shield() -> None:
    async def turns_to(make_wait: object) -> int:
        turns, done = 0, False

        async def count() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.ensure_future(count())
        await asyncio.sleep(0)
        await make_wait()  # type: ignore[operator]
        done = True
        await counter
        return turns

    async def go() -> tuple[int, int]:
        through_shield = await turns_to(lambda: asyncio.shield(asyncio.ensure_future(answer())))
        return through_shield, await turns_to(lambda: Shielded(answer()))

    through_shield, through_shielded = asyncio.run(go())
    assert through_shielded == through_shield - 1, (through_shielded, through_shield)

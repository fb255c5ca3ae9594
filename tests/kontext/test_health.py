"""DatabaseCheck: the cached, one-at-a-time, time-limited database ping behind ``/healthz``."""

from __future__ import annotations

import asyncio

from kontext.health import DatabaseCheck


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_callers_share_one_ping_and_its_answer_is_cached_for_ttl() -> None:
    clock = Clock()
    release = asyncio.Event()
    started = asyncio.Event()

    async def ping() -> bool:
        started.set()
        await release.wait()
        return True

    check = DatabaseCheck(ping, ttl=5.0, timeout=60.0, clock=clock)
    waiting = [asyncio.create_task(check.ok()) for _ in range(50)]
    await started.wait()
    release.set()
    assert await asyncio.gather(*waiting) == [True] * 50
    assert check.pings == 1
    clock.now += 4.9
    assert await check.ok() and check.pings == 1
    clock.now += 0.2
    assert await check.ok() and check.pings == 2


async def test_a_failing_ping_is_unreachable_and_cached() -> None:
    clock = Clock()
    answers: list[object] = [OSError("refused"), False, True]

    async def ping() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    check = DatabaseCheck(ping, ttl=5.0, clock=clock)
    assert not await check.ok()
    assert not await check.ok() and check.pings == 1
    clock.now += 6
    assert not await check.ok()
    clock.now += 6
    assert await check.ok() and check.pings == 3


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_ping() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def ping() -> bool:
        started.set()
        await release.wait()
        return True

    check = DatabaseCheck(ping, timeout=60.0)
    impatient = asyncio.create_task(check.ok())
    patient = asyncio.create_task(check.ok())
    await started.wait()
    impatient.cancel()
    release.set()
    assert await patient
    assert impatient.cancelled() and check.pings == 1


async def test_no_second_ping_while_a_timed_out_one_still_winds_down() -> None:
    clock = Clock()
    unstick = asyncio.Event()
    finished = asyncio.Event()

    async def ping() -> bool:
        try:
            while True:  # a driver that ignores cancellation until the socket gives up
                try:
                    await unstick.wait()
                    return True
                except asyncio.CancelledError:
                    continue
        finally:
            finished.set()

    check = DatabaseCheck(ping, ttl=1.0, timeout=0.05, clock=clock)
    assert not await check.ok()  # timed out
    clock.now += 2
    assert not await check.ok()  # the first ping is still running: waited on, not repeated
    assert check.pings == 1
    unstick.set()
    await finished.wait()
    finished.clear()
    clock.now += 2
    assert await check.ok() and check.pings == 2  # now a new ping may start
    await check.aclose()

"""The job queue: concurrency cap, RPM window, fairness, bounds, pause, close."""

from __future__ import annotations

import asyncio

import pytest

from kontext.errors import QueueFull, ShuttingDown
from kontext.queue import JobQueue, RateWindow


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """Jobs that run until released, recording the order they started in."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release: dict[int, asyncio.Event] = {}
        self.running = 0
        self.peak = 0
        self.changed = asyncio.Event()

    def job(self, key: int):
        ev = self.release.setdefault(key, asyncio.Event())

        async def run() -> int:
            self.started.append(key)
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.changed.set()
            try:
                await ev.wait()
            finally:
                self.running -= 1
            return key

        return run

    async def wait_started(self, n: int) -> None:
        while len(self.started) < n:
            self.changed.clear()
            await self.changed.wait()


async def test_concurrency_cap_and_results() -> None:
    q = JobQueue(max_concurrent=2, rpm=1000, max_size=10)
    gate = Gate()
    tickets = [q.submit(i, (1, i), gate.job(i)) for i in range(5)]
    await gate.wait_started(2)
    assert q.running_count == 2 and q.waiting_count == 3
    for i in range(5):
        gate.release.setdefault(i, asyncio.Event()).set()
    assert [await t.result() for t in tickets] == list(range(5))
    assert gate.peak == 2
    await q.aclose()


async def test_round_robin_between_members() -> None:
    q = JobQueue(max_concurrent=1, rpm=1000, max_size=20)
    gate = Gate()
    # member A queues 3 jobs first, then B and C one each
    order = [(1, "A"), (2, "A"), (3, "A"), (4, "B"), (5, "C")]
    tickets = [q.submit(k, (0, ord(m)), gate.job(k)) for k, m in order]
    await gate.wait_started(1)
    # A's first runs; A goes to the back of the line, so B and C come before A's second
    assert [t.key for t in q.waiting_order()] == [4, 5, 2, 3]
    for k in range(1, 6):
        gate.release.setdefault(k, asyncio.Event()).set()
    await asyncio.gather(*(t.result() for t in tickets))
    # nobody waits behind more than one of A's jobs
    assert gate.started.index(4) < gate.started.index(3)
    assert gate.started.index(5) < gate.started.index(3)
    await q.aclose()


async def test_positions_change_as_jobs_start() -> None:
    q = JobQueue(max_concurrent=1, rpm=1000, max_size=20)
    gate = Gate()
    t1 = q.submit(1, (0, 1), gate.job(1))
    t2 = q.submit(2, (0, 2), gate.job(2))
    t3 = q.submit(3, (0, 3), gate.job(3))
    await gate.wait_started(1)
    assert t1.position() == (0, 2)
    assert t2.position() == (1, 2)
    assert t3.position() == (2, 2)
    gate.release[1].set()
    await gate.wait_started(2)
    assert t3.position() == (1, 1)
    for ev in gate.release.values():
        ev.set()
    gate.release.setdefault(3, asyncio.Event()).set()
    await asyncio.gather(t1.result(), t2.result(), t3.result())
    await q.aclose()


async def test_bounded_queue_refuses() -> None:
    q = JobQueue(max_concurrent=1, rpm=1000, max_size=2)
    gate = Gate()
    q.submit(1, (0, 1), gate.job(1))
    await gate.wait_started(1)
    q.submit(2, (0, 2), gate.job(2))
    q.submit(3, (0, 3), gate.job(3))
    with pytest.raises(QueueFull):
        q.submit(4, (0, 4), gate.job(4))
    left = q.close()
    assert [t.key for t in left] == [2, 3]
    for t in left:
        with pytest.raises(ShuttingDown):
            await t.result()
    with pytest.raises(ShuttingDown):
        q.submit(5, (0, 5), gate.job(5))
    gate.release[1].set()
    assert await q.wait_running(5)
    await q.aclose()


def test_rate_window_sliding() -> None:
    clock = FakeClock()
    w = RateWindow(3, clock=clock)
    for _ in range(3):
        assert w.delay() == 0
        w.record()
        clock.now += 1
    assert w.delay() == pytest.approx(57.0)
    clock.now += 57.0
    assert w.delay() == 0
    w.block_for(5)
    assert w.delay() == pytest.approx(5.0)


async def test_rpm_limit_holds_under_burst() -> None:
    clock = FakeClock()
    q = JobQueue(max_concurrent=10, rpm=3, max_size=20, clock=clock)
    done: list[int] = []

    def job(k: int):
        async def run() -> None:
            done.append(k)

        return run

    tickets = [q.submit(k, (0, k), job(k)) for k in range(6)]
    await asyncio.gather(*(tickets[i].result() for i in range(3)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(done) == 3  # the window is full: the other three wait for the clock
    clock.now += 61
    q._notify()  # the dispatcher sleeps on real time; wake it after moving the fake clock
    await asyncio.gather(*(t.result() for t in tickets))
    assert sorted(done) == list(range(6))
    await q.aclose()


async def test_pause_holds_and_resume_releases() -> None:
    q = JobQueue(max_concurrent=2, rpm=1000, max_size=5)
    gate = Gate()
    q.pause()
    t = q.submit(1, (0, 1), gate.job(1))
    for _ in range(5):
        await asyncio.sleep(0)
    assert gate.started == []
    q.resume()
    await gate.wait_started(1)
    gate.release[1].set()
    assert await t.result() == 1
    await q.aclose()


async def test_eta_uses_rolling_median() -> None:
    q = JobQueue(max_concurrent=2, rpm=1000, max_size=5, default_duration_s=18)
    assert q.estimate_duration() == 18
    for d in (10, 12, 100):
        q.record_duration(d)
    assert q.estimate_duration() == 12


async def test_release_frees_the_slot_before_the_job_ends() -> None:
    q = JobQueue(max_concurrent=1, rpm=1000, max_size=10)
    gate = Gate()
    first = q.submit(1, (1, 1), gate.job(1))
    second = q.submit(2, (1, 2), gate.job(2))
    await gate.wait_started(1)
    assert q.waiting_count == 1
    first.release()  # e.g. the API call is over; the job only posts its result now
    first.release()  # idempotent
    await gate.wait_started(2)
    assert q.running_count == 1 and gate.running == 2
    for ev in gate.release.values():
        ev.set()
    assert await first.result() == 1 and await second.result() == 2
    await q.aclose()


async def test_a_moved_clock_lets_rpm_held_jobs_start() -> None:
    q = JobQueue(max_concurrent=5, rpm=2, max_size=10)
    offset = [0.0]
    q.use_clock(lambda: 1000.0 + offset[0])
    gate = Gate()
    for i in range(3):
        q.submit(i, (1, i), gate.job(i))
    await gate.wait_started(2)
    await asyncio.sleep(0.05)
    assert gate.started == [0, 1] and q.waiting_count == 1
    assert 59 < q.rate.delay() <= 60
    offset[0] += 60.0
    q.kick()
    await gate.wait_started(3)
    for ev in gate.release.values():
        ev.set()
    await q.aclose()

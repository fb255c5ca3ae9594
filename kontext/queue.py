"""The job queue: how many API calls run at once, how many start per minute, and who goes next.

* at most ``max_concurrent`` jobs run at once (``MAX_CONCURRENT_JOBS``);
* at most ``rpm`` jobs start in any sliding 60-second window (``SEGMIND_RPM``); a 429 from the API
  can push the next start back (:meth:`JobQueue.slow_down`);
* waiting jobs are served round-robin between members, each member's own jobs in order, so one
  member with many jobs cannot starve the others;
* at most ``max_size`` jobs wait (``MAX_QUEUE_SIZE``): beyond it :class:`~kontext.errors.QueueFull`;
* the queue can be paused (the API account needs attention) and closed (shutdown).

The queue holds tickets in memory; each job's truth (state, credits) is in the database, so a
restart loses nothing but the order of jobs that were still waiting, which are refunded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kontext.errors import QueueFull, ShuttingDown

log = logging.getLogger("kontext.queue")

Member = tuple[int, int]  # (guild_id, user_id)


@dataclass(eq=False)
class Ticket:
    """One job's place in the queue."""

    key: int
    member: Member
    run: Callable[[], Awaitable[Any]]
    enqueued_at: float
    queue: JobQueue
    started_at: float | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: asyncio.Task[Any] | None = None

    @property
    def waiting(self) -> bool:
        return self.started_at is None and not self.done.done()

    def position(self) -> tuple[int, int]:
        """``(position, waiting)``: 1-based place among the waiting jobs, 0 once started."""
        return self.queue.position_of(self)

    def eta_seconds(self) -> float:
        """Estimated seconds until this job's result, from recent real durations."""
        return self.queue.eta_of(self)

    def release(self) -> None:
        """Give the job's slot to the next one now (its API call is done; it only posts)."""
        self.queue.release(self)

    def cancel(self, error: BaseException | None = None) -> bool:
        """Withdraw a job that has not started. Returns False when it already started."""
        return self.queue.withdraw(self, error)

    async def result(self) -> Any:
        """Wait for the job's coroutine and return its result (or raise its error)."""
        return await asyncio.shield(self.done)


class RateWindow:
    """A sliding-window limiter: at most ``rpm`` starts in any 60 seconds."""

    def __init__(self, rpm: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = rpm
        self._clock = clock
        self._starts: deque[float] = deque()
        self._blocked_until = 0.0

    def delay(self) -> float:
        """Seconds until one more start is allowed (0 when allowed now)."""
        now = self._clock()
        while self._starts and now - self._starts[0] >= 60.0:
            self._starts.popleft()
        wait = max(0.0, self._blocked_until - now)
        if len(self._starts) >= self.rpm:
            wait = max(wait, self._starts[0] + 60.0 - now)
        return wait

    def record(self) -> None:
        self._starts.append(self._clock())

    def block_for(self, seconds: float) -> None:
        self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def started_in_last_minute(self) -> int:
        self.delay()
        return len(self._starts)


class JobQueue:
    """A fair, bounded queue in front of the image API."""

    def __init__(
        self,
        *,
        max_concurrent: int,
        rpm: int,
        max_size: int,
        default_duration_s: float = 18.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_size = max_size
        self._clock = clock
        self.rate = RateWindow(rpm, clock=clock)
        self._waiting: OrderedDict[Member, deque[Ticket]] = OrderedDict()
        self._running: set[Ticket] = set()
        self._durations: deque[float] = deque(maxlen=50)
        self._default_duration = default_duration_s
        self._wake = asyncio.Event()
        self._paused = False
        self._closed = False
        self._dispatcher: asyncio.Task[None] | None = None

    # --- introspection ------------------------------------------------------------------------

    @property
    def waiting_count(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    def waiting_order(self) -> list[Ticket]:
        """The waiting tickets in the order they will start (round-robin between members)."""
        queues = [list(q) for q in self._waiting.values()]
        order: list[Ticket] = []
        depth = 0
        while True:
            layer = [q[depth] for q in queues if len(q) > depth]
            if not layer:
                return order
            order.extend(layer)
            depth += 1

    def position_of(self, ticket: Ticket) -> tuple[int, int]:
        order = self.waiting_order()
        try:
            return order.index(ticket) + 1, len(order)
        except ValueError:
            return 0, len(order)

    def member_jobs(self, member: Member) -> int:
        """Jobs of ``member`` waiting or running in this process."""
        waiting = len(self._waiting.get(member, ()))
        return waiting + sum(1 for t in self._running if t.member == member)

    def estimate_duration(self) -> float:
        """The rolling median of recent real job durations (a default before any)."""
        if not self._durations:
            return self._default_duration
        return float(statistics.median(self._durations))

    def eta_of(self, ticket: Ticket) -> float:
        est = self.estimate_duration()
        if ticket.started_at is not None:
            return max(0.0, est - (self._clock() - ticket.started_at))
        pos, _ = self.position_of(ticket)
        # jobs ahead start as slots free up; each "round" of max_concurrent jobs takes ~est
        running_left = sorted(
            max(0.0, est - (self._clock() - t.started_at)) for t in self._running if t.started_at
        )
        slots = self.max_concurrent
        held = self.rate.delay()  # the RPM window (or a 429) holds every start for this long
        if pos <= slots - len(running_left):
            return held + est
        idx = pos - (slots - len(running_left)) - 1
        rounds, slot = divmod(idx, slots)
        first_free = running_left[slot] if slot < len(running_left) else 0.0
        return max(first_free, held) + rounds * est + est

    def record_duration(self, seconds: float) -> None:
        """Feed a real API duration into the estimate."""
        if seconds > 0:
            self._durations.append(seconds)

    # --- control --------------------------------------------------------------------------------

    def submit(self, key: int, member: Member, run: Callable[[], Awaitable[Any]]) -> Ticket:
        """Queue ``run`` for ``member``. Raises QueueFull or ShuttingDown."""
        if self._closed:
            raise ShuttingDown("queue closed")
        if self.waiting_count >= self.max_size:
            raise QueueFull(f"queue at {self.max_size}")
        ticket = Ticket(key=key, member=member, run=run, enqueued_at=self._clock(), queue=self)
        self._waiting.setdefault(member, deque()).append(ticket)
        self._ensure_dispatcher()
        self._notify()
        return ticket

    def withdraw(self, ticket: Ticket, error: BaseException | None = None) -> bool:
        """Take a waiting ticket out; whoever awaits it gets ``error`` (default: cancelled)."""
        q = self._waiting.get(ticket.member)
        if q is None or ticket not in q:
            return False
        q.remove(ticket)
        if not q:
            del self._waiting[ticket.member]
        if not ticket.done.done():
            if error is None:
                ticket.done.cancel()
            else:
                ticket.done.set_exception(error)
        self._notify()
        return True

    def withdraw_all(self, error: BaseException) -> list[Ticket]:
        """Take every waiting ticket out, handing ``error`` to each awaiting job."""
        left = self.waiting_order()
        for ticket in left:
            self.withdraw(ticket, error)
        return left

    def pause(self) -> None:
        """Hold every waiting job (running ones go on)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._notify()

    def release(self, ticket: Ticket) -> None:
        """Free ``ticket``'s slot before its coroutine ends (idempotent)."""
        if ticket in self._running:
            self._running.discard(ticket)
            self._notify()

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Switch the queue (and its RPM window) to another clock; tests move time on with it."""
        self._clock = clock
        self.rate._clock = clock
        self._notify()

    def kick(self) -> None:
        """Make the dispatcher look again now (after the clock moved)."""
        self._notify()

    def slow_down(self, seconds: float) -> None:
        """Start nothing for ``seconds`` (after a 429)."""
        self.rate.block_for(seconds)
        self._notify()

    def close(self, error: BaseException | None = None) -> list[Ticket]:
        """Take no more jobs; withdraw the waiting ones (their awaiters get ``error``)."""
        self._closed = True
        left = self.withdraw_all(error or ShuttingDown("queue closed"))
        self._notify()
        return left

    async def wait_running(self, timeout: float | None) -> bool:
        """Wait until no job runs, at most ``timeout`` seconds. True when all finished."""
        tasks = [t.task for t in self._running if t.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def aclose(self) -> None:
        """Stop the dispatcher (running job tasks are left to their owners)."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None

    def running_tasks(self) -> list[asyncio.Task[Any]]:
        return [t.task for t in self._running if t.task is not None]

    # --- internals --------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._wake.set()
        for q in self._waiting.values():
            for ticket in q:
                ticket.changed.set()

    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(), name="kontext-queue-dispatcher"
            )

    def _next_ticket(self) -> Ticket | None:
        if not self._waiting:
            return None
        member, q = next(iter(self._waiting.items()))
        ticket = q.popleft()
        # the member goes to the back of the line: round-robin between members
        del self._waiting[member]
        if q:
            self._waiting[member] = q
        return ticket

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            if self._paused or not self._waiting or len(self._running) >= self.max_concurrent:
                await self._wake.wait()
                continue
            delay = self.rate.delay()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                continue
            ticket = self._next_ticket()
            if ticket is None:
                continue
            self._start(ticket)
            self._notify()

    def _start(self, ticket: Ticket) -> None:
        self.rate.record()
        ticket.started_at = self._clock()
        self._running.add(ticket)
        ticket.started.set()
        ticket.changed.set()
        ticket.task = asyncio.get_running_loop().create_task(
            self._run(ticket), name=f"kontext-job-{ticket.key}"
        )

    async def _run(self, ticket: Ticket) -> None:
        try:
            result = await ticket.run()
        except asyncio.CancelledError:
            if not ticket.done.done():
                ticket.done.cancel()
            raise
        except BaseException as exc:  # handed to whoever awaits the ticket
            if not ticket.done.done():
                ticket.done.set_exception(exc)
        else:
            if not ticket.done.done():
                ticket.done.set_result(result)
        finally:
            self.release(ticket)

"""One job's in-flight state in this process, its progress edits, and the in-flight registry.

Nothing here decides money: that is read from the job's row (:mod:`kontext.store`). What this
process keeps is what it needs to talk to the member and to stop its own tasks:

* :class:`JobRun` — one job received here (waiting) or run here (under a lease): its spec,
  the member's sink, its progress edits, its task;
* :class:`InFlight` — the jobs of this process: waiting ones by job id, leased ones **by
  lease** (job id + epoch), so a stale task of an old lease can only ever touch its own entry;
* :class:`Lifecycle` — whether this process accepts, is stopping, hands jobs over;
* :class:`Progress` — throttles one job's status edits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from kontext.errors import ShuttingDown
from kontext.jobs import JobOutcome, JobSink, JobSpec
from kontext.store import Job, Lease

T = TypeVar("T")

#: the progress bar's first edit waits this long, so that it does not compete with sending the
#: API request itself (nobody sees 50 ms of an ~18 s generation)
GENERATING_STATUS_AFTER_S = 0.05
#: a job's place in the queue is shown once it has waited this long (a quick claim shows none)
QUEUED_STATUS_AFTER_S = 0.3


class LeaseLost(Exception):
    """This process no longer holds (or could not renew) the job's lease: hands off."""


class Stop(StrEnum):
    """Why this process cancelled one of its own job tasks (never a money decision)."""

    LOST = "lost"  # another process holds the job now
    SHUTDOWN = "shutdown"  # this process is stopping


async def stop_progress(ticker: asyncio.Task[Any], progress: Progress) -> None:
    """End a job's progress edits; the next status edit is then the last word."""
    progress.closed = True
    ticker.cancel()
    await asyncio.gather(ticker, return_exceptions=True)
    await progress.drain()


class Progress:
    """One job's progress edits: at most one per ``interval`` seconds, never two at once."""

    def __init__(self, interval: float) -> None:
        self.interval = max(0.0, interval)
        self.last = float("-inf")
        self.closed = False
        self.edits = 0
        self._lock = asyncio.Lock()

    async def show(self, make: Callable[[], Any]) -> None:
        """Wait for this job's next turn, then run ``make()`` (an edit) unless closed."""
        while not self.closed:
            delay = self.last + self.interval - time.monotonic()
            if delay <= 0:
                break
            await asyncio.sleep(delay)
        async with self._lock:
            if self.closed:
                return
            self.last = time.monotonic()
            self.edits += 1
            with contextlib.suppress(Exception):
                await make()

    async def drain(self) -> None:
        """Wait for an edit in flight to finish."""
        async with self._lock:
            return


class RestartedRefund(ShuttingDown):
    """A job stopped by a restart; the message says the credits came back."""

    key = "bot.restarted_refund"

    def __init__(self, *, credits: int) -> None:
        super().__init__("restart", credits=credits)


@dataclass(slots=True)
class JobRun:
    """A job this process received (waiting in the queue) or runs (claimed or taken over)."""

    spec: JobSpec
    sink: JobSink
    cost: int
    #: the member's balance after the reservation (-1: unknown here, read before posting)
    balance_after: int
    t0: float
    timings: dict[str, float]
    progress: Progress
    lease: Lease | None = None
    done: asyncio.Future[JobOutcome] | None = None  # the receiving run() awaits it
    remote: bool = False  # received by another process (its sink is rebuilt from the job)
    task: asyncio.Task[Any] | None = None
    #: the upload of its result is under way here (a shutdown gives it time to finish)
    posting: bool = False
    #: why this process cancelled the job's task, if it did
    stop: Stop | None = None


class RunFactory:
    """Builds the :class:`JobRun` of a job this process did not receive, from its row."""

    def __init__(
        self,
        sink_for: Callable[[Job], JobSink],
        *,
        progress_interval_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._sink_for = sink_for
        self._progress_s = progress_interval_s
        self._clock = clock

    def from_job(self, job: Job) -> JobRun:
        return JobRun(
            spec=JobSpec.from_job(job),
            sink=self._sink_for(job),
            cost=job.cost_credits,
            balance_after=-1,
            t0=self._clock(),
            timings={},
            progress=Progress(self._progress_s),
            remote=True,
        )


@dataclass(slots=True)
class Lifecycle:
    """This process's phase: accepting new jobs, or stopping (and how)."""

    accepting: bool = True
    #: shutdown is cancelling running jobs
    stopping: bool = False
    #: stopping in async API mode: jobs with a request id are left to the next process
    handing_over: bool = False


@dataclass(slots=True)
class InFlight:
    """This process's jobs: waiting (by job id) and leased (by lease), and its tasks."""

    waiting: dict[int, JobRun] = field(default_factory=dict)
    leased: dict[Lease, JobRun] = field(default_factory=dict)
    #: jobs claimed or taken over here, and other short work of the pipeline
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    #: commits and refunds retried while the database is away
    settling: set[asyncio.Task[Any]] = field(default_factory=set)
    #: reservations whose outcome was unknown (the member was told "not charged"): never run
    doomed: set[int] = field(default_factory=set)

    def spawn(
        self, coro: Coroutine[Any, Any, T], name: str, *, settling: bool = False
    ) -> asyncio.Task[T]:
        """Run ``coro`` as a task this process waits for at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        bucket = self.settling if settling else self.tasks
        bucket.add(task)
        task.add_done_callback(bucket.discard)
        return task

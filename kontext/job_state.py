"""One job's state while this process handles it, and its progress edits.

:class:`ActiveJob` is what every stage of :class:`~kontext.pipeline.JobPipeline` passes along
(the spec, the member's sink, the reservation, the lease, whether a request went out);
:class:`Progress` throttles one job's status edits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kontext.errors import ShuttingDown
from kontext.jobs import JobOutcome, JobSink, JobSpec
from kontext.store import Lease, Reservation

#: how long a commit or refund is retried while the database is away (then a restart settles it)
SETTLE_RETRY_S = 3600.0
#: the progress bar's first edit waits this long, so that it does not compete with sending the
#: API request itself (nobody sees 50 ms of an ~18 s generation)
GENERATING_STATUS_AFTER_S = 0.05
#: a job's place in the queue is shown once it has waited this long (a quick claim shows none)
QUEUED_STATUS_AFTER_S = 0.3


class LeaseLost(Exception):
    """This process no longer holds (or could not renew) the job's lease: hands off."""


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
class ActiveJob:
    """A job this process received (waiting in the queue) or runs (claimed or taken over)."""

    spec: JobSpec
    sink: JobSink
    reservation: Reservation
    t0: float
    timings: dict[str, float]
    progress: Progress = field(default_factory=lambda: Progress(3.0))
    lease: Lease | None = None
    done: asyncio.Future[JobOutcome] | None = None  # the receiving run() awaits it
    remote: bool = False  # received by another process (its sink is rebuilt from the job)
    sent: bool = False  # an API request may have gone out
    api_charged: bool = False
    delivering: bool = False
    lost: bool = False
    request_id: str | None = None
    status_url: str | None = None
    response_url: str | None = None
    task: asyncio.Task[Any] | None = None
    outcome: JobOutcome | None = None

"""Settling a job taken over from a process that stopped (or went silent), from its row.

What the taker does is read from the job's state alone (the table in docs/ARCHITECTURE.md):

* ``claimed`` — nothing was sent: back in the queue, its place kept;
* ``sent`` — the request may have been billed: in async API mode with a stored request id the
  generation is fetched (never submitted again) and posted; otherwise the member is refunded,
  and the owner's budgets keep the call;
* ``posting`` — settled by :class:`~kontext.posting.PostingSettler`: committed when the result
  is known to be in the channel, refunded when a search proves it is not, never posted again.
"""

from __future__ import annotations

import asyncio

from kontext.errors import ShuttingDown
from kontext.execution import Executor
from kontext.job_state import InFlight, JobRun, Lifecycle
from kontext.jobs import JobOutcome
from kontext.posting import PostingSettler
from kontext.settlement import Settlement
from kontext.store import Job
from kontext.vocab import JobState


class Recovery:
    """Takes over jobs of stopped processes (see the module)."""

    def __init__(
        self,
        *,
        executor: Executor,
        posting: PostingSettler,
        settlement: Settlement,
        inflight: InFlight,
        lifecycle: Lifecycle,
        async_mode: bool,
    ) -> None:
        self.executor = executor
        self.posting = posting
        self.settlement = settlement
        self.inflight = inflight
        self.lifecycle = lifecycle
        self.async_mode = async_mode

    async def take_over(self, run: JobRun, job: Job) -> JobOutcome:
        """Settle ``job`` (its row as the takeover returned it) under ``run.lease``."""
        lease = run.lease
        assert lease is not None
        run.task = asyncio.current_task()
        self.inflight.leased[lease] = run
        try:
            if job.state == JobState.CLAIMED:
                return await self.settlement.requeue(run)
            if job.state == JobState.SENT:
                if self.async_mode and job.api_request_id and not self.lifecycle.stopping:
                    return await self.executor.execute(run, resume=job)
                return await self.settlement.refund(
                    run, ShuttingDown("process restarted"), restarted=True
                )
            run.posting = True
            return await self.posting.settle(run)
        finally:
            if self.inflight.leased.get(lease) is run:
                del self.inflight.leased[lease]

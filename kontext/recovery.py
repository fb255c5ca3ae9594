"""The shared queue's hooks: a job claimed here, taken over from a stopped process, lost to
another process, or expired while waiting — and how a taken-over job is settled."""

from __future__ import annotations

import asyncio
import logging

from kontext.errors import QueueTimeout, ShuttingDown
from kontext.execution import Execution
from kontext.job_state import ActiveJob
from kontext.jobs import JobOutcome
from kontext.store import Job, Lease
from kontext.vocab import Outcome

log = logging.getLogger("kontext.pipeline")


class Recovery(Execution):
    """The queue's hooks (see the module)."""

    def _on_claim(self, job: Job, lease: Lease) -> None:
        """This process claimed ``job``: run it (with the member's live sink if it came here)."""
        if job.id in self._doomed:  # its member was told "not charged"
            self._spawn(self._refund_doomed(lease), f"kontext-refund-{job.id}")
            return
        active = self._waiting.pop(job.id, None)
        if active is None:
            active = self._active_from_job(job)
        active.lease = lease
        self._spawn(self._execute(active), f"kontext-job-{job.id}")

    def _on_taken_over(self, job: Job, lease: Lease) -> None:
        """A stopped (or silent) process left ``job`` running: settle it here."""
        if job.id in self._doomed:  # claimed inside a reservation whose outcome we never heard
            self._spawn(self._refund_doomed(lease), f"kontext-refund-{job.id}")
            return
        active = self._active_from_job(job)
        active.lease = lease
        self._spawn(self._recover(active), f"kontext-recover-{job.id}")

    def _on_lost(self, job_id: int) -> None:
        """Another process holds the job now: stop it here without a word or a refund."""
        active = self._active.get(job_id)
        if active is not None and active.task is not None and not active.delivering:
            active.lost = True
            active.task.cancel()

    async def _on_expired(self, job: Job) -> None:
        """``job`` waited longer than ``MAX_QUEUE_WAIT_SECONDS``: refund it and say so."""
        active = self._waiting.get(job.id) or self._active_from_job(job)
        await self._refund_waiting(active, QueueTimeout("waited too long"))

    async def _recover(self, active: ActiveJob) -> JobOutcome:
        """Settle a job taken over from a stopped process, from the database and the channel.

        Its result may already be in the channel (the process died between posting and
        committing): then it is committed, never posted again nor refunded. Else, in async mode
        with a stored request id, the generation is fetched and posted; otherwise it is
        refunded (its API call may have been billed: the budget keeps it) and the member told.
        When the channel cannot be read, the lease is let go and a later sweep tries again.
        """
        spec, lease = active.spec, active.lease
        assert lease is not None
        active.task = asyncio.current_task()
        self._active[spec.job_id] = active
        try:
            try:
                found = await active.sink.find_result()
            except Exception as exc:  # noqa: BLE001 - nobody knows yet: try again later
                log.warning(
                    "job %s: cannot look for its result in the channel (%s); retrying later",
                    spec.job_id, type(exc).__name__,
                )
                await self._let_go(active)
                return self._finish(JobOutcome(spec.job_id, Outcome.HANDED_OVER), active)
            if found is not None:
                log.warning("job %s: its result was already posted; committing it", spec.job_id)
                await self._commit(active, found, None)
                return self._finish(JobOutcome(spec.job_id, Outcome.POSTED, delivery=found), active)
            if (
                self.settings.segmind_api_mode == "async"
                and active.request_id
                and not self._stopping
            ):
                log.info("job %s: resuming API request %s", spec.job_id, active.request_id)
                return await self._execute(active, resume=True)
            return await self._refund(active, ShuttingDown("process restarted"), restarted=True)
        finally:
            if active.task is asyncio.current_task():
                self._active.pop(spec.job_id, None)


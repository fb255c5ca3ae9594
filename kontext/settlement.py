"""The money edges of a job: commit once posted, refund on every other end, or requeue.

Every change names the job's lease (a process that lost it changes nothing); a commit or refund
the database does not take is retried in the background (:meth:`PipelineBase._settle_later`).
"""

from __future__ import annotations

import logging
from typing import Any

from kontext.errors import ApiError, KontextError, ShuttingDown
from kontext.job_state import ActiveJob, RestartedRefund
from kontext.jobs import Delivery, JobOutcome, JobSink, JobSpec
from kontext.pipeline_base import PipelineBase
from kontext.store import Lease
from kontext.vocab import JobState, Outcome

log = logging.getLogger("kontext.pipeline")


class Settlement(PipelineBase):
    """Commit, refund, requeue (see the module)."""

    async def _refund_if_ours(self, job_id: int) -> bool:
        job = await self.store.jobs.get(job_id)
        if job is None or job.worker_id != self.worker_id:
            return False  # nothing was reserved, or the job is in another process's hands
        if job.state == JobState.ACCEPTED:
            return await self.store.ledger.refund(
                job_id, cause="internal", clear_cooldown=True, api_charged=False, waiting_only=True
            )
        if job.state == JobState.RUNNING and job.lease_owner == self.worker_id and job.id not in self._active:
            # claimed inside the reservation we never heard back from: ours, and never sent
            lease = Lease(job.id, self.worker_id, job.lease_epoch)
            self.queue.forget(job.id)
            return await self.store.ledger.refund(
                job_id, cause="internal", clear_cooldown=True, api_charged=False, lease=lease
            )
        return False

    async def _refund_doomed(self, lease: Lease) -> None:
        self.queue.forget(lease.job_id)
        try:
            await self.store.ledger.refund(
                lease.job_id, cause="internal", clear_cooldown=True, api_charged=False, lease=lease
            )
        except Exception as exc:  # noqa: BLE001 - the lease expires; the background refund goes on
            log.warning("job %s: refund after an unsure reservation failed (%s)", lease.job_id, exc)

    async def _requeue(self, active: ActiveJob) -> JobOutcome:
        """No request went out: put the job back in the queue (if the lease is still ours)."""
        lease = active.lease
        if lease is not None:
            self.queue.forget(lease.job_id)
            try:
                if await self.store.leases.requeue(lease):
                    log.info("job %s: back in the queue (no request was sent)", lease.job_id)
                    self.queue.kick()
                    return self._finish(JobOutcome(active.spec.job_id, Outcome.QUEUED), active)
            except Exception as exc:  # noqa: BLE001 - then the lease expires and it is taken over
                log.warning("job %s: could not put it back in the queue (%s)", lease.job_id, exc)
        return self._lost(active)

    async def _commit(self, active: ActiveJob, delivery: Delivery, api_seconds: float | None) -> None:
        spec, lease = active.spec, active.lease

        async def commit() -> Any:
            return await self.store.ledger.commit(
                spec.job_id,
                result_message_id=delivery.message_id,
                result_channel_id=delivery.channel_id,
                duration_s=api_seconds,
                lease=lease,
            )

        try:
            if not await commit():
                log.warning("job %s: commit refused (the lease moved on)", spec.job_id)
        except Exception:
            log.exception("job %s: commit failed; retrying until the database answers", spec.job_id)
            self._settle_later("commit", spec.job_id, commit)
        finally:
            if lease is not None:
                self.queue.forget(lease.job_id)

    async def _refund(
        self, active: ActiveJob, err: KontextError, *, restarted: bool = False
    ) -> JobOutcome:
        """End a claimed job with a refund (fenced by its lease) and tell the member."""
        spec, lease = active.spec, active.lease
        refunded = 0
        # the budget: False only when nothing can have been generated (no request sent, or an
        # answer that proves it); None leaves the database's record (billed from the claim on)
        billed: bool | None = active.api_charged if active.sent else False
        if active.sent and not active.api_charged and not isinstance(err, ApiError):
            billed = None

        async def refund() -> bool:
            return await self.store.ledger.refund(
                spec.job_id,
                cause=err.cause,
                clear_cooldown=not err.members_fault,
                api_charged=billed,
                lease=lease,
            )

        try:
            if await refund():
                refunded = active.reservation.cost
            else:
                log.warning("job %s: refund refused (the lease moved on)", spec.job_id)
                return self._lost(active)
        except Exception:
            log.exception("job %s: refund failed; retrying until the database answers", spec.job_id)
            self._settle_later("refund", spec.job_id, refund)
            refunded = active.reservation.cost  # it will be: the member is told so now
        finally:
            if lease is not None:
                self.queue.forget(lease.job_id)
        log.info(
            "job %s refunded %d credit(s): %s (%s)", spec.job_id, refunded, err.cause, err.detail
        )
        if restarted or isinstance(err, ShuttingDown):
            err = RestartedRefund(credits=refunded)
        await self._tell(active.sink, err, refunded=refunded)
        return self._finish(
            JobOutcome(spec.job_id, Outcome.REFUNDED, err.cause, err, timings=active.timings), active
        )

    async def _refund_waiting(self, active: ActiveJob, err: KontextError) -> JobOutcome | None:
        """Refund a job that still waits in the queue (no one holds it) and tell the member."""
        spec = active.spec
        try:
            done = await self.store.ledger.refund(
                spec.job_id,
                cause=err.cause,
                clear_cooldown=True,
                api_charged=False,
                waiting_only=True,
            )
        except Exception:
            log.exception("job %s: refund of a waiting job failed", spec.job_id)
            self._settle_later(
                "refund", spec.job_id, lambda: self._refund_if_ours(spec.job_id)
            )
            done = True
        if not done:
            return None  # claimed (or ended) meanwhile: not ours to end
        log.info("job %s refunded while waiting: %s", spec.job_id, err.cause)
        await self._tell(active.sink, err, refunded=active.reservation.cost)
        outcome = self._finish(JobOutcome(spec.job_id, Outcome.REFUNDED, err.cause, err), active)
        if active.done is not None and not active.done.done():
            active.done.set_result(outcome)
        return outcome

    async def _reject(self, spec: JobSpec, sink: JobSink, err: KontextError) -> JobOutcome:
        await self._tell(sink, err, refunded=0)
        return self._finish(JobOutcome(spec.job_id, Outcome.REJECTED, err.cause, err))


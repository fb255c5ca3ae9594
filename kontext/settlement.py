"""The money edges of a job: commit once posted, refund on every other end, or requeue.

Every change names the job's lease (a process that lost it changes nothing) and every decision
about the owner's budget is the row's: a refund passes ``billed`` only when the API's own answer
proved it (billed, or nothing made); otherwise the row says, and a job that reached ``sent``
stays billed. A commit or refund the database does not take is retried in the background with
tenacity until it does (or a later process settles it from the row).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from kontext.errors import KontextError, ShuttingDown
from kontext.job_state import InFlight, JobRun, RestartedRefund
from kontext.jobs import Delivery, JobOutcome, JobSink, JobSpec
from kontext.outcomes import OutcomeLog
from kontext.store import Lease, Store
from kontext.vocab import JobState, Outcome

log = logging.getLogger("kontext.pipeline")

#: how long a commit or refund is retried while the database is away (then a restart settles it)
SETTLE_RETRY_S = 3600.0


class LeaseKeeper(Protocol):
    """What settling needs of the queue: stop renewing a lease, look for work again."""

    def forget(self, lease: Lease) -> None: ...

    def kick(self) -> None: ...


class Settlement:
    """Commit, refund, requeue, and the job's end in this process."""

    def __init__(
        self,
        *,
        store: Store,
        leases: LeaseKeeper,
        outcomes: OutcomeLog,
        inflight: InFlight,
        worker_id: str,
    ) -> None:
        self.store = store
        self.leases = leases
        self.outcomes = outcomes
        self.inflight = inflight
        self.worker_id = worker_id

    # --- the end of a job here ----------------------------------------------------------------

    def finish(self, outcome: JobOutcome, run: JobRun | None = None) -> JobOutcome:
        """Record the job's end here and wake its receiving ``run()`` call."""
        if run is not None and run.done is not None and not run.done.done():
            run.done.set_result(outcome)
        return self.outcomes.record(outcome)

    def lost(self, run: JobRun) -> JobOutcome:
        """Another process holds the job (or will): stop here, change nothing."""
        log.warning(
            "job %s: lease lost or stale; leaving the job to the process that holds it",
            run.spec.job_id,
        )
        if run.lease is not None:
            self.leases.forget(run.lease)
        return self.finish(JobOutcome(run.spec.job_id, Outcome.LOST), run)

    async def tell(self, sink: JobSink, err: KontextError, *, refunded: int) -> None:
        try:
            await sink.failed(err, refunded=refunded)
        except Exception:
            log.exception("could not tell the member about %s", err.cause)

    # --- retried in the background --------------------------------------------------------------

    def settle_later(self, what: str, job_id: int, op: Callable[[], Awaitable[object]]) -> None:
        """Retry a commit or refund in the background until the database takes it."""
        self.inflight.spawn(self._retry(what, job_id, op), f"kontext-{what}-{job_id}", settling=True)

    async def _retry(self, what: str, job_id: int, op: Callable[[], Awaitable[object]]) -> None:
        tries = 0
        done: object = None
        try:
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.25, max=2.0),
                stop=stop_after_delay(SETTLE_RETRY_S),
                retry=retry_if_exception_type(Exception),
                reraise=True,
            ):
                with attempt:
                    tries += 1
                    if tries % 20 == 0:
                        log.warning("job %s: %s still failing; retrying", job_id, what)
                    done = await op()
        except Exception as exc:  # noqa: BLE001 - the database stayed away for the whole bound
            log.error(
                "job %s: %s still failing after %d tries (%s); the process that takes the job "
                "over settles it from its row", job_id, what, tries, type(exc).__name__,
            )
            return
        if done is False:  # the database answered: the job is in other hands (its lease moved)
            log.warning("job %s: %s refused after %d tries: the job moved on", job_id, what, tries)
        elif tries > 1:
            log.warning("job %s: %s went through after %d tries", job_id, what, tries)

    # --- the edges ------------------------------------------------------------------------------

    async def try_requeue(self, run: JobRun) -> bool:
        """claimed → accepted: no request went out; the job waits again. False when the row is
        no longer claimed under this lease (sent meanwhile, or taken over)."""
        lease = run.lease
        if lease is None:
            return False
        self.leases.forget(lease)
        try:
            if await self.store.leases.requeue(lease):
                log.info("job %s: back in the queue (no request was sent)", lease.job_id)
                self.leases.kick()
                return True
        except Exception as exc:  # noqa: BLE001 - then the lease expires and it is taken over
            log.warning("job %s: could not put it back in the queue (%s)", lease.job_id, exc)
        return False

    async def requeue(self, run: JobRun) -> JobOutcome:
        """:meth:`try_requeue`, and the job's end here (queued, or lost to another process)."""
        if await self.try_requeue(run):
            return self.finish(JobOutcome(run.spec.job_id, Outcome.QUEUED), run)
        return self.lost(run)

    async def commit(self, run: JobRun, delivery: Delivery, api_seconds: float | None) -> None:
        """posting → posted: the charge is final (fenced by the lease; retried if need be)."""
        spec, lease = run.spec, run.lease

        async def commit() -> bool:
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
            self.settle_later("commit", spec.job_id, commit)
        finally:
            if lease is not None:
                self.leases.forget(lease)

    async def refund(
        self,
        run: JobRun,
        err: KontextError,
        *,
        billed: bool | None = None,
        restarted: bool = False,
    ) -> JobOutcome:
        """End a leased job with a refund (fenced by its lease) and tell the member.

        ``billed``: only what an answer of the API proved (True: it billed; False: nothing was
        made). None leaves the row's truth: billed once the job reached ``sent``.
        """
        spec, lease = run.spec, run.lease

        async def refund() -> bool:
            return await self.store.ledger.refund(
                spec.job_id,
                cause=err.cause,
                clear_cooldown=not err.members_fault,
                api_charged=billed,
                lease=lease,
            )

        try:
            if not await refund():
                log.warning("job %s: refund refused (the lease moved on)", spec.job_id)
                return self.lost(run)
        except Exception:
            log.exception("job %s: refund failed; retrying until the database answers", spec.job_id)
            self.settle_later("refund", spec.job_id, refund)
        finally:
            if lease is not None:
                self.leases.forget(lease)
        refunded = run.cost  # given back now, or by the retry (or the next holder)
        log.info("job %s refunded %d credit(s): %s (%s)", spec.job_id, refunded, err.cause, err.detail)
        if restarted or isinstance(err, ShuttingDown):
            err = RestartedRefund(credits=refunded)
        await self.tell(run.sink, err, refunded=refunded)
        return self.finish(
            JobOutcome(spec.job_id, Outcome.REFUNDED, err.cause, err, timings=run.timings), run
        )

    async def refund_waiting(self, run: JobRun, err: KontextError) -> JobOutcome | None:
        """Refund a job that still waits in the queue (no one holds it) and tell the member.

        None when the job was claimed (or ended) meanwhile: not this caller's to end.
        """
        spec = run.spec
        try:
            done = await self.store.ledger.refund(
                spec.job_id, cause=err.cause, clear_cooldown=True, api_charged=False, waiting_only=True
            )
        except Exception:
            log.exception("job %s: refund of a waiting job failed", spec.job_id)
            self.settle_later("refund", spec.job_id, lambda: self.refund_if_ours(spec.job_id))
            done = True
        if not done:
            return None
        log.info("job %s refunded while waiting: %s", spec.job_id, err.cause)
        await self.tell(run.sink, err, refunded=run.cost)
        return self.finish(JobOutcome(spec.job_id, Outcome.REFUNDED, err.cause, err), run)

    async def refund_if_ours(self, job_id: int) -> bool:
        """A reservation whose outcome this process never heard: refund it if it exists and is
        still waiting, or claimed by this process and never sent (read from the row)."""
        job = await self.store.jobs.get(job_id)
        if job is None or job.worker_id != self.worker_id:
            return False  # nothing was reserved, or the job is in another process's hands
        if job.state == JobState.ACCEPTED:
            return await self.store.ledger.refund(
                job_id, cause="internal", clear_cooldown=True, api_charged=False, waiting_only=True
            )
        if job.state == JobState.CLAIMED and job.lease_owner == self.worker_id:
            lease = Lease(job.id, self.worker_id, job.lease_epoch)
            if lease in self.inflight.leased:
                return False  # it runs here after all
            self.leases.forget(lease)
            return await self.store.ledger.refund(
                job_id, cause="internal", clear_cooldown=True, api_charged=False, lease=lease
            )
        return False

    async def refund_doomed(self, lease: Lease) -> None:
        """A job claimed inside a reservation whose member was told "not charged": refund it."""
        self.leases.forget(lease)
        try:
            await self.store.ledger.refund(
                lease.job_id, cause="internal", clear_cooldown=True, api_charged=False, lease=lease
            )
        except Exception as exc:  # noqa: BLE001 - the lease expires; the background refund goes on
            log.warning("job %s: refund after an unsure reservation failed (%s)", lease.job_id, exc)

    async def reject(self, spec: JobSpec, sink: JobSink, err: KontextError) -> JobOutcome:
        """Refused before any reservation: nothing was charged."""
        await self.tell(sink, err, refunded=0)
        return self.finish(JobOutcome(spec.job_id, Outcome.REJECTED, err.cause, err))

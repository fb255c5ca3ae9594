"""The pipeline's shared state and the small steps every stage uses.

:class:`PipelineBase` declares what :class:`~kontext.pipeline.JobPipeline` holds (set in its
``__init__``) and the helpers the stages share: ending a job (:meth:`_finish`), telling a
member, retrying a commit or refund while the database is away, letting a lease go. The stages
build on it, each in its own module, in this order (each may call the ones before it):

* :mod:`kontext.settlement` — the money edges: commit, refund, requeue;
* :mod:`kontext.account_guard` — the API account: rate limits, pauses, probes;
* :mod:`kontext.execution` — claim → API call → deliver → commit, under the job's lease;
* :mod:`kontext.recovery` — the shared queue's hooks: claimed, taken over, lost, expired;
* :mod:`kontext.pipeline` — intake (checks, reservation, waiting) and shutdown: the whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from kontext.accounts import Accounts
from kontext.errors import KontextError, ServicePaused, ShuttingDown
from kontext.job_state import SETTLE_RETRY_S, ActiveJob, LeaseLost, Progress
from kontext.jobs import JobOutcome, JobSink, JobSpec
from kontext.metrics import Metrics
from kontext.queue import SharedQueue
from kontext.segmind import SegmindClient
from kontext.settings import Settings
from kontext.store import Job, Reservation, ReserveRequest, Store
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import Outcome

log = logging.getLogger("kontext.pipeline")


class PipelineBase:
    """State and shared steps of :class:`~kontext.pipeline.JobPipeline` (see the module)."""

    settings: Settings
    metrics: Metrics
    store: Store
    client: SegmindClient
    queue: SharedQueue
    http: aiohttp.ClientSession
    worker_id: str
    #: builds the sink of a job this process did not receive (None: such jobs cannot run here)
    sink_factory: Callable[[Job], JobSink] | None
    #: servers' own keys (kontext.accounts.Accounts); None: every job on the owner's key
    accounts: Accounts | None
    progress_interval_s: float
    probe_interval_s: float
    _clock: Callable[[], float]
    accepting: bool
    handing_over: bool
    _stopping: bool  # shutdown is cancelling running jobs
    _probe_task: asyncio.Task[None] | None
    _waiting: dict[int, ActiveJob]  # jobs received here, waiting in the queue
    _active: dict[int, ActiveJob]  # jobs this process runs (API call or delivery)
    _jobs: set[asyncio.Task[Any]]  # jobs claimed or taken over here
    _settling: set[asyncio.Task[Any]]  # commits/refunds retried (database down)
    _doomed: set[int]  # reservations whose outcome was unknown: never run them
    outcomes: dict[str, int]
    on_outcome: Callable[[JobOutcome], None] | None

    def ensure_accepting(self, account: str = OWNER_ACCOUNT) -> None:
        """Raise when new jobs are refused right now (restart, the owner's account paused)."""
        if not self.accepting:
            raise ShuttingDown("not accepting")
        if self.queue.paused and account == OWNER_ACCOUNT:
            raise ServicePaused("API account paused")

    @property
    def paused(self) -> bool:
        """True while the API account needs attention (new jobs are refused)."""
        return self.queue.paused

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _active_from_job(self, job: Job) -> ActiveJob:
        spec = JobSpec.from_job(job)
        if self.sink_factory is None:
            raise RuntimeError("no sink_factory: cannot run another process's job")
        active = ActiveJob(
            spec=spec,
            sink=self.sink_factory(job),
            reservation=Reservation(
                job_id=job.id, cost=job.cost_credits, balance_after=-1, cooldown_until=None
            ),
            t0=self._clock(),
            timings={},
            progress=Progress(self.progress_interval_s),
        )
        active.remote = True
        active.request_id = job.api_request_id
        active.status_url = job.api_status_url
        active.response_url = job.api_response_url
        return active

    async def _let_go(self, active: ActiveJob) -> None:
        lease = active.lease
        if lease is None:
            return
        self.queue.forget(lease.job_id)
        try:
            await self.store.leases.let_go(lease)
        except Exception as exc:  # noqa: BLE001 - the lease then simply expires
            log.warning("job %s: could not let its lease go (%s)", lease.job_id, exc)

    def _reserve_request(self, spec: JobSpec) -> ReserveRequest:
        return ReserveRequest(
            job_id=spec.job_id,
            guild_id=spec.guild_id,
            channel_id=spec.channel_id,
            user_id=spec.user_id,
            params=spec.params(),
            seed=spec.seed,
            locale=spec.locale,
            application_id=spec.application_id,
            interaction_token=spec.interaction_token,
            exempt_from_cooldown=spec.exempt_from_cooldown,
            worker_id=self.worker_id,
            parent_job_id=spec.parent_job_id,
            account=spec.account,
        )

    def _check_lease(self, active: ActiveJob) -> None:
        """Raise LeaseLost unless the job's lease is held and fresh (renewed in half its life)."""
        if active.lease is None or not self.queue.fresh(active.lease):
            raise LeaseLost(f"job {active.spec.job_id}")

    def _lost(self, active: ActiveJob) -> JobOutcome:
        log.warning(
            "job %s: lease lost or stale; leaving the job to the process that holds it",
            active.spec.job_id,
        )
        if active.lease is not None:
            self.queue.forget(active.lease.job_id)
        return self._finish(JobOutcome(active.spec.job_id, Outcome.LOST), active)

    def _settle_later(self, what: str, job_id: int, op: Callable[[], Any]) -> None:
        """Retry a commit or refund in the background until the database takes it."""
        task = asyncio.get_running_loop().create_task(
            self._retry_settle(what, job_id, op), name=f"kontext-{what}-{job_id}"
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _retry_settle(self, what: str, job_id: int, op: Callable[[], Any]) -> None:
        delay, tries = 0.25, 0
        give_up = time.monotonic() + SETTLE_RETRY_S
        while True:
            await asyncio.sleep(delay)
            tries += 1
            try:
                await op()
            except Exception as exc:  # noqa: BLE001 - the database is still away
                if time.monotonic() > give_up:
                    log.error(
                        "job %s: %s still failing after %d tries (%s); a restart's recovery "
                        "will settle it", job_id, what, tries, type(exc).__name__,
                    )
                    return
                if tries % 20 == 1:
                    log.warning("job %s: %s failed again (%s); retrying", job_id, what, exc)
                delay = min(2.0, delay * 1.5)
                continue
            log.warning("job %s: %s went through after %d retries", job_id, what, tries)
            return

    async def _tell(self, sink: JobSink, err: KontextError, *, refunded: int) -> None:
        try:
            await sink.failed(err, refunded=refunded)
        except Exception:
            log.exception("could not tell the member about %s", err.cause)

    async def _tell_handover(self, active: ActiveJob) -> None:
        with contextlib.suppress(Exception):
            await active.sink.generating(-1.0, self.queue.estimate_duration())

    def _finish(self, outcome: JobOutcome, active: ActiveJob | None = None) -> JobOutcome:
        if active is not None:
            active.outcome = outcome
            if active.done is not None and not active.done.done():
                active.done.set_result(outcome)
        self.outcomes[outcome.status] = self.outcomes.get(outcome.status, 0) + 1
        self.metrics.job_finished(outcome.status, outcome.cause)
        if self.on_outcome is not None:
            with contextlib.suppress(Exception):
                self.on_outcome(outcome)
        return outcome



"""One job's life: check → reserve → queue → call the API → deliver → commit, or refund.

:class:`JobPipeline` is discord-free. The Discord side hands it a :class:`JobSpec` (what to make)
and a :class:`JobSink` (how to talk to the member: progress, the result, a failure); the pipeline
owns the money rules:

* nothing is charged before both inputs passed their checks;
* credits are reserved (atomically, idempotently per interaction id) before the job is queued;
* the charge is committed only after the image was posted;
* every other end refunds, and the member is told why in plain words;
* in async API mode a job whose request id is stored survives a restart: it is resumed and
  posted, never refunded, since the owner already paid for it.

The queue is the database's (:mod:`kontext.store.queue`, :mod:`kontext.queue`): :meth:`run`
reserves and then waits; whichever process claims the job runs it under a lease, stepping its
row through ``claimed → sent → posting → posted`` (:mod:`kontext.execution`), each step fenced
by the lease and written before its effect begins. A process that takes over a job of one that
stopped settles it from that step alone (:mod:`kontext.recovery`, :mod:`kontext.posting`).

The pipeline is composed of small parts (see :class:`JobPipeline`); the job types live in
:mod:`kontext.jobs` and are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from kontext.account_guard import AccountGuard
from kontext.accounts import Accounts
from kontext.errors import (
    GuildKeyRefused,
    GuildNotEnabled,
    JobAlreadyExists,
    KontextError,
    QueueTimeout,
    ServicePaused,
    ShuttingDown,
)
from kontext.execution import Executor
from kontext.intake import Intake
from kontext.job_state import (
    InFlight,
    JobRun,
    Lifecycle,
    Progress,
    RunFactory,
    Stop,
)
from kontext.jobs import Delivery, InputImage, JobOutcome, JobSink, JobSpec, ResultInfo
from kontext.metrics import Metrics
from kontext.outcomes import OutcomeLog
from kontext.posting import PostingSettler
from kontext.queue import SharedQueue
from kontext.recovery import Recovery
from kontext.segmind import SegmindClient
from kontext.settings import Settings
from kontext.settlement import Settlement
from kontext.store import Job, Lease, Store
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import JobState, Outcome

__all__ = [
    "Delivery",
    "InputImage",
    "JobOutcome",
    "JobPipeline",
    "JobSink",
    "JobSpec",
    "ResultInfo",
]

log = logging.getLogger("kontext.pipeline")

class JobPipeline:
    """Runs jobs for the whole process, on the bot's shared queue.

    Composed of small parts, each built here with what it needs: :class:`Settlement` (the money
    edges), :class:`AccountGuard` (API accounts), :class:`PostingSettler` (a post's fate),
    :class:`Executor` (a leased job's steps) and :class:`Recovery` (takeovers); the pipeline
    itself does the intake, serves the queue's events (:class:`kontext.queue_events.QueueHandler`) and
    shuts down. ``progress_interval_s`` is the least time between two progress edits of one
    job; ``probe_interval_s`` how often a paused API account is probed; ``settle_s`` the bound
    on settling a post whose channel cannot be read. ``accounts`` picks each job's API account
    (a server's own key); without it every job runs on the owner's key.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        client: SegmindClient,
        queue: SharedQueue,
        http: aiohttp.ClientSession,
        worker_id: str,
        progress_interval_s: float = 3.0,
        probe_interval_s: float = 60.0,
        settle_s: float = 600.0,
        metrics: Metrics | None = None,
        accounts: Accounts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.store = store
        self.client = client
        self.queue = queue
        self.http = http
        self.worker_id = worker_id
        self.accounts = accounts
        self.progress_interval_s = progress_interval_s
        self._clock = clock
        self._runs: set[asyncio.Task[Any]] = set()  # callers inside run()
        self._remote_runs: RunFactory | None = None  # given its sinks by start()
        self.lifecycle = Lifecycle()
        self.inflight = InFlight()
        self.outcomes = OutcomeLog(self.metrics)
        async_mode = settings.segmind_api_mode == "async"
        self.settlement = Settlement(
            store=store, leases=queue, outcomes=self.outcomes, inflight=self.inflight,
            worker_id=worker_id,
        )
        self.guard = AccountGuard(
            store=store, queue=queue, client=client, accounts=accounts,
            settlement=self.settlement, inflight=self.inflight, lifecycle=self.lifecycle,
            metrics=self.metrics, run_for=self._run_for, probe_interval_s=probe_interval_s,
        )
        self.intake = Intake(
            settings=settings, store=store, queue=queue, http=http, accounts=accounts,
            settlement=self.settlement, inflight=self.inflight, worker_id=worker_id,
        )
        self.posting = PostingSettler(
            store=store, settlement=self.settlement, lifecycle=self.lifecycle, settle_s=settle_s
        )
        self.executor = Executor(
            store=store, queue=queue, guard=self.guard, settlement=self.settlement,
            posting=self.posting, inflight=self.inflight, lifecycle=self.lifecycle,
            metrics=self.metrics, async_mode=async_mode, clock=clock,
        )
        self.recovery = Recovery(
            executor=self.executor, posting=self.posting, settlement=self.settlement,
            inflight=self.inflight, lifecycle=self.lifecycle, async_mode=async_mode,
        )

    def start(self, sinks: Callable[[Job], JobSink]) -> None:
        """Start serving the shared queue (claims, lease renewals, takeovers). ``sinks`` builds
        the sink of a job this process did not receive (run for another process, or taken over
        after one stopped)."""
        self._remote_runs = RunFactory(
            sinks, progress_interval_s=self.progress_interval_s, clock=self._clock
        )
        self.queue.start(self)

    def _run_for(self, job: Job) -> JobRun:
        """The run of a job this process did not receive (its sink rebuilt from the row)."""
        if self._remote_runs is None:
            raise RuntimeError("the pipeline was not started: it cannot run another process's job")
        return self._remote_runs.from_job(job)

    # --- the state the bot shows ------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self.lifecycle.accepting

    @property
    def paused(self) -> bool:
        """True while the owner's API account needs attention (new jobs are refused)."""
        return self.queue.paused

    def ensure_accepting(self, account: str = OWNER_ACCOUNT) -> None:
        """Raise when new jobs are refused right now (restart, the owner's account paused)."""
        if not self.lifecycle.accepting:
            raise ShuttingDown("not accepting")
        if self.queue.paused and account == OWNER_ACCOUNT:
            raise ServicePaused("API account paused")

    async def ensure_accepting_for(self, guild_id: int) -> None:
        """:meth:`ensure_accepting` for a new job of ``guild_id`` (its server may bring its own
        key: the owner's pause then does not apply, its own does)."""
        account = OWNER_ACCOUNT
        if self.accounts is not None:
            account = await self.accounts.account_for(guild_id)
        self.ensure_accepting(account)
        if account != OWNER_ACCOUNT and await self.store.queue.account_paused(account):
            raise GuildKeyRefused(f"{account} paused")

    # --- the queue's events (kontext.queue_events.QueueHandler) -----------------------------------

    def on_claim(self, job: Job, lease: Lease) -> None:
        """This process claimed ``job``: run it (with the member's live sink if it came here)."""
        if job.id in self.inflight.doomed:  # its member was told "not charged"
            self.inflight.spawn(self.settlement.refund_doomed(lease), f"kontext-refund-{job.id}")
            return
        run = self.inflight.waiting.pop(job.id, None) or self._run_for(job)
        run.lease = lease
        self.inflight.spawn(self.executor.execute(run), f"kontext-job-{job.id}")

    def on_taken_over(self, job: Job, lease: Lease) -> None:
        """A stopped (or silent) process left ``job`` unfinished: settle it here, from its row."""
        if job.id in self.inflight.doomed and job.state == JobState.CLAIMED:
            self.inflight.spawn(self.settlement.refund_doomed(lease), f"kontext-refund-{job.id}")
            return
        run = self._run_for(job)
        run.lease = lease
        self.inflight.spawn(self.recovery.take_over(run, job), f"kontext-recover-{job.id}")

    def on_lost(self, lease: Lease) -> None:
        """Another process holds the job now: stop this lease's task without a word or a refund
        (an upload under way finishes; the new holder finds it)."""
        run = self.inflight.leased.get(lease)
        if run is not None and run.task is not None and not run.posting:
            run.stop = Stop.LOST
            run.task.cancel()

    async def on_expired(self, job: Job) -> None:
        """``job`` waited longer than ``MAX_QUEUE_WAIT_SECONDS``: refund it and say so."""
        run = self.inflight.waiting.get(job.id) or self._run_for(job)
        await self.settlement.refund_waiting(run, QueueTimeout("waited too long"))

    async def on_refused(self, job: Job) -> None:
        """``job`` waits for a server the bot no longer serves: refund it and say so."""
        run = self.inflight.waiting.get(job.id) or self._run_for(job)
        await self.settlement.refund_waiting(run, GuildNotEnabled(f"server {job.guild_id}"))

    def on_paused(self, paused: bool) -> None:
        self.guard.on_paused(paused)

    # --- intake -----------------------------------------------------------------------------------

    async def run(self, spec: JobSpec, sink: JobSink) -> JobOutcome:
        """Run one new job to its end. Never raises a KontextError; tells ``sink`` instead.

        Returns when the job ended here, or when it is in another process's hands (another
        process claimed it, or this one is restarting and leaves it queued).
        """
        me = asyncio.current_task()
        if me is not None:
            self._runs.add(me)
        try:
            return await self._run(spec, sink)
        finally:
            if me is not None:
                self._runs.discard(me)

    async def _run(self, spec: JobSpec, sink: JobSink) -> JobOutcome:
        t0 = self._clock()
        timings: dict[str, float] = {}
        try:
            spec = await self.intake.use_account(spec)
            self.ensure_accepting(spec.account)
            reserving = time.monotonic()
            # everything that can refuse the member is checked before any download, and one
            # member's jobs are taken in one at a time
            async with self.intake.member_lock(spec):
                await self.intake.check_in_turn(spec)
                timings["checked"] = self._clock() - t0
                self.ensure_accepting(spec.account)  # a shutdown may have begun meanwhile
                reservation = await self.intake.reserve(spec)
                timings["reserved"] = self._clock() - t0
        except JobAlreadyExists:
            log.info("job %s: duplicate delivery, already handled", spec.job_id)
            return self.settlement.finish(
                JobOutcome(spec.job_id, Outcome.DUPLICATE, cause="duplicate")
            )
        except KontextError as err:
            log.info("job %s refused: %s (%s)", spec.job_id, err.cause, err.detail)
            return await self.settlement.reject(spec, sink, err)
        except Exception as exc:  # the database away while reserving, or a bug: nothing charged
            log.exception("job %s could not be accepted", spec.job_id)
            return await self.settlement.reject(spec, sink, KontextError(type(exc).__name__))

        run = JobRun(
            spec=spec,
            sink=sink,
            cost=reservation.cost,
            balance_after=reservation.balance_after,
            t0=t0,
            timings=timings,
            progress=Progress(self.progress_interval_s),
        )
        run.done = asyncio.get_running_loop().create_future()
        self.inflight.waiting[spec.job_id] = run
        claim = reservation.claim
        if claim is not None and claim.lease is not None:
            # claimed inside the reservation's transaction: run it now, no round trip
            self.inflight.waiting.pop(spec.job_id, None)
            if await self.queue.adopt(claim.lease, reserving):
                run.lease = claim.lease
                self.inflight.spawn(self.executor.execute(run), f"kontext-job-{spec.job_id}")
            else:  # shutting down: it went back to the queue for the next process
                self.settlement.finish(JobOutcome(spec.job_id, Outcome.QUEUED), run)
        else:
            self.queue.kick()
        reporter = asyncio.create_task(self.intake.report_place(run))
        try:
            return await asyncio.shield(run.done)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling() and run.lease is None:
                # our caller gave up on a job that still waits: take it out of the queue
                await asyncio.shield(
                    self.settlement.refund_waiting(run, ShuttingDown("cancelled"))
                )
            raise
        finally:
            reporter.cancel()
            self.inflight.waiting.pop(spec.job_id, None)

    # --- shutdown and health ----------------------------------------------------------------------

    async def shutdown(self, grace_s: float, *, settle_s: float = 3.0) -> None:
        """Stop taking jobs, let running ones finish within ``grace_s``, then stop the rest.

        Waiting jobs stay in the queue: the next process (or another one now) runs them. Running
        jobs that do not finish in time are cancelled: refunded in sync mode; in async mode, once
        their request id is stored, handed over to the next process (the lease let go, not
        refunded). A job already posting its image gets up to ``settle_s`` more; then everyone
        who was told nothing yet is told, within ``settle_s``.
        """
        self.lifecycle.accepting = False
        self.queue.stop_claiming()
        for run in list(self.inflight.waiting.values()):  # they stay queued: their run() returns
            if run.done is not None and not run.done.done():
                self.settlement.finish(JobOutcome(run.spec.job_id, Outcome.QUEUED), run)
        if self.inflight.waiting:
            log.info("shutdown: %d waiting job(s) stay in the queue", len(self.inflight.waiting))
        self.guard.stop()
        jobs = {t for t in self.inflight.tasks if not t.done()}
        if jobs:
            log.info("shutdown: waiting up to %.1f s for %d running job(s)", grace_s, len(jobs))
            _, pending = await asyncio.wait(jobs, timeout=max(0.0, grace_s))
            if pending:
                self.lifecycle.stopping = True
                self.lifecycle.handing_over = self.settings.segmind_api_mode == "async"
                runs = list(self.inflight.leased.values())
                posting = {r.task for r in runs if r.posting and r.task}
                for r in runs:
                    if r.task in pending and r.task not in posting:
                        r.stop = Stop.SHUTDOWN
                log.warning(
                    "shutdown: %d job(s) still running after %.1f s: %s",
                    len(pending),
                    grace_s,
                    "handing them over" if self.lifecycle.handing_over else "refunding",
                )
                for task in pending - posting:
                    task.cancel()
                _, still = await asyncio.wait(pending, timeout=settle_s)
                for r in runs:  # an upload that hangs: give up on it too (its fate: looked up)
                    if r.task in still:
                        r.stop = Stop.SHUTDOWN
                for task in still:
                    task.cancel()
                if still:
                    await asyncio.wait(still, timeout=1.0)
        runs_left = [t for t in self._runs if not t.done()]
        if runs_left:  # messages of the jobs that stay queued
            await asyncio.wait(runs_left, timeout=settle_s)
        if self.inflight.settling:  # the database was down: one last chance, then the next process
            _, late = await asyncio.wait(self.inflight.settling, timeout=settle_s)
            for task in late:
                task.cancel()
        await self.queue.aclose()

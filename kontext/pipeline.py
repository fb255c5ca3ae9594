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
reserves and then waits; whichever process claims the job runs it (:meth:`_execute`) under a
lease, and every change it makes names that lease. A process that lost the lease, or could not
renew it for half its life, starts no API call and posts nothing for that job: the process that
takes it over settles it from the database and the channel.

This module is the whole :class:`JobPipeline` (intake and shutdown here; the other stages in
:mod:`kontext.settlement`, :mod:`kontext.account_guard`, :mod:`kontext.execution` and
:mod:`kontext.recovery`, see :mod:`kontext.pipeline_base`). The job types live in
:mod:`kontext.jobs` and are importable from here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from kontext import images
from kontext.accounts import Accounts
from kontext.errors import (
    GuildKeyRefused,
    JobAlreadyExists,
    KontextError,
    ShuttingDown,
)
from kontext.job_state import QUEUED_STATUS_AFTER_S, ActiveJob, Progress
from kontext.jobs import Delivery, InputImage, JobOutcome, JobSink, JobSpec, ResultInfo
from kontext.metrics import Metrics
from kontext.queue import SharedQueue
from kontext.recovery import Recovery
from kontext.segmind import SegmindClient
from kontext.settings import Settings
from kontext.store import Job, Reservation, Store
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

#: jobs that download and check their images at once, and how long one may keep its turn
INTAKE_AT_ONCE = 4
INTAKE_SLOT_S = 1.0


class JobPipeline(Recovery):
    """Runs jobs for the whole process, on the bot's shared queue.

    ``progress_interval_s`` is the least time between two progress edits of one job (queue
    position, progress bar); ``probe_interval_s`` how often a paused API account is probed.
    ``sink_factory`` builds the sink of a job this process did not receive (run for another
    process, or taken over after one stopped). ``accounts`` picks each job's API account (a
    server's own key); without it every job runs on the owner's key.
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
        sink_factory: Callable[[Job], JobSink] | None = None,
        progress_interval_s: float = 3.0,
        probe_interval_s: float = 60.0,
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
        self.sink_factory = sink_factory
        self.accounts = accounts
        self.progress_interval_s = progress_interval_s
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self.accepting = True
        self._intake = asyncio.Semaphore(INTAKE_AT_ONCE)
        self._intakes: dict[tuple[int, int], asyncio.Lock] = {}  # one intake per member
        self.handing_over = False
        self._stopping = False  # shutdown is cancelling running jobs
        self._probe_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, ActiveJob] = {}  # jobs received here, waiting in the queue
        self._active: dict[int, ActiveJob] = {}  # jobs this process runs (API call or delivery)
        self._runs: set[asyncio.Task[Any]] = set()  # callers inside run()
        self._jobs: set[asyncio.Task[Any]] = set()  # jobs claimed or taken over here
        self._settling: set[asyncio.Task[Any]] = set()  # commits/refunds retried (database down)
        self._doomed: set[int] = set()  # reservations whose outcome was unknown: never run them
        self.outcomes: dict[str, int] = {}
        self.on_outcome: Callable[[JobOutcome], None] | None = None
        queue.on_claim = self._on_claim
        queue.on_taken_over = self._on_taken_over
        queue.on_lost = self._on_lost
        queue.on_expired = self._on_expired
        queue.on_paused = self._on_paused

    def start(self) -> None:
        """Start serving the shared queue (claims, lease renewals, takeovers)."""
        self.queue.start()

    async def ensure_accepting_for(self, guild_id: int) -> None:
        """:meth:`ensure_accepting` for a new job of ``guild_id`` (its server may bring its own
        key: the owner's pause then does not apply, its own does)."""
        account = OWNER_ACCOUNT
        if self.accounts is not None:
            account = await self.accounts.account_for(guild_id)
        self.ensure_accepting(account)
        if account != OWNER_ACCOUNT and await self.store.queue.account_paused(account):
            raise GuildKeyRefused(f"{account} paused")

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
            await self._use_account(spec)
            self.ensure_accepting(spec.account)
            reserving = time.monotonic()
            # everything that can refuse the member is checked before any download, and one
            # member's jobs are taken in one at a time
            async with self._member_lock(spec):
                await self._check_in_turn(spec)
                timings["checked"] = self._clock() - t0
                self.ensure_accepting(spec.account)  # a shutdown may have begun meanwhile
                reservation = await self._reserve(spec)
                timings["reserved"] = self._clock() - t0
        except JobAlreadyExists:
            log.info("job %s: duplicate delivery, already handled", spec.job_id)
            return self._finish(JobOutcome(spec.job_id, Outcome.DUPLICATE, cause="duplicate"))
        except KontextError as err:
            log.info("job %s refused: %s (%s)", spec.job_id, err.cause, err.detail)
            return await self._reject(spec, sink, err)
        except Exception as exc:  # the database away while reserving, or a bug: nothing charged
            log.exception("job %s could not be accepted", spec.job_id)
            return await self._reject(spec, sink, KontextError(type(exc).__name__))

        active = ActiveJob(
            spec=spec,
            sink=sink,
            reservation=reservation,
            t0=t0,
            timings=timings,
            progress=Progress(self.progress_interval_s),
        )
        active.done = asyncio.get_running_loop().create_future()
        self._waiting[spec.job_id] = active
        claim = reservation.claim
        if claim is not None and claim.job is not None:
            await self.queue.adopt(claim, reserving)  # runs it now (or, shutting down, requeues)
        else:
            self.queue.kick()
        reporter = asyncio.create_task(self._report_queue(active))
        try:
            return await asyncio.shield(active.done)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling() and active.lease is None:
                # our caller gave up on a job that still waits: take it out of the queue
                await asyncio.shield(self._refund_waiting(active, ShuttingDown("cancelled")))
            raise
        finally:
            reporter.cancel()
            self._waiting.pop(spec.job_id, None)

    async def _use_account(self, spec: JobSpec) -> None:
        """Pick the job's API account (a server's own key, else the owner's); refuse while a
        server's own key is paused (Segmind refused it)."""
        if self.accounts is None:
            return
        spec.account = await self.accounts.account_for(spec.guild_id)
        if spec.account != OWNER_ACCOUNT and await self.store.queue.account_paused(spec.account):
            raise GuildKeyRefused(f"{spec.account} paused")

    @contextlib.asynccontextmanager
    async def _member_lock(self, spec: JobSpec) -> AsyncIterator[None]:
        """One intake (checks and reservation) per member at a time in this process."""
        key = (spec.guild_id, spec.user_id)
        lock = self._intakes.get(key)
        if lock is None:
            lock = self._intakes[key] = asyncio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock._waiters:  # noqa: SLF001
                self._intakes.pop(key, None)

    async def _reserve(self, spec: JobSpec) -> Reservation:
        """:meth:`kontext.store.ledger.Ledger.reserve`, and no credit left held when its outcome is unknown.

        A connection lost while committing, or a caller cancelled once its transaction began,
        leaves it open whether the reservation was written. Then a refund follows in the
        background (retried while the database is away): it finds the job still waiting and
        gives the credits back, or finds none (or one already claimed) and changes nothing.
        """
        try:
            request = self._reserve_request(spec)
            if self.queue.claiming:  # an empty queue with room: claimed in the same transaction
                every = await self.queue.every_account()
                request = dataclasses.replace(
                    request, claim_for=(self.worker_id, every, self.queue.lease_s)
                )
            return await self.store.ledger.reserve(request)
        except KontextError:
            raise  # a refusal: decided inside the transaction, which was rolled back
        except BaseException:
            # the member is told "not charged": make it true, also if this process claims it
            self._doomed.add(spec.job_id)
            self._settle_later("refund", spec.job_id, lambda: self._refund_if_ours(spec.job_id))
            raise

    async def _check_in_turn(self, spec: JobSpec) -> None:
        """:meth:`check_inputs`, a few jobs at a time, first come first served.

        In a burst, jobs that all check their images at once all finish late; in turn, the first
        members' jobs reach the API (or the queue) while the rest are still being checked. A
        check that takes longer than ``INTAKE_SLOT_S`` (a slow download) goes on outside its
        turn, so it never holds up the members behind it.
        """
        check: asyncio.Future[None] | None = None
        try:
            async with self._intake:
                # what can refuse the member is read first: a refused job downloads nothing
                await self.store.ledger.precheck(self._reserve_request(spec))
                check = asyncio.ensure_future(self.check_inputs(spec))
                await asyncio.wait({check}, timeout=INTAKE_SLOT_S)
            await check
        except BaseException:
            if check is not None:
                check.cancel()
                if check.done() and not check.cancelled():
                    check.exception()  # retrieved: asyncio must not warn about it later
            raise

    async def check_inputs(self, spec: JobSpec) -> None:
        """Download and check both images; raises InputError before any money moves."""
        s = self.settings
        await asyncio.gather(
            *(
                images.fetch_and_check(
                    self.http,
                    img.url,
                    which=n,
                    declared_size=img.size,
                    max_bytes=s.max_image_bytes,
                    max_pixels=s.max_image_pixels,
                )
                for n, img in ((1, spec.image_1), (2, spec.image_2))
            )
        )

    # --- shutdown and health ----------------------------------------------------------------------

    async def shutdown(self, grace_s: float, *, settle_s: float = 3.0) -> None:
        """Stop taking jobs, let running ones finish within ``grace_s``, then stop the rest.

        Waiting jobs stay in the queue: the next process (or another one now) runs them. Running
        jobs that do not finish in time are cancelled: refunded in sync mode; in async mode, once
        their request id is stored, handed over to the next process (the lease let go, not
        refunded). A job already posting its image gets up to ``settle_s`` more; then everyone
        who was told nothing yet is told, within ``settle_s``.
        """
        self.accepting = False
        self.queue.stop_claiming()
        for active in list(self._waiting.values()):  # they stay queued: their run() returns
            if active.done is not None and not active.done.done():
                active.done.set_result(self._finish(JobOutcome(active.spec.job_id, Outcome.QUEUED)))
        if self._waiting:
            log.info("shutdown: %d waiting job(s) stay in the queue", len(self._waiting))
        if self._probe_task is not None:
            self._probe_task.cancel()
        jobs = {t for t in self._jobs if not t.done()}
        if jobs:
            log.info("shutdown: waiting up to %.1f s for %d running job(s)", grace_s, len(jobs))
            _, pending = await asyncio.wait(jobs, timeout=max(0.0, grace_s))
            if pending:
                self._stopping = True
                self.handing_over = self.settings.segmind_api_mode == "async"
                posting = {a.task for a in self._active.values() if a.delivering and a.task}
                stop = [t for t in pending if t not in posting]
                log.warning(
                    "shutdown: %d job(s) still running after %.1f s: %s",
                    len(pending),
                    grace_s,
                    "handing over the ones with a request id" if self.handing_over else "refunding",
                )
                for task in stop:
                    task.cancel()
                _, still = await asyncio.wait(pending, timeout=settle_s)
                for task in still:  # a post that hangs: give up on it too
                    task.cancel()
                if still:
                    await asyncio.wait(still, timeout=1.0)
        runs = [t for t in self._runs if not t.done()]
        if runs:  # messages of the jobs that stay queued
            await asyncio.wait(runs, timeout=settle_s)
        if self._settling:  # the database was down: one last chance, then the next process
            _, late = await asyncio.wait(self._settling, timeout=settle_s)
            for task in late:
                task.cancel()
        await self.queue.aclose()

    async def _report_queue(self, active: ActiveJob) -> None:
        """While the job waits: tell the member its place (when it changes, throttled), and
        notice when another process took the job (its run() then returns)."""
        shown: tuple[int, int] | None = None
        job_id = active.spec.job_id
        # a job with room to start is claimed within milliseconds: show no place for it (the
        # first edit would also hold back its progress bar by a whole interval)
        await asyncio.sleep(QUEUED_STATUS_AFTER_S)
        while active.lease is None and active.done is not None and not active.done.done():
            try:
                view = await self.queue.view(account=active.spec.account)
            except Exception as exc:  # noqa: BLE001 - the database is away: look again later
                log.debug("job %s: queue view failed: %s", job_id, exc)
                await asyncio.sleep(self.progress_interval_s)
                continue
            pos, total = view.position(job_id)
            if pos == 0:
                if await self._claimed_elsewhere(active):
                    return
                await asyncio.sleep(self.queue.view_s)
                continue
            if shown != (pos, total):
                shown = (pos, total)
                eta = self.queue.eta(view, pos)

                async def show(pos: int = pos, total: int = total, eta: float = eta) -> None:
                    if active.lease is None:
                        await active.sink.queued(pos, total, eta)

                await active.progress.show(show)
                continue
            await asyncio.sleep(min(self.progress_interval_s, max(0.05, self.queue.poll_s)))

    async def _claimed_elsewhere(self, active: ActiveJob) -> bool:
        """The job left the waiting list: True (and run() returns) when not into our hands."""
        job = await self.store.jobs.get(active.spec.job_id)
        if active.lease is not None or job is None:
            return False
        if job.state == JobState.ACCEPTED or job.lease_owner == self.worker_id:
            return False  # still waiting, or our own claim is on its way
        if active.done is not None and not active.done.done():
            active.progress.closed = True
            log.info("job %s: in another process's hands (%s)", job.id, job.state)
            active.done.set_result(self._finish(JobOutcome(job.id, Outcome.ELSEWHERE)))
        return True


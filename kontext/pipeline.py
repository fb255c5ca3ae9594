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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

from kontext import images
from kontext.accounts import Accounts
from kontext.errors import (
    ApiError,
    ApiRateLimited,
    GuildKeyRefused,
    JobAlreadyExists,
    KontextError,
    QueueTimeout,
    ResultNotDelivered,
    ServicePaused,
    ShuttingDown,
)
from kontext.metrics import Metrics
from kontext.queue import SharedQueue
from kontext.segmind import GenerationRequest, GenerationResult, SegmindClient, SubmittedJob
from kontext.settings import Settings
from kontext.store import Job, Lease, Reservation, ReserveRequest, Store
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import ImageFormat, JobState, Outcome, Source

log = logging.getLogger("kontext.pipeline")


@dataclass(frozen=True, slots=True)
class InputImage:
    """One input image as Discord gave it."""

    url: str
    filename: str = "image"
    size: int | None = None
    content_type: str | None = None
    attachment_id: int | None = None
    message_id: int | None = None  # the message that carries it, to refetch a fresh URL


@dataclass(slots=True)
class JobSpec:
    """Everything needed to run (or rerun) one generation."""

    job_id: int
    guild_id: int
    channel_id: int
    user_id: int
    prompt: str
    image_1: InputImage
    image_2: InputImage
    aspect_ratio: str = "match_input_image"
    output_format: ImageFormat = ImageFormat.JPG
    safety_tolerance: int = 1
    seed: int = 42
    locale: str | None = None
    exempt_from_cooldown: bool = False
    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    parent_job_id: int | None = None
    source: Source = Source.SLASH
    #: whose API key runs it: the owner's, or ``guild:<id>`` (a server's own key)
    account: str = OWNER_ACCOUNT

    def params(self) -> dict[str, Any]:
        """The job's parameters as stored in the database (no token)."""
        return {
            "prompt": self.prompt,
            "image_1": asdict(self.image_1),
            "image_2": asdict(self.image_2),
            "aspect_ratio": self.aspect_ratio,
            "output_format": self.output_format,
            "safety_tolerance": self.safety_tolerance,
            "seed": self.seed,
            "source": self.source,
        }

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            image_1_url=self.image_1.url,
            image_2_url=self.image_2.url,
            aspect_ratio=self.aspect_ratio,
            output_format=self.output_format,
            safety_tolerance=self.safety_tolerance,
            seed=self.seed,
        )

    @classmethod
    def from_job(cls, job: Job) -> JobSpec:
        """Rebuild the spec of a stored job (after a restart, or for a button)."""
        p = job.params
        return cls(
            job_id=job.id,
            guild_id=job.guild_id,
            channel_id=job.channel_id,
            user_id=job.user_id,
            prompt=p["prompt"],
            image_1=InputImage(**p["image_1"]),
            image_2=InputImage(**p["image_2"]),
            aspect_ratio=p.get("aspect_ratio", "match_input_image"),
            output_format=ImageFormat(p.get("output_format", ImageFormat.JPG)),
            safety_tolerance=int(p.get("safety_tolerance", 1)),
            seed=int(p.get("seed", job.seed or 0)),
            locale=job.locale,
            application_id=job.application_id,
            interaction_token=job.interaction_token,
            parent_job_id=job.parent_job_id,
            source=Source(p.get("source", Source.SLASH)),
            account=job.account,
        )


@dataclass(slots=True)
class ResultInfo:
    """What the sink needs to post a result."""

    spec: JobSpec
    image: images.FittedImage
    generation: GenerationResult
    api_seconds: float
    total_seconds: float
    balance_after: int
    cost: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where the result was posted."""

    message_id: int
    channel_id: int


@dataclass(slots=True)
class JobOutcome:
    """How a job ended, for callers and tests."""

    job_id: int
    status: Outcome
    cause: str | None = None
    error: KontextError | None = None
    delivery: Delivery | None = None
    timings: dict[str, float] = field(default_factory=dict)


class JobSink(Protocol):
    """How the pipeline talks to the member. Implemented by the Discord adapter."""

    @property
    def upload_limit(self) -> int:
        """Largest attachment, in bytes, the result may have."""
        ...

    async def queued(self, position: int, total: int, eta_s: float) -> None:
        """The job waits at ``position`` of ``total``."""

    async def generating(self, elapsed_s: float, estimate_s: float) -> None:
        """The API is working on it."""

    async def deliver(self, result: ResultInfo) -> Delivery:
        """Post the result; raise ResultNotDelivered when it cannot be posted."""
        ...

    async def failed(self, error: KontextError, *, refunded: int) -> None:
        """Tell the member the job stopped (``refunded`` credits were given back)."""

    async def find_result(self) -> Delivery | None:
        """Look for this job's result in its channel (an ambiguous or interrupted post).

        None when it is not there; raises when the channel cannot be read (then nobody knows).
        """
        ...


#: how long a commit or refund is retried while the database is away (then a restart settles it)
SETTLE_RETRY_S = 3600.0
#: the progress bar's first edit waits this long, so that it does not compete with sending the
#: API request itself (nobody sees 50 ms of an ~18 s generation)
GENERATING_STATUS_AFTER_S = 0.05
#: a job's place in the queue is shown once it has waited this long (a quick claim shows none)
QUEUED_STATUS_AFTER_S = 0.3
#: jobs that download and check their images at once, and how long one may keep its turn
INTAKE_AT_ONCE = 4
INTAKE_SLOT_S = 1.0


class _LeaseLost(Exception):
    """This process no longer holds (or could not renew) the job's lease: hands off."""


class JobPipeline:
    """Runs jobs for the whole process, on the bot's shared queue.

    ``progress_interval_s`` is the least time between two progress edits of one job (queue
    position, progress bar); ``probe_interval_s`` how often a paused API account is probed.
    ``sink_factory`` builds the sink of a job this process did not receive (run for another
    process, or taken over after one stopped).
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
        #: servers' own keys (kontext.accounts.Accounts); None: every job on the owner's key
        self.accounts: Accounts | None = None
        self.progress_interval_s = progress_interval_s
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self.accepting = True
        self._intake = asyncio.Semaphore(INTAKE_AT_ONCE)
        self._intakes: dict[tuple[int, int], asyncio.Lock] = {}  # one intake per member
        self.handing_over = False
        self._stopping = False  # shutdown is cancelling running jobs
        self._probe_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, _Active] = {}  # jobs received here, waiting in the queue
        self._active: dict[int, _Active] = {}  # jobs this process runs (API call or delivery)
        self._runs: set[asyncio.Task[Any]] = set()  # callers inside run()
        self._jobs: set[asyncio.Task[Any]] = set()  # jobs claimed or taken over here
        self._settling: set[asyncio.Task[Any]] = set()  # commits/refunds retried (database down)
        self._doomed: set[int] = set()  # reservations whose outcome was unknown: never run them
        self.outcomes: dict[str, int] = {}
        self.on_outcome: Callable[[JobOutcome], None] | None = None
        if hasattr(client, "on_rate_limited"):
            client.on_rate_limited = self._rate_limited
        queue.on_claim = self._on_claim
        queue.on_taken_over = self._on_taken_over
        queue.on_lost = self._on_lost
        queue.on_expired = self._on_expired
        queue.on_paused = self._on_paused

    # --- entry points ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving the shared queue (claims, lease renewals, takeovers)."""
        self.queue.start()

    def ensure_accepting(self, account: str = OWNER_ACCOUNT) -> None:
        """Raise when new jobs are refused right now (restart, the owner's account paused)."""
        if not self.accepting:
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

    @property
    def paused(self) -> bool:
        """True while the API account needs attention (new jobs are refused)."""
        return self.queue.paused

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

        active = _Active(
            spec=spec,
            sink=sink,
            reservation=reservation,
            t0=t0,
            timings=timings,
            progress=_Progress(self.progress_interval_s),
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

    async def _client(self, active: _Active) -> SegmindClient:
        if self.accounts is None or active.spec.account == OWNER_ACCOUNT:
            return self.client
        try:
            return await self.accounts.client_for(active.spec.account)
        except LookupError as exc:  # the key was removed meanwhile: nothing was sent
            raise GuildKeyRefused(str(exc)) from None

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

    # --- the queue's hooks ------------------------------------------------------------------------

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

    async def _refund_doomed(self, lease: Lease) -> None:
        self.queue.forget(lease.job_id)
        try:
            await self.store.ledger.refund(
                lease.job_id, cause="internal", clear_cooldown=True, api_charged=False, lease=lease
            )
        except Exception as exc:  # noqa: BLE001 - the lease expires; the background refund goes on
            log.warning("job %s: refund after an unsure reservation failed (%s)", lease.job_id, exc)

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

    def _on_paused(self, paused: bool) -> None:
        if paused and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_account())

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _active_from_job(self, job: Job) -> _Active:
        spec = JobSpec.from_job(job)
        if self.sink_factory is None:
            raise RuntimeError("no sink_factory: cannot run another process's job")
        active = _Active(
            spec=spec,
            sink=self.sink_factory(job),
            reservation=Reservation(
                job_id=job.id, cost=job.cost_credits, balance_after=-1, cooldown_until=None
            ),
            t0=self._clock(),
            timings={},
            progress=_Progress(self.progress_interval_s),
        )
        active.remote = True
        active.request_id = job.api_request_id
        active.status_url = job.api_status_url
        active.response_url = job.api_response_url
        return active

    async def _recover(self, active: _Active) -> JobOutcome:
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

    async def _let_go(self, active: _Active) -> None:
        lease = active.lease
        if lease is None:
            return
        self.queue.forget(lease.job_id)
        try:
            await self.store.leases.let_go(lease)
        except Exception as exc:  # noqa: BLE001 - the lease then simply expires
            log.warning("job %s: could not let its lease go (%s)", lease.job_id, exc)

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

    def _rate_limited(self, delay: float | None) -> None:
        """A 429 from the API: hold every new start for a while (the request itself retries)."""
        wait = min(60.0, delay if delay is not None and delay > 0 else 5.0)
        self.metrics.rate_limited.inc()
        self.queue.slow_down(wait)
        log.warning("image API rate limit hit: starting no new job for %.1f s", wait)

    def pause_for_account(self, err: ApiError) -> None:
        """The API account needs the owner: hold new jobs (every process) and probe."""
        if self.queue.paused:
            return
        log.error(
            "PAUSING new jobs: the Segmind account needs attention (%s, HTTP %s): %s. "
            "Check SEGMIND_API_KEY, SEGMIND_MODEL and the account's credits at "
            "https://cloud.segmind.com; probing again every %.0f s.",
            err.cause,
            err.status,
            err.detail,
            self.probe_interval_s,
        )
        self.queue.note_paused()  # at once, here; the database tells the other processes
        self._spawn(self._pause(err), "kontext-pause")

    async def _pause(self, err: ApiError) -> None:
        try:
            await self.queue.pause(err.cause)
        except Exception:
            log.exception("could not record the pause in the database")
        # the jobs waiting now would only wait for the owner: refund them
        try:
            waiting = await self.store.queue.waiting_jobs()
        except Exception:
            log.exception("could not list the waiting jobs")
            return
        for job in waiting:
            active = self._waiting.get(job.id) or self._active_from_job(job)
            await self._refund_waiting(active, ServicePaused("account paused"))

    async def _pause_guild_account(self, account: str, err: ApiError) -> None:
        """A server's own key was refused: hold that server's jobs until its admins fix it."""
        log.warning(
            "%s: the server's own Segmind key was refused (%s, HTTP %s); its jobs pause until an "
            "admin sets a new key", account, err.cause, err.status,
        )
        try:
            await self.store.queue.set_account_paused(account, True, err.cause)
            waiting = await self.store.queue.waiting_jobs()
        except Exception:
            log.exception("could not pause %s", account)
            return
        for job in waiting:
            if job.account == account:
                active = self._waiting.get(job.id) or self._active_from_job(job)
                await self._refund_waiting(active, GuildKeyRefused("key paused"))

    async def _probe_account(self) -> None:
        while self.queue.paused and self.accepting:
            await asyncio.sleep(self.probe_interval_s)
            try:
                credits = await self.client.account_credits()
            except ApiError as err:
                log.error(
                    "account probe: the Segmind account still needs attention (%s, HTTP %s); "
                    "new jobs stay paused",
                    err.cause,
                    err.status,
                )
                continue
            except Exception:  # noqa: BLE001 - a probe must never die
                log.exception("account probe failed")
                continue
            if credits is None or credits > 0:
                log.warning("account probe: the Segmind account works again; resuming jobs")
                try:
                    await self.queue.resume()
                except Exception:
                    log.exception("could not record the resume in the database")
                    continue
            else:
                log.error("account probe: the Segmind account has no credits left; still paused")

    # --- internals ---------------------------------------------------------------------------------

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

    async def _report_queue(self, active: _Active) -> None:
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

    async def _claimed_elsewhere(self, active: _Active) -> bool:
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

    async def _report_generating(self, active: _Active, started: float) -> None:
        async def show() -> None:
            await active.sink.generating(self._clock() - started, self.queue.estimate_duration())

        await asyncio.sleep(GENERATING_STATUS_AFTER_S)  # the API request goes out first
        while True:
            await active.progress.show(show)

    def _check_lease(self, active: _Active) -> None:
        """Raise _LeaseLost unless the job's lease is held and fresh (renewed in half its life)."""
        if active.lease is None or not self.queue.fresh(active.lease):
            raise _LeaseLost(f"job {active.spec.job_id}")

    async def _call_api(self, active: _Active, resume: bool) -> GenerationResult:
        spec = active.spec

        async def submitted(job: SubmittedJob) -> None:
            # the request id is what lets any process fetch this (billed) generation: keep it in
            # memory whatever happens, and store it (retried in the background if need be)
            active.request_id = job.request_id
            active.status_url, active.response_url = job.status_url, job.response_url
            try:
                await self._store_request_id(active)
            except Exception as exc:  # noqa: BLE001 - the database is away: keep polling
                log.warning(
                    "job %s: could not store request id %s (%s); retrying in the background",
                    spec.job_id, job.request_id, type(exc).__name__,
                )
                self._settle_later("request-id", spec.job_id, lambda: self._store_request_id(active))

        client = await self._client(active)
        for attempt in range(1, 6):
            self._check_lease(active)  # no API call for a job this process may have lost
            try:
                active.sent = True
                if resume:
                    assert active.request_id is not None
                    return await client.resume(
                        active.request_id, active.status_url, active.response_url
                    )
                return await client.generate(spec.request(), on_submitted=submitted)
            except ApiRateLimited as err:
                # a 429 is never billed: slow the whole queue down and try again
                wait = min(60.0, err.retry_after or 5.0 * attempt)
                self.queue.slow_down(wait)
                if attempt == 5 or (err.retry_after or 0) > 60:
                    raise  # limited for long: refund now rather than hold the member's slot
                log.warning("job %s: rate limited, retrying in %.1f s", spec.job_id, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _store_request_id(self, active: _Active) -> bool:
        return await self.store.jobs.set_api_request(
            active.spec.job_id,
            active.request_id,
            active.status_url,
            active.response_url,
            lease=active.lease,
        )

    async def _execute(self, active: _Active, *, resume: bool = False) -> JobOutcome:
        """Call the API, deliver, commit; refund on anything else. Runs under the job's lease."""
        spec = active.spec
        started = self._clock()
        active.timings["started"] = started - active.t0
        active.task = asyncio.current_task()
        self._active[spec.job_id] = active
        ticker = asyncio.create_task(self._report_generating(active, started))
        result: GenerationResult | None = None
        fitted: images.FittedImage | None = None
        try:
            result = await self._call_api(active, resume)
            api_seconds = self._clock() - started
            active.api_charged = True
            self._api_done(active)  # the next job may start (in any process)
            self.queue.record_duration(api_seconds)
            self.metrics.api_latency.observe(api_seconds)
            active.timings["api_done"] = self._clock() - active.t0
            await _stop(ticker, active.progress)
            fitted = await images.fit_to_limit_async(
                result.image, output_format=result.output_format, limit_bytes=active.sink.upload_limit
            )
            balance_after = active.reservation.balance_after
            if active.remote:  # received by another process: read what the member has now
                with contextlib.suppress(Exception):
                    status = await self.store.credits.member_status(spec.guild_id, spec.user_id)
                    balance_after = status.balance
            info = ResultInfo(
                spec=spec,
                image=fitted,
                generation=result,
                api_seconds=api_seconds,
                total_seconds=self._clock() - active.t0,
                balance_after=balance_after,
                cost=active.reservation.cost,
            )
            self._check_lease(active)  # post nothing for a job this process may have lost
            active.delivering = True
            delivery = await self._deliver(active, info)
            if delivery is None:  # the post's fate is unknown and the channel cannot tell yet
                await self._let_go(active)
                return self._finish(JobOutcome(spec.job_id, Outcome.HANDED_OVER), active)
            active.timings["delivered"] = self._clock() - active.t0
            await self._commit(active, delivery, api_seconds)
            self.metrics.credits_spent.inc(active.reservation.cost)
            log.info(
                "job %s posted: %.1f s API, %.1f s total, %d bytes%s; phases (ms from start): %s",
                spec.job_id,
                api_seconds,
                self._clock() - active.t0,
                fitted.size,
                " (re-encoded)" if fitted.reencoded else "",
                " ".join(f"{k}={v * 1000:.1f}" for k, v in active.timings.items()),
            )
            return self._finish(
                JobOutcome(spec.job_id, Outcome.POSTED, delivery=delivery, timings=active.timings),
                active,
            )
        except _LeaseLost:
            await _stop(ticker, active.progress)
            if not active.sent:
                return await self._requeue(active)
            return self._lost(active)
        except asyncio.CancelledError:
            await asyncio.shield(_stop(ticker, active.progress))
            if active.lost:
                outcome = self._lost(active)
            elif not active.sent and self._stopping:
                outcome = await asyncio.shield(self._requeue(active))
            elif self.handing_over and active.request_id and not active.delivering:
                log.info("job %s handed over to the next process", spec.job_id)
                await asyncio.shield(self._let_go(active))
                await asyncio.shield(self._tell_handover(active))
                outcome = self._finish(JobOutcome(spec.job_id, Outcome.HANDED_OVER), active)
            else:
                outcome = await asyncio.shield(
                    self._refund(active, ShuttingDown("cancelled while running"))
                )
            me = asyncio.current_task()
            if not (self._stopping or active.lost) or me is None:
                raise
            me.uncancel()  # our own shutdown (or a lost lease) stopped the job: it is settled
            return outcome
        except ApiError as err:
            await _stop(ticker, active.progress)
            # billed unless the answer proves nothing was generated (the client says which)
            active.api_charged = bool(err.charged_maybe)
            if err.account_problem and spec.account != OWNER_ACCOUNT:
                # a server's own key: pause that server's jobs only, and say what to do
                self._spawn(self._pause_guild_account(spec.account, err), "kontext-pause-key")
                return await self._refund(active, GuildKeyRefused(err.detail))
            if err.account_problem:
                self.pause_for_account(err)
            return await self._refund(active, err)
        except KontextError as err:
            await _stop(ticker, active.progress)
            return await self._refund(active, err)
        except Exception as exc:  # a bug: the member still gets their credits back
            await _stop(ticker, active.progress)
            log.exception("job %s failed unexpectedly", spec.job_id)
            return await self._refund(active, KontextError(f"{type(exc).__name__}"))
        finally:
            if active.task is asyncio.current_task():
                self._active.pop(spec.job_id, None)
            # a big result's temporary file(s), whatever the end: posted, refunded, cancelled
            if fitted is not None:
                fitted.close()
            if result is not None:
                result.close()

    def _api_done(self, active: _Active) -> None:
        """Free the job's API slot for the whole bot, without holding up the post."""
        lease = active.lease
        if lease is None:
            return

        async def done() -> None:
            try:
                await self.queue.slot_freed(lease)  # and the next job, in one transaction
            except Exception as exc:  # noqa: BLE001 - the slot frees at commit / refund then
                log.warning("job %s: could not free its API slot early (%s)", lease.job_id, exc)
                self.queue.kick()

        self._spawn(done(), f"kontext-api-done-{lease.job_id}")

    async def _deliver(self, active: _Active, info: ResultInfo) -> Delivery | None:
        """Post the result. A post whose fate is unknown is settled by looking in the channel:
        an image that reached the channel is never refunded (nor posted again)."""
        try:
            return await active.sink.deliver(info)
        except ResultNotDelivered:
            raise  # Discord said no: nothing was posted
        except Exception as exc:
            log.warning(
                "job %s: the post's fate is unknown (%s); looking in the channel",
                active.spec.job_id, type(exc).__name__,
            )
        try:
            found = await active.sink.find_result()
        except Exception as exc:  # noqa: BLE001 - nobody knows: the next holder looks again
            log.warning("job %s: cannot read the channel (%s)", active.spec.job_id, exc)
            return None
        if found is None:
            raise ResultNotDelivered("post failed and the result is not in the channel")
        return found

    async def _requeue(self, active: _Active) -> JobOutcome:
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

    def _lost(self, active: _Active) -> JobOutcome:
        log.warning(
            "job %s: lease lost or stale; leaving the job to the process that holds it",
            active.spec.job_id,
        )
        if active.lease is not None:
            self.queue.forget(active.lease.job_id)
        return self._finish(JobOutcome(active.spec.job_id, Outcome.LOST), active)

    async def _commit(self, active: _Active, delivery: Delivery, api_seconds: float | None) -> None:
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

    async def _refund(
        self, active: _Active, err: KontextError, *, restarted: bool = False
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
            err = _Restarted(credits=refunded)
        await self._tell(active.sink, err, refunded=refunded)
        return self._finish(
            JobOutcome(spec.job_id, Outcome.REFUNDED, err.cause, err, timings=active.timings), active
        )

    async def _refund_waiting(self, active: _Active, err: KontextError) -> JobOutcome | None:
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

    async def _tell(self, sink: JobSink, err: KontextError, *, refunded: int) -> None:
        try:
            await sink.failed(err, refunded=refunded)
        except Exception:
            log.exception("could not tell the member about %s", err.cause)

    async def _tell_handover(self, active: _Active) -> None:
        with contextlib.suppress(Exception):
            await active.sink.generating(-1.0, self.queue.estimate_duration())

    def _finish(self, outcome: JobOutcome, active: _Active | None = None) -> JobOutcome:
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


async def _stop(ticker: asyncio.Task[Any], progress: _Progress) -> None:
    """End a job's progress edits; the next status edit is then the last word."""
    progress.closed = True
    ticker.cancel()
    await asyncio.gather(ticker, return_exceptions=True)
    await progress.drain()


class _Progress:
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


class _Restarted(ShuttingDown):
    """A job stopped by a restart; the message says the credits came back."""

    key = "bot.restarted_refund"

    def __init__(self, *, credits: int) -> None:
        super().__init__("restart", credits=credits)


@dataclass(slots=True)
class _Active:
    spec: JobSpec
    sink: JobSink
    reservation: Reservation
    t0: float
    timings: dict[str, float]
    progress: _Progress = field(default_factory=lambda: _Progress(3.0))
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

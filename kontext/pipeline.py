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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

from kontext import images
from kontext.errors import (
    ApiError,
    ApiRateLimited,
    JobAlreadyExists,
    KontextError,
    ServicePaused,
    ShuttingDown,
)
from kontext.metrics import Metrics
from kontext.queue import JobQueue
from kontext.schema import ACTIVE_STATES
from kontext.segmind import GenerationRequest, GenerationResult, SegmindClient, SubmittedJob
from kontext.settings import Settings
from kontext.store import Job, Reservation, ReserveRequest, Store

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
    output_format: str = "jpg"
    safety_tolerance: int = 1
    seed: int = 42
    locale: str | None = None
    exempt_from_cooldown: bool = False
    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    parent_job_id: int | None = None
    source: str = "slash"

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
            output_format=p.get("output_format", "jpg"),
            safety_tolerance=int(p.get("safety_tolerance", 1)),
            seed=int(p.get("seed", job.seed or 0)),
            locale=job.locale,
            application_id=job.application_id,
            interaction_token=job.interaction_token,
            parent_job_id=job.parent_job_id,
            source=p.get("source", "slash"),
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
    status: str  # posted | refunded | rejected | duplicate | handed_over
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


#: how long a commit or refund is retried while the database is away (then a restart settles it)
SETTLE_RETRY_S = 3600.0
#: the progress bar's first edit waits this long, so that it does not compete with sending the
#: API request itself (nobody sees 50 ms of an ~18 s generation)
GENERATING_STATUS_AFTER_S = 0.05
#: jobs that download and check their images at once, and how long one may keep its turn
INTAKE_AT_ONCE = 4
INTAKE_SLOT_S = 1.0


class JobPipeline:
    """Runs jobs for the whole process.

    ``progress_interval_s`` is the least time between two progress edits of one job (queue
    position, progress bar); ``probe_interval_s`` how often a paused API account is probed.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        client: SegmindClient,
        queue: JobQueue,
        http: aiohttp.ClientSession,
        worker_id: str,
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
        self.progress_interval_s = progress_interval_s
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self.accepting = True
        self._intake = asyncio.Semaphore(INTAKE_AT_ONCE)
        self.handing_over = False
        self._stopping = False  # shutdown is cancelling running jobs
        self._probe_task: asyncio.Task[None] | None = None
        self._active: dict[int, _Active] = {}  # jobs calling the API or delivering
        self._runs: set[asyncio.Task[Any]] = set()  # callers inside run()
        self._resumed: set[asyncio.Task[Any]] = set()
        self._settling: set[asyncio.Task[Any]] = set()  # commits/refunds retried (database down)
        self.outcomes: dict[str, int] = {}
        self.on_outcome: Callable[[JobOutcome], None] | None = None
        if hasattr(client, "on_rate_limited"):
            client.on_rate_limited = self._rate_limited

    # --- entry points ---------------------------------------------------------------------------

    def ensure_accepting(self) -> None:
        """Raise when new jobs are refused right now (restart, account paused)."""
        if not self.accepting:
            raise ShuttingDown("not accepting")
        if self.queue.paused:
            raise ServicePaused("API account paused")

    @property
    def paused(self) -> bool:
        """True while the API account needs attention (new jobs are refused)."""
        return self.queue.paused

    async def run(self, spec: JobSpec, sink: JobSink) -> JobOutcome:
        """Run one new job to its end. Never raises a KontextError; tells ``sink`` instead."""
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
            self.ensure_accepting()
            await self._check_in_turn(spec)
            timings["checked"] = self._clock() - t0
            self.ensure_accepting()  # a shutdown may have begun while the images were checked
            reservation = await self._reserve(spec)
            timings["reserved"] = self._clock() - t0
        except JobAlreadyExists:
            log.info("job %s: duplicate delivery, already handled", spec.job_id)
            return self._finish(JobOutcome(spec.job_id, "duplicate", cause="duplicate"))
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
        try:
            ticket = self.queue.submit(
                spec.job_id, (spec.guild_id, spec.user_id), lambda: self._execute(active)
            )
        except KontextError as err:
            return await self._refund(active, err)
        active.ticket = ticket  # set before the job can start (the dispatcher is another task)

        reporter = asyncio.create_task(self._report_queue(ticket, active))
        try:
            return await ticket.result()
        except KontextError as err:  # withdrawn while waiting (shutdown, account paused)
            return await self._refund(active, err)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():  # our caller gave up on the job
                if ticket.cancel(ShuttingDown("cancelled")):
                    await asyncio.shield(self._refund(active, ShuttingDown("cancelled")))
                raise
            # the job's own task was cancelled (shutdown); it settled its money itself
            return active.outcome or JobOutcome(spec.job_id, "refunded", "shutdown")
        finally:
            reporter.cancel()

    async def resume(self, job: Job, sink: JobSink) -> JobOutcome:
        """Finish a job another (dead) process left behind.

        In async mode with a stored request id the result is fetched and posted; otherwise the
        job is refunded and the member told.
        """
        spec = JobSpec.from_job(job)
        reservation = Reservation(
            job_id=job.id, cost=job.cost_credits, balance_after=-1, cooldown_until=None
        )
        active = _Active(
            spec=spec,
            sink=sink,
            reservation=reservation,
            t0=self._clock(),
            timings={},
            progress=_Progress(self.progress_interval_s),
        )
        active.request_id = job.api_request_id
        active.status_url = job.api_status_url
        active.response_url = job.api_response_url
        # a call that was in flight when its process died still runs (and is billed) at the
        # API: keep its share of the owner's daily budget
        active.api_charged = job.api_charged or job.state == "running"
        if self.settings.segmind_api_mode == "async" and job.api_request_id and not self._stopping:
            log.info("job %s: resuming API request %s", job.id, job.api_request_id)
            return await self._execute(active, resume=True)
        return await self._refund(active, ShuttingDown("process restarted"), restarted=True)

    def resume_in_background(self, job: Job, sink: JobSink) -> asyncio.Task[JobOutcome]:
        """:meth:`resume` as a task the pipeline tracks (shutdown waits for it or hands it on)."""
        task = asyncio.get_running_loop().create_task(
            self.resume(job, sink), name=f"kontext-resume-{job.id}"
        )
        self._resumed.add(task)
        task.add_done_callback(self._resumed.discard)
        return task

    async def _reserve(self, spec: JobSpec) -> Reservation:
        """:meth:`Store.reserve`, and no credit left held when its outcome is unknown.

        A connection lost while committing, or a caller cancelled once its transaction began,
        leaves it open whether the reservation was written. Then a refund follows in the
        background (retried while the database is away): it finds this process's job and
        gives the credits back, or finds none and changes nothing.
        """
        try:
            return await self.store.reserve(self._reserve_request(spec))
        except KontextError:
            raise  # a refusal: decided inside the transaction, which was rolled back
        except BaseException:
            self._settle_later("refund", spec.job_id, lambda: self._refund_if_ours(spec.job_id))
            raise

    async def _refund_if_ours(self, job_id: int) -> bool:
        job = await self.store.get_job(job_id)
        if job is None or job.worker_id != self.worker_id or job.state not in ACTIVE_STATES:
            return False  # nothing was reserved, or another process owns the job
        return await self.store.refund(job_id, cause="internal", clear_cooldown=True)

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

        Waiting jobs are refunded at once. Running jobs that do not finish in time are
        cancelled: refunded in sync mode; in async mode, once their request id is stored, they
        are handed over to the next process (left running, not refunded). A job already posting
        its image gets up to ``settle_s`` more; then everyone who was told nothing yet is told,
        within ``settle_s``.
        """
        self.accepting = False
        left = self.queue.close(ShuttingDown("restarting"))
        if left:
            log.info("shutdown: %d waiting job(s) withdrawn and refunded", len(left))
        if self._probe_task is not None:
            self._probe_task.cancel()
        jobs = self._job_tasks()
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
        if runs:  # refunds and messages of withdrawn jobs
            await asyncio.wait(runs, timeout=settle_s)
        if self._settling:  # the database was down: one last chance, then the next process
            _, late = await asyncio.wait(self._settling, timeout=settle_s)
            for task in late:
                task.cancel()
        await self.queue.aclose()

    def _job_tasks(self) -> set[asyncio.Task[Any]]:
        tasks = set(self.queue.running_tasks()) | {t for t in self._resumed if not t.done()}
        tasks |= {a.task for a in self._active.values() if a.task is not None and not a.task.done()}
        return tasks

    def _rate_limited(self, delay: float | None) -> None:
        """A 429 from the API: hold every new start for a while (the request itself retries)."""
        wait = min(60.0, delay if delay is not None and delay > 0 else 5.0)
        self.metrics.rate_limited.inc()
        self.queue.slow_down(wait)
        log.warning("image API rate limit hit: starting no new job for %.1f s", wait)

    def pause_for_account(self, err: ApiError) -> None:
        """The API account needs the owner: hold new jobs and probe until it works again."""
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
        self.queue.pause()
        self.queue.withdraw_all(ServicePaused("account paused"))
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_account())

    async def _probe_account(self) -> None:
        while self.queue.paused:
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
                self.queue.resume()
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
        )

    async def _report_queue(self, ticket: Any, active: _Active) -> None:
        """Tell the member their place while the job waits, when it changes (throttled)."""
        shown: list[tuple[int, int]] = []

        async def show() -> None:
            pos, total = ticket.position()
            if pos and ticket.waiting and (not shown or shown[-1] != (pos, total)):
                shown.append((pos, total))
                await active.sink.queued(pos, total, ticket.eta_seconds())

        while ticket.waiting:
            ticket.changed.clear()
            pos, total = ticket.position()
            if pos and (not shown or shown[-1] != (pos, total)):
                await active.progress.show(show)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ticket.changed.wait(), timeout=self.progress_interval_s)

    async def _report_generating(self, active: _Active, started: float) -> None:
        async def show() -> None:
            await active.sink.generating(self._clock() - started, self.queue.estimate_duration())

        await asyncio.sleep(GENERATING_STATUS_AFTER_S)  # the API request goes out first
        while True:
            await active.progress.show(show)

    async def _call_api(self, active: _Active, resume: bool) -> GenerationResult:
        spec = active.spec

        async def submitted(job: SubmittedJob) -> None:
            active.request_id = job.request_id
            await self.store.set_api_request(
                spec.job_id, job.request_id, job.status_url, job.response_url
            )

        for attempt in range(1, 6):
            try:
                if resume:
                    assert active.request_id is not None
                    return await self.client.resume(
                        active.request_id, active.status_url, active.response_url
                    )
                return await self.client.generate(spec.request(), on_submitted=submitted)
            except ApiRateLimited as err:
                # a 429 is never billed: slow the whole queue down and try again
                wait = min(60.0, err.retry_after or 5.0 * attempt)
                self.queue.slow_down(wait)
                if attempt == 5 or (err.retry_after or 0) > 60:
                    raise  # limited for long: refund now rather than hold the member's slot
                log.warning("job %s: rate limited, retrying in %.1f s", spec.job_id, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _execute(self, active: _Active, *, resume: bool = False) -> JobOutcome:
        """Call the API, deliver, commit; refund on anything else. Runs inside a queue slot."""
        spec = active.spec
        started = self._clock()
        active.timings["started"] = started - active.t0
        active.task = asyncio.current_task()
        self._active[spec.job_id] = active
        ticker = asyncio.create_task(self._report_generating(active, started))
        try:
            if not resume:
                await self.store.mark_running(spec.job_id)
            result = await self._call_api(active, resume)
            api_seconds = self._clock() - started
            active.api_charged = True
            active.delivering = True
            if active.ticket is not None:
                active.ticket.release()  # the API call is over: the next job may start
            self.queue.record_duration(api_seconds)
            self.metrics.api_latency.observe(api_seconds)
            # no database write here: a job still "running" counts as billed if this process
            # dies (see resume), and commit / refund record the charge with the job's end
            active.timings["api_done"] = self._clock() - active.t0
            await _stop(ticker, active.progress)
            fitted = await images.fit_to_limit_async(
                result.image, output_format=result.output_format, limit_bytes=active.sink.upload_limit
            )
            info = ResultInfo(
                spec=spec,
                image=fitted,
                generation=result,
                api_seconds=api_seconds,
                total_seconds=self._clock() - active.t0,
                balance_after=active.reservation.balance_after,
                cost=active.reservation.cost,
            )
            delivery = await active.sink.deliver(info)
            active.timings["delivered"] = self._clock() - active.t0
            await self._commit(spec, delivery, api_seconds)
            self.metrics.credits_spent.inc(active.reservation.cost)
            log.info(
                "job %s posted: %.1f s API, %.1f s total, %d bytes%s; phases (ms from start): %s",
                spec.job_id,
                api_seconds,
                self._clock() - active.t0,
                len(fitted.data),
                " (re-encoded)" if fitted.reencoded else "",
                " ".join(f"{k}={v * 1000:.1f}" for k, v in active.timings.items()),
            )
            return self._finish(
                JobOutcome(spec.job_id, "posted", delivery=delivery, timings=active.timings),
                active,
            )
        except asyncio.CancelledError:
            await asyncio.shield(_stop(ticker, active.progress))
            if self.handing_over and active.request_id and not active.delivering:
                log.info("job %s handed over to the next process", spec.job_id)
                await asyncio.shield(self._tell_handover(active))
                outcome = self._finish(JobOutcome(spec.job_id, "handed_over"), active)
            else:
                outcome = await asyncio.shield(
                    self._refund(active, ShuttingDown("cancelled while running"))
                )
            me = asyncio.current_task()
            if not self._stopping or me is None:
                raise
            me.uncancel()  # our own shutdown cancelled the job: it is settled, so end normally
            return outcome
        except ApiError as err:
            await _stop(ticker, active.progress)
            if err.charged_maybe and (err.status is None or 200 <= err.status < 300):
                # answered 200 (garbage) or no answer after sending: the API may have billed it,
                # so the budget keeps it (an HTTP error status is a failed call: not billed)
                active.api_charged = True
            if err.account_problem:
                self.pause_for_account(err)
            return await self._refund(active, err)
        except KontextError as err:
            await _stop(ticker, active.progress)
            return await self._refund(active, err)
        except Exception as exc:  # a bug: the member still gets their credits back
            await _stop(ticker, active.progress)
            log.exception("job %s failed unexpectedly", spec.job_id)
            err = KontextError(f"{type(exc).__name__}")
            return await self._refund(active, err)
        finally:
            self._active.pop(spec.job_id, None)

    async def _commit(self, spec: JobSpec, delivery: Delivery, api_seconds: float) -> None:
        async def commit() -> Any:
            return await self.store.commit(
                spec.job_id,
                result_message_id=delivery.message_id,
                result_channel_id=delivery.channel_id,
                duration_s=api_seconds,
            )

        try:
            await commit()
        except Exception:
            log.exception("job %s: commit failed; retrying until the database answers", spec.job_id)
            self._settle_later("commit", spec.job_id, commit)

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
        spec = active.spec
        refunded = 0

        async def refund() -> bool:
            return await self.store.refund(
                spec.job_id,
                cause=err.cause,
                clear_cooldown=not err.members_fault,
                api_charged=active.api_charged,
            )

        try:
            if await refund():
                refunded = active.reservation.cost
        except Exception:
            log.exception("job %s: refund failed; retrying until the database answers", spec.job_id)
            self._settle_later("refund", spec.job_id, refund)
            refunded = active.reservation.cost  # it will be: the member is told so now
        log.info(
            "job %s refunded %d credit(s): %s (%s)", spec.job_id, refunded, err.cause, err.detail
        )
        if restarted or isinstance(err, ShuttingDown):
            err = _Restarted(credits=refunded)
        await self._tell(active.sink, err, refunded=refunded)
        return self._finish(
            JobOutcome(spec.job_id, "refunded", err.cause, err, timings=active.timings), active
        )

    async def _reject(self, spec: JobSpec, sink: JobSink, err: KontextError) -> JobOutcome:
        await self._tell(sink, err, refunded=0)
        return self._finish(JobOutcome(spec.job_id, "rejected", err.cause, err))

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
    api_charged: bool = False
    delivering: bool = False
    request_id: str | None = None
    status_url: str | None = None
    response_url: str | None = None
    task: asyncio.Task[Any] | None = None
    ticket: Any = None
    outcome: JobOutcome | None = None

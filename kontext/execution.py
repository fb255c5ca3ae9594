"""Running a leased job: ``claimed → sent →`` the API call ``→ posting →`` the post ``→ posted``.

Each step is written to the job's row (fenced by the lease) **before** its effect begins: the
row says ``sent`` before the first request goes to the API, ``posting`` before the upload of the
result begins. So whoever takes the job over knows what may have happened and settles it from
the row (:mod:`kontext.recovery`). A process whose lease is lost or stale (not renewed for half
its life) starts no request (the client asks before every POST) and begins no upload.

Money is the row's: a refund passes ``billed`` only when the API's own answer proved it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from kontext import images
from kontext.account_guard import AccountGuard
from kontext.errors import (
    ApiError,
    ApiRateLimited,
    KontextError,
    PostFateUnknown,
    ResultNotDelivered,
    ShuttingDown,
)
from kontext.job_state import (
    GENERATING_STATUS_AFTER_S,
    InFlight,
    JobRun,
    LeaseLost,
    Lifecycle,
    Stop,
    stop_progress,
)
from kontext.jobs import JobOutcome, ResultInfo
from kontext.metrics import Metrics
from kontext.posting import PostingSettler
from kontext.queue import SharedQueue
from kontext.segmind import GenerationResult, SendFenced, SubmittedJob
from kontext.settlement import Settlement
from kontext.store import Job, Lease, Store
from kontext.vocab import Outcome

log = logging.getLogger("kontext.pipeline")


class Executor:
    """Runs leased jobs to their end (see the module)."""

    def __init__(
        self,
        *,
        store: Store,
        queue: SharedQueue,
        guard: AccountGuard,
        settlement: Settlement,
        posting: PostingSettler,
        inflight: InFlight,
        lifecycle: Lifecycle,
        metrics: Metrics,
        async_mode: bool,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.queue = queue
        self.guard = guard
        self.settlement = settlement
        self.posting = posting
        self.inflight = inflight
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.async_mode = async_mode
        self._clock = clock

    def _check_lease(self, run: JobRun) -> Lease:
        """The job's lease, or LeaseLost unless it is held and fresh (renewed in half its life)."""
        if run.lease is None or not self.queue.fresh(run.lease):
            raise LeaseLost(f"job {run.spec.job_id}")
        return run.lease

    async def _report_generating(self, run: JobRun, started: float) -> None:
        async def show() -> None:
            await run.sink.generating(self._clock() - started, self.queue.estimates.estimate_duration())

        await asyncio.sleep(GENERATING_STATUS_AFTER_S)  # the API request goes out first
        while True:
            await run.progress.show(show)

    async def _call_api(self, run: JobRun, resume: Job | None) -> GenerationResult:
        client = await self.guard.client_for(run)
        hooks = self.guard.hooks_for(run)
        if resume is not None:  # a billed request of a process that stopped: fetch it
            assert resume.api_request_id is not None
            return await client.resume(
                resume.api_request_id, resume.api_status_url, resume.api_response_url, hooks=hooks
            )
        lease = self._check_lease(run)
        if not await self.store.leases.mark_sent(lease):  # claimed → sent, before any POST
            raise LeaseLost(f"job {run.spec.job_id}: not claimed under this lease")

        async def submitted(job: SubmittedJob) -> None:
            # the request id lets any process fetch this billed generation: store it now, or
            # keep trying in the background while the call goes on
            async def store_it() -> bool:
                return await self.store.jobs.set_api_request(
                    run.spec.job_id, job.request_id, job.status_url, job.response_url, lease=lease
                )

            try:
                await store_it()
            except Exception as exc:  # noqa: BLE001 - the database is away: keep polling
                log.warning(
                    "job %s: could not store request id %s (%s); retrying in the background",
                    run.spec.job_id, job.request_id, type(exc).__name__,
                )
                self.settlement.settle_later("request-id", run.spec.job_id, store_it)

        # one call per job: the client owns every retry, asks the lease before each POST and
        # tells each 429 to the job's account
        return await client.generate(run.spec.request(), on_submitted=submitted, hooks=hooks)

    async def execute(self, run: JobRun, *, resume: Job | None = None) -> JobOutcome:
        """Call the API (or, with ``resume``, fetch the stored request), post, commit; refund
        on anything else. Runs under ``run.lease``."""
        spec, lease = run.spec, run.lease
        assert lease is not None
        started = self._clock()
        run.timings["started"] = started - run.t0
        run.task = asyncio.current_task()
        self.inflight.leased[lease] = run
        ticker = asyncio.create_task(self._report_generating(run, started))
        result: GenerationResult | None = None
        fitted: images.FittedImage | None = None
        try:
            result = await self._call_api(run, resume)
            api_seconds = self._clock() - started
            # sent → posting and the slot freed (the next job may start, in any process), in
            # one transaction that runs while the image is fitted
            answered = self._api_done(lease)
            self.queue.estimates.record_duration(api_seconds)
            self.metrics.api_latency.observe(api_seconds)
            run.timings["api_done"] = self._clock() - run.t0
            await stop_progress(ticker, run.progress)
            fitted = await images.fit_to_limit_async(
                result.image, output_format=result.output_format, limit_bytes=run.sink.upload_limit
            )
            info = ResultInfo(
                spec=spec,
                image=fitted,
                generation=result,
                api_seconds=api_seconds,
                total_seconds=self._clock() - run.t0,
                balance_after=await self._balance_after(run),
                cost=run.cost,
            )
            self._check_lease(run)
            # the upload begins only once the row says posting (written above, or here when
            # that write failed)
            if not await answered and not await self.store.leases.mark_posting(lease):
                raise LeaseLost(f"job {spec.job_id}: not sent under this lease")
            run.posting = True
            return await self._post(run, info, api_seconds)
        except LeaseLost:
            await stop_progress(ticker, run.progress)
            return await self.settlement.requeue(run)  # only a job still claimed goes back
        except SendFenced:
            await stop_progress(ticker, run.progress)
            # every POST before was answered with a proof that nothing started (429s)
            return await self.settlement.refund(
                run, ApiRateLimited("stopped: the lease was not fresh"), billed=False
            )
        except asyncio.CancelledError:
            await asyncio.shield(stop_progress(ticker, run.progress))
            outcome = await asyncio.shield(self._cancelled(run))
            me = asyncio.current_task()
            if run.stop is None or me is None:
                raise
            me.uncancel()  # our own shutdown (or a lost lease) stopped the job: it is settled
            return outcome
        except ApiError as err:
            await stop_progress(ticker, run.progress)
            end: KontextError = err
            if err.account_problem:
                end = self.guard.account_refused(err, spec.account)
            # the client says whether its answer proves nothing was made
            return await self.settlement.refund(run, end, billed=None if err.charged_maybe else False)
        except KontextError as err:
            await stop_progress(ticker, run.progress)
            return await self.settlement.refund(run, err)
        except Exception as exc:  # a bug: the member still gets their credits back
            await stop_progress(ticker, run.progress)
            log.exception("job %s failed unexpectedly", spec.job_id)
            return await self.settlement.refund(run, KontextError(f"{type(exc).__name__}"))
        finally:
            if self.inflight.leased.get(lease) is run:
                del self.inflight.leased[lease]
            # a big result's temporary file(s), whatever the end: posted, refunded, cancelled
            if fitted is not None:
                fitted.close()
            if result is not None:
                result.close()

    async def _post(self, run: JobRun, info: ResultInfo, api_seconds: float) -> JobOutcome:
        """Upload the result (once) and commit; a fate left unknown is settled by looking."""
        spec = run.spec
        try:
            delivery = await run.sink.deliver(info)
        except ResultNotDelivered as err:  # Discord said no: nothing was posted
            return await self.settlement.refund(run, err)
        except PostFateUnknown as exc:
            log.warning("job %s: the post's fate is unknown (%s); looking", spec.job_id, exc.detail)
            return await self.posting.settle(run)
        except Exception as exc:  # noqa: BLE001 - any other failure once the upload began
            log.warning("job %s: the post failed (%s); looking", spec.job_id, type(exc).__name__)
            return await self.posting.settle(run)
        run.timings["delivered"] = self._clock() - run.t0
        await self.settlement.commit(run, delivery, api_seconds)
        self.metrics.credits_spent.inc(run.cost)
        log.info(
            "job %s posted: %.1f s API, %.1f s total, %d bytes%s; phases (ms from start): %s",
            spec.job_id,
            api_seconds,
            self._clock() - run.t0,
            info.image.size,
            " (re-encoded)" if info.image.reencoded else "",
            " ".join(f"{k}={v * 1000:.1f}" for k, v in run.timings.items()),
        )
        return self.settlement.finish(
            JobOutcome(spec.job_id, Outcome.POSTED, delivery=delivery, timings=run.timings), run
        )

    async def _cancelled(self, run: JobRun) -> JobOutcome:
        """The job's task was cancelled: by a lost lease, this process's shutdown, or its
        caller. Settled from the row's state by whoever may."""
        if run.stop == Stop.LOST:
            return self.settlement.lost(run)
        if run.posting or (self.async_mode and self.lifecycle.handing_over):
            # an upload cut short, or a request the next process can fetch: it settles the job
            # from its row (posting: by looking; sent: resumed, or refunded without a request id)
            return await self._hand_over(run)
        if await self.settlement.try_requeue(run):  # still claimed: nothing was sent
            return self.settlement.finish(JobOutcome(run.spec.job_id, Outcome.QUEUED), run)
        return await self.settlement.refund(run, ShuttingDown("cancelled while running"))

    async def _hand_over(self, run: JobRun) -> JobOutcome:
        lease = run.lease
        assert lease is not None
        log.info("job %s handed over to the next process", run.spec.job_id)
        self.settlement.leases.forget(lease)
        try:
            await self.store.leases.let_go(lease)
        except Exception as exc:  # noqa: BLE001 - the lease then simply expires
            log.warning("job %s: could not let its lease go (%s)", lease.job_id, exc)
        if not run.posting:
            with contextlib.suppress(Exception):
                await run.sink.generating(-1.0, self.queue.estimates.estimate_duration())
        return self.settlement.finish(JobOutcome(run.spec.job_id, Outcome.HANDED_OVER), run)

    async def _balance_after(self, run: JobRun) -> int:
        if not run.remote:
            return run.balance_after
        with contextlib.suppress(Exception):  # received by another process: read it now
            status = await self.store.credits.member_status(run.spec.guild_id, run.spec.user_id)
            return status.balance
        return -1

    def _api_done(self, lease: Lease) -> asyncio.Task[bool]:
        """Move the job to ``posting`` and free its API slot for the whole bot (and claim the
        next job), without holding up the fitting; the task's result: whether it moved."""

        async def done() -> bool:
            try:
                return await self.queue.slot_freed(lease)  # and the next job, in one transaction
            except Exception as exc:  # noqa: BLE001 - the slot frees at posting / refund then
                log.warning("job %s: could not free its API slot early (%s)", lease.job_id, exc)
                self.queue.kick()
                return False

        return self.inflight.spawn(done(), f"kontext-api-done-{lease.job_id}")

"""Running a claimed job: call the API → deliver → commit, or refund, under the job's lease.

A process that lost the lease (or could not renew it for half its life) starts no API call and
posts nothing: the process that takes the job over settles it. In async API mode the request id
is stored as soon as Segmind hands it out, so a billed generation is never lost to a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from kontext import images
from kontext.account_guard import AccountGuard
from kontext.errors import (
    ApiError,
    GuildKeyRefused,
    KontextError,
    ResultNotDelivered,
    ShuttingDown,
)
from kontext.job_state import GENERATING_STATUS_AFTER_S, ActiveJob, LeaseLost, stop_progress
from kontext.jobs import Delivery, JobOutcome, ResultInfo
from kontext.segmind import CallHooks, GenerationResult, SendFenced, SubmittedJob
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import Outcome

log = logging.getLogger("kontext.pipeline")


class Execution(AccountGuard):
    """Claim → API → deliver → commit (see the module)."""

    async def _report_generating(self, active: ActiveJob, started: float) -> None:
        async def show() -> None:
            await active.sink.generating(self._clock() - started, self.queue.estimate_duration())

        await asyncio.sleep(GENERATING_STATUS_AFTER_S)  # the API request goes out first
        while True:
            await active.progress.show(show)

    async def _call_api(self, active: ActiveJob, resume: bool) -> GenerationResult:
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
        self._check_lease(active)  # no API call for a job this process may have lost
        active.sent = True
        # one call per job: the client owns every retry (at most max_retries + 1 POSTs, each one
        # only while the lease is fresh) and tells each 429 to _rate_limited once (a server's own
        # key paces its own account); a 429 it gave up on is refunded like any error
        hooks = CallHooks(
            may_send=lambda: active.lease is not None and self.queue.fresh(active.lease),
            on_rate_limited=functools.partial(self._rate_limited, account=spec.account),
        )
        if resume:
            assert active.request_id is not None
            return await client.resume(
                active.request_id, active.status_url, active.response_url, hooks=hooks
            )
        try:
            return await client.generate(spec.request(), on_submitted=submitted, hooks=hooks)
        except SendFenced as exc:  # the lease went during the client's own repeats
            raise LeaseLost(f"job {spec.job_id}: {exc}") from None

    async def _store_request_id(self, active: ActiveJob) -> bool:
        return await self.store.jobs.set_api_request(
            active.spec.job_id,
            active.request_id,
            active.status_url,
            active.response_url,
            lease=active.lease,
        )

    async def _execute(self, active: ActiveJob, *, resume: bool = False) -> JobOutcome:
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
            await stop_progress(ticker, active.progress)
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
        except LeaseLost:
            await stop_progress(ticker, active.progress)
            if not active.sent:
                return await self._requeue(active)
            return self._lost(active)
        except asyncio.CancelledError:
            await asyncio.shield(stop_progress(ticker, active.progress))
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
            await stop_progress(ticker, active.progress)
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
            await stop_progress(ticker, active.progress)
            return await self._refund(active, err)
        except Exception as exc:  # a bug: the member still gets their credits back
            await stop_progress(ticker, active.progress)
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

    def _api_done(self, active: ActiveJob) -> None:
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

    async def _deliver(self, active: ActiveJob, info: ResultInfo) -> Delivery | None:
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


"""Settling a job whose result's upload began (state ``posting``) from what can be proven.

A job that reached ``posting`` is never posted again. Its end is read from its row and its
channel, in this order:

1. the bot saw its result message on the gateway (``result_message_id`` on the row): committed,
   even when the message was deleted since (a deleted result was posted);
2. a search of every message in the channel since the upload began (``posting_at``, as a
   snowflake ``after=``: no fixed count) finds the result: committed; proves it absent:
   refunded;
3. the channel cannot be read: the lease is let go with the try counted, and the job is taken
   again after a growing delay (the API slot was freed when posting began). After
   :data:`MAX_SETTLE_TRIES` such tries (``KONTEXT_SETTLE_SECONDS`` in all, 600 s by default) the
   stated rule ends it: **refunded** (:class:`~kontext.errors.PostUnverified`) — a member never
   pays for an image nobody could show was posted; the owner's budget keeps the billed call.
"""

from __future__ import annotations

import logging

from kontext.errors import PostUnverified, ResultNotDelivered
from kontext.job_state import JobRun, Lifecycle
from kontext.jobs import Delivery, JobOutcome
from kontext.settlement import Settlement
from kontext.store import Store
from kontext.vocab import JobState, Outcome

log = logging.getLogger("kontext.pipeline")

#: searches that could not read the channel before the stated rule settles the job
MAX_SETTLE_TRIES = 5
#: the search starts this long before the upload began by the database's clock (Discord's
#: clock and the database's may differ; the result's file name keeps the search exact)
SEARCH_MARGIN_S = 120.0


def settle_delays(settle_s: float) -> list[float]:
    """The waits between tries: doubling, adding up to ``settle_s``."""
    parts = [2.0**i for i in range(MAX_SETTLE_TRIES - 1)]
    return [settle_s * p / sum(parts) for p in parts]


class PostingSettler:
    """Ends ``posting`` jobs from the row and the channel (see the module)."""

    def __init__(
        self, *, store: Store, settlement: Settlement, lifecycle: Lifecycle, settle_s: float
    ) -> None:
        self.store = store
        self.settlement = settlement
        self.lifecycle = lifecycle
        self.delays = settle_delays(settle_s)

    async def settle(self, run: JobRun) -> JobOutcome:
        """Commit, refund or defer the leased job ``run`` (in state ``posting``)."""
        spec, lease = run.spec, run.lease
        assert lease is not None
        job = await self.store.jobs.get(spec.job_id)
        if (
            job is None
            or job.state != JobState.POSTING
            or job.lease_owner != lease.owner
            or job.lease_epoch != lease.epoch
        ):
            return self.settlement.lost(run)
        if job.result_message_id is not None:
            log.warning("job %s: its result was seen posted; committing it", spec.job_id)
            delivery = Delivery(job.result_message_id, job.result_channel_id or job.channel_id)
            return await self._commit(run, delivery)
        since = float(job.posting_at or job.created_at) - SEARCH_MARGIN_S
        try:
            found = await run.sink.find_result(since)
        except Exception as exc:  # noqa: BLE001 - the channel cannot tell now
            return await self._cannot_tell(run, job.settle_tries + 1, exc)
        if found is not None:
            log.warning("job %s: its result is in the channel; committing it", spec.job_id)
            return await self._commit(run, found)
        log.warning("job %s: its result is not in the channel; refunding", spec.job_id)
        return await self.settlement.refund(
            run, ResultNotDelivered("the upload began but the result is not in the channel")
        )

    async def _commit(self, run: JobRun, delivery: Delivery) -> JobOutcome:
        await self.settlement.commit(run, delivery, None)
        return self.settlement.finish(
            JobOutcome(run.spec.job_id, Outcome.POSTED, delivery=delivery, timings=run.timings), run
        )

    async def _cannot_tell(self, run: JobRun, tries: int, exc: Exception) -> JobOutcome:
        lease = run.lease
        assert lease is not None
        if tries >= MAX_SETTLE_TRIES:
            log.error(
                "job %s: its channel could not be read in %d tries (%s); refunded by rule",
                run.spec.job_id, tries, type(exc).__name__,
            )
            return await self.settlement.refund(run, PostUnverified(f"{tries} searches failed"))
        delay = 0.0 if self.lifecycle.stopping else self.delays[tries - 1]
        log.warning(
            "job %s: cannot look for its result in the channel (%s); try %d of %d again in %.0f s",
            run.spec.job_id, type(exc).__name__, tries, MAX_SETTLE_TRIES, delay,
        )
        self.settlement.leases.forget(lease)
        try:
            await self.store.leases.defer(lease, delay)
        except Exception as exc2:  # noqa: BLE001 - then the lease simply expires
            log.warning("job %s: could not defer it (%s)", run.spec.job_id, exc2)
        return self.settlement.finish(JobOutcome(run.spec.job_id, Outcome.HANDED_OVER), run)

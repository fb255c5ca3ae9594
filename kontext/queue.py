"""This process's side of the shared job queue (the queue itself is in the database).

:class:`SharedQueue` runs three loops for one bot process:

* the **dispatcher** claims the next job (:meth:`kontext.store.queue.QueueStore.claim_next`)
  whenever the API account's global limits allow, and hands it to the pipeline
  (``on_claim``); it looks again at once when a slot frees in this process (:meth:`kick`), and
  every ``poll_s`` for what other processes changed;
* the **renewer** extends this process's leases every ``lease_s / 6`` seconds. A lease the
  database no longer gives back was lost (``on_lost``); a lease not renewed for half its life is
  not *fresh* (:meth:`fresh`): its job starts no API call and posts nothing until it is;
* the **sweeper** takes over unfinished jobs whose lease expired by the database's clock
  (``on_taken_over``: a process died, or was paused) and refunds jobs that waited longer than
  ``MAX_QUEUE_WAIT_SECONDS`` (``on_expired``).

The events go to a :class:`QueueHandler` (the pipeline) given to :meth:`SharedQueue.start`.
Leases are kept **by lease** (job id and epoch): forgetting or losing an old lease of a job never
touches a newer one this process holds.

Positions, durations and ETAs come from its :class:`~kontext.queue_estimates.QueueEstimates`
(``queue.estimates``: the whole bot's queue, read at most every ``view_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from kontext.accounts import Accounts
from kontext.queue_estimates import QueueEstimates
from kontext.queue_events import QueueHandler
from kontext.store.types import AccountLimits, Claim, Lease

log = logging.getLogger("kontext.queue")

#: a lease is renewed this many times per life
RENEWALS_PER_LEASE = 6


@dataclass(slots=True)
class _Held:
    lease: Lease
    #: monotonic, once the claim had committed: a renewal sent before this may not have seen
    #: the claim yet, so its answer says nothing about this lease
    since: float
    #: monotonic, when the last renewal that returned it (or the claim) was *sent*: the lease
    #: lives at least ``lease_s`` from then, by the database's clock
    renewed: float


class SharedQueue:
    """One process's dispatcher, lease renewer and sweeper over the database queue."""

    def __init__(
        self,
        store: Any,
        *,
        worker_id: str,
        limits: AccountLimits,
        accounts: Accounts | None = None,
        lease_s: float = 60.0,
        poll_s: float = 0.5,
        max_wait_s: float = 1800.0,
        view_s: float = 0.5,
        default_duration_s: float = 18.0,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.limits = limits
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_wait_s = max_wait_s
        #: positions, durations and ETAs of the whole bot's queue
        self.estimates = QueueEstimates(
            store,
            limits=limits,
            view_s=view_s,
            default_duration_s=default_duration_s,
            on_owner_paused=self._set_paused,
        )
        self._held: dict[int, _Held] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._claiming = False
        self._closed = False
        self._paused = False
        self._changing_pause = False
        self._idle = False  # the last claim found nothing waiting, anywhere
        self._holds: set[asyncio.Task[Any]] = set()
        #: every account's limits (the owner's and servers' own keys); the owner's alone if None
        self.accounts = accounts
        self._handler: QueueHandler | None = None

    # --- life ----------------------------------------------------------------------------------

    def start(self, handler: QueueHandler) -> None:
        """Start claiming, renewing and sweeping, telling ``handler`` (idempotent)."""
        if self._tasks or self._closed:
            return
        self._handler = handler
        self._claiming = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._dispatch(), name="kontext-queue-dispatcher"),
            loop.create_task(self._renew(), name="kontext-queue-renewer"),
            loop.create_task(self._sweep(), name="kontext-queue-sweeper"),
        ]

    def stop_claiming(self) -> None:
        """Claim and take over nothing more (shutdown); leases held are still renewed."""
        self._claiming = False
        self._wake.set()

    async def aclose(self) -> None:
        """Stop every loop (the leases still held simply expire)."""
        self._closed = True
        self._claiming = False
        tasks = [*self._tasks, *self._holds]
        while tasks:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
            tasks = [t for t in tasks if not t.done()]
        self._tasks = []

    @property
    def claiming(self) -> bool:
        return self._claiming

    def kick(self) -> None:
        """Look for a claimable job now (a job was queued or a slot freed in this process)."""
        self._wake.set()

    # --- leases --------------------------------------------------------------------------------

    def hold(self, lease: Lease, sent: float | None = None) -> None:
        """Renew ``lease`` from now on; ``sent``: when the claim that gave it was sent."""
        now = time.monotonic()
        self._held[lease.job_id] = _Held(lease, now, now if sent is None else sent)

    def forget(self, lease: Lease) -> None:
        """The job ended here (or was let go) under ``lease``: stop renewing that lease (a newer
        lease of the same job, held here, is kept)."""
        held = self._held.get(lease.job_id)
        if held is not None and held.lease == lease:
            del self._held[lease.job_id]
        self._wake.set()

    def fresh(self, lease: Lease) -> bool:
        """True while ``lease`` is held and was renewed within half its life (by this process's
        monotonic clock, measured from when the renewal was sent: a lower bound on the time the
        database still gives it)."""
        held = self._held.get(lease.job_id)
        return (
            held is not None
            and held.lease == lease
            and time.monotonic() - held.renewed < self.lease_s / 2
        )

    # --- the account -------------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def max_concurrent(self) -> int:
        return self.limits.max_concurrent

    async def pause(self, reason: str) -> None:
        """The account needs its owner: every process stops starting jobs."""
        self._set_paused(True)
        self._changing_pause = True
        try:
            await self.store.queue.set_account_paused(self.limits.account, True, reason)
        finally:
            self._changing_pause = False

    async def resume(self) -> None:
        self._set_paused(False)
        self._changing_pause = True
        try:
            await self.store.queue.set_account_paused(self.limits.account, False, None)
        finally:
            self._changing_pause = False
        self.kick()

    def note_paused(self) -> None:
        """Refuse new jobs here at once (the pause is being written for every process)."""
        self._set_paused(True)
        self._changing_pause = True

    def _set_paused(self, paused: bool) -> None:
        if self._changing_pause:
            return  # this process is writing the new state: what it read may be older
        if paused != self._paused:
            self._paused = paused
            if self._handler is not None:
                with contextlib.suppress(Exception):
                    self._handler.on_paused(paused)

    def slow_down(self, seconds: float) -> None:
        """Start no job of the account for ``seconds``, in every process (after a 429)."""
        task = asyncio.get_running_loop().create_task(
            self.store.queue.hold_account(self.limits.account, seconds)
        )
        self._holds.add(task)
        task.add_done_callback(self._held_done)

    def _held_done(self, task: asyncio.Task[Any]) -> None:
        self._holds.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record the API's rate limit: %s", task.exception())

    # --- the loops ---------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        backoff = self.poll_s
        while not self._closed:
            self._wake.clear()
            if not self._claiming:
                await self._wake.wait()
                continue
            sent = time.monotonic()
            try:
                claim: Claim = await self.store.queue.claim_next(
                    self.worker_id, await self._every_account(), lease_s=self.lease_s
                )
            except Exception as exc:  # noqa: BLE001 - the database is away: try again later
                log.warning("queue: could not claim a job (%s); retrying", type(exc).__name__)
                await self._sleep(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = self.poll_s
            self._idle = claim.empty and claim.job is None
            if await self._take(claim, sent):
                continue
            if claim.wait_s > 0:
                await self._sleep(min(claim.wait_s, 60.0))
            else:
                await self._sleep(self.poll_s)

    async def every_account(self) -> list[AccountLimits]:
        """Every account's limits (the owner's, then servers' own keys)."""
        return await self._every_account()

    async def adopt(self, lease: Lease, sent: float) -> bool:
        """Hold ``lease``, claimed inside a reservation of this process, so that its caller runs
        the job at once (True); False when this process is shutting down (the job is put back
        in the queue: nothing was sent)."""
        if not self._claiming:
            await self._requeue_quietly(lease)
            return False
        self.hold(lease, sent=sent)
        self.estimates.invalidate()  # positions moved
        return True

    async def _every_account(self) -> list[AccountLimits]:
        if self.accounts is None:
            return [self.limits]
        await self.accounts.refresh()
        return list(self.accounts.limits())

    async def _take(self, claim: Claim, sent: float) -> bool:
        """Start a claimed job (True), or note why there was none (False)."""
        self._set_paused(claim.paused)
        if claim.refused:
            self._refuse(claim.refused)
        if claim.job is None or claim.lease is None:
            return False
        if not self._claiming:  # shutdown began while claiming: back in the queue (never sent)
            await self._requeue_quietly(claim.lease)
            return True
        self.hold(claim.lease, sent=sent)
        self.estimates.invalidate()  # positions moved
        try:
            assert self._handler is not None
            self._handler.on_claim(claim.job, claim.lease)
        except Exception:
            log.exception("job %s: could not start it", claim.job.id)
        return True

    def _refuse(self, job_ids: list[int]) -> None:
        """Refund waiting jobs of servers the bot no longer serves (in the background)."""
        handler = self._handler
        if handler is None:
            return

        async def refuse() -> None:
            for job_id in job_ids:
                try:
                    job = await self.store.jobs.get(job_id)
                    if job is not None:
                        await handler.on_refused(job)
                except Exception:
                    log.exception("job %s: could not refuse it", job_id)

        task = asyncio.get_running_loop().create_task(refuse(), name="kontext-refuse")
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)

    async def slot_freed(self, lease: Lease) -> bool:
        """The API call of ``lease``'s job answered with the image: move it to ``posting``, free
        its slot and, in the same transaction, take the next job (when this process still
        claims). True when the job moved to ``posting`` (its upload may begin)."""
        if self._idle or not self._claiming:
            # nothing waited at the last look (at most ``poll_s`` ago), or this process claims
            # no more: just free the slot (one small update) and let the dispatchers look
            posting: bool = await self.store.leases.api_done(lease)
            self.kick()
            return posting
        sent = time.monotonic()
        claim = await self.store.queue.claim_next(
            self.worker_id, await self._every_account(), lease_s=self.lease_s, done=lease
        )
        if await self._take(claim, sent):
            self.kick()  # there may be room for more
        return bool(claim.done_posting)

    async def _sleep(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires, and aclose() would then wait forever
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _requeue_quietly(self, lease: Lease) -> None:
        self.forget(lease)
        try:
            await self.store.leases.requeue(lease)
        except Exception as exc:  # noqa: BLE001 - its lease then expires and it is taken over
            log.warning("job %s: could not put it back in the queue (%s)", lease.job_id, exc)

    async def _renew(self) -> None:
        every = self.lease_s / RENEWALS_PER_LEASE
        while True:
            await asyncio.sleep(every)
            if not self._held:
                continue
            sent = time.monotonic()
            try:
                kept = await self.store.leases.renew(self.worker_id, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - leases age; fresh() says when to stop
                log.warning("queue: could not renew leases (%s)", type(exc).__name__)
                continue
            for job_id, held in list(self._held.items()):
                if held.since >= sent:
                    continue  # claimed around this renewal: its answer may predate the claim
                if kept.get(job_id) == held.lease.epoch:
                    held.renewed = sent
                else:
                    log.warning("job %s: lease lost to another process; stopping here", job_id)
                    del self._held[job_id]
                    if self._handler is not None:
                        with contextlib.suppress(Exception):
                            self._handler.on_lost(held.lease)

    async def _sweep(self) -> None:
        every = max(0.2, self.lease_s / 4)
        while True:
            if self._claiming:
                await self._sweep_once()
            await asyncio.sleep(every)

    async def _sweep_once(self) -> None:
        try:
            taken = await self.store.leases.take_over_expired(self.worker_id, self.lease_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("queue: recovery sweep failed (%s)", type(exc).__name__)
            taken = []
        handler = self._handler
        if handler is None:
            return
        for job, lease in taken:
            log.warning("job %s (%s): taken over from a stopped or silent process", job.id, job.state)
            self.hold(lease)
            try:
                handler.on_taken_over(job, lease)
            except Exception:
                log.exception("job %s: could not resume it", job.id)
        try:
            expired = await self.store.queue.expired_waiting(self.max_wait_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("queue: wait-bound sweep failed (%s)", type(exc).__name__)
            return
        for job in expired:
            try:
                await handler.on_expired(job)
            except Exception:
                log.exception("job %s: could not end it after its wait", job.id)

"""A new job's intake: everything before it waits in the queue, and its place while it waits.

The job's API account (a server's own key, or the owner's), what can refuse the member read
first (:meth:`kontext.store.ledger.Ledger.precheck`, so a refused job downloads nothing), both
input images downloaded and checked a few jobs at a time in arrival order, then the reservation
(credits held, budget booked, the job queued — and claimed in the same transaction when nothing
waits). One intake per member at a time in this process. A reservation whose outcome is unknown
(a connection lost while committing) is refunded in the background, so a member told "not
charged" never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import aiohttp

from kontext import images
from kontext.accounts import Accounts
from kontext.errors import GuildKeyRefused, KontextError
from kontext.job_state import QUEUED_STATUS_AFTER_S, InFlight, JobRun
from kontext.jobs import JobOutcome, JobSpec
from kontext.queue import SharedQueue
from kontext.settings import Settings
from kontext.settlement import Settlement
from kontext.store import Reservation, ReserveRequest, Store
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import JobState, Outcome

log = logging.getLogger("kontext.pipeline")

#: jobs that download and check their images at once, and how long one may keep its turn
INTAKE_AT_ONCE = 4
INTAKE_SLOT_S = 1.0


class Intake:
    """Checks, turns and the reservation of new jobs (see the module)."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        queue: SharedQueue,
        http: aiohttp.ClientSession,
        accounts: Accounts | None,
        settlement: Settlement,
        inflight: InFlight,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.http = http
        self.accounts = accounts
        self.settlement = settlement
        self.inflight = inflight
        self.worker_id = worker_id
        #: the turns of the image checks (``INTAKE_AT_ONCE`` at a time)
        self.turns = asyncio.Semaphore(INTAKE_AT_ONCE)
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}  # one intake per member

    async def use_account(self, spec: JobSpec) -> JobSpec:
        """``spec`` with the job's API account (a server's own key, else the owner's); refuse
        while a server's own key is paused (Segmind refused it)."""
        if self.accounts is None:
            return spec
        spec = dataclasses.replace(spec, account=await self.accounts.account_for(spec.guild_id))
        if spec.account != OWNER_ACCOUNT and await self.store.queue.account_paused(spec.account):
            raise GuildKeyRefused(f"{spec.account} paused")
        return spec

    def reserve_request(self, spec: JobSpec) -> ReserveRequest:
        """What :meth:`kontext.store.ledger.Ledger.reserve` needs of ``spec`` (and ``precheck``)."""
        return ReserveRequest(
            job_id=spec.job_id,
            guild_id=spec.guild_id,
            channel_id=spec.channel_id,
            user_id=spec.user_id,
            options=spec.options,
            locale=spec.locale,
            application_id=spec.application_id,
            interaction_token=spec.interaction_token,
            exempt_from_cooldown=spec.exempt_from_cooldown,
            worker_id=self.worker_id,
            account=spec.account,
        )

    @contextlib.asynccontextmanager
    async def member_lock(self, spec: JobSpec) -> AsyncIterator[None]:
        """One intake (checks and reservation) per member at a time in this process."""
        key = (spec.guild_id, spec.user_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock._waiters:  # noqa: SLF001
                self._locks.pop(key, None)

    async def reserve(self, spec: JobSpec) -> Reservation:
        """:meth:`kontext.store.ledger.Ledger.reserve`, and no credit left held when its outcome is unknown.

        A connection lost while committing, or a caller cancelled once its transaction began,
        leaves it open whether the reservation was written. Then a refund follows in the
        background (retried while the database is away): it finds the job still waiting and
        gives the credits back, or finds none (or one already claimed) and changes nothing.
        """
        try:
            request = self.reserve_request(spec)
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
            self.inflight.doomed.add(spec.job_id)
            self.settlement.settle_later(
                "refund", spec.job_id, lambda: self.settlement.refund_if_ours(spec.job_id)
            )
            raise

    async def check_in_turn(self, spec: JobSpec) -> None:
        """:meth:`check_inputs`, a few jobs at a time, first come first served.

        In a burst, jobs that all check their images at once all finish late; in turn, the first
        members' jobs reach the API (or the queue) while the rest are still being checked. A
        check that takes longer than ``INTAKE_SLOT_S`` (a slow download) goes on outside its
        turn, so it never holds up the members behind it.
        """
        check: asyncio.Future[None] | None = None
        try:
            async with self.turns:
                # what can refuse the member is read first: a refused job downloads nothing
                await self.store.ledger.precheck(self.reserve_request(spec))
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

    # --- while it waits ------------------------------------------------------------------------

    async def report_place(self, run: JobRun) -> None:
        """While the job waits: tell the member its place (when it changes, throttled), and
        notice when another process took the job (its run() then returns)."""
        shown: tuple[int, int] | None = None
        job_id = run.spec.job_id
        # a job with room to start is claimed within milliseconds: show no place for it (the
        # first edit would also hold back its progress bar by a whole interval)
        await asyncio.sleep(QUEUED_STATUS_AFTER_S)
        while run.lease is None and run.done is not None and not run.done.done():
            try:
                view = await self.queue.estimates.view(account=run.spec.account)
            except Exception as exc:  # noqa: BLE001 - the database is away: look again later
                log.debug("job %s: queue view failed: %s", job_id, exc)
                await asyncio.sleep(run.progress.interval)
                continue
            pos, total = view.position(job_id)
            if pos == 0:
                if await self._claimed_elsewhere(run):
                    return
                await asyncio.sleep(self.queue.estimates.view_s)
                continue
            if shown != (pos, total):
                shown = (pos, total)
                eta = self.queue.estimates.eta(view, pos)

                async def show(pos: int = pos, total: int = total, eta: float = eta) -> None:
                    if run.lease is None:
                        await run.sink.queued(pos, total, eta)

                await run.progress.show(show)
                continue
            await asyncio.sleep(min(run.progress.interval, max(0.05, self.queue.poll_s)))

    async def _claimed_elsewhere(self, run: JobRun) -> bool:
        """The job left the waiting list: True (and run() returns) when not into our hands."""
        job = await self.store.jobs.get(run.spec.job_id)
        if run.lease is not None or job is None:
            return False
        if job.state == JobState.ACCEPTED or job.lease_owner == self.worker_id:
            return False  # still waiting, or our own claim is on its way
        if run.done is not None and not run.done.done():
            run.progress.closed = True
            log.info("job %s: in another process's hands (%s)", job.id, job.state)
            self.settlement.finish(JobOutcome(job.id, Outcome.ELSEWHERE), run)
        return True


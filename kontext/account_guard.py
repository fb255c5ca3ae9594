"""The API accounts' health as the pipeline sees it: rate limits, pauses and probes.

A 429 slows every new start of that account for a while; an account problem (bad key, no
credits) pauses new jobs of **that account only** (the owner's for every process, or one
server's own key) and refunds its waiting jobs; a probe resumes the owner's account once it
works again. Each job's API calls get their :class:`~kontext.segmind.CallHooks` here: the lease
is asked before every POST, and a 429 is told to the right account.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kontext.accounts import Accounts
from kontext.errors import ApiError, GuildKeyRefused, KontextError, ServicePaused
from kontext.job_state import InFlight, JobRun, Lifecycle
from kontext.metrics import Metrics
from kontext.queue import SharedQueue
from kontext.segmind import CallHooks, SegmindClient
from kontext.settlement import Settlement
from kontext.store import Job, Store
from kontext.store.types import OWNER_ACCOUNT

log = logging.getLogger("kontext.pipeline")


class AccountGuard:
    """Rate limits, pauses and probes of the API accounts (see the module)."""

    def __init__(
        self,
        *,
        store: Store,
        queue: SharedQueue,
        client: SegmindClient,
        accounts: Accounts | None,
        settlement: Settlement,
        inflight: InFlight,
        lifecycle: Lifecycle,
        metrics: Metrics,
        run_for: Callable[[Job], JobRun],
        probe_interval_s: float,
    ) -> None:
        self.store = store
        self.queue = queue
        self.client = client
        self.accounts = accounts
        self.settlement = settlement
        self.inflight = inflight
        self.lifecycle = lifecycle
        self.metrics = metrics
        self._run_for = run_for
        self.probe_interval_s = probe_interval_s
        self._probe_task: asyncio.Task[None] | None = None

    # --- a job's calls ------------------------------------------------------------------------

    async def client_for(self, run: JobRun) -> SegmindClient:
        """The client of the job's account (a server's own key, or the owner's)."""
        if self.accounts is None or run.spec.account == OWNER_ACCOUNT:
            return self.client
        try:
            return await self.accounts.client_for(run.spec.account)
        except LookupError as exc:  # the key was removed meanwhile: nothing was sent
            raise GuildKeyRefused(str(exc)) from None

    def hooks_for(self, run: JobRun) -> CallHooks:
        """The job's call hooks: no POST without a fresh lease; each 429 to its account."""
        account = run.spec.account

        def may_send() -> bool:
            return run.lease is not None and self.queue.fresh(run.lease)

        def rate_limited(delay: float | None) -> None:
            self.rate_limited(delay, account)

        return CallHooks(may_send=may_send, on_rate_limited=rate_limited)

    def rate_limited(self, delay: float | None, account: str = OWNER_ACCOUNT) -> None:
        """A 429 from the API (told once per 429 by the client, which retries the request
        itself): hold every new start of ``account`` for a while, in every process."""
        wait = min(60.0, delay if delay is not None and delay > 0 else 5.0)
        self.metrics.rate_limited.inc()
        if account == OWNER_ACCOUNT:
            self.queue.slow_down(wait)
        else:  # a server's own key: its own account waits, not the owner's
            self.inflight.spawn(self._hold_account(account, wait), "kontext-hold")
        log.warning("image API rate limit hit: %s starts no new job for %.1f s", account, wait)

    async def _hold_account(self, account: str, wait: float) -> None:
        try:
            await self.store.queue.hold_account(account, wait)
        except Exception as exc:  # noqa: BLE001 - the next 429 tries again
            log.warning("could not record the API's rate limit for %s: %s", account, exc)

    # --- pauses ---------------------------------------------------------------------------------

    def account_refused(self, err: ApiError, account: str) -> KontextError:
        """The API refused ``account`` (bad key, no credits): pause that account, refund its
        waiting jobs; returns the error the job in hand ends with."""
        if account != OWNER_ACCOUNT:
            self.inflight.spawn(self._pause_guild_account(account, err), "kontext-pause-key")
            return GuildKeyRefused(err.detail)
        self.pause_for_account(err)
        return err

    def pause_for_account(self, err: ApiError) -> None:
        """The owner's API account needs the owner: hold its new jobs (every process), probe."""
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
        self.inflight.spawn(self._pause(err), "kontext-pause")

    async def _pause(self, err: ApiError) -> None:
        try:
            await self.queue.pause(err.cause)
        except Exception:
            log.exception("could not record the pause in the database")
        # the owner's jobs waiting now would only wait for the owner: refund them (servers
        # with their own key are not paused by the owner's account)
        await self._refund_waiting_of(OWNER_ACCOUNT, ServicePaused("account paused"))

    async def _pause_guild_account(self, account: str, err: ApiError) -> None:
        """A server's own key was refused: hold that server's jobs until its admins fix it."""
        log.warning(
            "%s: the server's own Segmind key was refused (%s, HTTP %s); its jobs pause until an "
            "admin sets a new key", account, err.cause, err.status,
        )
        try:
            await self.store.queue.set_account_paused(account, True, err.cause)
        except Exception:
            log.exception("could not pause %s", account)
            return
        await self._refund_waiting_of(account, GuildKeyRefused("key paused"))

    async def _refund_waiting_of(self, account: str, err: KontextError) -> None:
        try:
            waiting = await self.store.queue.waiting_jobs()
        except Exception:
            log.exception("could not list the waiting jobs")
            return
        for job in waiting:
            if job.account != account:
                continue
            run = self.inflight.waiting.get(job.id) or self._run_for(job)
            await self.settlement.refund_waiting(run, err)

    def on_paused(self, paused: bool) -> None:
        """The owner's account was paused (here or by another process): probe it."""
        if paused and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_account())

    def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()

    async def _probe_account(self) -> None:
        while self.queue.paused and self.lifecycle.accepting:
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

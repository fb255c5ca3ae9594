"""The API account's health as the pipeline sees it: rate limits, pauses and probes.

A 429 slows every new start for a while; an account problem (bad key, no credits) pauses new
jobs for every process and refunds the waiting ones, and a probe resumes them once the account
works again. A server's own key that Segmind refuses pauses only that server's jobs.
"""

from __future__ import annotations

import asyncio
import logging

from kontext.errors import ApiError, GuildKeyRefused, ServicePaused
from kontext.job_state import ActiveJob
from kontext.segmind import SegmindClient
from kontext.settlement import Settlement
from kontext.store.types import OWNER_ACCOUNT

log = logging.getLogger("kontext.pipeline")


class AccountGuard(Settlement):
    """Rate limits, pauses and probes (see the module)."""

    def _on_paused(self, paused: bool) -> None:
        if paused and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_account())

    async def _client(self, active: ActiveJob) -> SegmindClient:
        if self.accounts is None or active.spec.account == OWNER_ACCOUNT:
            return self.client
        try:
            client = await self.accounts.client_for(active.spec.account)
        except LookupError as exc:  # the key was removed meanwhile: nothing was sent
            raise GuildKeyRefused(str(exc)) from None
        return client

    def _rate_limited(self, delay: float | None, account: str = OWNER_ACCOUNT) -> None:
        """A 429 from the API (told once per 429 by the client, which retries the request
        itself): hold every new start of ``account`` for a while, in every process."""
        wait = min(60.0, delay if delay is not None and delay > 0 else 5.0)
        self.metrics.rate_limited.inc()
        if account == OWNER_ACCOUNT:
            self.queue.slow_down(wait)
        else:  # a server's own key: its own account waits, not the owner's
            self._spawn(self._hold_account(account, wait), "kontext-hold")
        log.warning("image API rate limit hit: %s starts no new job for %.1f s", account, wait)

    async def _hold_account(self, account: str, wait: float) -> None:
        try:
            await self.store.queue.hold_account(account, wait)
        except Exception as exc:  # noqa: BLE001 - the next 429 tries again
            log.warning("could not record the API's rate limit for %s: %s", account, exc)

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


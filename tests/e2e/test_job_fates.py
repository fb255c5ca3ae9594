"""How a job ends when something goes wrong around it (issue 15: H1, M1, M3, L6), with real
``python bot.py`` processes against the emulators.

Each test reads only what outlives any rewrite of the pipeline: the jobs rows (a job is
*finished* when posted, refunded or failed), the owner's budget tables, and the emulators' own
records (the generations Segmind received and billed, the messages in the channels). Faults come
from the emulators (a channel answering 403, a slow channel read, a 401 on the owner's key) or
from killing a process.

* H1: a takeover that cannot read the job's channel still ends the job in bounded time, and the
  job's API slot is not held meanwhile.
* M1: a job whose request reached Segmind keeps its budget share when a takeover refunds it.
* M3: a process that takes its own job over (its lease expired while it still ran it) submits
  the generation once, whatever its stale task does.
* L6: a 401 on the owner's key refunds no waiting job of a server that brings its own key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import func, select

from emulators.discord import DiscordEmulator, InteractionRecord
from emulators.segmind import SegmindEmulator
from kontext.schema import budget_days, guild_budget_days, jobs
from kontext.store import Store
from tests.dbutil import make_settings
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image
from tests.e2e.procbot import BotProcess, logs, result_posts, start_bot, wait_connected

FINISHED = ("posted", "refunded", "failed")
LEASE = "2"  # seconds: a killed process's job is taken over after this (by the DB's clock)
#: how long, in these tests' settings, a job whose channel cannot be read may stay unfinished
UNREADABLE_CHANNEL_BOUND_S = 20.0


@dataclass
class World:
    """Both emulators, a server with a channel, one database file, the bot processes."""

    demu: DiscordEmulator
    semu: SegmindEmulator
    url: str
    tmp: Path
    guild: int
    channel: int
    bots: list[BotProcess] = field(default_factory=list)

    async def start(self, name: str, **env: str) -> BotProcess:
        bot = await start_bot(self.demu, self.semu, self.url, workdir=self.tmp, name=name, **env)
        self.bots.append(bot)
        await wait_connected(self.demu, [bot], len(self.demu.connections) + 1)
        return bot

    def member(self, name: str, guild: int | None = None) -> int:
        return int(self.demu.add_member(guild or self.guild, name=name)["user"]["id"])

    async def kontext(
        self, user_id: int, prompt: str, *, guild: int | None = None, channel: int | None = None
    ) -> InteractionRecord:
        return await self.demu.invoke_slash(
            "kontext",
            {
                "image_1": (make_image(), "one.png", "image/png"),
                "image_2": (make_image(colour="blue"), "two.png", "image/png"),
                "prompt": prompt,
            },
            user_id=user_id, guild_id=guild or self.guild, channel_id=channel or self.channel,
        )

    def posted(self) -> Counter[int]:
        """Public messages carrying each job's result (``kontext-<job id>.<ext>``)."""
        return result_posts(self.demu)

    def submits(self) -> int:
        """Generation requests Segmind received (v1 calls and v2 submits)."""
        return len(self.semu.calls)

    def logs(self) -> str:
        return logs(*self.bots)

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        store = await Store.open(self.url, make_settings())
        try:
            yield store
        finally:
            await store.close()

    async def job(self, job_id: int) -> Any:
        async with self.store() as store:
            return await store.jobs.get(job_id)

    async def until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``check`` (sync or async) every 20 ms; on timeout fail with every bot's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s: {what}\n{self.logs()}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def world(tmp_path: Path, *, latency: float) -> AsyncIterator[World]:
    async with (
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY, latency=latency) as semu,
    ):
        guild = demu.add_guild(name="Fates Server")
        channel = int(demu.add_channel(guild.id, name="general")["id"])
        w = World(demu, semu, f"sqlite:///{tmp_path / 'kontext.db'}", tmp_path, guild.id, channel)
        try:
            yield w
        except BaseException:
            print(w.logs())
            raise
        finally:
            await asyncio.gather(*(b.stop(timeout=5) for b in w.bots), return_exceptions=True)


async def crash_mid_call(w: World, user: int, **env: str) -> tuple[InteractionRecord, BotProcess]:
    """A bot process receives /kontext, sends the generation request, and is killed (-9)
    while Segmind works on it."""
    first = await w.start("first", KONTEXT_LEASE_SECONDS=LEASE, **env)
    conns = list(w.demu.connections)
    rec = await w.kontext(user, "killed mid-call")
    await w.until(lambda: w.submits() == 1, 15, "the generation request sent")
    first.kill()
    assert await first.wait(10) == -9
    await w.demu.wait_until(lambda: all(c.closed for c in conns), 10, description="gateway closed")
    return rec, first


async def budget_micros(w: World) -> tuple[int, int]:
    """The owner's budget share reserved today (all servers, and this server)."""
    async with w.store() as store, store.db.read() as conn:
        total = (await conn.execute(select(func.sum(budget_days.c.reserved_micros)))).scalar()
        guild = (
            await conn.execute(
                select(func.sum(guild_budget_days.c.reserved_micros)).where(
                    guild_budget_days.c.guild_id == w.guild
                )
            )
        ).scalar()
    return int(total or 0), int(guild or 0)


# --- H1: a takeover that cannot read the job's channel ---------------------------------------------


async def test_h1_a_takeover_that_cannot_read_the_channel_ends_the_job_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    """A process is killed (-9) while it uploads a job's result to Discord; the channel then
    answers 403 Missing Access to every read (Read Message History removed). The process that
    takes the job over cannot tell whether the result was posted: still, the job ends within
    a bound, and its API slot (MAX_CONCURRENT_JOBS=1) does not stop another member's job
    meanwhile.

    Before the job states, the takeover let the lease go and tried again, forever: the job stayed ``running``
    (its epoch climbing with each hand-over)."""
    async with world(tmp_path, latency=0.2) as w:
        # the stated bound for a channel that cannot be read, shortened for the test
        env = {"MAX_CONCURRENT_JOBS": "1", "KONTEXT_LEASE_SECONDS": LEASE,
               "KONTEXT_SETTLE_SECONDS": "6"}
        stuck_member, other_member = w.member("stuck"), w.member("other")
        first = await w.start("first", **env)
        conns = list(w.demu.connections)
        # the result's upload (the interaction's public follow-up) hangs: killed meanwhile
        upload = w.demu.delay("POST", r"/webhooks/\d+/[^/]+$", 30.0, times=1)
        stuck = await w.kontext(stuck_member, "killed while posting")
        await w.until(lambda: upload.hits >= 1, 15, "the result's upload begun")
        first.kill()
        assert await first.wait(10) == -9
        await w.demu.wait_until(lambda: all(c.closed for c in conns), 10, description="closed")
        unreadable = w.demu.fail_next(
            "GET", rf"/channels/{w.channel}/messages$", 403, code=50001,
            message="Missing Access", times=None,
        )
        await w.start("second", **env)
        await w.until(lambda: unreadable.hits >= 1, 20, "the takeover reading the channel")
        other = await w.kontext(other_member, "another member's job")
        started = time.monotonic()

        async def both_done() -> bool:
            job, job2 = await w.job(stuck.id), await w.job(other.id)
            return bool(job and job.state in FINISHED and w.posted()[other.id] == 1 and job2)

        try:
            await w.until(both_done, UNREADABLE_CHANNEL_BOUND_S, "")
        except AssertionError:
            job, job2 = await w.job(stuck.id), await w.job(other.id)
            raise AssertionError(
                f"{UNREADABLE_CHANNEL_BOUND_S:.0f} s after the channel became unreadable: the "
                f"taken-over job is {job.state!r} (lease epoch {job.lease_epoch}, "
                f"{unreadable.hits} channel reads refused); the other member's job is "
                f"{job2.state if job2 else None!r}, posted {w.posted()[other.id]} time(s)\n"
                f"{w.logs()}"
            ) from None
        print(f"\nboth ended {time.monotonic() - started:.1f} s after the second job arrived")
        assert w.submits() == 2 and w.posted()[stuck.id] <= 1, w.logs()
        job = await w.job(stuck.id)
        assert job is not None and job.api_charged, job  # its request was sent: billed
        if w.posted()[stuck.id] == 0:  # proven neither way: refunded by the stated rule
            assert (job.state, job.failure_cause) == ("refunded", "post_unverified"), job


# --- M1: a takeover refund keeps the budget share of a request that was sent ----------------------


async def test_m1_a_takeover_refund_keeps_the_budget_share_of_a_sent_request(
    tmp_path: Path,
) -> None:
    """kill -9 while the generation request is at Segmind (sync mode: nothing to resume). The
    next process refunds the member; the owner's and the server's budgets keep the call's
    share (Segmind may bill it) and the job stays marked as charged.

    Before the job states, the taken-over job was rebuilt as "never sent", and the refund gave the
    budget back."""
    async with world(tmp_path, latency=60) as w:
        member = w.member("member")
        rec, _ = await crash_mid_call(w, member)
        sent_total, sent_guild = await budget_micros(w)
        assert sent_total > 0 and sent_guild > 0, (sent_total, sent_guild)  # counted when sent
        await w.start("second", KONTEXT_LEASE_SECONDS=LEASE)

        async def finished() -> Any:
            job = await w.job(rec.id)
            return job if job is not None and job.state in FINISHED else None

        job = await w.until(finished, 20, "the taken-over job settled")
        assert job.state in ("refunded", "failed") and w.posted()[rec.id] == 0, (job, w.logs())
        assert w.submits() == 1, w.logs()
        after_total, after_guild = await budget_micros(w)
        assert (after_total, after_guild) == (sent_total, sent_guild), (
            f"the budget share of a request Segmind received was given back on the takeover's "
            f"refund: owner {sent_total} -> {after_total} micros, server {sent_guild} -> "
            f"{after_guild} micros (job api_charged={job.api_charged})"
        )
        assert job.api_charged, job


# --- M3: a stale task of the same process ---------------------------------------------------------


async def test_m3_a_process_that_takes_its_own_job_over_submits_it_once(tmp_path: Path) -> None:
    """Async mode, one process. While its job's generation runs at Segmind, the job's lease
    expires (the test moves the expiry into the past, as a stalled renewer would leave it) and
    the process's own sweeper takes the job over with a new epoch; the takeover's look into the
    channel is slow. The first task, now stale, sees its lease gone when the result comes.

    Whatever either task does, the generation is submitted once, billed once, posted once.
    Before the fix, the stale task's clean-up dropped the takeover's new lease (bookkeeping by
    job id), the takeover then found its lease not fresh, believed nothing was sent and
    requeued the job, and it was generated a second time."""
    async with world(tmp_path, latency=2.0) as w:
        env = {"SEGMIND_API_MODE": "async", "KONTEXT_LEASE_SECONDS": "4"}
        bot = await w.start("only", **env)
        rec = await w.kontext(w.member("member"), "taken over by its own process")

        async def request_stored() -> Any:
            job = await w.job(rec.id)
            return job if job is not None and job.api_request_id else None

        first = await w.until(request_stored, 15, "the request id stored")
        assert first.lease_epoch == 1 and w.submits() == 1, first
        # the takeover's channel search answers slowly: the stale task meets its end meanwhile
        w.demu.delay("GET", rf"/channels/{w.channel}/messages$", 3.0, times=1)
        async with w.store() as store:
            deadline = time.monotonic() + 10
            while True:  # the lease "expires" until this process's sweeper takes the job over
                async with store.db.write() as conn:
                    await conn.execute(
                        jobs.update()
                        .where(jobs.c.id == rec.id, jobs.c.lease_epoch == first.lease_epoch)
                        .values(lease_expires_at=0.0)
                    )
                job = await store.jobs.get(rec.id)
                assert job is not None
                if job.lease_epoch > first.lease_epoch or job.state in FINISHED:
                    break
                assert time.monotonic() < deadline, f"never taken over: {job}\n{bot.log_tail()}"
                await asyncio.sleep(0.02)
        assert job.state in FINISHED or job.lease_owner == first.lease_owner, job  # its own

        async def settled() -> Any:
            job = await w.job(rec.id)
            return job if job is not None and job.state in FINISHED and w.posted()[rec.id] else None

        try:
            done = await w.until(settled, 30, "the job posted")
        finally:
            print(f"\nsubmits {w.submits()}, billed {w.semu.charged_count}, posts {w.posted()}")
        assert (w.submits(), w.semu.charged_count, w.posted()[rec.id]) == (1, 1, 1), (
            f"{w.submits()} generation(s) submitted, {w.semu.charged_count} billed, posted "
            f"{w.posted()[rec.id]} time(s) for one job (final state {done.state!r}, epoch "
            f"{done.lease_epoch})\n{w.logs()}"
        )
        assert done.state == "posted", done


# --- L6: the owner's 401 and servers' own keys ----------------------------------------------------

SERVER_KEY = "SG_server_own_key_0123456789"


async def test_l6_a_401_on_the_owner_key_leaves_waiting_jobs_on_servers_own_keys(
    tmp_path: Path,
) -> None:
    """Server S brings its own key (one generation at a time): S's first job is at Segmind,
    its second waits for S's slot. A job on the owner's key is answered 401 and pauses the
    owner's account. S's waiting job does not need the owner's account: it runs once S's slot
    frees, on S's key. Before the fix, the pause refunded every waiting job, S's included."""
    encryption = Fernet.generate_key().decode()
    async with world(tmp_path, latency=3.0) as w:
        server = w.demu.add_guild(name="Own Key Server")
        s_channel = int(w.demu.add_channel(server.id, name="general")["id"])
        w.semu.add_key(SERVER_KEY)
        from kontext.accounts import KeyVault

        async with w.store() as store:
            await store.owner.set_api_key(server.id, KeyVault(encryption).encrypt(SERVER_KEY), 1)
        await w.start("bot", ENCRYPTION_KEY=encryption, KONTEXT_LEASE_SECONDS=LEASE)
        s0, s1 = w.member("s0", server.id), w.member("s1", server.id)
        first = await w.kontext(s0, "on the server's key", guild=server.id, channel=s_channel)
        await w.until(lambda: w.submits() == 1, 15, "S's first job at Segmind")
        second = await w.kontext(s1, "waiting for the server's slot", guild=server.id, channel=s_channel)

        async def waiting() -> bool:
            job = await w.job(second.id)
            return job is not None and job.state == "accepted"

        await w.until(waiting, 10, "S's second job waiting")
        assert w.semu.calls[0].api_key == SERVER_KEY
        w.semu.fail_next(401)  # the owner's key is refused
        owner_job = await w.kontext(w.member("owner's member"), "on the owner's key")

        async def owner_job_ended() -> bool:
            job = await w.job(owner_job.id)
            return job is not None and job.state in FINISHED

        await w.until(owner_job_ended, 15, "the owner's job refused")
        assert w.semu.calls[1].api_key == SEGMIND_KEY and w.semu.calls[1].status == 401

        async def second_ended() -> Any:
            job = await w.job(second.id)
            return job if job is not None and job.state in FINISHED else None

        ended = await w.until(second_ended, 20, "S's second job ended")
        assert ended.state == "posted", (
            f"S's waiting job was {ended.state!r} (cause {ended.failure_cause!r}) after a 401 on "
            f"the owner's key; it runs on S's own key\n{w.logs()}"
        )
        assert w.posted()[second.id] == 1 and w.semu.calls[-1].api_key == SERVER_KEY
        assert w.posted()[first.id] == 1

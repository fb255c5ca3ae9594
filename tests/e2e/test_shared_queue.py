"""Issue 9: one job queue in the database, served by every bot process (real OS processes).

Each test runs ``python bot.py`` processes against the Discord and Segmind emulators on one
database (a real Postgres database or a SQLite file) and checks what members and the owner
would see:

* the API account's limits are global: ``MAX_CONCURRENT_JOBS`` generations at once and
  ``SEGMIND_RPM`` starts in any 60 s across all processes, with no time wasted;
* SIGTERM leaves waiting jobs queued for the next process; the running one finishes;
* ``kill -9`` of a process: the survivor runs the waiting jobs and, once the lease expired by the
  database's clock, refunds (sync API mode) or resumes and posts (async mode) the running one;
* a process whose clock runs ten minutes ahead (libfaketime) never takes a live job over;
* a 60 s Postgres outage while jobs run: no job runs twice, nothing is posted twice, the money
  rules hold afterwards.

Leases are shortened with ``KONTEXT_LEASE_SECONDS``; nothing here waits a fixed time except the
windows in which something must *not* happen, and the outage itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from emulators.discord import DiscordEmulator, GatewayConnection, InteractionRecord
from emulators.segmind import SegmindEmulator
from kontext.schema import LEASED_STATES, jobs
from kontext.store import Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits
from tests.dbutil import _dsn, backend_url, ensure_postgres, make_settings, temp_postgres_url
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image
from tests.e2e.procbot import BotProcess, logs, result_posts, start_bot

LEASE = "2"  # seconds: a killed process's running jobs move on after this (by the DB's clock)
RESTART_TEXT = "The bot restarted while your image was being made"


# --- the world: emulators, a database, bot processes ---------------------------------------------


def database(backend: str, tmp_path: Path) -> contextlib.AbstractAsyncContextManager[str]:
    return backend_url(backend, tmp_path, "shared.db")


@dataclass
class Fleet:
    """Both emulators, one server with members, one database, and the bot processes on it."""

    demu: DiscordEmulator
    semu: SegmindEmulator
    url: str
    tmp: Path
    guild: int
    channel: int
    bots: list[BotProcess] = field(default_factory=list)
    conns: dict[str, GatewayConnection] = field(default_factory=dict)

    async def start(self, name: str, **env: str) -> BotProcess:
        """Start ``python bot.py`` and wait until *its* gateway connection is up."""
        old = {id(c) for c in self.demu._gateway_connections}
        bot = await start_bot(self.demu, self.semu, self.url, workdir=self.tmp, name=name, **env)
        self.bots.append(bot)

        def mine() -> GatewayConnection | None:
            if not bot.running:
                raise AssertionError(f"{name} exited with {bot.proc.returncode}\n{logs(bot)}")
            new = [c for c in self.demu.connections if id(c) not in old]
            if new and self.demu.find_command("kontext") is not None:
                return new[0]
            return None

        try:
            self.conns[name] = await self.demu.wait_until(mine, 30, description=f"{name} connected")
        except TimeoutError:
            raise AssertionError(f"{name} did not connect\n{logs(bot)}") from None
        return bot

    def members(self, n: int) -> list[int]:
        return [
            int(self.demu.add_member(self.guild, name=f"member-{i}")["user"]["id"]) for i in range(n)
        ]

    async def kontext(self, user_id: int, prompt: str, to: str) -> InteractionRecord:
        """``/kontext`` from ``user_id``, delivered only to bot ``to``."""
        return await self.demu.invoke_slash(
            "kontext",
            {
                "image_1": (make_image(), "one.png", "image/png"),
                "image_2": (make_image(colour="blue"), "two.png", "image/png"),
                "prompt": prompt,
            },
            user_id=user_id, guild_id=self.guild, channel_id=self.channel, to=self.conns[to],
        )

    def posted(self) -> Counter[int]:
        """How many public messages carry each job's result (``kontext-<job id>.<ext>``)."""
        return result_posts(self.demu)

    def calls_per_prompt(self) -> Counter[str]:
        return Counter(str((c.payload or {}).get("prompt")) for c in self.semu.calls)

    def logs(self) -> str:
        return logs(*self.bots)

    async def until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``check`` (sync) every 20 ms; on timeout fail with every bot's log."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s: {what}\n{self.logs()}")
            await asyncio.sleep(0.02)

    async def until_db(self, check: Callable[[Store], Any], timeout: float, what: str) -> Any:
        """Poll the database (``await check(store)``) until it is truthy."""
        deadline = time.monotonic() + timeout
        async with self.store() as store:
            while True:
                with contextlib.suppress(Exception):  # the database may be coming back
                    value = await check(store)
                    if value:
                        return value
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout} s: {what}\n{self.logs()}")
                await asyncio.sleep(0.05)

    async def stays(self, check: Callable[[], bool], seconds: float, what: str) -> None:
        """``check`` holds for ``seconds`` (a window in which something must not happen)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert check(), f"{what}\n{self.logs()}"
            await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        store = await Store.open(self.url, make_settings())
        try:
            yield store
        finally:
            await store.close()

    async def aclose(self) -> None:
        # teardown only: a process that does not exit soon is killed (exiting promptly on
        # SIGTERM is tested on its own, below)
        await asyncio.gather(*(b.stop(timeout=5) for b in self.bots), return_exceptions=True)


@contextlib.asynccontextmanager
async def fleet(url: str, tmp: Path, *, latency: float) -> AsyncIterator[Fleet]:
    async with (
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY, latency=latency) as semu,
    ):
        guild = demu.add_guild(name="Queue Server")
        channel = int(demu.add_channel(guild.id, name="general")["id"])
        f = Fleet(demu, semu, url, tmp, guild.id, channel)
        try:
            yield f
        except BaseException:
            print(f.logs())
            raise
        finally:
            await f.aclose()


async def jobs_ended(store: Store, ids: list[int]) -> list[Any] | None:
    found = [await store.jobs.get(i) for i in ids]
    if all(j is not None and j.state in ("posted", "refunded") for j in found):
        return found
    return None


async def assert_money(
    f: Fleet, recs: list[InteractionRecord], *, refunded: set[int] = frozenset()  # type: ignore[assignment]
) -> None:
    """Each job: one reservation and one commit (or one refund, for ``refunded``); balances
    agree; nothing is active; the money rules hold."""
    async with f.store() as store:
        assert await store.audit.check_invariants() == [], f.logs()
        assert await store.jobs.count_active() == 0
        spent: Counter[int] = Counter()
        for rec in recs:
            job = await store.jobs.get(rec.id)
            assert job is not None
            kinds = sorted(
                e.kind
                for e in await store.credits.recent(f.guild, rec.user_id, limit=100)
                if e.job_id == rec.id
            )
            if rec.id in refunded:
                assert job.state == "refunded" and kinds == ["refund", "reserve"], (job, kinds)
            else:
                assert job.state == "posted" and kinds == ["commit", "reserve"], (job, kinds)
                spent[rec.user_id] += job.cost_credits
        for user in {r.user_id for r in recs}:
            status = await store.credits.member_status(f.guild, user)
            assert status.balance == 10 - spent[user], (user, status)


def window_max(starts: list[float], window: float = 60.0) -> int:
    """The most starts in any ``window`` seconds."""
    return max((sum(1 for s in starts if a <= s < a + window) for a in starts), default=0)


# --- 1. the account's limits are global ------------------------------------------------------------


async def test_two_processes_share_two_slots_exactly_and_waste_no_time(tmp_path: Path) -> None:
    """8 members, 8 jobs delivered across two processes, MAX_CONCURRENT_JOBS=2, 1 s each:
    never more than 2 at the API, never fewer while work waits (about the 4 s ideal)."""
    await ensure_postgres()
    async with temp_postgres_url() as url, fleet(url, tmp_path, latency=1.0) as f:
        env = {"MAX_CONCURRENT_JOBS": "2", "KONTEXT_LEASE_SECONDS": "6"}
        await f.start("a", **env)
        await f.start("b", **env)
        users = f.members(8)
        recs = list(
            await asyncio.gather(
                *(f.kontext(u, f"job {i}", "ab"[i % 2]) for i, u in enumerate(users))
            )
        )
        ids = [r.id for r in recs]
        done_at: list[float] = []

        def all_posted() -> bool:
            if not done_at and all(f.posted()[i] for i in ids):
                done_at.append(time.monotonic())
            return bool(done_at)

        await f.demu.wait_until(all_posted, 30, description="8 results")
        first_start = min(f.semu.started_times)
        span = done_at[0] - first_start
        print(
            f"\n8 jobs x 1 s on 2 global slots over 2 processes: first API start -> last post "
            f"{span:.2f} s (ideal 4 s, bound {4 * 1.3:.1f} s); peak concurrency "
            f"{f.semu.peak_concurrency}; API calls {len(f.semu.calls)}"
        )
        assert f.semu.peak_concurrency == 2, f.logs()
        assert len(f.semu.calls) == 8 and max(f.calls_per_prompt().values()) == 1, f.logs()
        assert f.posted() == Counter({i: 1 for i in ids}), f.logs()
        assert span <= 4.0 * 1.3, f"{span:.2f} s for 8 jobs of 1 s on 2 slots\n{f.logs()}"
        # whichever process ran a job, its member got the result through their interaction
        for rec in recs:
            assert len([m for m in rec.followups if m.get("attachments")]) == 1, f.logs()
        done = await f.until_db(lambda s: jobs_ended(s, ids), 10, "every job committed")
        print(f"jobs run per process: {sorted(Counter(j.worker_id for j in done).values())}")
        await assert_money(f, recs)


async def test_rpm_limit_holds_across_two_processes(tmp_path: Path) -> None:
    """SEGMIND_RPM=6, 10 jobs across two processes: 6 start, the other 4 are held for the rest
    of the minute (by the database's clock); the test moves the starts a minute into the past
    instead of waiting one, and then the 4 start. No 60 s window (in queue time) sees more
    than 6 starts."""
    await ensure_postgres()
    latency = 6.0  # the first six are still at the API while the test checks the hold
    async with temp_postgres_url() as url, fleet(url, tmp_path, latency=latency) as f:
        env = {"MAX_CONCURRENT_JOBS": "10", "SEGMIND_RPM": "6", "KONTEXT_LEASE_SECONDS": "6"}
        await f.start("a", **env)
        await f.start("b", **env)
        users = f.members(10)
        recs = list(
            await asyncio.gather(
                *(f.kontext(u, f"rpm {i}", "ab"[i % 2]) for i, u in enumerate(users))
            )
        )
        ids = [r.id for r in recs]
        await f.until(lambda: len(f.semu.calls) >= 6, 15, "six API starts")
        async with f.store() as store:
            deadline = time.monotonic() + 15
            while await store.queue.count_waiting() != 4:
                assert time.monotonic() < deadline, f.logs()
                await asyncio.sleep(0.05)
            await f.stays(lambda: len(f.semu.calls) == 6, 1.5, "a 7th API start within the minute")
            claim = await store.queue.claim_next(
                "probe-worker", AccountLimits(OWNER_ACCOUNT, 10, 6), lease_s=10
            )
            assert claim.job is None and claim.wait_s > 50, (claim, f.logs())
            assert all(c.finished is None for c in f.semu.calls), "the first six ended too soon"
            moved_at = time.monotonic()
            async with store.db.write() as conn:  # a minute passes, for the RPM window
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.started_at.is_not(None))
                    .values(started_at=jobs.c.started_at - 60.0)
                )
        await f.demu.wait_until(
            lambda: all(f.posted()[i] for i in ids), latency + 20, description="10 results"
        )
        starts = sorted(f.semu.started_times)
        early = [s for s in starts if s < moved_at]
        queue_time = sorted(s + (60.0 if s >= moved_at else 0.0) for s in starts)
        print(
            f"\nRPM 6 over 2 processes: {len(early)} starts before the minute passed, "
            f"{len(starts) - len(early)} after; most starts in any 60 s (queue time): "
            f"{window_max(queue_time)}"
        )
        assert len(early) == 6, starts
        assert len(starts) == 10 and max(f.calls_per_prompt().values()) == 1, f.logs()
        assert window_max(queue_time) <= 6, queue_time
        assert f.posted() == Counter({i: 1 for i in ids}), f.logs()
        await f.until_db(lambda s: jobs_ended(s, ids), 10, "every job committed")
        await assert_money(f, recs)


# --- 2. SIGTERM: the running job finishes, the waiting ones stay queued ----------------------------


async def test_sigterm_finishes_the_running_job_and_leaves_the_waiting_ones_queued(
    tmp_path: Path,
) -> None:
    """SQLite, MAX_CONCURRENT_JOBS=1: 1 job running and 3 waiting when the process gets SIGTERM.
    The running one is posted before it exits; the 3 stay queued and the next process runs
    them, answering through the members' stored interactions. 4 API calls, 4 charges."""
    url = f"sqlite:///{tmp_path / 'kontext.db'}"
    async with fleet(url, tmp_path, latency=3.0) as f:
        env = {"MAX_CONCURRENT_JOBS": "1", "KONTEXT_LEASE_SECONDS": "3"}
        first = await f.start("first", **env)
        users = f.members(4)
        recs = [await f.kontext(u, f"term {i}", "first") for i, u in enumerate(users)]
        await f.until(lambda: len(f.semu.calls) == 1, 10, "the first API call")
        await f.until_db(lambda s: _eq(s.queue.count_waiting(), 3), 10, "3 jobs waiting")
        ids = [r.id for r in recs]
        running = await f.until_db(lambda s: _running(s, ids), 10, "the running job")
        waiting = [i for i in ids if i != running.id]
        assert await first.stop(timeout=30) == 0, f.logs()
        assert "3 waiting job(s) stay in the queue" in first.log(), f.logs()
        assert len(f.semu.calls) == 1, f.logs()
        assert f.posted() == Counter({running.id: 1}), f.logs()  # finished within the grace
        async with f.store() as store:
            assert await store.queue.count_waiting() == 3
            for job_id in waiting:
                job = await store.jobs.get(job_id)
                assert job is not None and job.state == "accepted" and job.lease_owner is None

        await f.start("second", **env)
        await f.until(lambda: all(f.posted()[i] for i in ids), 30, "the 3 waiting jobs posted")
        assert f.posted() == Counter({i: 1 for i in ids}), f.logs()
        assert len(f.semu.calls) == 4 and max(f.calls_per_prompt().values()) == 1, f.logs()
        # the next process answered through the stored interactions (a follow-up each)
        for rec in recs:
            assert len([m for m in rec.followups if m.get("attachments")]) == 1, f.logs()
        found = {j.id: j for j in await f.until_db(lambda s: jobs_ended(s, ids), 10, "committed")}
        later = {found[i].worker_id for i in waiting}
        assert len(later) == 1 and found[running.id].worker_id not in later  # the second ran all 3
        await assert_money(f, recs)


async def _eq(awaitable: Any, value: Any) -> bool:
    return (await awaitable) == value


# --- 3. kill -9 while another process is alive ---------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "mode"),
    [("postgres", "sync"), ("postgres", "async"), ("sqlite", "sync"), ("sqlite", "async")],
)
async def test_kill9_survivor_runs_the_waiting_jobs_and_settles_the_running_one(
    backend: str, mode: str, tmp_path: Path
) -> None:
    """Process A holds 1 running job (2 more wait) and is killed while process B is up. B runs
    the waiting jobs; after A's lease expires B refunds the running one (sync) or resumes its
    request and posts it (async). Nothing posted twice, no second API call for any job."""
    async with database(backend, tmp_path) as url, fleet(
        url, tmp_path, latency=60.0 if mode == "sync" else 4.0
    ) as f:
        env = {"MAX_CONCURRENT_JOBS": "1", "KONTEXT_LEASE_SECONDS": LEASE, "SEGMIND_API_MODE": mode}
        a = await f.start("a", **env)
        users = f.members(3)
        recs = [await f.kontext(u, f"kill {i}", "a") for i, u in enumerate(users)]
        await f.until(lambda: len(f.semu.calls) == 1, 10, "A's first API call")
        ids = [r.id for r in recs]
        running = await f.until_db(lambda s: _running(s, ids), 10, "A's running job")
        if mode == "async":  # killed after the request id is stored (before, it cannot resume)
            await f.until_db(
                lambda s: _job_has(s, running.id, lambda j: j.api_request_id), 10, "request id"
            )
        await f.until_db(lambda s: _eq(s.queue.count_waiting(), 2), 10, "2 jobs waiting")
        f.semu.latency = 0.3  # the jobs still to come are quick
        b = await f.start("b", **env)  # alive, sweeping, while A holds the job
        async with f.store() as store:
            held = await store.jobs.get(running.id)
        assert held is not None and held.state == "sent" and held.lease_epoch == 1, held
        assert held.lease_owner == running.lease_owner  # still A's
        a.kill()
        assert await a.wait(10) == -9
        rec0 = next(r for r in recs if r.id == running.id)
        others = [i for i in ids if i != running.id]
        if mode == "sync":
            await f.until(lambda: all(f.posted()[i] for i in others), 30, "B posted the 2")
            await f.until(
                lambda: RESTART_TEXT in ((rec0.original or {}).get("content") or ""),
                20, "the member of the running job told of the refund",
            )
            assert "1 credit(s) were refunded" in rec0.original["content"]
            expected = Counter({i: 1 for i in others})
            refunded = {running.id}
        else:
            await f.until(lambda: all(f.posted()[i] for i in ids), 30, "all 3 posted")
            expected = Counter({i: 1 for i in ids})
            refunded = set()
        await f.until_db(lambda s: jobs_ended(s, ids), 15, "every job settled")
        async with f.store() as store:
            settled = await store.jobs.get(running.id)
        assert f.posted() == expected, f.logs()
        assert len(f.semu.calls) == 3 and max(f.calls_per_prompt().values()) == 1, f.logs()
        assert settled is not None and settled.lease_epoch == 2, settled  # taken over once
        assert "taken over from a stopped or silent process" in b.log()
        await assert_money(f, recs, refunded=refunded)


async def _job_has(store: Store, job_id: int, check: Callable[[Any], Any]) -> bool:
    job = await store.jobs.get(job_id)
    return job is not None and bool(check(job))


async def _running(store: Store, ids: list[int]) -> Any:
    for job_id in ids:
        job = await store.jobs.get(job_id)
        if job is not None and job.state in LEASED_STATES:
            return job
    return None


async def test_sigterm_of_an_idle_process_exits_within_the_grace(tmp_path: Path) -> None:
    """A process that served a job and now has nothing in flight exits 0 at once on SIGTERM
    (a platform SIGKILLs it after its grace otherwise: no clean close, no worker retired)."""
    url = f"sqlite:///{tmp_path / 'kontext.db'}"
    async with fleet(url, tmp_path, latency=0.1) as f:
        bot = await f.start("idle", SHUTDOWN_GRACE_SECONDS="10", KONTEXT_LEASE_SECONDS="3")
        (user,) = f.members(1)
        rec = await f.kontext(user, "one job", "idle")
        await f.until(lambda: f.posted()[rec.id], 15, "the result")
        await f.until_db(lambda s: jobs_ended(s, [rec.id]), 10, "the job committed")
        sent = time.monotonic()
        bot.proc.send_signal(signal.SIGTERM)
        try:
            code = await bot.wait(12)
        except TimeoutError:
            pytest.fail(f"still running 12 s after SIGTERM (grace 10 s), nothing in flight\n{f.logs()}")
        took = time.monotonic() - sent
        print(f"\nidle process: exit {code} {took:.2f} s after SIGTERM")
        assert code == 0 and took < 3.0, f.logs()
        assert "stopped cleanly" in bot.log()


# --- 4. clock skew ---------------------------------------------------------------------------------


def libfaketime() -> str:
    """The libfaketime preload library (Debian package ``faketime``); skip without it, but fail
    in CI (``CI=true``), where ``.ci/run`` installs it."""
    for pattern in (
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    why = "libfaketime not found (apt-get install faketime)"
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI=true but {why}")
    pytest.skip(why)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", re.M)


def log_clock_ahead(bot: BotProcess) -> float:
    """How far ahead of ours the clock in ``bot``'s newest log line is (seconds)."""
    stamps = LOG_TIME.findall(bot.log())
    assert stamps, bot.log()
    return (datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S") - datetime.now()).total_seconds()


async def test_a_process_ten_minutes_ahead_never_takes_a_live_job_over(tmp_path: Path) -> None:
    """Leases expire by the database's clock: a process whose own clock runs 10 minutes ahead
    (libfaketime) sweeps for expired leases all through another process's long job and never
    takes it: one API call, posted once, by its owner, with its first epoch. The skewed
    process then serves the queue normally."""
    lib = libfaketime()
    await ensure_postgres()
    latency = 10.0  # five lease lives
    async with temp_postgres_url() as url, fleet(url, tmp_path, latency=latency) as f:
        env = {"MAX_CONCURRENT_JOBS": "1", "KONTEXT_LEASE_SECONDS": LEASE}
        await f.start("a", **env)
        user, other = f.members(2)
        rec = await f.kontext(user, "the long job", "a")
        await f.until(lambda: len(f.semu.calls) == 1, 15, "A's API call")
        live = await f.until_db(lambda s: _running(s, [rec.id]), 10, "the job running in A")
        skewed = await f.start(
            "skewed", LD_PRELOAD=lib, FAKETIME="+10m", DONT_FAKE_MONOTONIC="1", **env
        )
        # its queue (and its sweeper) starts once it is ready
        await f.until(lambda: "connected as" in skewed.log(), 15, "the skewed process ready")
        ahead = log_clock_ahead(skewed)
        print(f"\nskewed process: its clock is {ahead:.0f} s ahead")
        assert 9 * 60 <= ahead <= 11 * 60, skewed.log()
        assert f.semu.calls[0].finished is None, "the job ended before the skewed process swept"
        sweeping_for = latency - (time.monotonic() - f.semu.calls[0].time)
        await f.until(lambda: f.posted()[rec.id], latency + 10, "the long job posted")
        (job,) = await f.until_db(lambda s: jobs_ended(s, [rec.id]), 10, "the job committed")
        print(f"skewed process swept for ~{sweeping_for:.1f} s of the live job; it stayed put")
        assert job.state == "posted" and job.worker_id == live.worker_id, job
        assert job.lease_epoch == 1, job  # never taken over
        assert len(f.semu.calls) == 1 and f.posted() == Counter({rec.id: 1}), f.logs()
        assert "taken over" not in skewed.log()
        # and the skewed process serves the shared queue like any other
        f.semu.latency = 0.3
        rec2 = await f.kontext(other, "a job received by the skewed process", "skewed")
        await f.until(lambda: f.posted()[rec2.id], 20, "the second job posted")
        await f.until_db(lambda s: jobs_ended(s, [rec2.id]), 10, "the second job committed")
        assert len(f.semu.calls) == 2 and f.posted() == Counter({rec.id: 1, rec2.id: 1})
        await assert_money(f, [rec, rec2])


# --- 5. a minute without Postgres ------------------------------------------------------------------

OUTAGE_S = 60.0


@dataclass
class PostgresServer:
    """A Postgres server the test may stop: a private throwaway cluster (``initdb``, own port,
    own socket directory), so stopping it touches no one else's databases; or, without the
    server binaries, the shared server with this database refusing connections."""

    url: str
    mode: str
    _down: Callable[[], Any]
    _up: Callable[[], Any]

    async def down(self) -> None:
        await self._down()

    async def up(self) -> None:
        await self._up()
        await self.answering()

    async def answering(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # answering again
            try:
                conn = await asyncpg.connect(_dsn(self.url), timeout=2)
                await conn.close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


def _postgres_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    return Path(found[-1]).parent if found else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path))


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {proc.returncode}: {out.decode(errors='replace')}")


@contextlib.asynccontextmanager
async def postgres_server() -> AsyncIterator[PostgresServer]:
    bindir = _postgres_bindir()
    runas: list[str] = []
    owner: int | None = None
    if bindir is not None and os.geteuid() == 0:  # initdb refuses root: run it as "postgres"
        try:
            owner = pwd.getpwnam("postgres").pw_uid
        except KeyError:
            bindir = None
        runner = shutil.which("runuser")
        if runner is None:
            bindir = None
        runas = [runner or "runuser", "-u", "postgres", "--"]
    if bindir is None:
        async with _shared_server() as server:
            yield server
        return
    root = Path(tempfile.mkdtemp(prefix="kontext-pg-"))
    if owner is not None:
        os.chown(root, owner, -1)
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg_ctl = [*runas, str(bindir / "pg_ctl"), "-D", str(data)]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"

    async def start() -> None:
        await _run(*pg_ctl, "-o", options, "-l", str(root / "server.log"), "-w", "-t", "30", "start")

    async def stop() -> None:
        await _run(*pg_ctl, "-m", "fast", "-w", "-t", "30", "stop")

    try:
        await _run(
            *runas, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )
        await start()
        server = PostgresServer(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", "a private server, stopped", stop, start
        )
        await server.answering()
        yield server
    finally:
        with contextlib.suppress(Exception):
            await _run(*pg_ctl, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def _shared_server() -> AsyncIterator[PostgresServer]:
    from tests.e2e.test_database_faults import kill_connections, set_allow_connections

    await ensure_postgres()
    async with temp_postgres_url() as url:
        name = make_url(url).database or ""

        async def refuse() -> None:
            await set_allow_connections(name, False)
            await kill_connections(name)

        async def allow() -> None:
            await set_allow_connections(name, True)

        server = PostgresServer(url, "the shared server refusing this database", refuse, allow)
        try:
            yield server
        finally:
            await allow()


async def test_a_minute_without_postgres_runs_no_job_twice(tmp_path: Path) -> None:
    """Two processes, 2 jobs at the API and 2 waiting when Postgres stops for 60 s. Meanwhile
    nothing is posted (no lease can be renewed), nothing new starts, and a member who asks is
    told plainly, not charged. When it is back: the 2 that were at the API are refunded once
    (their leases expired; their results were never posted), the 2 waiting run. One API call
    per job, nothing posted twice, the money rules hold."""
    async with postgres_server() as server, fleet(server.url, tmp_path, latency=4.0) as f:
        env = {"MAX_CONCURRENT_JOBS": "2", "KONTEXT_LEASE_SECONDS": "3"}
        await f.start("a", **env)
        await f.start("b", **env)
        users = f.members(5)
        recs = [await f.kontext(u, f"outage {i}", "ab"[i % 2]) for i, u in enumerate(users[:4])]
        ids = [r.id for r in recs]
        await f.until(lambda: len(f.semu.calls) == 2, 15, "two jobs at the API")
        await f.until_db(lambda s: _eq(s.queue.count_waiting(), 2), 10, "two jobs waiting")
        async with f.store() as store:
            at_api = {j.id for j in [await store.jobs.get(i) for i in ids] if j and j.state in LEASED_STATES}
        assert len(at_api) == 2

        down_at = time.monotonic()
        await server.down()
        late = await f.kontext(users[4], "asked during the outage", "a")
        await f.until(
            lambda: "not charged" in ((late.original or {}).get("content") or ""), 30,
            "the member asking during the outage told plainly",
        )

        def quiet() -> bool:
            return not f.posted() and len(f.semu.calls) == 2 and all(b.running for b in f.bots)

        await f.stays(quiet, OUTAGE_S - (time.monotonic() - down_at), "something moved while down")
        assert all(c.finished is not None for c in f.semu.calls)  # the API answered meanwhile
        f.semu.latency = 0.5
        await server.up()
        back_at = time.monotonic()
        print(f"\nPostgres ({server.mode}) away for {back_at - down_at:.1f} s")

        waiting = [i for i in ids if i not in at_api]
        await f.until(lambda: all(f.posted()[i] for i in waiting), 60, "the waiting jobs posted")
        await f.until_db(lambda s: jobs_ended(s, ids), 60, "every job settled")
        for rec in recs:
            if rec.id in at_api:
                await f.until(
                    lambda rec=rec: RESTART_TEXT in ((rec.original or {}).get("content") or ""),
                    15, "the members of the interrupted jobs told of the refund",
                )
        print(f"all settled {time.monotonic() - back_at:.1f} s after Postgres came back")
        assert f.posted() == Counter({i: 1 for i in waiting}), f.logs()
        assert len(f.semu.calls) == 4 and max(f.calls_per_prompt().values()) == 1, f.logs()
        async with f.store() as store:
            assert await store.jobs.get(late.id) is None
            assert (await store.credits.member_status(f.guild, users[4])).balance == 10
        await assert_money(f, recs, refunded=at_api)

"""Run one chaos plan: real ``python bot.py`` processes on one database, the Discord and Segmind
emulators, the jobs and faults of :mod:`tests.chaos.schedule`; then wait (bounded) until every
job is finished and check the invariants (:mod:`tests.chaos.checks`).

    result = await run_plan(plan(seed, "postgres", jobs=20), workdir)
    print(result.report())
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from emulators.discord import DiscordEmulator, InteractionRecord
from emulators.discord.faults import FaultRule
from emulators.segmind import SegmindEmulator
from kontext.schema import jobs
from kontext.store import Store
from kontext.vocab import JobState
from tests.chaos.schedule import Fault, Job, Plan
from tests.dbutil import make_settings
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image
from tests.e2e.procbot import BotProcess, result_ids, result_posts, start_bot

#: a job in any other state is unfinished (``accepted``, ``claimed``, ``sent``, ``posting``; also
#: the old ``running`` of a database before revision 0003)
FINISHED = frozenset({JobState.POSTED, JobState.REFUNDED, JobState.FAILED})
STARTING_CREDITS = 100
READ_MESSAGE_HISTORY = 1 << 16
#: where a result is uploaded: the interaction's follow-up, or the channel (the fallback)
UPLOAD_ROUTES = {"followup": r"^/webhooks/\d+/[^/]+$", "channel": r"^/channels/\d+/messages$"}
#: seconds after the schedule ends (and every fault is lifted) by which every job is finished
DEFAULT_BOUND_S = 60.0


def bot_env(plan: Plan) -> dict[str, str]:
    return {
        "SEGMIND_API_MODE": plan.mode,
        "KONTEXT_LEASE_SECONDS": f"{plan.lease_s:g}",
        # the README's bound, shortened like the lease: a post whose channel cannot be read is
        # settled by the stated rule within this (600 s in production)
        "KONTEXT_SETTLE_SECONDS": "12",
        "MAX_CONCURRENT_JOBS": "3",
        "SEGMIND_RPM": "10000",
        "JOBS_PER_MEMBER": "2",
        "STARTING_CREDITS": str(STARTING_CREDITS),
        "DAILY_BUDGET_USD": "100000",
        "GUILD_DAILY_BUDGET_USD": "0",
        "SHUTDOWN_GRACE_SECONDS": "5",
        "SEGMIND_TIMEOUT_SECONDS": "6",
        "LOG_LEVEL": "INFO",
    }


def store_settings() -> Any:
    return make_settings(daily_budget_usd=100000.0, guild_daily_budget_usd=0.0,
                         starting_credits=STARTING_CREDITS)


def libfaketime() -> str | None:
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


# --- the database: down, up, connections dropped ----------------------------------------------


class DbControl:
    """Outages of the bots' database. Postgres: the database refuses connections and every
    connection is terminated (``ALLOW_CONNECTIONS false`` + ``pg_terminate_backend``). SQLite:
    another process holds an exclusive lock on the file (every write fails "database is
    locked" once the bots' busy timeout runs out)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = "sqlite" if url.startswith("sqlite") else "postgres"
        self._lock: sqlite3.Connection | None = None
        self.down_now = False

    async def down(self) -> None:
        if self.backend == "postgres":
            from tests.e2e.test_database_faults import kill_connections, set_allow_connections

            name = make_url(self.url).database or ""
            await set_allow_connections(name, False)
            await kill_connections(name)
        else:
            path = make_url(self.url).database or ""

            def lock() -> sqlite3.Connection:
                conn = sqlite3.connect(path, timeout=30, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("BEGIN EXCLUSIVE")
                return conn

            self._lock = await asyncio.to_thread(lock)
        self.down_now = True

    async def up(self) -> None:
        if not self.down_now:
            return
        if self.backend == "postgres":
            from tests.e2e.test_database_faults import set_allow_connections

            await set_allow_connections(make_url(self.url).database or "", True)
        elif self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None
        self.down_now = False

    async def drop(self) -> None:
        if self.backend == "postgres":
            from tests.e2e.test_database_faults import kill_connections

            await kill_connections(make_url(self.url).database or "")


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Slot:
    """One bot process position: what runs there now and the environment it restarts with."""

    index: int
    env: dict[str, str]
    bot: BotProcess | None = None
    generation: int = 0
    #: one stop/restart at a time (two faults may pick the same process)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class RunResult:
    plan: Plan
    jobs_made: int
    faults: Counter[str]
    violations: list[str]
    notes: list[str]
    elapsed_s: float
    logs: dict[str, str] = field(default_factory=dict)
    states: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"
        states = " ".join(f"{k} {v}" for k, v in sorted(self.states.items()))
        return (
            f"seed {self.plan.seed} {self.plan.backend}/{self.plan.mode} bots={self.plan.bots}: "
            f"{self.jobs_made} jobs ({states}), {sum(self.faults.values())} faults ({faults}), "
            f"{len(self.violations)} violations, {self.elapsed_s:.0f} s"
        )

    def report(self, *, log_lines: int = 12) -> str:
        """The summary; on failure also the schedule, the run's notes, the violations and the
        bots' log lines that name the jobs in question."""
        if self.ok:
            return self.summary()
        out = [self.summary(), "violations:"]
        out += ["  " + v for v in self.violations]
        out += ["schedule (replay: the same seed, backend and job count):", self.plan.describe()]
        out += ["what happened:"] + ["  " + n for n in self.notes]
        ids = sorted({m for v in self.violations for m in re.findall(r"job (\d+)", v)})
        for job_id in ids[:8]:
            out.append(f"log lines naming job {job_id}:")
            for name, text in self.logs.items():
                lines = [ln for ln in text.splitlines() if job_id in ln]
                out += [f"  [{name}] {ln}" for ln in lines[-log_lines:]]
        return "\n".join(out)


class Run:
    def __init__(self, plan: Plan, demu: DiscordEmulator, semu: SegmindEmulator, url: str,
                 workdir: Path) -> None:
        self.plan = plan
        self.demu = demu
        self.semu = semu
        self.url = url
        self.workdir = workdir
        self.db = DbControl(url)
        guild = demu.add_guild(name="Chaos Server")
        self.guild = guild.id
        self.channels = [int(demu.add_channel(guild.id, name=f"chan-{i}")["id"])
                         for i in range(plan.channels)]
        self.members = [int(demu.add_member(guild.id, name=f"m{i}")["user"]["id"])
                        for i in range(plan.members)]
        env = bot_env(plan)
        self.slots = [Slot(i, dict(env)) for i in range(plan.bots)]
        self.recs: dict[int, InteractionRecord] = {}  # job index -> interaction
        self.deleted: Counter[int] = Counter()  # job id -> result messages the schedule deleted
        self.faults: Counter[str] = Counter()
        self.notes: list[str] = []
        self.history_rules: dict[int, FaultRule] = {}  # channel index -> the 403 rule
        self.every_bot: list[BotProcess] = []
        self.t0: float | None = None  # the schedule's start (None while the fleet starts)
        self._start_lock = asyncio.Lock()

    def note(self, text: str) -> None:
        at = "  setup " if self.t0 is None else f"{time.monotonic() - self.t0:7.2f}s"
        self.notes.append(f"{at}  {text}")

    # --- processes ---

    async def start(self, slot: Slot, deadline_s: float = 60.0) -> None:
        """Start the slot's process and wait for its gateway connection; a process that exits
        first (e.g. the database is down at start) is started again until ``deadline_s``."""
        async with self._start_lock:
            deadline = time.monotonic() + deadline_s
            while True:
                old = {id(c) for c in self.demu._gateway_connections}
                slot.generation += 1
                name = f"bot{slot.index}.{slot.generation}"
                bot = await start_bot(self.demu, self.semu, self.url, workdir=self.workdir,
                                      name=name, **slot.env)
                slot.bot = bot
                self.every_bot.append(bot)

                def ready(bot: BotProcess = bot, old: set[int] = old) -> bool:
                    new = [c for c in self.demu.connections if id(c) not in old]
                    return not bot.running or bool(new and self.demu.find_command("kontext"))

                await self._until(ready, max(0.0, deadline - time.monotonic()))
                if bot.running and ready():
                    self.note(f"{name} up (pid {bot.pid})")
                    return
                self.note(f"{name} did not come up (exit {bot.proc.returncode}); again")
                bot.kill()
                with contextlib.suppress(Exception):
                    await bot.wait(10)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not come up in {deadline_s} s")
                await self._until(lambda: not self.db.down_now, 30)

    async def stop(self, slot: Slot, *, kill: bool) -> None:
        bot = slot.bot
        if bot is None or not bot.running:
            return
        if kill:
            bot.kill()
            await bot.wait(10)
            self.note(f"{bot.name} killed (-9)")
        else:
            took = time.monotonic()
            code = await bot.stop(timeout=15)
            self.note(f"{bot.name} SIGTERM -> exit {code} in {time.monotonic() - took:.1f} s")

    async def _until(self, check: Callable[[], Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # --- jobs ---

    async def submit(self, job: Job) -> None:
        live = await self._until(lambda: bool(self.demu.connections), 30)
        conns = self.demu.connections
        if not live or not conns:
            self.note(f"job {job.index}: no bot connected, not sent")
            return
        conn = conns[job.bot % len(conns)]
        try:
            rec = await self.demu.invoke_slash(
                "kontext",
                {
                    "image_1": (make_image(), "one.png", "image/png"),
                    "image_2": (make_image(colour="blue"), "two.png", "image/png"),
                    "prompt": f"put the hat on the cat {job.tag} seed {self.plan.seed}",
                },
                user_id=self.members[job.member], guild_id=self.guild,
                channel_id=self.channels[job.channel], to=conn,
            )
        except Exception as exc:  # noqa: BLE001 - the connection went away meanwhile
            self.note(f"job {job.index}: interaction not delivered ({exc!r})")
            return
        self.recs[job.index] = rec

    # --- faults ---

    async def inject(self, fault: Fault) -> None:
        self.faults[fault.kind] += 1
        a = fault.args
        kind = fault.kind
        self.note(f"fault {kind} {a}")
        if kind in ("kill9", "sigterm"):
            slot = self.slots[a["bot"]]
            async with slot.lock:
                await self.stop(slot, kill=kind == "kill9")
                await asyncio.sleep(a["restart_after"])  # the schedule's pause before restarting
                await self.start(slot)
        elif kind == "clock":
            slot = self.slots[a["bot"]]
            lib = libfaketime()
            async with slot.lock:
                await self.stop(slot, kill=a["kill"])
                if lib is None:
                    self.note("libfaketime missing: restarted without a moved clock")
                else:
                    slot.env.update(LD_PRELOAD=lib, FAKETIME=f"{a['skew_s']:+d}",
                                    DONT_FAKE_MONOTONIC="1")
                await self.start(slot)
        elif kind == "db_outage":
            if self.db.down_now:
                return
            await self.db.down()
            await asyncio.sleep(a["seconds"])  # the outage's planned length
            await self.db.up()
            self.note("database back")
        elif kind == "db_drop":
            if not self.db.down_now:
                await self.db.drop()
        elif kind == "discord_5xx":
            self.demu.fail_next("POST", UPLOAD_ROUTES[a["route"]], a["status"], process=True)
        elif kind == "discord_drop":
            self.demu.faults.drop_next("POST", UPLOAD_ROUTES[a["route"]])
        elif kind == "gateway_drop":
            await self.demu.disconnect_all()
        elif kind == "history_removed":
            await self.remove_history(a["channel"], a["seconds"])
        elif kind == "delete_result":
            self.delete_newest_result(self.channels[a["channel"]])
        elif kind == "segmind_429":
            self.semu.fail_next(429, times=a["times"])
        elif kind == "segmind_5xx":
            self.semu.fail_next(a["status"], times=a["times"])
        elif kind == "segmind_timeout":
            self.semu.hang_next()
        elif kind == "segmind_reset":
            self.semu.reset_next()
        else:  # pragma: no cover - a kind without an injector
            raise ValueError(kind)

    async def remove_history(self, index: int, seconds: float | None) -> None:
        cid = self.channels[index]
        if index in self.history_rules:
            return
        self.demu.set_overwrite(cid, self.demu.bot_user_id, deny=READ_MESSAGE_HISTORY,
                                member=True)
        self.history_rules[index] = self.demu.fail_next(
            "GET", rf"^/channels/{cid}/messages(/\d+)?$", 403, code=50001,
            message="Missing Access", times=None,
        )
        if seconds is None:
            return  # removed for the rest of the run
        await asyncio.sleep(seconds)  # the planned length of the removal
        self.restore_history(index)

    def restore_history(self, index: int) -> None:
        rule = self.history_rules.pop(index, None)
        if rule is None:
            return
        rule.times = rule.hits  # used up: the channel can be read again
        self.demu.set_overwrite(self.channels[index], self.demu.bot_user_id, member=True)
        self.note(f"read history restored in chan-{index}")

    def delete_newest_result(self, cid: int) -> None:
        for msg in reversed(self.demu.public_messages(cid)):
            ids = result_ids(msg)
            if ids:
                self.demu.store.delete(msg)  # a moderator deletes it
                for job_id in ids:
                    self.deleted[job_id] += 1
                self.note(f"deleted the result of job {ids[0]} (message {msg['id']})")
                return
        self.note("no result to delete")

    # --- afterwards ---

    async def lift_faults(self) -> None:
        """Every fault with an end ends: the database is up, unconsumed emulator faults are
        dropped (Read Message History stays removed where the schedule said "until the end"),
        and every slot has a running process."""
        await self.db.up()
        self.semu.clear_faults()
        keep = set(map(id, self.history_rules.values()))
        for rule in self.demu.faults.rules:
            if id(rule) not in keep:
                rule.times = rule.hits
        for slot in self.slots:
            async with slot.lock:
                if slot.bot is None or not slot.bot.running:
                    if slot.bot is not None:
                        self.note(f"{slot.bot.name} found dead (exit {slot.bot.proc.returncode})")
                    await self.start(slot)

    async def stop_all(self) -> None:
        await asyncio.gather(
            *(b.stop(timeout=10) for b in self.every_bot if b.running), return_exceptions=True
        )

    def posted(self) -> Counter[int]:
        """Result messages per job id in every channel (live, public)."""
        return result_posts(self.demu)

    def logs(self) -> dict[str, str]:
        return {b.name: b.log() for b in self.every_bot}


@contextlib.asynccontextmanager
async def open_store(url: str) -> AsyncIterator[Store]:
    store = await Store.open(url, store_settings())
    try:
        yield store
    finally:
        await store.close()


async def job_states(store: Store) -> dict[int, str]:
    async with store.db.read() as conn:
        return {int(i): str(s) for i, s in await conn.execute(select(jobs.c.id, jobs.c.state))}


#: an interaction that reached a bot has its job row (or its refusal) within this: the job table
#: must show every job finished for this long before the wait ends (a job sent just before the
#: schedule ended may not have its row yet)
SETTLED_FOR_S = 3.0


async def wait_finished(run: Run, bound_s: float) -> dict[int, str]:
    """Poll the job table until no job is unfinished (for :data:`SETTLED_FOR_S` in a row) or
    ``bound_s`` passed; the last states."""
    deadline = time.monotonic() + bound_s
    states: dict[int, str] = {}
    settled_since: float | None = None
    async with open_store(run.url) as store:
        while True:
            with contextlib.suppress(Exception):  # a connection the outage broke is replaced
                states = await job_states(store)
                if all(s in FINISHED for s in states.values()):
                    settled_since = settled_since or time.monotonic()
                    if time.monotonic() - settled_since >= SETTLED_FOR_S:
                        return states
                else:
                    settled_since = None
            if time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.25)


async def _at(t0: float, at: float, action: Callable[[], Awaitable[None]]) -> None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))  # the schedule's own clock
    await action()


async def run_plan(plan: Plan, url: str, workdir: Path, *, bound_s: float = DEFAULT_BOUND_S,
                   ) -> RunResult:
    """Run ``plan`` on the (fresh) database ``url``; returns the result and its violations."""
    from tests.chaos.checks import check_run

    started = time.monotonic()
    async with (
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY, latency=plan.latency_s) as semu,
    ):
        run = Run(plan, demu, semu, url, workdir)
        violations: list[str] = []
        states: dict[int, str] = {}
        try:
            for slot in run.slots:
                await run.start(slot)
            run.t0 = t0 = time.monotonic()
            tasks = [asyncio.create_task(_at(t0, j.at, partial(run.submit, j))) for j in plan.jobs]
            tasks += [asyncio.create_task(_at(t0, f.at, partial(run.inject, f)))
                      for f in plan.faults]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    run.note(f"harness error: {r!r}")
            await run.lift_faults()
            run.note(f"schedule over; faults lifted; waiting up to {bound_s:g} s")
            lifted = time.monotonic()
            states = await wait_finished(run, bound_s)
            run.note(f"waited {time.monotonic() - lifted:.1f} s for the jobs to finish")
            await run.stop_all()
            violations = await check_run(run)
        finally:
            await run.stop_all()
            await run.db.up()
        return RunResult(plan, len(states), run.faults, violations, run.notes,
                         time.monotonic() - started, run.logs(), Counter(states.values()))

"""Gateway shards (``SHARD_COUNT`` / ``SHARD_IDS``) with the real bot as OS processes.

The Discord emulator routes a guild's events and interactions only to the connection whose shard
owns it (``(guild_id >> 22) % shard_count``), as Discord does. The job queue is in the database,
shared by every process whatever its shards:

1. two processes, ``SHARD_IDS=0`` and ``SHARD_IDS=1`` of ``SHARD_COUNT=2``, one guild on each
   shard: each process connects with its own shard and sees only its guild; each guild's
   ``/kontext`` reaches only the process owning it; each job is posted once and charged once
   (SQLite file, and Postgres when a server is there);
2. a job runs in whichever process has capacity, whatever shard received the command: three
   jobs received by the shard-0 process; it is stopped (SIGTERM) while running the first one;
   the shard-1 process runs and posts the other two, in the shard-0 guild's channel, through
   the members' interactions;
3. one process with ``SHARD_IDS=0,1`` (the auto-sharded client) connects both shards and serves
   both guilds.

Nothing waits a fixed time: every wait is on the emulators, the database or a process's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulators.discord import (
    DiscordEmulator,
    GatewayConnection,
    InteractionRecord,
)
from emulators.segmind import SegmindEmulator
from kontext.store import Store
from tests.dbutil import backend_url, make_settings
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image
from tests.e2e.procbot import BotProcess, logs, result_posts, start_bot, wait_logged

SHARDS = 2


def shard_of(guild_id: int, count: int = SHARDS) -> int:
    """Discord's rule: the shard that receives a guild's events."""
    return (guild_id >> 22) % count


def database(backend: str, tmp_path: Path) -> contextlib.AbstractAsyncContextManager[str]:
    return backend_url(backend, tmp_path, "shards.db")


@dataclass
class Place:
    """A guild of the world, its channel and members."""

    guild: int
    channel: int
    members: list[int]


@dataclass
class World:
    """Both emulators, one guild per shard, one database, the bot processes on it."""

    demu: DiscordEmulator
    semu: SegmindEmulator
    url: str
    tmp: Path
    places: dict[int, Place] = field(default_factory=dict)  # by shard
    bots: list[BotProcess] = field(default_factory=list)

    def add_guild_on_shard(self, shard: int, members: int) -> Place:
        """A guild on ``shard``: the emulator's snowflakes are taken until one falls on it (the
        shard comes from the id's millisecond part, so this takes at most a millisecond or so)."""
        while shard_of(gid := self.demu.snowflake()) != shard:
            pass
        guild = self.demu.add_guild(gid, name=f"Shard {shard} Server")
        assert shard_of(guild.id) == shard
        channel = int(self.demu.add_channel(guild.id, name="general")["id"])
        users = [
            int(self.demu.add_member(guild.id, name=f"s{shard}-m{i}")["user"]["id"])
            for i in range(members)
        ]
        place = Place(guild.id, channel, users)
        self.places[shard] = place
        return place

    async def start(
        self, name: str, shards: int = 1, **env: str
    ) -> tuple[BotProcess, list[GatewayConnection]]:
        """Start ``python bot.py`` and wait until its ``shards`` gateway connections are up (READY
        and the guilds sent) and ``/kontext`` exists; returns them in shard order."""
        old = {id(c) for c in self.demu._gateway_connections}
        bot = await start_bot(
            self.demu, self.semu, self.url, workdir=self.tmp, name=name, DYNO=name, **env
        )
        self.bots.append(bot)

        def mine() -> list[GatewayConnection] | None:
            if not bot.running:
                raise AssertionError(f"{name} exited with {bot.proc.returncode}\n{logs(bot)}")
            new = [c for c in self.demu.connections if id(c) not in old]
            if len(new) >= shards and self.demu.find_command("kontext") is not None:
                return sorted(new, key=lambda c: c.shard or (0, 0))
            return None

        try:
            conns = await self.demu.wait_until(mine, 30, description=f"{name} connected")
        except TimeoutError:
            raise AssertionError(f"{name} did not connect\n{logs(bot)}") from None
        return bot, conns

    async def kontext(self, shard: int, member: int, prompt: str) -> InteractionRecord:
        """``/kontext`` in the guild on ``shard``, sent as Discord would (to its shard only)."""
        place = self.places[shard]
        return await self.demu.invoke_slash(
            "kontext",
            {
                "image_1": (make_image(), "one.png", "image/png"),
                "image_2": (make_image(colour="blue"), "two.png", "image/png"),
                "prompt": prompt,
            },
            user_id=place.members[member],
            guild_id=place.guild,
            channel_id=place.channel,
            to="all",
        )

    def posted(self, channel: int | None = None) -> Counter[int]:
        """How many public messages carry each job's result (``kontext-<job id>.<ext>``)."""
        return result_posts(self.demu, channel)

    def logs(self) -> str:
        return logs(*self.bots)

    async def until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        try:
            return await self.demu.wait_until(check, timeout, description=what)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s: {what}\n{self.logs()}") from None

    async def until_db(self, check: Callable[[Store], Any], timeout: float, what: str) -> Any:
        """Poll the database (``await check(store)``) every 20 ms until it is truthy."""
        deadline = time.monotonic() + timeout
        async with self.store() as store:
            while True:
                value = await check(store)
                if value:
                    return value
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout} s: {what}\n{self.logs()}")
                await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        store = await Store.open(self.url, make_settings())
        try:
            yield store
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def world(url: str, tmp: Path, *, latency: float, members: int = 1) -> AsyncIterator[World]:
    """The emulators and one guild on each of the two shards (none connected yet)."""
    async with (
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY, latency=latency) as semu,
    ):
        w = World(demu, semu, url, tmp)
        for shard in range(SHARDS):
            w.add_guild_on_shard(shard, members)
        try:
            yield w
        except BaseException:
            print(w.logs())
            raise
        finally:
            await asyncio.gather(*(b.stop(timeout=10) for b in w.bots), return_exceptions=True)


async def jobs_ended(store: Store, ids: list[int]) -> list[Any] | None:
    found = [await store.jobs.get(i) for i in ids]
    if all(j is not None and j.state == "posted" for j in found):
        return found
    return None


def result_followups(rec: InteractionRecord) -> list[dict[str, Any]]:
    return [m for m in rec.followups if m.get("attachments")]


def guilds_sent(conn: GatewayConnection) -> set[int]:
    """The guilds the emulator announced on ``conn`` (READY's list and GUILD_CREATEs)."""
    seen: set[int] = set()
    for frame in conn.sent:
        if frame.get("t") == "READY":
            seen |= {int(g["id"]) for g in frame["d"]["guilds"]}
        elif frame.get("t") == "GUILD_CREATE":
            seen.add(int(frame["d"]["id"]))
    return seen


async def assert_each_charged_once(w: World, recs: list[InteractionRecord]) -> None:
    """Every job posted, a reservation and a commit each, balances agree, invariants hold."""
    async with w.store() as store:
        assert await store.audit.check_invariants() == [], w.logs()
        assert await store.jobs.count_active() == 0
        for rec in recs:
            job = await store.jobs.get(rec.id)
            assert job is not None and job.state == "posted", (job, w.logs())
            kinds = sorted(
                e.kind
                for e in await store.credits.recent(rec.guild_id, rec.user_id, limit=50)
                if e.job_id == rec.id
            )
            assert kinds == ["commit", "reserve"], (rec.id, kinds)
            status = await store.credits.member_status(rec.guild_id, rec.user_id)
            assert status.balance == 10 - job.cost_credits, (rec.user_id, status)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def healthz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status, await resp.json()


# --- 1. one process per shard ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_one_process_per_shard_each_guild_served_by_its_own(
    backend: str, tmp_path: Path
) -> None:
    async with database(backend, tmp_path) as url, world(url, tmp_path, latency=0.05) as w:
        env = {"SHARD_COUNT": str(SHARDS)}
        bots: dict[int, BotProcess] = {}
        conns: dict[int, GatewayConnection] = {}
        ports = {shard: free_port() for shard in range(SHARDS)}
        for shard in range(SHARDS):
            bots[shard], (conns[shard],) = await w.start(
                f"shard{shard}", SHARD_IDS=str(shard), PORT=str(ports[shard]), **env
            )
        for shard, conn in conns.items():
            # it identified with its shard, and Discord announced only that shard's guild
            assert conn.identify is not None and conn.identify.get("shard") == [shard, SHARDS]
            assert conn.shard == (shard, SHARDS)
            assert guilds_sent(conn) == {w.places[shard].guild}, w.logs()
            await wait_logged(bots[shard], "in 1 server(s)")  # on_ready saw its one guild
            status, body = await healthz(ports[shard])
            assert status == 200 and body["gateway_connected"] is True, (body, w.logs())

        recs = {shard: await w.kontext(shard, 0, f"on shard {shard}") for shard in range(SHARDS)}
        for shard, rec in recs.items():
            assert rec.delivered_to == [conns[shard].number], (shard, rec.delivered_to)
        await w.until(
            lambda: all(result_followups(r) for r in recs.values()), 30, "both results posted"
        )
        ids = [r.id for r in recs.values()]
        await w.until_db(lambda s: jobs_ended(s, ids), 10, "both jobs committed")
        for shard, rec in recs.items():
            assert len(rec.responses) == 1 and rec.deferred, rec.responses
            assert not rec.rejected, rec.rejected
            assert len(result_followups(rec)) == 1, w.logs()
            assert w.posted(w.places[shard].channel) == Counter({rec.id: 1}), w.logs()
        assert len(w.semu.calls) == 2 and w.semu.charged_count == 2, w.logs()
        for shard in range(SHARDS):  # the processes stop cleanly
            assert await bots[shard].stop(timeout=20) == 0, w.logs()
        await assert_each_charged_once(w, list(recs.values()))


# --- 2. a job runs wherever there is capacity -----------------------------------------------------


class ApiGate:
    """Holds every Segmind generation (inputs fetched, before its latency) until :meth:`open`.

    The test uses it to keep the shard-0 process's first job running until the shard-1 process
    is connected and the shard-0 one was told to stop.
    """

    def __init__(self, semu: SegmindEmulator) -> None:
        self._opened = asyncio.Event()
        original = semu._pause

        async def pause(seconds: float) -> bool:
            await self._opened.wait()
            return await original(seconds)

        semu._pause = pause  # type: ignore[method-assign]

    def open(self) -> None:
        self._opened.set()


async def test_jobs_received_on_shard0_run_in_the_shard1_process_when_shard0_stops(
    tmp_path: Path,
) -> None:
    """MAX_CONCURRENT_JOBS=1, 1.5 s per job. Three members of the shard-0 guild send /kontext to
    the shard-0 process, which runs one of them. It gets SIGTERM while that one runs (the shard-1
    process is up): that job is posted by it before it exits; the shard-1 process runs the two
    waiting jobs and posts them in the shard-0 guild's channel as the members' follow-ups."""
    url = f"sqlite:///{tmp_path / 'shards.db'}"
    async with world(url, tmp_path, latency=1.5, members=3) as w:
        gate = ApiGate(w.semu)
        env = {
            "SHARD_COUNT": str(SHARDS),
            "MAX_CONCURRENT_JOBS": "1",
            "SHUTDOWN_GRACE_SECONDS": "20",
            "KONTEXT_LEASE_SECONDS": "6",
            "KONTEXT_QUEUE_POLL_SECONDS": "0.2",
        }
        # the shard-1 process starts once the shard-0 one claimed the first job (with both up,
        # either could claim it the moment it is queued); the gate keeps that job at the API
        # until the shard-1 process is up and the shard-0 one stopped claiming
        shard0, (conn0,) = await w.start("shard0", SHARD_IDS="0", **env)
        recs = [await w.kontext(0, m, f"member {m}") for m in range(3)]
        assert all(r.delivered_to == [conn0.number] for r in recs)
        ids = [r.id for r in recs]

        async def one_running_two_waiting(store: Store) -> list[int] | None:
            """The ids, the running one first (the three arrive at once: any may be first)."""
            jobs = [await store.jobs.get(i) for i in ids]
            if any(j is None for j in jobs):
                return None
            states = sorted((j.state, j.id) for j in jobs if j is not None)
            if [st for st, _ in states] != ["accepted", "accepted", "sent"]:
                return None
            return [states[2][1], states[0][1], states[1][1]]

        ids = await w.until_db(one_running_two_waiting, 15, "one job running, two waiting")
        await w.until(lambda: w.semu.in_flight == 1, 10, "the first job at the API")
        shard1, (conn1,) = await w.start("shard1", SHARD_IDS="1", **env)
        assert conn1.shard == (1, SHARDS) and guilds_sent(conn1) == {w.places[1].guild}
        await wait_logged(shard1, "in 1 server(s)")

        shard0.proc.send_signal(signal.SIGTERM)  # stop claiming, finish the running job, exit
        await wait_logged(shard0, "2 waiting job(s) stay in the queue")
        await wait_logged(shard0, "waiting up to")  # it claims nothing more from here
        gate.open()
        assert await shard0.wait(timeout=30) == 0, w.logs()
        assert w.posted() == Counter({ids[0]: 1}), w.logs()  # finished within its grace

        channel = w.places[0].channel
        await w.until(
            lambda: all(w.posted(channel)[i] for i in ids), 30, "the two waiting jobs posted"
        )
        found = await w.until_db(lambda s: jobs_ended(s, ids), 10, "every job committed")
        why = w.logs()
        owners = [j.worker_id.split("-")[0] for j in found]
        assert owners == ["shard0", "shard1", "shard1"], (owners, why)
        assert w.posted() == Counter({i: 1 for i in ids}), why
        assert w.posted(channel) == w.posted(), why  # all in the shard-0 guild's channel
        for rec in recs:  # the shard-1 process answered through the stored interactions
            assert len(result_followups(rec)) == 1, (rec, why)
        assert len(w.semu.calls) == 3 and w.semu.charged_count == 3, why
        prompts = Counter(str((c.payload or {}).get("prompt")) for c in w.semu.calls)
        assert max(prompts.values()) == 1, prompts
        assert w.semu.peak_concurrency == 1, why
        assert await shard1.stop(timeout=20) == 0, w.logs()
        await assert_each_charged_once(w, recs)


# --- 3. one process, both shards ------------------------------------------------------------------


async def test_one_process_with_both_shards_serves_both_guilds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shards.db'}"
    async with world(url, tmp_path, latency=0.05) as w:
        port = free_port()
        bot, conns = await w.start(
            "both", shards=SHARDS, SHARD_COUNT=str(SHARDS), SHARD_IDS="0,1", PORT=str(port)
        )
        assert [c.shard for c in conns] == [(0, SHARDS), (1, SHARDS)], conns
        for shard, conn in enumerate(conns):
            assert conn.identify is not None and conn.identify.get("shard") == [shard, SHARDS]
            assert guilds_sent(conn) == {w.places[shard].guild}
        await wait_logged(bot, "in 2 server(s)")  # on_ready once both shards are ready
        status, body = await healthz(port)
        assert status == 200 and body["gateway_connected"] is True, (body, w.logs())

        recs = [await w.kontext(shard, 0, f"both, shard {shard}") for shard in range(SHARDS)]
        for shard, rec in enumerate(recs):
            assert rec.delivered_to == [conns[shard].number]
        await w.until(lambda: all(result_followups(r) for r in recs), 30, "both results posted")
        ids = [r.id for r in recs]
        await w.until_db(lambda s: jobs_ended(s, ids), 10, "both jobs committed")
        for shard, rec in enumerate(recs):
            assert len(result_followups(rec)) == 1
            assert w.posted(w.places[shard].channel) == Counter({rec.id: 1}), w.logs()
        assert len(w.semu.calls) == 2 and w.semu.charged_count == 2, w.logs()
        assert await bot.stop(timeout=20) == 0, w.logs()
        assert "stopped cleanly" in bot.log(), w.logs()
        await assert_each_charged_once(w, recs)

"""``python bot.py`` as its own OS process against the emulators (as ``devtools/demo.py`` does).

The settings come only from the environment; the working directory is a scratch directory (no
``.env``). Tests stop the process with SIGTERM or kill it with SIGKILL, like a PaaS does::

    async with world() as w, bot_process(w, SEGMIND_API_MODE="async") as bot:
        rec = await w.kontext()
        bot.kill()

The bot's stderr (its log) goes to a file; :meth:`BotProcess.output` reads it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.discord import DiscordEmulator, InteractionRecord
from emulators.segmind import SegmindEmulator
from kontext.settings import Settings, settings_from_env
from kontext.store import Store
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image

ROOT = Path(__file__).resolve().parents[2]
BOT = ROOT / "bot.py"
BASE_ENV = {
    "DISCORD_TOKEN": DISCORD_TOKEN,
    "SEGMIND_API_KEY": SEGMIND_KEY,
    "COOLDOWN_SECONDS": "0",
    "JOBS_PER_MEMBER": "1",
    "STARTING_CREDITS": "10",
    "LOG_LEVEL": "DEBUG",
    "PORT": "",
}
_OWN_PREFIXES = ("DISCORD_", "SEGMIND_", "DATABASE_", "KONTEXT_", "SHUTDOWN_", "PORT")


def clean_env(**env: str) -> dict[str, str]:
    """The test process's environment without any bot setting, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    base.update(env)
    return base


async def run_cli(*args: str, env: dict[str, str], timeout: float = 30.0) -> tuple[int, str, str]:
    """Run ``python bot.py *args`` in a scratch directory; return (code, stdout, stderr)."""
    with tempfile.TemporaryDirectory(prefix="kontext-cli-") as tmp:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(BOT), *args, cwd=tmp, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


@dataclass
class World:
    """Both emulators, one server with a channel and members, and a database file."""

    discord: DiscordEmulator
    segmind: SegmindEmulator
    database_url: str
    guild_id: int
    channel_id: int
    member_id: int
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)

    def add_member(self, name: str) -> int:
        return int(self.discord.add_member(self.guild_id, name=name)["user"]["id"])

    async def kontext(self, *, user_id: int | None = None, **options: Any) -> InteractionRecord:
        """Send ``/kontext`` as a member (does not wait for the job)."""
        opts: dict[str, Any] = {
            "image_1": (make_image(), "one.png", "image/png"),
            "image_2": (make_image(colour="blue"), "two.png", "image/png"),
            "prompt": "put the hat from image 2 on the cat in image 1",
            **options,
        }
        return await self.discord.invoke_slash(
            "kontext", opts, user_id=user_id or self.member_id, guild_id=self.guild_id,
            channel_id=self.channel_id,
        )

    def result_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.discord.public_messages(self.channel_id) if m.get("attachments")]

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        """The bot's database, opened from the test (after the bot stopped, or alongside it)."""
        store = await Store.open(self.database_url, self.settings())
        try:
            yield store
        finally:
            await store.close()

    def settings(self) -> Settings:
        return settings_from_env({**BASE_ENV, "DATABASE_URL": self.database_url})


@contextlib.asynccontextmanager
async def world(*, segmind_latency: float = 0.0) -> AsyncIterator[World]:
    with tempfile.TemporaryDirectory(prefix="kontext-proc-", ignore_cleanup_errors=True) as tmp:
        async with DiscordEmulator(token=DISCORD_TOKEN) as demu, SegmindEmulator(
            api_key=SEGMIND_KEY, latency=segmind_latency
        ) as semu:
            guild = demu.add_guild(name="Process Server")
            channel = demu.add_channel(guild.id, name="general")
            member = demu.add_member(guild.id, name="member")
            w = World(
                discord=demu,
                segmind=semu,
                database_url=f"sqlite:///{Path(tmp) / 'kontext.db'}",
                guild_id=guild.id,
                channel_id=int(channel["id"]),
                member_id=int(member["user"]["id"]),
                tmp=Path(tmp),
            )
            w.env = {
                **BASE_ENV,
                "DATABASE_URL": w.database_url,
                "SEGMIND_BASE_URL": semu.base_url,
                "DISCORD_API_BASE_URL": demu.api_base,
                "DISCORD_GATEWAY_URL": demu.gateway_url,
            }
            yield w


@dataclass
class BotProcess:
    """One running ``python bot.py``."""

    proc: asyncio.subprocess.Process
    log_path: Path
    started: float

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> float:
        """SIGTERM; returns the time it was sent."""
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup at all."""
        self.proc.kill()

    async def wait_exit(self, timeout: float = 15.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` every 20 ms until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def bot_process(w: World, name: str = "bot", **env: str) -> AsyncIterator[BotProcess]:
    """Start ``python bot.py`` for ``w``; wait until it is connected and its commands exist."""
    log_path = w.tmp / f"{name}.log"
    old = set(map(id, w.discord._gateway_connections))
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(BOT), cwd=w.tmp, env=clean_env(**{**w.env, **env}),
            stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )
    bot = BotProcess(proc, log_path, time.monotonic())
    try:
        try:
            await until(
                lambda: any(id(c) not in old for c in w.discord.connections)
                and w.discord.find_command("kontext") is not None
                or proc.returncode is not None,
                20,
                "the bot to connect",
            )
            assert proc.returncode is None, bot.output()[-3000:]
        except BaseException:
            print(bot.output()[-3000:])
            raise
        yield bot
    except BaseException:
        print(f"--- {name} log ---\n" + bot.output()[-4000:])
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""Runs the real bot (real discord.py, real cogs, real database) against both emulators.

A :class:`Harness` starts a Discord emulator with one server (a general channel, an
age-restricted channel, a member and an admin), a Segmind emulator, and a :class:`KontextBot`
configured through the same settings a real deployment uses. Tests drive it like a member:
``await h.kontext(...)`` sends a ``/kontext`` interaction and returns when the job has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
from PIL import Image

from bot import KontextBot
from emulators.discord import DiscordEmulator, InteractionRecord
from emulators.segmind import SegmindEmulator
from kontext.logging_setup import RedactingFilter
from kontext.pipeline import JobOutcome
from kontext.services import open_services
from kontext.settings import Settings, settings_from_env

DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.test.discord-token-value-do-not-leak"
SEGMIND_KEY = "SG_test_segmind_key_value_do_not_leak"
MANAGE_GUILD = 1 << 5


def make_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48), colour: str = "red") -> bytes:
    """A small real image."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Harness:
    """Both emulators, the bot, and the ids of the test server."""

    discord: DiscordEmulator
    segmind: SegmindEmulator
    bot: KontextBot
    settings: Settings
    guild_id: int
    channel_id: int
    nsfw_channel_id: int
    member_id: int
    admin_id: int
    outcomes: dict[int, JobOutcome] = field(default_factory=dict)
    #: jobs that reached the pipeline (an outcome will follow); the rest were refused by the cog
    entered: set[int] = field(default_factory=set)
    _outcome_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, outcome: JobOutcome) -> None:
        self.outcomes[outcome.job_id] = outcome
        self._outcome_changed.set()

    async def wait_outcome(self, job_id: int, timeout: float = 15.0) -> JobOutcome:
        """Wait until the pipeline finished the job of interaction ``job_id``."""
        async with asyncio.timeout(timeout):
            while job_id not in self.outcomes:
                self._outcome_changed.clear()
                await self._outcome_changed.wait()
        return self.outcomes[job_id]

    async def kontext(
        self,
        *,
        prompt: str = "put the hat from image 2 on the cat in image 1",
        image_1: bytes | dict[str, Any] | None = None,
        image_2: bytes | dict[str, Any] | None = None,
        user_id: int | None = None,
        channel_id: int | None = None,
        wait: bool = True,
        **options: Any,
    ) -> InteractionRecord:
        """Run ``/kontext`` as a member; with ``wait`` return once the job has ended."""
        opts: dict[str, Any] = {
            "image_1": image_1 if image_1 is not None else (make_image(), "one.png", "image/png"),
            "image_2": image_2 if image_2 is not None else (make_image(colour="blue"), "two.png", "image/png"),
            "prompt": prompt,
            **options,
        }
        rec = await self.discord.invoke_slash(
            "kontext",
            opts,
            user_id=user_id or self.member_id,
            guild_id=self.guild_id,
            channel_id=channel_id or self.channel_id,
        )
        if wait:
            await self.wait_settled(rec)
        return rec

    async def wait_settled(self, rec: InteractionRecord, timeout: float = 15.0) -> None:
        """Wait until the job of ``rec`` ended, or the command answered without a job."""
        await rec.wait_response(timeout)
        async with asyncio.timeout(timeout):
            # a refusal the pipeline tells is on screen a moment before its outcome is recorded
            while rec.id not in self.outcomes and not (
                _answered_without_job(rec) and rec.id not in self.entered
            ):
                self._outcome_changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._outcome_changed.wait()

    async def slash(self, name: str, options: dict[str, Any] | None = None, *, user_id: int | None = None, **kw: Any) -> InteractionRecord:
        rec = await self.discord.invoke_slash(
            name, options or {}, user_id=user_id or self.member_id, guild_id=self.guild_id,
            channel_id=kw.pop("channel_id", self.channel_id), **kw,
        )
        await rec.wait_for(lambda r: r.followups or (r.responses and r.responses[0]["type"] == 4), 10)
        return rec

    def reply_text(self, rec: InteractionRecord) -> str:
        """All text the member saw for ``rec``: contents and embed texts, in order."""
        parts: list[str] = []
        for resp in rec.responses:
            data = resp.get("data") or {}
            parts.append(data.get("content") or "")
        for edit in rec.edits:
            parts.append(edit.get("content") or "")
        for msg in rec.followups:
            parts.append(msg.get("content") or "")
            for e in msg.get("embeds") or []:
                parts.append(e.get("title") or "")
                parts.append(e.get("description") or "")
                for f in e.get("fields") or []:
                    parts.append(f"{f['name']}: {f['value']}")
        return "\n".join(p for p in parts if p)

    def last_status(self, rec: InteractionRecord) -> str:
        """The private status message's current text."""
        return (rec.original or {}).get("content") or ""

    def result_messages(self) -> list[dict[str, Any]]:
        """Public messages in the test channels that carry an image."""
        out = []
        for cid in (self.channel_id, self.nsfw_channel_id):
            out += [m for m in self.discord.public_messages(cid) if m.get("attachments")]
        return out

    async def balance(self, user_id: int | None = None) -> int:
        assert self.bot.store is not None
        status = await self.bot.store.credits.member_status(self.guild_id, user_id or self.member_id)
        return status.balance


def _answered_without_job(rec: InteractionRecord) -> bool:
    """The command finished without starting a job: an error (or refusal) is showing."""
    if not rec.edits and not rec.followups:
        return False
    last = (rec.original or {}).get("content") or ""
    return bool(last) and not last.startswith(("✅", "⏳", "🎨", "📤", "🔄", "**Quote**"))


def test_settings(**env: str) -> Settings:
    base = {
        "DISCORD_TOKEN": DISCORD_TOKEN,
        "SEGMIND_API_KEY": SEGMIND_KEY,
        "COOLDOWN_SECONDS": "0",
        "JOBS_PER_MEMBER": "1",
        "STARTING_CREDITS": "10",
        "LOG_LEVEL": "DEBUG",
    }
    base.update(env)
    return settings_from_env(base)


@contextlib.asynccontextmanager
async def running_bot(settings: Settings, on_outcome: Any = None) -> AsyncIterator[KontextBot]:
    """Open the services, start a KontextBot with them, and stop both afterwards."""
    async with open_services(settings) as services:
        bot = KontextBot(services, guild_ready_timeout=0.05)
        task: asyncio.Task[None] | None = None
        try:
            await bot.login(settings.discord_token)
            if on_outcome is not None:
                bot.pipeline.outcomes.subscribe(on_outcome)
            task = asyncio.create_task(bot.connect(reconnect=False))
            async with asyncio.timeout(15):
                await bot.wait_until_ready()
                await bot.recovered.wait()
            yield bot
        finally:
            if not bot.is_closed():
                await bot.close()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


@contextlib.asynccontextmanager
async def harness(
    database_url: str | None = None, *, segmind_latency: float = 0.0, **env: str
) -> AsyncIterator[Harness]:
    """Everything a test needs, torn down afterwards."""
    with tempfile.TemporaryDirectory(prefix="kontext-e2e-", ignore_cleanup_errors=True) as tmp:
        async with DiscordEmulator(token=DISCORD_TOKEN) as demu, SegmindEmulator(api_key=SEGMIND_KEY, latency=segmind_latency) as semu:
            guild = demu.add_guild(name="Showcase Server")
            general = demu.add_channel(guild.id, name="general")
            nsfw = demu.add_channel(guild.id, name="after-dark", nsfw=True)
            member = demu.add_member(guild.id, name="member")
            admin = demu.add_member(guild.id, name="admin", permissions=MANAGE_GUILD)
            url = database_url or f"sqlite:///{Path(tmp) / 'kontext.db'}"
            settings = test_settings(
                DATABASE_URL=url,
                SEGMIND_BASE_URL=semu.base_url,
                DISCORD_API_BASE_URL=demu.api_base,
                DISCORD_GATEWAY_URL=demu.gateway_url,
                **env,
            )
            outcomes: dict[int, JobOutcome] = {}
            h: Harness | None = None

            def on_outcome(outcome: JobOutcome) -> None:
                if h is not None:
                    h.record(outcome)
                else:
                    outcomes[outcome.job_id] = outcome

            saved_base = discord.http.Route.BASE
            saved_gw = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
            try:
                async with running_bot(settings, on_outcome) as bot:
                    entered: set[int] = set()
                    run = bot.pipeline.run

                    async def tracked_run(spec: Any, sink: Any) -> JobOutcome:
                        entered.add(spec.job_id)
                        return await run(spec, sink)

                    bot.pipeline.run = tracked_run
                    h = Harness(
                        discord=demu,
                        segmind=semu,
                        bot=bot,
                        settings=settings,
                        guild_id=guild.id,
                        channel_id=int(general["id"]),
                        nsfw_channel_id=int(nsfw["id"]),
                        member_id=int(member["user"]["id"]),
                        admin_id=int(admin["user"]["id"]),
                        outcomes=outcomes,
                        entered=entered,
                    )
                    yield h
            finally:
                discord.http.Route.BASE = saved_base
                discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved_gw


class SecretWatch(logging.Handler):
    """Collects every log line of the run, formatted, with the bot's redaction applied."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(RedactingFilter(secrets))
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "true", "yes"}

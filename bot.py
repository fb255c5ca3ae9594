"""Kontext Bot: the entry point.

``python bot.py`` runs the bot; ``python bot.py sync`` forces a sync of the slash commands and
exits. Settings come from the environment and ``.env`` (see ``.env.example``); a bad one prints a
single line naming it and exits with code 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import uuid
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from kontext.errors import KontextError
from kontext.metrics import Metrics
from kontext.queue import JobQueue
from kontext.segmind import SegmindClient
from kontext.settings import Settings, SettingsError, load_settings
from kontext.store import Store

log = logging.getLogger("kontext.bot")

COGS = ("cogs.kontext", "cogs.credits", "cogs.admin")
HEARTBEAT_S = 10.0
STALE_AFTER_S = 45.0


class RedactingFilter(logging.Filter):
    """Replaces every secret value in a log record's text with ``[redacted]``."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is still logged
            return True
        exc_text = None
        if record.exc_info:
            exc_text = logging.Formatter().formatException(record.exc_info)
        changed = False
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
                changed = True
            if exc_text and secret in exc_text:
                exc_text = exc_text.replace(secret, "[redacted]")
                changed = True
        if changed:
            record.msg, record.args = text, None
            if exc_text is not None:
                record.exc_info, record.exc_text = None, exc_text
        return True


def setup_logging(settings: Settings, stream: Any = None) -> logging.Handler:
    """One stream handler on the root logger, secrets redacted, discord.py kept at INFO."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(RedactingFilter(settings.secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    logging.getLogger("discord").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))
    return handler


def point_discord_py_at(settings: Settings) -> None:
    """Development and tests: talk to a local Discord emulator instead of discord.com."""
    if settings.discord_api_base_url:
        discord.http.Route.BASE = settings.discord_api_base_url
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class KontextTree(app_commands.CommandTree["KontextBot"]):
    """Routes every app-command error to one plain, ephemeral reply."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        from cogs.common import reply_error

        original = getattr(error, "original", error)
        if isinstance(original, KontextError):
            await reply_error(interaction, original)
            return
        if isinstance(error, app_commands.CheckFailure):
            await reply_error(interaction, KontextError("check failed", key="error.not_allowed"))
            return
        log.error(
            "command %s failed",
            interaction.command.qualified_name if interaction.command else "?",
            exc_info=original,
        )
        await reply_error(interaction, KontextError(type(original).__name__))


class KontextBot(commands.Bot):
    """The bot: owns the HTTP session, the database and the job services."""

    def __init__(self, settings: Settings, *, force_sync: bool = False, **options: Any) -> None:
        point_discord_py_at(settings)
        discord.VoiceClient.warn_nacl = False  # no voice: don't warn about its libraries
        discord.VoiceClient.warn_dave = False
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            tree_cls=KontextTree,
            help_command=None,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            **options,
        )
        self.settings = settings
        self.force_sync = force_sync
        self.worker_id = f"{os.environ.get('DYNO', 'worker')}-{uuid.uuid4().hex[:12]}"
        self.http_session: aiohttp.ClientSession | None = None
        self.store: Store | None = None
        self.segmind: SegmindClient | None = None
        self.queue: JobQueue | None = None
        self.pipeline: Any = None
        self.health: Any = None
        self.metrics = Metrics()
        self._background: list[asyncio.Task[Any]] = []
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self.shutdown_task: asyncio.Task[None] | None = None
        self.recovered = asyncio.Event()

    async def setup_hook(self) -> None:
        from kontext.pipeline import JobPipeline

        s = self.settings
        self.http_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=50, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        self.store = await Store.open(s.database_url, s)
        await self.store.register_worker(self.worker_id)
        self.segmind = SegmindClient(
            self.http_session,
            api_key=s.segmind_api_key,
            base_url=s.segmind_base_url,
            model=s.segmind_model,
            mode=s.segmind_api_mode,
            timeout_s=s.segmind_timeout_seconds,
        )
        self.queue = JobQueue(
            max_concurrent=s.max_concurrent_jobs, rpm=s.segmind_rpm, max_size=s.max_queue_size
        )
        self.pipeline = JobPipeline(
            settings=s,
            store=self.store,
            client=self.segmind,
            queue=self.queue,
            http=self.http_session,
            worker_id=self.worker_id,
            metrics=self.metrics,
        )
        queue = self.queue
        self.metrics.bind_queue(
            lambda: queue.waiting_count, lambda: queue.running_count, lambda: queue.paused
        )
        for cog in COGS:
            await self.load_extension(cog)
        await self.sync_commands(force=self.force_sync)
        if s.port:
            from kontext.health import HealthServer

            self.health = HealthServer(self, port=s.port)
            await self.health.start()
        self._background.append(asyncio.create_task(self._heartbeat(), name="kontext-heartbeat"))

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync the command tree when it changed since the last sync (or when forced)."""
        assert self.store is not None
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        payload = [c.to_dict(self.tree) for c in self.tree.get_commands(guild=guild)]
        digest = hashlib.sha256(
            json.dumps(payload, sort_keys=True, default=str).encode()
        ).hexdigest()
        meta_key = f"commands_hash:{guild.id if guild else 'global'}"
        if not force and await self.store.get_meta(meta_key) == digest:
            log.info("slash commands unchanged since the last sync; not syncing")
            return False
        synced = await self.tree.sync(guild=guild)
        await self.store.set_meta(meta_key, digest)
        log.info(
            "synced %d slash command(s) %s",
            len(synced),
            f"to server {guild.id}" if guild else "globally (may take a while to show)",
        )
        return True

    # --- health (kontext.health.HealthSource) ---------------------------------------------------

    def gateway_connected(self) -> bool:
        return self.is_ready() and not self.is_closed() and self.ws is not None and self.ws.open

    async def database_ok(self) -> bool:
        return self.store is not None and await self.store.ping()

    def queue_snapshot(self) -> dict[str, int | bool]:
        q = self.queue
        if q is None:
            return {}
        return {"waiting": q.waiting_count, "running": q.running_count, "paused": q.paused}

    async def on_ready(self) -> None:
        log.info("connected as %s (id %s) in %d server(s)", self.user, self.user and self.user.id, len(self.guilds))
        if not self.recovered.is_set():
            self._background.append(asyncio.create_task(self._recovery_loop(), name="kontext-recovery"))

    async def _heartbeat(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.store.heartbeat(self.worker_id)
            except Exception:
                log.exception("heartbeat failed (database unreachable?)")

    async def _recovery_loop(self) -> None:
        """Claim jobs that dead processes left behind: resume (async mode) or refund them."""
        from cogs.common import ChannelSink

        assert self.store is not None
        first = True
        while not self._closing:
            try:
                jobs = await self.store.claim_orphans(self.worker_id, stale_after_s=STALE_AFTER_S)
                for job in jobs:
                    sink = ChannelSink(self, job.channel_id, job.user_id, job.locale, job_id=job.id)
                    await self.pipeline.resume(job, sink)
                if jobs:
                    log.warning("recovered %d job(s) left by a stopped process", len(jobs))
            except Exception:
                log.exception("recovery sweep failed")
            if first:
                first = False
                self.recovered.set()
            await asyncio.sleep(STALE_AFTER_S / 3)

    async def shutdown(self) -> None:
        """Graceful stop: drain jobs within the grace period, then close everything."""
        if self._closing:
            return
        self._closing = True
        log.info("shutting down: no new jobs; %.0f s grace for running ones", self.settings.shutdown_grace_seconds)
        if self.pipeline is not None:
            with contextlib.suppress(Exception):
                await self.pipeline.shutdown(self.settings.shutdown_grace_seconds)
        await self.close()

    async def close(self) -> None:
        """Close once, whoever asks (signal handler, ``async with``, tests); later calls wait."""
        self._closing = True
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close_everything())
        await asyncio.shield(self._close_task)

    async def _close_everything(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.health is not None:
            with contextlib.suppress(Exception):
                await self.health.stop()
        await super().close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.retire_worker(self.worker_id)
            await self.store.close()
        if self.http_session is not None:
            await self.http_session.close()


async def run_bot(settings: Settings, *, sync_only: bool = False) -> int:
    """Run until closed; returns the process exit code."""
    bot = KontextBot(settings, force_sync=sync_only)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda s=sig: _on_signal(bot, s))
    try:
        async with bot:
            if sync_only:
                await bot.login(settings.discord_token)
                return 0
            await bot.start(settings.discord_token)
        if bot.shutdown_task is not None:
            await bot.shutdown_task
    except discord.LoginFailure:
        log.error("DISCORD_TOKEN was refused by Discord: check the token in the Developer Portal")
        return 2
    except discord.PrivilegedIntentsRequired:
        log.error("Discord refused the gateway intents; this bot needs no privileged intents")
        return 2
    return 0


def _on_signal(bot: KontextBot, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    if bot.shutdown_task is None:
        bot.shutdown_task = asyncio.get_running_loop().create_task(bot.shutdown())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv not in ([], ["sync"]):
        print("usage: python bot.py [sync]", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    setup_logging(settings)
    try:
        return asyncio.run(run_bot(settings, sync_only=argv == ["sync"]))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

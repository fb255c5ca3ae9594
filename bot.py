"""Kontext Bot: the entry point.

``python bot.py`` runs the bot; ``python bot.py sync`` forces a sync of the slash commands and
exits; ``python bot.py upgrade`` brings the database's schema up to date and exits;
``python bot.py owner …`` are the owner's controls (:mod:`kontext.cli` parses them).
Settings come from the environment and ``.env`` (see ``.env.example``); a bad one prints a
single line naming it and exits with code 2.

As in discord.py's ``examples/advanced_startup.py``: :func:`run_bot` opens the services (HTTP
session, database, queue, pipeline, job launcher — :mod:`kontext.services`) and hands them to
:class:`KontextBot`, which only wires Discord: the command tree, the cogs, the command sync, the
health endpoint, signals and a graceful shutdown. The services are closed after the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from cogs.base import KontextBotBase
from cogs.common import gate_refuses
from cogs.recovered import recovered_sink
from cogs.translation import KontextTranslator
from kontext import cli, images
from kontext.jobs import JobSink
from kontext.logging_setup import describe, setup_logging
from kontext.services import Services, StartupError, build_services

if TYPE_CHECKING:
    from kontext.health import HealthServer
from kontext.settings import Settings
from kontext.store import Job

__all__ = ["KontextBot", "ShardedKontextBot", "main", "run_bot", "setup_logging"]

log = logging.getLogger("kontext.bot")

COGS = (
    "cogs.errors",  # first: the tree's error handler is in place before any command is
    "cogs.kontext",
    "cogs.credits",
    "cogs.admin",
    "cogs.results",
    "cogs.showcase",
    "cogs.context_menu",
    "cogs.result_watch",
)


def point_discord_py_at(settings: Settings) -> None:
    """Development and tests: talk to a local Discord emulator instead of discord.com."""
    if settings.discord_api_base_url:
        discord.http.Route.BASE = settings.discord_api_base_url
        # the emulator serves the attachments too: fetch inputs from it as from Discord's CDN
        images.allow_input_host(settings.discord_api_base_url)
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class KontextTree(app_commands.CommandTree["KontextBot"]):
    """Refuses every command where the bot is not enabled. Errors are answered by the
    ``cogs.errors`` cog, which installs itself as this tree's error handler."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return not await gate_refuses(interaction)


def freeze_long_lived_objects() -> None:
    """Keep what exists now out of the garbage collector's full passes.

    What is made while starting (modules, commands, the guild cache) lives as long as the process;
    a full collection would walk all of it again and again, stalling the event loop for tens of
    milliseconds in the middle of a burst of jobs. Called once the bot is set up and again once
    it is connected.
    """
    gc.collect()
    gc.freeze()


class KontextBot(KontextBotBase):
    """The bot: wires the (already open) services to Discord."""

    def __init__(self, services: Services, *, force_sync: bool = False, **options: Any) -> None:
        settings = services.settings
        point_discord_py_at(settings)
        discord.VoiceClient.warn_nacl = False  # no voice: don't warn about its libraries
        discord.VoiceClient.warn_dave = False
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True  # the bot's own result messages (cogs.result_watch)
        options.update(shard_options(settings))
        super().__init__(
            services,
            command_prefix=commands.when_mentioned,
            intents=intents,
            tree_cls=KontextTree,
            help_command=None,
            # the guild_messages intent brings every message of every server: keep none of them
            # (result_watch reads each one as it arrives; nothing needs a message cache)
            max_messages=None,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
            **options,
        )
        self.force_sync = force_sync
        self.health: HealthServer | None = None
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self.shutdown_task: asyncio.Task[None] | None = None
        self.recovered = asyncio.Event()
        self._frozen = False

    async def on_message(self, message: discord.Message, /) -> None:
        """No text commands: messages (the guild_messages intent) are for listeners only."""

    async def setup_hook(self) -> None:
        for cog in COGS:
            await self.load_extension(cog)
        await self.tree.set_translator(KontextTranslator())
        await self.sync_commands(force=self.force_sync)
        if self.settings.port:
            from kontext.health import HealthServer  # aiohttp.web loads only when it serves

            self.health = HealthServer(self, port=self.settings.port)
            await self.health.start()
        freeze_long_lived_objects()

    async def _clear_dev_guild_commands(self, dev_key: str) -> None:
        """Remove the server-only copies an earlier ``DEV_GUILD_ID`` run left behind.

        Without this, a server used for development would list every command twice (its own
        copy and the global one) once the bot syncs globally again.
        """
        old = await self.store.get_meta(dev_key)
        if not old:
            return
        dev_guild = discord.Object(int(old))
        self.tree.clear_commands(guild=dev_guild)
        await self.tree.sync(guild=dev_guild)
        await self.store.set_meta(dev_key, "")
        log.info("removed the server-only commands of the former DEV_GUILD_ID %s", old)

    async def sync_commands(self, *, force: bool = False) -> bool:
        """Sync the command tree when it changed since the last sync (or when forced)."""
        guild = discord.Object(self.settings.dev_guild_id) if self.settings.dev_guild_id else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        # hash what Discord receives, translations included, so a catalog change re-syncs
        translator = self.tree.translator
        payload = [
            await c.get_translated_payload(self.tree, translator) if translator else c.to_dict(self.tree)
            for c in self.tree.get_commands(guild=guild)
        ]
        digest = hashlib.sha256(
            json.dumps(payload, sort_keys=True, default=str).encode()
        ).hexdigest()
        # per application: a database kept across a switch to another application still syncs
        app = self.application_id
        meta_key = f"commands_hash:{app}:{guild.id if guild else 'global'}"
        dev_key = f"dev_guild:{app}"
        if guild is None:
            await self._clear_dev_guild_commands(dev_key)
        if not force and await self.store.get_meta(meta_key) == digest:
            log.info("slash commands unchanged since the last sync; not syncing")
            return False
        synced = await self.tree.sync(guild=guild)
        await self.store.set_meta(meta_key, digest)
        if guild is not None:
            await self.store.set_meta(dev_key, str(guild.id))
            log.warning(
                "commands synced to server %s only (DEV_GUILD_ID); if they were synced globally "
                "before, that server lists each command twice until you unset DEV_GUILD_ID and "
                "restart (the server copies are then removed)", guild.id,
            )
        log.info(
            "synced %d slash command(s) %s",
            len(synced),
            f"to server {guild.id}" if guild else "globally (may take a while to show)",
        )
        return True

    # --- health (kontext.health.HealthSource) ---------------------------------------------------

    def gateway_connected(self) -> bool:
        if not self.is_ready() or self.is_closed():
            return False
        shards = getattr(self, "shards", None)  # several shards in this process
        if isinstance(shards, dict) and shards:
            return all(not shard.is_closed() for shard in shards.values())
        return self.ws is not None and self.ws.open

    async def database_ok(self) -> bool:
        return await self.store.ping()

    def queue_snapshot(self) -> dict[str, int | bool]:
        q = self.queue
        return {
            "waiting": q.estimates.waiting_count,
            "running": q.estimates.running_count,
            "paused": q.paused,
            "accepting": self.pipeline.accepting,
        }

    # --- Discord's events -----------------------------------------------------------------------

    async def on_guild_join(self, guild: discord.Guild) -> None:
        log.info("added to server %s (%s)", guild.id, guild.name)
        await self.note_guild(guild)

    async def on_connect(self) -> None:
        # serve the queue as soon as the gateway is up (interactions arrive before on_ready,
        # which waits for every server's data); ``python bot.py sync`` never connects, so it
        # never claims a job
        if not self.recovered.is_set():
            await self._start_queue()

    async def on_ready(self) -> None:
        log.info("connected as %s (id %s) in %d server(s)", self.user, self.user and self.user.id, len(self.guilds))
        if not self._frozen:
            self._frozen = True
            freeze_long_lived_objects()

    async def _start_queue(self) -> None:
        """Serve the shared queue once connected: claim waiting jobs, take over stopped ones."""
        # jobs this process did not receive talk to their member through Discord from here
        self.pipeline.start(self.recovered_sink)
        self.recovered.set()

    def recovered_sink(self, job: Job) -> JobSink:
        """The sink of a job this process did not receive (:func:`cogs.recovered.recovered_sink`)."""
        return recovered_sink(self, job)

    # --- stopping -------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Graceful stop: drain jobs within the grace period, then close everything."""
        if self._closing:
            return
        self._closing = True
        grace = self.settings.shutdown_grace_seconds
        # keep a little of the grace for refunds, messages and closing, so the process is gone
        # before the platform's SIGKILL
        reserve = min(4.0, grace * 0.25)
        log.info("shutting down: no new jobs; %.1f s for running ones to finish", grace - reserve)
        try:
            await self.pipeline.shutdown(grace - reserve, settle_s=max(1.0, reserve / 2))
        except Exception:
            log.exception("draining jobs failed")
        await self.close()
        log.info("stopped cleanly")

    async def close(self) -> None:
        """Close once, whoever asks (signal handler, ``async with``, tests); later calls wait.

        The bot stops serving the shared queue (it started at connect); the other services
        stay open: whoever opened them closes them after the bot."""
        self._closing = True
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close_discord())
        await asyncio.shield(self._close_task)

    async def _close_discord(self) -> None:
        if self.health is not None:
            with contextlib.suppress(Exception):
                await self.health.stop()
        await self.queue.aclose()
        await super().close()


class ShardedKontextBot(KontextBot, commands.AutoShardedBot):
    """The bot when this process runs several gateway shards (``SHARD_IDS=0,1``)."""


def shard_options(settings: Settings) -> dict[str, Any]:
    """discord.py's shard options for ``SHARD_COUNT`` / ``SHARD_IDS``.

    One shard id: a plain client on that shard; several: an auto-sharded client on those ids;
    none: one connection for everything (or, with only ``SHARD_COUNT``, discord.py's
    auto-sharding over all of them in this process).
    """
    ids, count = settings.shard_ids, settings.shard_count
    if ids is None:
        return {"shard_count": count} if count else {}
    if len(ids) == 1:
        return {"shard_id": ids[0], "shard_count": count}
    return {"shard_ids": list(ids), "shard_count": count}


def bot_class(settings: Settings) -> type[KontextBot]:
    """:class:`ShardedKontextBot` when this process runs several shards (or all, by count)."""
    ids = settings.shard_ids
    several = (ids is not None and len(ids) > 1) or (ids is None and (settings.shard_count or 1) > 1)
    return ShardedKontextBot if several else KontextBot


async def run_bot(settings: Settings, sync_only: bool = False) -> int:
    """Open the services, run the bot until it stops, close both; returns the exit code."""
    try:
        services = await build_services(settings)
    except StartupError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    try:
        return await _run(services, sync_only)
    finally:
        await services.aclose()


async def _run(services: Services, sync_only: bool) -> int:
    settings = services.settings
    bot = bot_class(settings)(services, force_sync=sync_only)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, bot, sig)
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
    except (aiohttp.ClientConnectionError, OSError) as exc:
        log.error("could not reach Discord (%s); is the network up?", describe(exc))
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return 0


def _on_signal(bot: KontextBot, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    if bot.shutdown_task is None:
        bot.shutdown_task = asyncio.get_running_loop().create_task(bot.shutdown())


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, run_bot)


if __name__ == "__main__":
    sys.exit(main())

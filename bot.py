"""Kontext Bot: the entry point.

``python bot.py`` runs the bot; ``python bot.py sync`` forces a sync of the slash commands and
exits. Settings come from the environment and ``.env`` (see ``.env.example``); a bad one prints a
single line naming it and exits with code 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any, cast

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from kontext import images
from kontext.accounts import Accounts, KeyVault
from kontext.gate import GuildGate
from kontext.metrics import Metrics
from kontext.queue import SharedQueue
from kontext.segmind import SegmindClient
from kontext.settings import Settings, SettingsError, load_settings
from kontext.store import Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits

log = logging.getLogger("kontext.bot")

COGS = (
    "cogs.errors",  # first: the tree's error handler is in place before any command is
    "cogs.kontext",
    "cogs.credits",
    "cogs.admin",
    "cogs.results",
    "cogs.showcase",
    "cogs.context_menu",
)
#: a job's lease lives this long without a renewal (renewed every sixth of it); a killed
#: process's running jobs are taken over after it, by the database's clock
LEASE_S = 60.0
#: an interaction token lives 15 minutes; past this age a recovered job talks through the channel
TOKEN_USABLE_S = 14 * 60.0
USAGE = (
    "usage: python bot.py [sync]\n"
    "       python bot.py owner COMMAND …\n"
    "  (no argument: run the bot; sync: sync the slash commands and exit;\n"
    "   owner: the owner's server controls, see 'python bot.py owner help')"
)

# Hidden knobs for development and tests only (not settings, not in .env.example):
#   KONTEXT_LEASE_SECONDS          a job's lease life; a killed process's jobs move after it (60)
#   KONTEXT_QUEUE_POLL_SECONDS     how often an idle process looks at the shared queue (0.5)
#   KONTEXT_PROGRESS_SECONDS       least time between two progress edits of a job (default 3)
#   KONTEXT_ACCOUNT_PROBE_SECONDS  how often a paused API account is probed (default 60)


def hidden_knob(name: str, default: float, env: Any = None) -> float:
    """A positive number from the environment, or ``default`` (a bad value is ignored, logged)."""
    raw = (env if env is not None else os.environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400:
        log.warning("ignoring %s=%r (a number of seconds above 0 is expected)", name, raw)
        return default
    return value


class StartupError(Exception):
    """A setting that parsed but does not work (the database cannot be opened). One line."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")


def _describe(exc: BaseException) -> str:
    """A short, single-line description of a startup failure (no URL, no secrets)."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    quiet = max(logging.INFO, logging.getLevelName(settings.log_level))
    logging.getLogger("discord").setLevel(quiet)
    # database drivers print statement parameters (interaction tokens) at DEBUG
    for name in ("aiosqlite", "asyncpg", "sqlalchemy"):
        logging.getLogger(name).setLevel(max(logging.WARNING, quiet))
    return handler


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
        from cogs.common import gate_refuses

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


class KontextBot(commands.Bot):
    """The bot: owns the HTTP session, the database and the job services."""

    def __init__(self, settings: Settings, *, force_sync: bool = False, **options: Any) -> None:
        point_discord_py_at(settings)
        discord.VoiceClient.warn_nacl = False  # no voice: don't warn about its libraries
        discord.VoiceClient.warn_dave = False
        intents = discord.Intents.none()
        intents.guilds = True
        options.update(shard_options(settings))
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
        self.queue: SharedQueue | None = None
        self.pipeline: Any = None
        self.health: Any = None
        self.gate: GuildGate | None = None
        self.vault: KeyVault | None = None
        self.accounts: Accounts | None = None
        self._named_guilds: set[int] = set()
        self.metrics = Metrics()
        self._background: list[asyncio.Task[Any]] = []
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self.shutdown_task: asyncio.Task[None] | None = None
        self.recovered = asyncio.Event()
        self._frozen = False
        self.lease_s = hidden_knob("KONTEXT_LEASE_SECONDS", LEASE_S)
        self.poll_s = hidden_knob("KONTEXT_QUEUE_POLL_SECONDS", 0.5)
        self.progress_interval_s = hidden_knob("KONTEXT_PROGRESS_SECONDS", 3.0)
        self.probe_interval_s = hidden_knob("KONTEXT_ACCOUNT_PROBE_SECONDS", 60.0)

    async def setup_hook(self) -> None:
        from kontext.pipeline import JobPipeline

        s = self.settings
        if not s.segmind_api_key:
            log.warning(
                "SEGMIND_API_KEY is empty: every /kontext will fail at the image service (and "
                "pause new jobs) until you set it"
            )
        self.http_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100, limit_per_host=50, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        try:
            self.store = await Store.open(s.database_url, s)
        except Exception as exc:  # unreachable server, corrupt file, wrong credentials
            why = _describe(exc)
            for secret in s.secrets:  # the token, the API key, DATABASE_URL's password
                if len(secret) >= 4:  # as RedactingFilter: a 1-char "secret" would mangle words
                    why = why.replace(secret, "***")
            raise StartupError("DATABASE_URL", f"the database cannot be opened ({why})") from None
        await self.store.audit.register_worker(self.worker_id)
        self.gate = GuildGate(s, self.store)
        self.segmind = SegmindClient(
            self.http_session,
            api_key=s.segmind_api_key,
            base_url=s.segmind_base_url,
            model=s.segmind_model,
            mode=s.segmind_api_mode,
            timeout_s=s.segmind_timeout_seconds,
        )
        self.queue = SharedQueue(
            self.store,
            worker_id=self.worker_id,
            limits=AccountLimits(OWNER_ACCOUNT, s.max_concurrent_jobs, s.segmind_rpm),
            lease_s=self.lease_s,
            poll_s=self.poll_s,
            max_wait_s=s.max_queue_wait_seconds,
        )
        self.pipeline = JobPipeline(
            settings=s,
            store=self.store,
            client=self.segmind,
            queue=self.queue,
            http=self.http_session,
            worker_id=self.worker_id,
            sink_factory=self.recovered_sink,
            metrics=self.metrics,
            progress_interval_s=self.progress_interval_s,
            probe_interval_s=self.probe_interval_s,
        )
        self.vault = KeyVault(s.encryption_key)
        self.accounts = Accounts(
            self.store,
            self.vault,
            self.segmind,
            self.queue.limits,
            lambda key: SegmindClient(
                self.http_session,  # type: ignore[arg-type]  # set above
                api_key=key,
                base_url=s.segmind_base_url,
                model=s.segmind_model,
                mode=s.segmind_api_mode,
                timeout_s=s.segmind_timeout_seconds,
            ),
        )
        self.pipeline.accounts = self.accounts
        self.queue.accounts = self.accounts
        queue = self.queue
        self.metrics.bind_queue(
            lambda: queue.waiting_count, lambda: queue.running_count, lambda: queue.paused
        )
        for cog in COGS:
            await self.load_extension(cog)
        from cogs.translation import KontextTranslator

        await self.tree.set_translator(KontextTranslator())
        await self.sync_commands(force=self.force_sync)
        if s.port:
            from kontext.health import HealthServer

            self.health = HealthServer(self, port=s.port)
            await self.health.start()
        freeze_long_lived_objects()

    async def _clear_dev_guild_commands(self, dev_key: str) -> None:
        """Remove the server-only copies an earlier ``DEV_GUILD_ID`` run left behind.

        Without this, a server used for development would list every command twice (its own
        copy and the global one) once the bot syncs globally again.
        """
        assert self.store is not None
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
        assert self.store is not None
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
        return self.store is not None and await self.store.ping()

    def queue_snapshot(self) -> dict[str, int | bool]:
        q = self.queue
        if q is None:
            return {}
        return {
            "waiting": q.waiting_count,
            "running": q.running_count,
            "paused": q.paused,
            "accepting": bool(self.pipeline is not None and self.pipeline.accepting),
        }

    async def note_guild(self, guild: discord.Guild | None) -> None:
        """Remember a server's name for the owner's listing (once per process)."""
        if guild is None or guild.id in self._named_guilds or self.store is None:
            return
        self._named_guilds.add(guild.id)
        try:
            await self.store.owner.note_name(guild.id, guild.name)
        except Exception as exc:  # noqa: BLE001 - a name for a listing is never worth a failure
            log.debug("could not note server %s: %s", guild.id, exc)

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
        assert self.pipeline is not None
        self.pipeline.start()
        self.recovered.set()

    def recovered_sink(self, job: Any) -> Any:
        """How to talk to the member of a job this process did not receive (another process
        did, or one that stopped): through its interaction while the token lives (private
        status edits, the result as a follow-up), else through the channel with a mention."""
        from cogs.common import ChannelSink, InteractionSink

        fresh = token_age(job, self.lease_s) < TOKEN_USABLE_S
        if job.interaction_token and job.application_id and fresh:
            # StoredInteraction has what InteractionSink uses of a discord.Interaction
            stored = cast(discord.Interaction, StoredInteraction(self, job))
            return InteractionSink(self, stored, job_id=job.id)
        return ChannelSink(self, job.channel_id, job.user_id, job.locale, job_id=job.id)

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
        if self.pipeline is not None:
            try:
                await self.pipeline.shutdown(grace - reserve, settle_s=max(1.0, reserve / 2))
            except Exception:
                log.exception("draining jobs failed")
        await self.close()
        log.info("stopped cleanly")

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
                await self.store.audit.retire_worker(self.worker_id)
            await self.store.close()
        if self.http_session is not None:
            await self.http_session.close()


def token_age(job: Any, lease_s: float) -> float:
    """Seconds since the job's interaction, by the database's clock when it can be told.

    A claimed job's lease expiry is the database's now + ``lease_s`` at the claim, and its
    ``queued_at`` the database's now at the reservation: their difference does not depend on
    any process's clock (a process whose clock is off would misjudge the token's 15 minutes).
    """
    if job.lease_expires_at is not None and job.queued_at is not None:
        return max(0.0, float(job.lease_expires_at) - lease_s - float(job.queued_at))
    return time.time() - float(job.created_at)


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


class StoredInteraction:
    """Just enough of a ``discord.Interaction``, rebuilt from a stored job, for
    :class:`cogs.common.InteractionSink`: a recovered job can still edit the member's private
    status and post its result as a follow-up while the interaction token lives."""

    def __init__(self, bot: KontextBot, job: Any) -> None:
        self._bot = bot
        self.id = job.id
        self.application_id = job.application_id
        self.token = job.interaction_token
        self.guild_id = job.guild_id
        self.channel_id = job.channel_id
        self.user = discord.Object(job.user_id)
        try:
            self.locale = discord.Locale(job.locale or "en-US")
        except ValueError:
            self.locale = discord.Locale.american_english
        self.followup = discord.Webhook.from_state(
            data={"id": job.application_id, "type": 3, "token": job.interaction_token},
            state=bot._connection,
        )

    @property
    def filesize_limit(self) -> int:
        guild = self._bot.get_guild(self.guild_id) if self.guild_id else None
        return guild.filesize_limit if guild is not None else 10 * 1024 * 1024

    async def edit_original_response(self, **kwargs: Any) -> discord.WebhookMessage:
        message: discord.WebhookMessage = await self.followup.edit_message("@original", **kwargs)  # type: ignore[call-overload]  # discord.py takes "@original" (typed int only)
        return message


async def run_bot(settings: Settings, *, sync_only: bool = False) -> int:
    """Run until closed; returns the process exit code."""
    bot = bot_class(settings)(settings, force_sync=sync_only)
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
    except StartupError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    except discord.LoginFailure:
        log.error("DISCORD_TOKEN was refused by Discord: check the token in the Developer Portal")
        return 2
    except discord.PrivilegedIntentsRequired:
        log.error("Discord refused the gateway intents; this bot needs no privileged intents")
        return 2
    except (aiohttp.ClientConnectionError, OSError) as exc:
        log.error("could not reach Discord (%s); is the network up?", _describe(exc))
        return 1
    return 0


def _on_signal(bot: KontextBot, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    if bot.shutdown_task is None:
        bot.shutdown_task = asyncio.get_running_loop().create_task(bot.shutdown())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"], ["help"]):
        print(USAGE)
        return 0
    owner = bool(argv) and argv[0] == "owner"
    if argv not in ([], ["sync"]) and not owner:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    setup_logging(settings)
    if owner:
        from kontext.owner_cli import run_owner

        return asyncio.run(run_owner(argv[1:], settings))
    try:
        return asyncio.run(run_bot(settings, sync_only=argv == ["sync"]))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

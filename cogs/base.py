"""The bot as the cogs see it: a ``commands.Bot`` that holds the :class:`~kontext.services.Services`.

Cogs import this module (and ``kontext/``, and each other where one needs another's Discord
pieces), never ``bot.py``: ``bot.py`` builds the services and subclasses :class:`KontextBotBase`
with the process's wiring (start-up, sync, signals, shutdown). Every service is there, open,
before the first cog loads.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord.ext import commands

from kontext.gate import GuildGate
from kontext.pipeline import JobPipeline
from kontext.queue import SharedQueue
from kontext.segmind import SegmindClient
from kontext.services import Services
from kontext.store import Store

log = logging.getLogger("kontext.cogs")

class KontextBotBase(commands.Bot):
    """A ``commands.Bot`` with the bot's services (see the module)."""

    def __init__(self, services: Services, **options: Any) -> None:
        super().__init__(**options)
        self.services = services
        self.settings = services.settings
        self.metrics = services.metrics  # an attribute: kontext.health.HealthSource reads it
        self._named_guilds: set[int] = set()

    # shortcuts to the services (the health endpoint and the tests read them)

    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def pipeline(self) -> JobPipeline:
        return self.services.pipeline

    @property
    def queue(self) -> SharedQueue:
        return self.services.queue

    @property
    def segmind(self) -> SegmindClient:
        return self.services.segmind

    @property
    def gate(self) -> GuildGate:
        return self.services.gate

    async def note_guild(self, guild: discord.Guild | None) -> None:
        """Remember a server's name for the owner's listing (once per process)."""
        if guild is None or guild.id in self._named_guilds:
            return
        self._named_guilds.add(guild.id)
        try:
            await self.store.owner.note_name(guild.id, guild.name)
        except Exception as exc:  # noqa: BLE001 - a name for a listing is never worth a failure
            log.debug("could not note server %s: %s", guild.id, exc)


def bot_of(interaction: discord.Interaction) -> KontextBotBase:
    """The bot an interaction came to (for buttons and modals, which get no cog)."""
    client = interaction.client
    if not isinstance(client, KontextBotBase):
        raise TypeError(f"an interaction of {type(client).__name__}, not the Kontext bot")
    return client

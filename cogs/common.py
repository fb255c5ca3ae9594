"""Shared pieces of the Discord adapter: replying with errors, the server gate, friendly names.

The job sinks (how the pipeline talks to a member through Discord) are in :mod:`cogs.sinks`.
"""

from __future__ import annotations

import logging

import discord

from cogs.base import KontextBotBase
from kontext.errors import GuildNotEnabled, InputError, KontextError
from kontext.i18n import DEFAULT_LOCALE, catalog, t
from kontext.settings import ASPECT_RATIOS

log = logging.getLogger("kontext.cogs")

#: the aspect ratios' friendly English names: the catalog's ``choice.<ratio>`` (one source)
ASPECT_NAMES: dict[str, str] = {a: catalog(DEFAULT_LOCALE)[f"choice.{a}"] for a in ASPECT_RATIOS}
#: a job's first status ("checking your images") appears only when that step takes longer than
#: this; a quicker check leaves Discord's own "thinking…" on screen
ACCEPTED_STATUS_AFTER_S = 0.5


def locale_of(interaction: discord.Interaction) -> str:
    return str(interaction.locale.value if interaction.locale else "en-US")

async def reply_error(interaction: discord.Interaction, error: KontextError) -> None:
    """Tell the member what went wrong, ephemerally, in their language."""
    text = error.user_message(locale_of(interaction))
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("could not send an error reply (%s): %s", exc.status, error.cause)

async def gate_refuses(interaction: discord.Interaction) -> bool:
    """True (and the member told, the owner's log told) when the bot is not enabled in this
    server: ``ALLOWED_GUILD_IDS``, or the owner blocked it. Nothing is charged or called."""
    bot = interaction.client
    guild_id = interaction.guild_id
    if not isinstance(bot, KontextBotBase) or guild_id is None:
        return False
    try:
        allowed = await bot.services.gate.allows(guild_id)
    except Exception:  # the database is away: the reservation re-checks it anyway
        log.exception("could not check whether server %s is enabled", guild_id)
        return False
    if allowed:
        await bot.note_guild(interaction.guild)
        return False
    name = interaction.guild.name if interaction.guild is not None else "?"
    log.warning(
        "refused an interaction in server %s (%s): the bot is not enabled there "
        "(ALLOWED_GUILD_IDS, or blocked by the owner)", guild_id, name,
    )
    await reply_error(interaction, GuildNotEnabled(f"server {guild_id}"))
    return True


def not_allowed() -> KontextError:
    return InputError("check failed", key="error.not_allowed")


def aspect_name(aspect_ratio: str, locale: str | None) -> str:
    """The friendly, translated name of an aspect ratio ("Square 1:1")."""
    name = t(f"choice.{aspect_ratio}", locale)
    return name if name != f"choice.{aspect_ratio}" else aspect_ratio


def safety_name(level: int, locale: str | None) -> str:
    """"Strict", "Moderate" or "Permissive", translated."""
    name = t(f"safety.{level}", locale)
    return name if name != f"safety.{level}" else str(level)

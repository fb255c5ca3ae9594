"""``/credits``: a member's own balance, cooldown, jobs and recent ledger entries (ephemeral)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs.base import KontextBotBase
from cogs.common import locale_of
from kontext.i18n import t
from kontext.store import LedgerEntry


def ledger_line(entry: LedgerEntry, locale: str | None) -> str:
    """One ledger entry as a short line: ``+5 grant · reason · <t:…:R>``."""
    sign = "+" if entry.delta > 0 else ""
    kind = t(f"ledger.{entry.kind}", locale)
    parts = [f"`{sign}{entry.delta}` {kind}"]
    if entry.reason:
        parts.append(entry.reason[:80])
    parts.append(f"<t:{int(entry.created_at)}:R>")
    return " · ".join(parts)


class CreditsCog(commands.Cog, name="Credits"):
    """The member's own view of their credits."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot

    @app_commands.command(name="credits", description="Your credits, cooldown and recent activity")
    @app_commands.guild_only()
    async def credits(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        assert interaction.guild_id is not None
        locale = locale_of(interaction)
        store = self.bot.services.store
        status = await store.credits.member_status(interaction.guild_id, interaction.user.id)
        gs = await store.settings.get(interaction.guild_id)
        entries = await store.credits.recent(interaction.guild_id, interaction.user.id, limit=5)

        embed = discord.Embed(title=t("credits.title", locale), colour=discord.Colour.green())
        embed.add_field(name=t("credits.balance", locale), value=str(status.balance))
        embed.add_field(name=t("credits.price", locale), value=str(gs.credits_per_image))
        cooldown = (
            t("credits.cooldown_left", locale, seconds=int(status.cooldown_remaining + 0.999))
            if status.cooldown_remaining > 0
            else t("credits.ready", locale)
        )
        embed.add_field(name=t("credits.cooldown", locale), value=cooldown)
        embed.add_field(
            name=t("credits.jobs", locale), value=str(status.inflight)
        )
        if gs.daily_free_credits:
            embed.add_field(
                name=t("credits.daily", locale),
                value=t("credits.daily_value", locale, amount=gs.daily_free_credits),
            )
        embed.add_field(
            name=t("credits.recent", locale),
            value="\n".join(ledger_line(e, locale) for e in entries) or t("credits.none", locale),
            inline=False,
        )
        await interaction.followup.send(embed=embed, ephemeral=True)


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(CreditsCog(bot))

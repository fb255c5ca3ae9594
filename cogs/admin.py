"""``/kontext-admin``: credits, settings and stats for server admins (Manage Server by default)."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs.base import KontextBotBase
from cogs.common import ASPECT_NAMES, aspect_name, locale_of, not_allowed, reply_error
from kontext.accounts import GUILD_KEY_CONCURRENCY, GUILD_KEY_RPM, guild_account
from kontext.errors import ApiError
from kontext.guild_settings import SETTINGS, Kind, SettingRow
from kontext.i18n import t
from kontext.segmind import SegmindClient
from kontext.settings import ASPECT_RATIOS
from kontext.store import GuildSettings, StatsWindow

log = logging.getLogger("kontext.cogs.admin")

ID_RE = re.compile(r"\d{15,21}")
CLEAR_WORDS = {"none", "clear", "-", "off"}


def parse_ids(text: str) -> tuple[int, ...]:
    """Channel or role mentions / raw ids in ``text``; "none" gives an empty tuple."""
    if text.strip().lower() in CLEAR_WORDS:
        return ()
    return tuple(dict.fromkeys(int(m) for m in ID_RE.findall(text)))


def parse_words(text: str) -> tuple[str, ...]:
    """Comma-separated words or phrases; "none" gives an empty tuple."""
    if text.strip().lower() in CLEAR_WORDS:
        return ()
    return tuple(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))


def display_value(row: SettingRow, value: Any, locale: str | None) -> str:
    """One setting's value as the settings display shows it (mentions for channels and roles)."""
    empty = t(row.empty, locale)
    if row.kind in (Kind.INT, Kind.CHOICE_INT):
        return f"{value} {row.unit}" if row.unit else str(value)
    if row.kind is Kind.ASPECT_RATIO:
        return aspect_name(str(value), locale)
    if row.kind is Kind.BOOL:
        return t("admin.yes" if value else "admin.no", locale)
    if row.kind is Kind.CHANNEL:
        return f"<#{value}>" if value else empty
    if row.kind is Kind.CHANNELS:
        return ", ".join(f"<#{v}>" for v in value) or empty
    if row.kind is Kind.ROLES:
        return ", ".join(f"<@&{v}>" for v in value) or empty
    return ", ".join(f"`{w}`" for w in value) or empty  # Kind.WORDS


def describe_settings(
    gs: GuildSettings, locale: str | None, rows: Sequence[SettingRow] = SETTINGS
) -> discord.Embed:
    """Every per-server setting (a row of the table) with its current value."""
    embed = discord.Embed(title=t("admin.settings_title", locale), colour=discord.Colour.blurple())
    for row in rows:
        value = display_value(row, getattr(gs, row.name), locale)
        embed.add_field(name=t(row.text_key, locale), value=value[:1024])
    return embed


# --- the /kontext-admin settings options, derived from the table ---------------------------------

RESET_DESCRIPTION = "Put one setting back to the bot's default"


def option_annotation(row: SettingRow) -> Any:
    """The command option's type for ``row`` (always optional)."""
    if row.kind is Kind.INT:
        return app_commands.Range[int, row.low, row.high] | None
    if row.kind is Kind.CHOICE_INT:
        return app_commands.Choice[int] | None
    if row.kind is Kind.ASPECT_RATIO:
        return app_commands.Choice[str] | None
    if row.kind is Kind.BOOL:
        return bool | None
    if row.kind is Kind.CHANNEL:
        return discord.TextChannel | None
    return str | None  # mentions or comma-separated words, parsed by option_value


def option_choices(row: SettingRow) -> list[app_commands.Choice[Any]] | None:
    """The choices the option offers, if it is a choice."""
    if row.kind is Kind.CHOICE_INT:
        return [app_commands.Choice(name=f"{n}", value=n) for n in range(row.low, row.high + 1)]
    if row.kind is Kind.ASPECT_RATIO:
        return [app_commands.Choice(name=ASPECT_NAMES[a], value=a) for a in ASPECT_RATIOS]
    return None


def option_value(row: SettingRow, given: Any) -> Any:
    """What the member gave for the option, as the store validates it."""
    if isinstance(given, app_commands.Choice):
        return given.value
    if row.kind is Kind.CHANNEL:
        return given.id
    if row.kind in (Kind.CHANNELS, Kind.ROLES):
        return parse_ids(given)
    if row.kind is Kind.WORDS:
        return parse_words(given)
    return given


def settings_options(rows: Sequence[SettingRow] = SETTINGS) -> Callable[[Any], Any]:
    """Give a ``(self, interaction, **options)`` callback one option per row (then ``reset``):
    its signature, descriptions and choices, as discord.py reads them to build the command."""

    def apply(callback: Any) -> Any:
        p = inspect.Parameter
        params = [
            p("self", p.POSITIONAL_OR_KEYWORD),
            p("interaction", p.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction),
        ]
        for row in rows:
            params.append(
                p(row.option, p.KEYWORD_ONLY, default=None, annotation=option_annotation(row))
            )
        params.append(
            p("reset", p.KEYWORD_ONLY, default=None, annotation=app_commands.Choice[str] | None)
        )
        callback.__signature__ = inspect.Signature(params)
        choices: dict[str, list[app_commands.Choice[Any]]] = {}
        for row in rows:
            offered = option_choices(row)
            if offered is not None:
                choices[row.option] = offered
        choices["reset"] = [app_commands.Choice(name=row.name, value=row.name) for row in rows]
        callback = app_commands.choices(**choices)(callback)
        return app_commands.describe(
            **{row.option: row.description for row in rows}, reset=RESET_DESCRIPTION
        )(callback)

    return apply


def describe_window(window: StatsWindow, locale: str | None) -> str:
    lines = [
        t("admin.stats_line", locale, generations=window.generations, credits=window.credits_spent, usd=f"{window.usd_spent:.2f}", refunds=window.refunds),
    ]
    if window.failures_by_cause:
        causes = ", ".join(f"{c}: {n}" for c, n in sorted(window.failures_by_cause.items(), key=lambda kv: -kv[1]))
        lines.append(t("admin.stats_failures", locale, causes=causes))
    if window.top_members:
        top = ", ".join(f"<@{uid}> ({n})" for uid, n in window.top_members)
        lines.append(t("admin.stats_top", locale, top=top))
    return "\n".join(lines)


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class AdminGroup(app_commands.Group, name="kontext-admin", description="Manage Kontext credits, settings and stats"):
    """The admin commands. Hidden from members without Manage Server unless a server changes it."""

    def __init__(self, bot: KontextBotBase) -> None:
        super().__init__()
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """The bot checks Manage Server itself on every admin action: a server may have shown
        the command to others (Server Settings → Integrations), which must not grant it."""
        perms = interaction.permissions
        if perms.manage_guild or perms.administrator:
            return True
        log.warning(
            "refused /kontext-admin for %s in server %s: no Manage Server",
            interaction.user.id, interaction.guild_id,
        )
        await reply_error(interaction, not_allowed())
        return False

    async def _ephemeral(self, interaction: discord.Interaction, text: str | None = None, **kwargs: Any) -> None:
        if text is not None:
            kwargs["content"] = text
        if interaction.response.is_done():
            await interaction.followup.send(ephemeral=True, **kwargs)
        else:
            await interaction.response.send_message(ephemeral=True, **kwargs)

    @app_commands.command(name="grant", description="Give credits to a member")
    @app_commands.describe(member="Who gets the credits", amount="How many", reason="Shown in their history")
    async def grant(
        self,
        interaction: discord.Interaction,
        member: discord.Member,
        amount: app_commands.Range[int, 1, 1_000_000],
        reason: app_commands.Range[str, 1, 200] | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        balance = await self.bot.services.store.credits.grant(
            interaction.guild_id, member.id, amount, actor_id=interaction.user.id, reason=reason
        )
        log.info("admin %s granted %d to %s in %s", interaction.user.id, amount, member.id, interaction.guild_id)
        await self._ephemeral(
            interaction,
            t("admin.granted", locale_of(interaction), amount=amount, member=member.mention, balance=balance),
            allowed_mentions=discord.AllowedMentions.none(),
        )

    @app_commands.command(name="revoke", description="Take credits from a member")
    @app_commands.describe(member="Whose credits", amount="How many (never below zero)", reason="Shown in their history")
    async def revoke(
        self,
        interaction: discord.Interaction,
        member: discord.Member,
        amount: app_commands.Range[int, 1, 1_000_000],
        reason: app_commands.Range[str, 1, 200] | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        revoked, balance = await self.bot.services.store.credits.revoke(
            interaction.guild_id, member.id, amount, actor_id=interaction.user.id, reason=reason
        )
        log.info("admin %s revoked %d from %s in %s", interaction.user.id, revoked, member.id, interaction.guild_id)
        await self._ephemeral(
            interaction,
            t("admin.revoked", locale_of(interaction), amount=revoked, member=member.mention, balance=balance),
            allowed_mentions=discord.AllowedMentions.none(),
        )

    @app_commands.command(name="balance", description="See a member's credits")
    async def balance(self, interaction: discord.Interaction, member: discord.Member) -> None:
        assert interaction.guild_id is not None
        status = await self.bot.services.store.credits.member_status(interaction.guild_id, member.id)
        await self._ephemeral(
            interaction,
            t(
                "admin.balance",
                locale_of(interaction),
                member=member.mention,
                balance=status.balance,
                inflight=status.inflight,
                cooldown=int(status.cooldown_remaining + 0.999),
            ),
            allowed_mentions=discord.AllowedMentions.none(),
        )

    @app_commands.command(name="settings", description="Show or change this server's Kontext settings")
    @settings_options()
    async def settings(self, interaction: discord.Interaction, **options: Any) -> None:
        """One option per row of :data:`kontext.guild_settings.SETTINGS`, then ``reset``."""
        assert interaction.guild_id is not None
        locale = locale_of(interaction)
        reset: app_commands.Choice[str] | None = options.pop("reset", None)
        changes: dict[str, Any] = {
            row.name: option_value(row, options[row.option])
            for row in SETTINGS
            if options.get(row.option) is not None
        }
        store = self.bot.services.store
        try:
            if reset is not None:
                await store.settings.reset(interaction.guild_id, interaction.user.id, reset.value)
            if changes:
                gs = await store.settings.update(interaction.guild_id, interaction.user.id, **changes)
            else:
                gs = await store.settings.get(interaction.guild_id)
        except ValueError as exc:
            await self._ephemeral(interaction, t("admin.invalid", locale, why=str(exc)))
            return
        if changes or reset is not None:
            log.info(
                "admin %s changed settings in %s: %s%s",
                interaction.user.id,
                interaction.guild_id,
                ", ".join(changes),
                f" (reset {reset.value})" if reset else "",
            )
        text = t("admin.saved", locale) if changes or reset is not None else None
        embed = describe_settings(gs, locale)
        embed.add_field(
            name=t("apikey.field", locale),
            value=await self._key_state(interaction.guild_id, locale),
            inline=False,
        )
        await self._ephemeral(interaction, text, embed=embed)

    async def _key_state(self, guild_id: int, locale: str) -> str:
        """This server's own Segmind key as its admins should know it (never the key itself)."""
        store = self.bot.services.store
        has_key = any(int(row.guild_id) == guild_id for row in await store.owner.api_keys())
        if not has_key:
            return t("apikey.state_none", locale)
        if await store.queue.account_paused(guild_account(guild_id)):
            return t("apikey.state_refused", locale)
        return t("apikey.state_ok", locale)

    @app_commands.command(name="stats", description="Generations, spend and failures: today and the last 30 days")
    async def stats(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        locale = locale_of(interaction)
        stats = await self.bot.services.store.stats.guild(interaction.guild_id)
        budget = await self.bot.services.store.budgets.status()
        embed = discord.Embed(title=t("admin.stats_title", locale), colour=discord.Colour.gold())
        embed.add_field(name=t("admin.today", locale), value=describe_window(stats.today, locale)[:1024], inline=False)
        embed.add_field(name=t("admin.last_30", locale), value=describe_window(stats.last_30_days, locale)[:1024], inline=False)
        embed.add_field(
            name=t("admin.budget", locale),
            value=t("admin.budget_value", locale, used=f"{budget.reserved_usd:.2f}", cap=f"{budget.cap_usd:.2f}"),
            inline=False,
        )
        await interaction.followup.send(embed=embed, ephemeral=True)


    @app_commands.command(name="api-key", description="Use this server's own Segmind API key (or remove it)")
    @app_commands.describe(remove="Remove the server's own key (images use the bot owner's key again)")
    async def api_key(self, interaction: discord.Interaction, remove: bool = False) -> None:
        assert interaction.guild_id is not None
        locale = locale_of(interaction)
        vault = self.bot.services.vault
        if not vault.enabled:
            await self._ephemeral(interaction, t("apikey.off", locale))
            return
        if remove:
            had = await self.bot.services.store.owner.remove_api_key(interaction.guild_id)
            self.bot.services.accounts.forget(interaction.guild_id)
            log.info("admin %s removed server %s's own Segmind key", interaction.user.id, interaction.guild_id)
            await self._ephemeral(interaction, t("apikey.removed" if had else "apikey.none", locale))
            return
        await interaction.response.send_modal(ApiKeyModal(self.bot, locale))


class ApiKeyModal(discord.ui.Modal):
    """Asks for the key (never echoed), checks it with Segmind, stores it encrypted."""

    def __init__(self, bot: KontextBotBase, locale: str) -> None:
        super().__init__(title=t("apikey.modal_title", locale)[:45], timeout=600)
        self.bot = bot
        self.locale = locale
        self.key: discord.ui.TextInput[ApiKeyModal] = discord.ui.TextInput(
            label=t("apikey.modal_label", locale)[:45], min_length=8, max_length=200,
            custom_id="api_key",
        )
        self.add_item(self.key)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        secret = self.key.value.strip()
        verdict = await check_segmind_key(self.bot, secret)
        if verdict != "ok":
            await interaction.followup.send(t(f"apikey.{verdict}", self.locale), ephemeral=True)
            return
        guild_id = interaction.guild_id
        await self.bot.services.store.owner.set_api_key(guild_id, self.bot.services.vault.encrypt(secret), interaction.user.id)
        await self.bot.services.store.queue.set_account_paused(guild_account(guild_id), False)
        self.bot.services.accounts.forget(guild_id)
        log.info("admin %s set server %s's own Segmind key", interaction.user.id, guild_id)
        await interaction.followup.send(
            t("apikey.saved", self.locale, concurrent=GUILD_KEY_CONCURRENCY, rpm=GUILD_KEY_RPM),
            ephemeral=True,
        )


async def check_segmind_key(bot: KontextBotBase, secret: str) -> str:
    """``"ok"``, ``"invalid"`` (Segmind refused it) or ``"unreachable"``: one credits request
    with the key. The key never reaches a log or an error text."""
    s = bot.settings
    client = SegmindClient(
        bot.services.http,
        api_key=secret,
        base_url=s.segmind_base_url,
        model=s.segmind_model,
        mode=s.segmind_api_mode,
        timeout_s=20.0,
        max_retries=1,
    )
    try:
        await client.account_credits()
    except ApiError as err:
        return "invalid" if err.account_problem else "unreachable"
    except Exception as exc:  # noqa: BLE001 - the network: say so, plainly
        log.warning("could not check a server's Segmind key: %s", type(exc).__name__)
        return "unreachable"
    return "ok"


class AdminCog(commands.Cog, name="Admin"):
    """Holds the ``/kontext-admin`` group."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot
        self.group = AdminGroup(bot)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.group)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.group.name)


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(AdminCog(bot))

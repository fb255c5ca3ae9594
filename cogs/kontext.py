"""``/kontext``: combine two images with an instruction.

The cog is thin: it acknowledges within Discord's 3 s (an ephemeral defer), applies the server's
rules, optionally shows a quote, then hands a :class:`~kontext.pipeline.JobSpec` and an
:class:`~cogs.common.InteractionSink` to the core pipeline, which does the rest.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.app_commands import locale_str
from discord.ext import commands

from cogs.common import (
    ACCEPTED_STATUS_AFTER_S,
    ASPECT_NAMES,
    InteractionSink,
    locale_of,
    queue_of,
    reply_error,
    store_of,
)
from kontext import images, policy
from kontext.errors import InputError, JobCancelled, KontextError
from kontext.i18n import t
from kontext.pipeline import InputImage, JobOutcome, JobSpec
from kontext.settings import ASPECT_RATIOS
from kontext.vocab import ImageFormat, Source

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger("kontext.cogs.kontext")

_ = locale_str  # command text: English here, translations in kontext/locales/*.json
ASPECT_CHOICES = [
    app_commands.Choice(name=_(ASPECT_NAMES[a], key=f"choice.{a}"), value=a) for a in ASPECT_RATIOS
]
FORMAT_CHOICES = [
    app_commands.Choice(name=_("JPG (smaller)", key="choice.jpg"), value=ImageFormat.JPG.value),
    app_commands.Choice(name=_("PNG (lossless)", key="choice.png"), value=ImageFormat.PNG.value),
]
SAFETY_CHOICES = [
    app_commands.Choice(name=_("0 · strict", key="choice.0"), value=0),
    app_commands.Choice(name=_("1 · moderate", key="choice.1"), value=1),
    app_commands.Choice(
        name=_("2 · permissive (age-restricted channels only)", key="choice.2"), value=2
    ),
]
DEFAULT_SAFETY = 1
QUOTE_TIMEOUT_S = 120.0


def input_from_attachment(att: discord.Attachment, message_id: int | None = None) -> InputImage:
    return InputImage(
        url=att.url,
        filename=att.filename,
        size=att.size,
        content_type=att.content_type,
        attachment_id=att.id,
        message_id=message_id,
    )


class QuoteView(discord.ui.View):
    """Confirm / Cancel under a quote; only the member who asked can press them."""

    def __init__(self, user_id: int, locale: str) -> None:
        super().__init__(timeout=QUOTE_TIMEOUT_S)
        self.user_id = user_id
        self.confirmed: bool | None = None
        self.done = asyncio.Event()
        self.confirm.label = t("quote.confirm", locale)
        self.cancel.label = t("quote.cancel", locale)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return interaction.user.id == self.user_id

    @discord.ui.button(style=discord.ButtonStyle.success, label="Confirm")
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        self.confirmed = True
        await interaction.response.defer()
        self.done.set()
        self.stop()

    @discord.ui.button(style=discord.ButtonStyle.secondary, label="Cancel")
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        self.confirmed = False
        await interaction.response.defer()
        self.done.set()
        self.stop()

    async def on_timeout(self) -> None:
        self.done.set()


class KontextCog(commands.Cog, name="Kontext"):
    """The image command and the shared way every job is started."""

    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot

    @app_commands.command(
        name=_("kontext", key="cmd.kontext.name"),
        description=_(
            "Combine two images with an instruction (FLUX.1 Kontext max)",
            key="cmd.kontext.description",
        ),
    )
    @app_commands.guild_only()
    @app_commands.describe(
        image_1=_("First image (PNG, JPEG or WebP)", key="cmd.kontext.image_1.description"),
        image_2=_("Second image (PNG, JPEG or WebP)", key="cmd.kontext.image_2.description"),
        prompt=_("What to do with the two images", key="cmd.kontext.prompt.description"),
        aspect_ratio=_(
            "Shape of the result (default: the server's setting)",
            key="cmd.kontext.aspect_ratio.description",
        ),
        output_format=_(
            "File format of the result (default JPG)", key="cmd.kontext.output_format.description"
        ),
        safety_tolerance=_(
            "How strict the content filter is (default moderate)",
            key="cmd.kontext.safety_tolerance.description",
        ),
        seed=_(
            "Same seed + same inputs = same result (random when empty)",
            key="cmd.kontext.seed.description",
        ),
    )
    @app_commands.choices(aspect_ratio=ASPECT_CHOICES, output_format=FORMAT_CHOICES)
    @app_commands.choices(safety_tolerance=SAFETY_CHOICES)  # apart: int choices, not str
    async def kontext(
        self,
        interaction: discord.Interaction,
        image_1: discord.Attachment,
        image_2: discord.Attachment,
        prompt: app_commands.Range[str, 1, 1000],
        aspect_ratio: app_commands.Choice[str] | None = None,
        output_format: app_commands.Choice[str] | None = None,
        safety_tolerance: app_commands.Choice[int] | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
    ) -> None:
        await self.launch(
            interaction,
            prompt=prompt,
            image_1=input_from_attachment(image_1),
            image_2=input_from_attachment(image_2),
            aspect_ratio=aspect_ratio.value if aspect_ratio else None,
            output_format=ImageFormat(output_format.value) if output_format else ImageFormat.JPG,
            safety_tolerance=safety_tolerance.value if safety_tolerance is not None else None,
            seed=seed,
        )

    async def launch(
        self,
        interaction: discord.Interaction,
        *,
        prompt: str,
        image_1: InputImage,
        image_2: InputImage,
        aspect_ratio: str | None,
        output_format: ImageFormat,
        safety_tolerance: int | None,
        seed: int | None,
        parent_job_id: int | None = None,
        source: Source = Source.SLASH,
    ) -> JobOutcome | None:
        """Start one job for ``interaction`` (slash command, button, modal or context menu).

        ``safety_tolerance`` None means the default: moderate (1), or the server's maximum when
        that is lower. ``seed`` None picks a random one. The job's id is the interaction's id.
        """
        deferred_here = not interaction.response.is_done()
        if not await self.acknowledge(interaction):
            return None
        locale = locale_of(interaction)
        try:
            if interaction.guild_id is None:
                raise InputError("not in a guild", key="input.guild_only")
            await self.bot.pipeline.ensure_accepting_for(interaction.guild_id)
            gs = await store_of(self.bot).settings.get(interaction.guild_id)
            clean_prompt = images.validate_prompt(prompt)
            channel = interaction.channel
            channel_ids = [interaction.channel_id or 0]
            parent_id = getattr(channel, "parent_id", None)
            if parent_id:
                channel_ids.append(parent_id)
            is_nsfw = getattr(channel, "is_nsfw", None)
            if safety_tolerance is None:
                safety_tolerance = min(DEFAULT_SAFETY, gs.max_safety_tolerance)
            policy.check_request(
                gs,
                prompt=clean_prompt,
                safety_tolerance=safety_tolerance,
                channel_ids=channel_ids,
                channel_nsfw=bool(is_nsfw()) if callable(is_nsfw) else False,
            )
            role_ids = [r.id for r in getattr(interaction.user, "roles", [])]
            spec = JobSpec(
                job_id=interaction.id,
                guild_id=interaction.guild_id,
                channel_id=interaction.channel_id or 0,
                user_id=interaction.user.id,
                prompt=clean_prompt,
                image_1=image_1,
                image_2=image_2,
                aspect_ratio=aspect_ratio or gs.default_aspect_ratio,
                output_format=output_format,
                safety_tolerance=safety_tolerance,
                seed=images.validate_seed(seed),
                locale=locale,
                exempt_from_cooldown=policy.is_exempt(gs, role_ids),
                application_id=interaction.application_id,
                interaction_token=interaction.token,
                parent_job_id=parent_job_id,
                source=source,
            )
            if gs.confirm_quote and not await self.quote(interaction, spec, gs.credits_per_image):
                raise JobCancelled("quote declined")
        except KontextError as err:
            # our own private "thinking…" message becomes the answer (a quote card included)
            if not (deferred_here and await self._status(interaction, err.user_message(locale), view=None)):
                await reply_error(interaction, err)
            return None
        sink = InteractionSink(self.bot, interaction, job_id=spec.job_id)
        sink.show(t("status.accepted", locale), after=ACCEPTED_STATUS_AFTER_S)
        try:
            outcome: JobOutcome = await self.bot.pipeline.run(spec, sink)
            return outcome
        finally:
            sink.close()

    async def check_channel(self, interaction: discord.Interaction) -> bool:
        """Refuse (and tell the member) when /kontext jobs may not start in this channel.

        For flows that show a modal first (context menu, buttons): the member learns it before
        typing a prompt. :meth:`launch` checks it again.
        """
        if interaction.guild_id is None:
            await reply_error(interaction, InputError("not in a guild", key="input.guild_only"))
            return False
        gs = await store_of(self.bot).settings.get(interaction.guild_id)
        ids = [interaction.channel_id or 0]
        parent_id = getattr(interaction.channel, "parent_id", None)
        if parent_id:
            ids.append(parent_id)
        try:
            policy.check_channel(gs, ids)
        except KontextError as err:
            await reply_error(interaction, err)
            return False
        return True

    async def acknowledge(self, interaction: discord.Interaction) -> bool:
        """Defer ephemerally within 3 s. False when another process already took it."""
        if interaction.response.is_done():
            return True
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
        except discord.HTTPException as exc:
            if exc.code == 40060:
                log.info("interaction %s already acknowledged elsewhere; leaving it", interaction.id)
            else:
                log.warning("could not acknowledge interaction %s: %s", interaction.id, exc)
            return False
        return True

    async def _status(self, interaction: discord.Interaction, text: str, **kwargs: object) -> bool:
        """Edit the private status message; False when that failed."""
        try:
            await interaction.edit_original_response(content=text, **kwargs)  # type: ignore[arg-type]  # kwargs are edit options (view=…), passed through
        except discord.HTTPException as exc:
            log.debug("status edit failed: %s", exc)
            return False
        return True

    async def quote(self, interaction: discord.Interaction, spec: JobSpec, cost: int) -> bool:
        """Show cost, balance after and wait, with Confirm / Cancel. True when confirmed."""
        locale = spec.locale
        status = await store_of(self.bot).credits.member_status(spec.guild_id, spec.user_id)
        eta = queue_of(self.bot).estimate_duration() * (
            1 + queue_of(self.bot).waiting_count // max(1, queue_of(self.bot).max_concurrent)
        )
        view = QuoteView(spec.user_id, locale or "en-US")
        text = t(
            "quote.card",
            locale,
            cost=cost,
            balance=status.balance,
            after=status.balance - cost,
            eta=round(eta),
            queue=queue_of(self.bot).waiting_count,
        )
        await self._status(interaction, text, view=view)
        await view.done.wait()
        await self._status(interaction, text, view=None)
        return bool(view.confirmed)


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(KontextCog(bot))

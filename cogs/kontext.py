"""``/kontext``: combine two images with an instruction.

The cog is thin: it declares the command and its options and hands them to
:func:`cogs.launch.launch`, which every way of starting a job shares (acknowledge, the server's
rules through the core :class:`~kontext.launcher.JobLauncher`, an optional quote, the pipeline).
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.app_commands import locale_str
from discord.ext import commands

from cogs.base import KontextBotBase
from cogs.common import ASPECT_NAMES
from cogs.inputs import input_from_attachment
from cogs.launch import launch
from kontext.job_options import JobOptions
from kontext.settings import ASPECT_RATIOS
from kontext.vocab import ImageFormat

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


class KontextCog(commands.Cog, name="Kontext"):
    """The image command."""

    def __init__(self, bot: KontextBotBase) -> None:
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
        options = JobOptions(
            prompt=prompt,
            image_1=input_from_attachment(image_1),
            image_2=input_from_attachment(image_2),
            aspect_ratio=aspect_ratio.value if aspect_ratio else None,
            output_format=ImageFormat(output_format.value) if output_format else ImageFormat.JPG,
            safety_tolerance=safety_tolerance.value if safety_tolerance is not None else None,
            seed=seed,
        )
        await launch(self.bot, interaction, options)


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(KontextCog(bot))

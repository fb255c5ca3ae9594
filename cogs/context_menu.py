"""The message context menu "Kontext: edit these images".

On a message with exactly two images it asks for a prompt (a modal), then starts the normal job
through :func:`cogs.launch.launch` (the modal's interaction id is the job id). The
inputs remember their message, so later buttons can re-read it for fresh URLs. Any other
message gets a plain refusal.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.app_commands import locale_str
from discord.ext import commands

from cogs.base import KontextBotBase
from cogs.common import locale_of, reply_error
from cogs.inputs import input_from_attachment
from cogs.launch import check_channel, launch
from cogs.modals import PromptModal
from kontext.errors import InputError
from kontext.job_options import JobOptions
from kontext.vocab import Source

log = logging.getLogger("kontext.cogs.context_menu")

MENU_NAME = "Kontext: edit these images"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def is_image(att: discord.Attachment) -> bool:
    """Whether an attachment looks like a picture (its content is checked by the job)."""
    if att.content_type:
        return att.content_type.startswith("image/")
    return att.filename.lower().endswith(IMAGE_EXTENSIONS)


class ContextMenuCog(commands.Cog, name="ContextMenu"):
    """Holds the message command and starts jobs from it."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(
            name=locale_str(MENU_NAME, key="menu.edit_images"),
            callback=self.edit_images,
            allowed_contexts=app_commands.AppCommandContext(guild=True),
        )

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    async def edit_images(self, interaction: discord.Interaction, message: discord.Message) -> None:
        pictures = [a for a in message.attachments if is_image(a)]
        if len(pictures) != 2:
            await reply_error(
                interaction,
                InputError("need two images", key="contextmenu.need_two_images", count=len(pictures)),
            )
            return
        if not await check_channel(self.bot, interaction):
            return
        image_1, image_2 = (input_from_attachment(a, message.id) for a in pictures)

        async def done(submit: discord.Interaction, prompt: str) -> None:
            options = JobOptions(
                prompt=prompt, image_1=image_1, image_2=image_2, source=Source.CONTEXT_MENU
            )
            await launch(self.bot, submit, options)

        await interaction.response.send_modal(
            PromptModal(locale_of(interaction), title_key="contextmenu.modal_title", on_done=done)
        )


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(ContextMenuCog(bot))

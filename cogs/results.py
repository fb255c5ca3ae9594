"""The buttons under every result: Reroll, Edit prompt, Swap images, Use as input, Share, Delete.

They are persistent :class:`discord.ui.DynamicItem` buttons: the custom id carries the action
and the job id (``kontext:reroll:<job id>``), and everything else is read from the database when
a button is pressed, so they keep working after a restart or a deploy (the cog registers the
button class at load; the buttons under a new result come from :mod:`cogs.result_buttons`, with
the same custom ids; no view object has to survive).

Each new job goes through :func:`cogs.launch.launch` with the pressing (or modal) interaction:
its id is the new job's id, and the server's rules, credits, cooldown and queue apply as for
``/kontext``. Inputs get fresh URLs first (:mod:`cogs.inputs`). Share goes to the showcase
(:mod:`cogs.showcase`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import discord
from discord.ext import commands

from cogs.base import KontextBotBase, bot_of
from cogs.common import gate_refuses, locale_of, reply_error
from cogs.inputs import fresh_inputs, result_input
from cogs.launch import acknowledge, check_channel, launch
from cogs.modals import PromptModal, UseAsInputModal
from cogs.result_buttons import button
from cogs.showcase import Showcase
from kontext.errors import InputError, KontextError
from kontext.i18n import t
from kontext.jobs import JobSpec
from kontext.store import Job
from kontext.vocab import Source

log = logging.getLogger("kontext.cogs.results")

class ResultButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"kontext:(?P<action>reroll|edit|swap|use|share|delete):(?P<job_id>[0-9]{1,20})",
):
    """One button under a result; rebuilt from its custom id whenever it is pressed."""

    def __init__(self, action: str, job_id: int, label: str | None = None) -> None:
        item = button(action, job_id, label)
        super().__init__(item, row=item.row)
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: Any, /
    ) -> ResultButton:
        return cls(match["action"], int(match["job_id"]), getattr(item, "label", None))

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return not await gate_refuses(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        await ResultActions(bot_of(interaction)).handle(interaction, self.action, self.job_id)


class ResultsCog(commands.Cog, name="Results"):
    """Registers the buttons and builds them under new results."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(ResultButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(ResultButton)


class ResultActions:
    """What each button does (a new job, a modal first, share, delete)."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot

    # --- dispatch ---------------------------------------------------------------------------

    async def handle(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        job = await self.bot.services.store.jobs.get(job_id)
        if job is None or job.guild_id != interaction.guild_id:
            await reply_error(interaction, InputError("unknown job", key="result.unknown"))
            return
        log.info("button %s on job %s by %s", action, job_id, interaction.user.id)
        if action == "reroll":
            await self.rerun(interaction, job, keep_seed=False, source=Source.REROLL)
        elif action == "swap":
            await self.rerun(interaction, job, swap=True, source=Source.SWAP)
        elif action == "edit":
            await self.ask_prompt(interaction, job)
        elif action == "use":
            await self.ask_use_as_input(interaction, job)
        elif action == "share":
            await Showcase(self.bot).share(interaction, job)
        elif action == "delete":
            await self.delete(interaction, job)

    # --- new jobs from a result -----------------------------------------------------------------

    async def rerun(
        self,
        interaction: discord.Interaction,
        job: Job,
        *,
        prompt: str | None = None,
        swap: bool = False,
        keep_seed: bool = True,
        source: Source,
    ) -> None:
        """A new job from ``job``'s inputs: the parent's seed, or a random one."""
        if not await acknowledge(interaction):
            return
        parent = JobSpec.from_job(job).options
        try:
            image_1, image_2 = await fresh_inputs(self.bot, job, (1, 2))
        except KontextError as err:
            await reply_error(interaction, err)
            return
        if swap:
            image_1, image_2 = image_2, image_1
        options = dataclasses.replace(
            parent,
            prompt=parent.prompt if prompt is None else prompt,
            image_1=image_1,
            image_2=image_2,
            seed=parent.seed if keep_seed else None,
            parent_job_id=job.id,
            source=source,
        )
        await launch(self.bot, interaction, options)

    async def ask_prompt(self, interaction: discord.Interaction, job: Job) -> None:
        if not await check_channel(self.bot, interaction):
            return

        async def done(submit: discord.Interaction, prompt: str) -> None:
            await self.rerun(submit, job, prompt=prompt, source=Source.EDIT)

        await interaction.response.send_modal(
            PromptModal(
                locale_of(interaction),
                title_key="modal.edit_title",
                on_done=done,
                default=str(job.params.get("prompt", "")),
            )
        )

    async def ask_use_as_input(self, interaction: discord.Interaction, job: Job) -> None:
        if not await check_channel(self.bot, interaction):
            return
        message_id = interaction.message.id if interaction.message else None

        async def done(submit: discord.Interaction, prompt: str, keep: int) -> None:
            await self.use_as_input(submit, job, prompt=prompt, keep=keep, message_id=message_id)

        await interaction.response.send_modal(UseAsInputModal(locale_of(interaction), done))

    async def use_as_input(
        self,
        interaction: discord.Interaction,
        job: Job,
        *,
        prompt: str,
        keep: int,
        message_id: int | None = None,
    ) -> None:
        """The result (image 1) edited together with original image ``keep`` (image 2)."""
        if not await acknowledge(interaction):
            return
        parent = JobSpec.from_job(job).options
        try:
            result = await result_input(self.bot, job, message_id)
            (original,) = await fresh_inputs(self.bot, job, (keep,))
        except KontextError as err:
            await reply_error(interaction, err)
            return
        options = dataclasses.replace(
            parent,
            prompt=prompt,
            image_1=result,
            image_2=original,
            seed=None,
            parent_job_id=job.id,
            source=Source.USE_AS_INPUT,
        )
        await launch(self.bot, interaction, options)

    # --- delete -----------------------------------------------------------------------------

    async def delete(self, interaction: discord.Interaction, job: Job) -> None:
        """The maker or a member with Manage Messages removes the result (and its showcase post).

        Only the job's own result message: the button must sit on the message stored as the
        job's result (``result_message_id`` in ``result_channel_id``), so a custom id naming
        another job, or the button on any other message, deletes nothing.
        """
        result_channel = job.result_channel_id or job.channel_id
        message = interaction.message
        if (
            message is None
            or not job.result_message_id
            or message.id != job.result_message_id
            or interaction.channel_id != result_channel
        ):
            log.warning(
                "job %s: delete refused on message %s in channel %s (result is %s in %s)",
                job.id, message.id if message else None, interaction.channel_id,
                job.result_message_id, result_channel,
            )
            await reply_error(interaction, InputError("not the result", key="result.wrong_message"))
            return
        perms = interaction.permissions
        if interaction.user.id != job.user_id and not perms.manage_messages:
            await reply_error(interaction, InputError("not the maker", key="result.delete_refused"))
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            await (
                self.bot.get_partial_messageable(result_channel)
                .get_partial_message(job.result_message_id)
                .delete()
            )
        except discord.NotFound:
            pass
        except discord.HTTPException as exc:
            log.warning("job %s: could not delete the result: %s", job.id, exc)
            await reply_error(interaction, KontextError(f"delete failed: {exc.status}"))
            return
        await Showcase(self.bot).remove_for_job(job)
        log.info("job %s: result deleted by %s", job.id, interaction.user.id)
        await interaction.followup.send(t("result.deleted", locale_of(interaction)), ephemeral=True)


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(ResultsCog(bot))

"""The buttons under every result: Reroll, Edit prompt, Swap images, Use as input, Share, Delete.

They are persistent :class:`discord.ui.DynamicItem` buttons: the custom id carries the action
and the job id (``kontext:reroll:<job id>``), and everything else is read from the database when
a button is pressed, so they keep working after a restart or a deploy (the cog registers the
button class at load; no view object has to survive).

Each new job goes through :meth:`cogs.kontext.KontextCog.launch` with the pressing (or modal)
interaction: its id is the new job's id, and the server's rules, credits, cooldown and queue
apply as for ``/kontext``. Input URLs expire (~1 day): inputs that came from a message (context
menu, a previous result) are re-read from that message for fresh URLs; others are probed, and
when they are gone the member is told plainly (``input.expired``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord.ext import commands

from cogs.common import gate_refuses, locale_of, reply_error, store_of
from kontext.errors import InputError, KontextError
from kontext.i18n import t
from kontext.pipeline import InputImage, JobSpec
from kontext.store import Job
from kontext.vocab import Source

if TYPE_CHECKING:
    from bot import KontextBot
    from cogs.kontext import KontextCog

log = logging.getLogger("kontext.cogs.results")

ACTIONS = ("reroll", "edit", "swap", "use", "share", "delete")
#: action -> (label key, style, row)
BUTTONS: dict[str, tuple[str, discord.ButtonStyle, int]] = {
    "reroll": ("result.reroll", discord.ButtonStyle.primary, 0),
    "edit": ("result.edit", discord.ButtonStyle.secondary, 0),
    "swap": ("result.swap", discord.ButtonStyle.secondary, 0),
    "use": ("result.use", discord.ButtonStyle.secondary, 0),
    "share": ("result.share", discord.ButtonStyle.success, 1),
    "delete": ("result.delete", discord.ButtonStyle.danger, 1),
}
EMOJI = {"reroll": "🎲", "edit": "✏️", "swap": "🔀", "use": "➕", "share": "🌟", "delete": "🗑️"}
MODAL_TIMEOUT_S = 900.0
PROBE_TIMEOUT_S = 10.0


def custom_id(action: str, job_id: int) -> str:
    return f"kontext:{action}:{job_id}"


class ResultButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"kontext:(?P<action>reroll|edit|swap|use|share|delete):(?P<job_id>[0-9]{1,20})",
):
    """One button under a result; rebuilt from its custom id whenever it is pressed."""

    def __init__(self, action: str, job_id: int, label: str | None = None) -> None:
        key, style, row = BUTTONS[action]
        super().__init__(
            discord.ui.Button(
                label=label or action,
                style=style,
                emoji=EMOJI.get(action),
                custom_id=custom_id(action, job_id),
            ),
            row=row,
        )
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
        cog = interaction.client.get_cog("Results")  # type: ignore[attr-defined]  # the client is our commands.Bot
        if not isinstance(cog, ResultsCog):
            await reply_error(interaction, KontextError("results cog not loaded"))
            return
        await cog.handle(interaction, self.action, self.job_id)


OnPrompt = Callable[[discord.Interaction, str], Awaitable[None]]


class PromptModal(discord.ui.Modal):
    """A modal asking for a prompt (optionally prefilled); hands the text to ``on_done``."""

    def __init__(self, locale: str, *, title_key: str, on_done: OnPrompt, default: str = "") -> None:
        super().__init__(title=t(title_key, locale)[:45], timeout=MODAL_TIMEOUT_S)
        self.locale = locale
        self.on_done = on_done
        self.prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            custom_id="prompt",
            default=default[:1000] or None,
            placeholder=t("modal.prompt_placeholder", locale)[:100],
            min_length=1,
            max_length=1000,
        )
        self.add_item(discord.ui.Label(text=t("modal.prompt", locale)[:45], component=self.prompt))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.on_done(interaction, self.prompt.value)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]  # as discord.ui.Modal.on_error: a modal has no item
        log.error("prompt modal failed", exc_info=error)
        await reply_error(interaction, KontextError(type(error).__name__))


class UseAsInputModal(discord.ui.Modal):
    """A follow-up prompt plus which original image goes with the result."""

    def __init__(
        self, locale: str, on_done: Callable[[discord.Interaction, str, int], Awaitable[None]]
    ) -> None:
        super().__init__(title=t("modal.use_title", locale)[:45], timeout=MODAL_TIMEOUT_S)
        self.on_done = on_done
        self.prompt: discord.ui.TextInput[UseAsInputModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            custom_id="prompt",
            placeholder=t("modal.prompt_placeholder", locale)[:100],
            min_length=1,
            max_length=1000,
        )
        self.keep: discord.ui.Select[UseAsInputModal] = discord.ui.Select(
            custom_id="keep",
            min_values=1,
            max_values=1,
            options=[
                discord.SelectOption(label=t("embed.image", locale, n=1), value="1", default=True),
                discord.SelectOption(label=t("embed.image", locale, n=2), value="2"),
            ],
        )
        self.add_item(discord.ui.Label(text=t("modal.prompt", locale)[:45], component=self.prompt))
        self.add_item(
            discord.ui.Label(
                text=t("modal.keep", locale)[:45],
                description=t("modal.keep_hint", locale)[:100],
                component=self.keep,
            )
        )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        keep = 2 if self.keep.values and self.keep.values[0] == "2" else 1
        await self.on_done(interaction, self.prompt.value, keep)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]  # as discord.ui.Modal.on_error: a modal has no item
        log.error("use-as-input modal failed", exc_info=error)
        await reply_error(interaction, KontextError(type(error).__name__))


class ResultsCog(commands.Cog, name="Results"):
    """Builds the result buttons and answers them."""

    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(ResultButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(ResultButton)

    @property
    def kontext(self) -> KontextCog:
        cog = self.bot.get_cog("Kontext")
        assert cog is not None, "cogs.kontext must be loaded"
        return cog  # type: ignore[return-value]  # get_cog is untyped by name; asserted loaded above

    # --- the view ---------------------------------------------------------------------------

    async def result_view(self, spec: JobSpec) -> discord.ui.View:
        """The buttons for a new result (Share only when the server has a showcase channel)."""
        gs = await store_of(self.bot).settings.get(spec.guild_id)
        view = discord.ui.View(timeout=None)
        for action in ACTIONS:
            if action == "share" and not gs.showcase_channel_id:
                continue
            label = t(BUTTONS[action][0], spec.locale)[:80]
            view.add_item(ResultButton(action, spec.job_id, label))
        return view

    # --- dispatch ---------------------------------------------------------------------------

    async def handle(self, interaction: discord.Interaction, action: str, job_id: int) -> None:
        job = await store_of(self.bot).jobs.get(job_id)
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
            showcase = self.bot.get_cog("Showcase")
            if showcase is None:
                await reply_error(interaction, InputError("no showcase", key="showcase.no_channel"))
                return
            await showcase.share(interaction, job)  # type: ignore[attr-defined]  # the ShowcaseCog (no import: cycle)
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
        if not await self.kontext.acknowledge(interaction):
            return
        spec = JobSpec.from_job(job)
        try:
            image_1, image_2 = await self.fresh_inputs(job, (1, 2))
        except KontextError as err:
            await reply_error(interaction, err)
            return
        if swap:
            image_1, image_2 = image_2, image_1
        await self.kontext.launch(
            interaction,
            prompt=spec.prompt if prompt is None else prompt,
            image_1=image_1,
            image_2=image_2,
            aspect_ratio=spec.aspect_ratio,
            output_format=spec.output_format,
            safety_tolerance=spec.safety_tolerance,
            seed=spec.seed if keep_seed else None,
            parent_job_id=job.id,
            source=source,
        )

    async def ask_prompt(self, interaction: discord.Interaction, job: Job) -> None:
        if not await self.kontext.check_channel(interaction):
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
        if not await self.kontext.check_channel(interaction):
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
        if not await self.kontext.acknowledge(interaction):
            return
        spec = JobSpec.from_job(job)
        try:
            result = await self.result_input(job, message_id)
            (original,) = await self.fresh_inputs(job, (keep,))
        except KontextError as err:
            await reply_error(interaction, err)
            return
        await self.kontext.launch(
            interaction,
            prompt=prompt,
            image_1=result,
            image_2=original,
            aspect_ratio=spec.aspect_ratio,
            output_format=spec.output_format,
            safety_tolerance=spec.safety_tolerance,
            seed=None,
            parent_job_id=job.id,
            source=Source.USE_AS_INPUT,
        )

    # --- fresh input URLs ---------------------------------------------------------------------

    async def fetch_message(self, channel_id: int, message_id: int) -> discord.Message | None:
        """The message with fresh attachment URLs, or None when it is gone or unreadable."""
        if not channel_id or not message_id:
            return None
        try:
            return await self.bot.get_partial_messageable(channel_id).fetch_message(message_id)
        except (discord.NotFound, discord.Forbidden):
            return None

    async def url_alive(self, url: str) -> bool:
        """False when the CDN says the signed URL is gone (403/404/410)."""
        session = self.bot.http_session
        if session is None:
            return True
        try:
            async with session.head(
                url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S), allow_redirects=True
            ) as resp:
                return resp.status not in (401, 403, 404, 410)
        except (aiohttp.ClientError, TimeoutError):
            return True  # unknown: let the job's own download report it

    async def fresh_input(self, image: InputImage, channel_ids: list[int]) -> InputImage:
        """``image`` with a URL that works now; InputError ``input.expired`` when it is gone."""
        if image.message_id and image.attachment_id:
            for cid in dict.fromkeys(c for c in channel_ids if c):
                msg = await self.fetch_message(cid, image.message_id)
                if msg is None:
                    continue
                att = next((a for a in msg.attachments if a.id == image.attachment_id), None)
                if att is not None:
                    return dataclasses.replace(
                        image, url=att.url, size=att.size, content_type=att.content_type
                    )
            raise InputError("input message gone", key="input.expired")
        if await self.url_alive(image.url):
            return image
        raise InputError("input URL expired", key="input.expired")

    async def fresh_inputs(self, job: Job, which: tuple[int, ...]) -> list[InputImage]:
        spec = JobSpec.from_job(job)
        channels = [job.channel_id, job.result_channel_id or 0]
        images = {1: spec.image_1, 2: spec.image_2}
        return [await self.fresh_input(images[n], channels) for n in which]

    async def result_input(self, job: Job, message_id: int | None = None) -> InputImage:
        """The posted result image of ``job`` as an input (fresh URL from its message)."""
        channel_id = job.result_channel_id or job.channel_id
        msg = await self.fetch_message(channel_id, job.result_message_id or message_id or 0)
        att = pick_result_attachment(msg, job.id) if msg is not None else None
        if msg is None or att is None:
            raise InputError("result message gone", key="input.expired")
        return InputImage(
            url=att.url,
            filename=att.filename,
            size=att.size,
            content_type=att.content_type,
            attachment_id=att.id,
            message_id=msg.id,
        )

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
        showcase = self.bot.get_cog("Showcase")
        if showcase is not None:
            await showcase.remove_for_job(job)  # type: ignore[attr-defined]  # the ShowcaseCog (no import: cycle)
        log.info("job %s: result deleted by %s", job.id, interaction.user.id)
        await interaction.followup.send(t("result.deleted", locale_of(interaction)), ephemeral=True)


def pick_result_attachment(msg: discord.Message, job_id: int) -> discord.Attachment | None:
    """The result image among a result message's attachments."""
    for att in msg.attachments:
        if att.filename.startswith(f"kontext-{job_id}."):
            return att
    images = [a for a in msg.attachments if (a.content_type or "").startswith("image/")]
    return images[0] if images else (msg.attachments[0] if msg.attachments else None)


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(ResultsCog(bot))

"""Sharing results to the server's showcase channel, with optional moderator approval.

* Share (a result button, see ``cogs/results.py``) posts a card to the showcase channel: the
  result and both inputs (attached), the prompt, settings and seed, the maker's mention and a
  link back to the original. One post per job: the claim is a conditional insert into
  ``showcase_posts`` (:mod:`kontext.store.showcase`), so a second click (or a second process)
  gets "already shared" instead of a second card.
* With ``showcase_requires_approval`` a member's share first becomes a request card, posted as
  a reply to the result in the result's own channel (where the image is already public, so
  nothing unapproved reaches the showcase). Approve / Reject are persistent buttons everyone
  sees but only the showcase's moderators may use; Approve posts the card, Reject tells the
  maker. A moderator's own share needs no approval; nobody decides on their own request.
* A showcase *moderator* has Manage Messages in the showcase channel itself (its permission
  overwrites count), computed by discord.py from the guild's roles and that channel — not the
  permissions of the channel the button was pressed in.
* Results made with permissive safety (2) only go to an age-restricted showcase channel.
* Deleting the original (the Delete button) removes its showcase post or pending request.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import discord
from discord.ext import commands

from cogs.base import KontextBotBase, bot_of
from cogs.common import aspect_name, gate_refuses, locale_of, reply_error, safety_name
from cogs.inputs import fetch_message, fresh_inputs, pick_result_attachment
from kontext import images
from kontext.errors import InputError, KontextError
from kontext.i18n import t
from kontext.jobs import JobSpec
from kontext.store import Job
from kontext.store.types import ShowcasePost
from kontext.vocab import JobState

log = logging.getLogger("kontext.cogs.showcase")

THUMB_SIDE = 320
NO_PINGS = discord.AllowedMentions.none()


class DecisionButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"kontext:(?P<decision>approve|reject):(?P<job_id>[0-9]{1,20})",
):
    """Approve / Reject under a showcase request; rebuilt from its custom id when pressed."""

    def __init__(self, decision: str, job_id: int, label: str | None = None) -> None:
        style = discord.ButtonStyle.success if decision == "approve" else discord.ButtonStyle.danger
        super().__init__(
            discord.ui.Button(
                label=label or decision, style=style, custom_id=f"kontext:{decision}:{job_id}"
            )
        )
        self.decision = decision
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: Any, /
    ) -> DecisionButton:
        return cls(match["decision"], int(match["job_id"]), getattr(item, "label", None))

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        return not await gate_refuses(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        await Showcase(bot_of(interaction)).decide(interaction, self.decision, self.job_id)


def jump_url(guild_id: int, channel_id: int | None, message_id: int | None) -> str:
    return f"https://discord.com/channels/{guild_id}/{channel_id}/{message_id}"


def refuse(key: str, **params: Any) -> InputError:
    return InputError(key, key=key, **params)


def moderates(interaction: discord.Interaction, channel_id: int | None) -> bool:
    """True when the pressing member has Manage Messages in the channel ``channel_id`` of the
    interaction's server (its overwrites included); False when either is not known."""
    guild = interaction.guild
    member = interaction.user
    if guild is None or not channel_id or not isinstance(member, discord.Member):
        return False
    channel = guild.get_channel_or_thread(channel_id)  # a thread answers with its parent's rights
    if channel is None:
        return False
    return channel.permissions_for(member).manage_messages


class ShowcaseCog(commands.Cog, name="Showcase"):
    """Registers the Approve / Reject buttons (the rest is :class:`Showcase`)."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(DecisionButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(DecisionButton)


class Showcase:
    """Share, approve, reject and remove showcase posts (a result's Share and Delete buttons,
    the request card's Approve and Reject)."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot
        self.posts = bot.services.store.showcase

    def guild_locale(self, guild_id: int) -> str:
        guild = self.bot.get_guild(guild_id)
        return str(guild.preferred_locale.value) if guild is not None else "en-US"

    async def showcase_channel(self, channel_id: int) -> discord.abc.Messageable | None:
        channel = self.bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(channel_id)
            except discord.HTTPException:
                return None
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def check_target(self, job: Job) -> discord.abc.Messageable:
        """The showcase channel ``job`` may go to; InputError when none or not allowed."""
        gs = await self.bot.services.store.settings.get(job.guild_id)
        if not gs.showcase_channel_id:
            raise refuse("showcase.no_channel")
        channel = await self.showcase_channel(gs.showcase_channel_id)
        if channel is None:
            raise refuse("showcase.no_channel")
        is_nsfw = getattr(channel, "is_nsfw", None)
        nsfw = bool(is_nsfw()) if callable(is_nsfw) else False
        if int(job.params.get("safety_tolerance", 1)) >= 2 and not nsfw:
            raise refuse("showcase.nsfw_only")
        return channel

    # --- share ------------------------------------------------------------------------------

    async def share(self, interaction: discord.Interaction, job: Job) -> None:
        locale = locale_of(interaction)
        try:
            if job.state != JobState.POSTED:
                raise refuse("showcase.not_ready")
            channel = await self.check_target(job)
            is_mod = moderates(interaction, getattr(channel, "id", None))
            if interaction.user.id != job.user_id and not is_mod:
                raise refuse("showcase.only_maker")
        except KontextError as err:
            await reply_error(interaction, err)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        gs = await self.bot.services.store.settings.get(job.guild_id)
        needs_approval = gs.showcase_requires_approval and not is_mod
        state = "pending" if needs_approval else "posted"
        claimed = await self.posts.claim(
            job.id,
            guild_id=job.guild_id,
            requested_by=interaction.user.id,
            state=state,
            showcase_channel_id=getattr(channel, "id", None),
        )
        if not claimed:
            existing = await self.posts.get(job.id)
            await interaction.followup.send(self.already_text(existing, locale), ephemeral=True)
            return
        try:
            if needs_approval:
                card = await self.post_request(job, channel)
                await self.posts.set_message(job.id, state="pending", approval_message_id=card.id)
                text = t("showcase.sent_for_approval", locale)
            else:
                msg = await self.post_card(job, channel)
                await self.posts.set_message(job.id, state="posted", showcase_message_id=msg.id)
                text = t("showcase.shared", locale, url=msg.jump_url)
        except (discord.HTTPException, KontextError) as exc:
            log.warning("job %s: showcase share failed: %s", job.id, exc)
            await self.posts.release(job.id, state=state)
            error = exc if isinstance(exc, KontextError) else refuse("showcase.failed")
            await reply_error(interaction, error)
            return
        log.info("job %s shared by %s (%s)", job.id, interaction.user.id, state)
        await interaction.followup.send(text, ephemeral=True)

    def already_text(self, post: ShowcasePost | None, locale: str) -> str:
        if post is None:
            return t("showcase.failed", locale)
        if post.state == "posted":
            text = t("showcase.already", locale)
            if post.showcase_message_id:
                url = jump_url(post.guild_id, post.showcase_channel_id, post.showcase_message_id)
                text += f" {url}"
            return text
        return t(f"showcase.already_{post.state}", locale)

    async def post_request(self, job: Job, channel: discord.abc.Messageable) -> discord.Message:
        """The moderators' Approve / Reject card, as a reply to the result in its channel."""
        locale = self.guild_locale(job.guild_id)
        where = self.bot.get_partial_messageable(job.result_channel_id or job.channel_id)
        view = discord.ui.View(timeout=None)
        view.add_item(DecisionButton("approve", job.id, t("showcase.approve", locale)[:80]))
        view.add_item(DecisionButton("reject", job.id, t("showcase.reject", locale)[:80]))
        text = t(
            "showcase.request",
            locale,
            maker=f"<@{job.user_id}>",
            channel=f"<#{getattr(channel, 'id', '')}>",
        )
        reference = None
        if job.result_message_id:
            reference = discord.MessageReference(
                message_id=job.result_message_id,
                channel_id=job.result_channel_id or job.channel_id,
                guild_id=job.guild_id,
                fail_if_not_exists=False,
            )
        return await where.send(text, view=view, reference=reference, allowed_mentions=NO_PINGS)  # type: ignore[arg-type]  # view=None is accepted at runtime, typed View only

    async def post_card(self, job: Job, channel: discord.abc.Messageable) -> discord.Message:
        """Post the showcase card for ``job`` (result + inputs attached)."""
        embeds, files = await self.build_card(job)
        return await channel.send(embeds=embeds, files=files, allowed_mentions=NO_PINGS)

    async def build_card(self, job: Job) -> tuple[list[discord.Embed], list[discord.File]]:
        spec = JobSpec.from_job(job)
        locale = self.guild_locale(job.guild_id)
        result_channel = job.result_channel_id or job.channel_id
        msg = await fetch_message(self.bot, result_channel, job.result_message_id or 0)
        att = pick_result_attachment(msg, job.id) if msg is not None else None
        if msg is None or att is None:
            raise refuse("showcase.original_gone")
        files = [discord.File(io.BytesIO(await att.read()), filename=att.filename)]
        prompt = spec.prompt if len(spec.prompt) <= 1000 else spec.prompt[:999] + "…"
        card = discord.Embed(
            title=t("showcase.title", locale), description=prompt, colour=discord.Colour.gold()
        )
        card.set_image(url=f"attachment://{att.filename}")
        card.add_field(name=t("embed.maker", locale), value=f"<@{job.user_id}>")
        card.add_field(name=t("embed.seed", locale), value=f"`{spec.seed}`")
        card.add_field(
            name=t("showcase.settings", locale),
            value=t(
                "showcase.settings_value",
                locale,
                aspect=aspect_name(spec.aspect_ratio, locale),
                format=spec.output_format.upper(),
                safety=safety_name(spec.safety_tolerance, locale),
            ),
        )
        card.add_field(
            name=t("showcase.original", locale),
            value=f"[{t('showcase.jump', locale)}]({jump_url(job.guild_id, result_channel, msg.id)})",
            inline=False,
        )
        embeds = [card]
        thumbs = await self.input_thumbnails(job)
        if thumbs:
            for n, data in thumbs:
                name = f"input-{n}.jpg"
                files.append(discord.File(io.BytesIO(data), filename=name))
                embeds.append(
                    discord.Embed(title=t("embed.image", locale, n=n), colour=discord.Colour.gold())
                    .set_thumbnail(url=f"attachment://{name}")
                )
        else:
            card.add_field(
                name=t("embed.inputs", locale), value=t("showcase.inputs_gone", locale), inline=False
            )
        return embeds, files

    async def input_thumbnails(self, job: Job) -> list[tuple[int, bytes]]:
        """Small JPEGs of both inputs; empty when they can no longer be downloaded."""
        session = self.bot.services.http
        s = self.bot.settings
        out: list[tuple[int, bytes]] = []
        try:
            fresh = await fresh_inputs(self.bot, job, (1, 2))
            for n, image in enumerate(fresh, start=1):
                data, _info = await images.fetch_and_check(
                    session,
                    image.url,
                    which=n,
                    declared_size=image.size,
                    max_bytes=s.max_image_bytes,
                    max_pixels=s.max_image_pixels,
                )
                out.append((n, await images.thumbnail_bytes_async(data, THUMB_SIDE)))
        except (KontextError, OSError, ValueError) as exc:
            log.info("job %s: showcase without input thumbnails (%s)", job.id, exc)
            return []
        return out

    # --- approve / reject -------------------------------------------------------------------

    async def decide(self, interaction: discord.Interaction, decision: str, job_id: int) -> None:
        locale = locale_of(interaction)
        job = await self.bot.services.store.jobs.get(job_id)
        pending = await self.posts.get(job_id) if job is not None else None
        if job is None or job.guild_id != interaction.guild_id or pending is None:
            await reply_error(interaction, refuse("result.unknown"))
            return
        mod = interaction.user.id
        # the showcase the card would go to now; the one asked for when it is no longer set
        gs = await self.bot.services.store.settings.get(job.guild_id)
        if not moderates(interaction, gs.showcase_channel_id or pending.showcase_channel_id):
            await reply_error(interaction, refuse("showcase.moderators_only"))
            return
        if mod in (pending.requested_by, job.user_id):
            await reply_error(interaction, refuse("showcase.own_request"))
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        if decision == "reject":
            post = await self.posts.transition(
                job.id, from_states=("pending",), to_state="rejected", decided_by=mod
            )
            if post is None:
                await interaction.followup.send(t("showcase.decided", locale), ephemeral=True)
                return
            maker_locale = job.locale or self.guild_locale(job.guild_id)
            text = t(
                "showcase.rejected",
                maker_locale,
                maker=f"<@{job.user_id}>",
                moderator=f"<@{mod}>",
                channel=f"<#{post.showcase_channel_id}>",
            )
            await self.edit_request(interaction, text)
            log.info("job %s: showcase request rejected by %s", job.id, mod)
            await interaction.followup.send(t("showcase.rejected_done", locale), ephemeral=True)
            return
        try:
            channel = await self.check_target(job)
        except KontextError as err:
            await reply_error(interaction, err)
            return
        post = await self.posts.transition(
            job.id,
            from_states=("pending",),
            to_state="posted",
            decided_by=mod,
            showcase_channel_id=getattr(channel, "id", None),
        )
        if post is None:
            await interaction.followup.send(t("showcase.decided", locale), ephemeral=True)
            return
        try:
            msg = await self.post_card(job, channel)
        except (discord.HTTPException, KontextError) as exc:
            log.warning("job %s: approved card could not be posted: %s", job.id, exc)
            await self.posts.transition(job.id, from_states=("posted",), to_state="pending")
            error = exc if isinstance(exc, KontextError) else refuse("showcase.failed")
            await reply_error(interaction, error)
            return
        await self.posts.set_message(job.id, state="posted", showcase_message_id=msg.id)
        await self.edit_request(
            interaction,
            t(
                "showcase.approved",
                self.guild_locale(job.guild_id),
                maker=f"<@{job.user_id}>",
                moderator=f"<@{mod}>",
                url=msg.jump_url,
            ),
        )
        log.info("job %s: showcase request approved by %s", job.id, mod)
        await interaction.followup.send(t("showcase.shared", locale, url=msg.jump_url), ephemeral=True)

    async def edit_request(self, interaction: discord.Interaction, text: str) -> None:
        """Replace the request card's text and remove its buttons."""
        if interaction.message is None:
            return
        try:
            await interaction.message.edit(content=text, view=None, allowed_mentions=NO_PINGS)
        except discord.HTTPException as exc:
            log.warning("could not update a showcase request card: %s", exc)

    # --- removal ------------------------------------------------------------------------------

    async def remove_for_job(self, job: Job) -> None:
        """The original was deleted: take its showcase post (or pending request) down."""
        post = await self.posts.transition(
            job.id, from_states=("pending", "posted"), to_state="removed"
        )
        if post is None:
            return
        targets = [
            (post.showcase_channel_id, post.showcase_message_id),
            (job.result_channel_id or job.channel_id, post.approval_message_id),
        ]
        for channel_id, message_id in targets:
            if not channel_id or not message_id:
                continue
            try:
                await (
                    self.bot.get_partial_messageable(channel_id)
                    .get_partial_message(message_id)
                    .delete()
                )
            except discord.NotFound:
                pass
            except discord.HTTPException as exc:
                log.warning("job %s: could not remove showcase message %s: %s", job.id, message_id, exc)
        log.info("job %s: showcase post removed with the original", job.id)


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(ShowcaseCog(bot))

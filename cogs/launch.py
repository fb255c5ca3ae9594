"""The Discord side of starting a job, shared by every way a member starts one.

``/kontext`` (:mod:`cogs.kontext`), a result's buttons and modals (:mod:`cogs.results`) and the
message context menu (:mod:`cogs.context_menu`) all call :func:`launch` with the interaction
that asked: it acknowledges within Discord's 3 s (an ephemeral defer), reads the interaction
into a :class:`~kontext.launcher.JobRequest`, lets the core :class:`~kontext.launcher.JobLauncher`
apply the server's rules, shows a quote when the server wants one, and runs the job with an
:class:`~cogs.sinks.InteractionSink`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord

from cogs.base import KontextBotBase
from cogs.common import ACCEPTED_STATUS_AFTER_S, locale_of, reply_error
from cogs.sinks import InteractionSink
from kontext.errors import JobCancelled, KontextError
from kontext.i18n import t
from kontext.jobs import JobOptions, JobOutcome, JobSpec
from kontext.launcher import JobLauncher, JobRequest

log = logging.getLogger("kontext.cogs.launch")

QUOTE_TIMEOUT_S = 120.0


def channel_ids_of(interaction: discord.Interaction) -> list[int]:
    """The interaction's channel, and a thread's parent channel (the channel rules see both)."""
    ids = [interaction.channel_id or 0]
    parent_id = getattr(interaction.channel, "parent_id", None)
    if parent_id:
        ids.append(parent_id)
    return ids


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


async def acknowledge(interaction: discord.Interaction) -> bool:
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


async def check_channel(bot: KontextBotBase, interaction: discord.Interaction) -> bool:
    """Refuse (and tell the member) when jobs may not start in this channel.

    For flows that show a modal first (context menu, buttons): the member learns it before
    typing a prompt. :func:`launch` checks it again.
    """
    try:
        await bot.services.launcher.check_channel(interaction.guild_id, channel_ids_of(interaction))
    except KontextError as err:
        await reply_error(interaction, err)
        return False
    return True


async def launch(
    bot: KontextBotBase, interaction: discord.Interaction, options: JobOptions
) -> JobOutcome | None:
    """Start one job making ``options`` for ``interaction`` (slash command, button, modal or
    context menu).

    ``options.safety_tolerance`` None means the default: moderate (1), or the server's maximum
    when that is lower; ``options.seed`` None picks a random one; ``options.aspect_ratio`` None
    takes the server's default. The job's id is the interaction's id.
    """
    deferred_here = not interaction.response.is_done()
    if not await acknowledge(interaction):
        return None
    launcher = bot.services.launcher
    locale = locale_of(interaction)
    ids = channel_ids_of(interaction)
    is_nsfw = getattr(interaction.channel, "is_nsfw", None)
    request = JobRequest(
        job_id=interaction.id,
        guild_id=interaction.guild_id,
        channel_id=ids[0],
        parent_channel_id=ids[1] if len(ids) > 1 else None,
        channel_nsfw=bool(is_nsfw()) if callable(is_nsfw) else False,
        user_id=interaction.user.id,
        role_ids=tuple(r.id for r in getattr(interaction.user, "roles", [])),
        locale=locale,
        application_id=interaction.application_id,
        interaction_token=interaction.token,
        options=options,
    )
    try:
        prepared = await launcher.prepare(request)
        spec = prepared.spec
        cost = prepared.confirm_cost
        if cost is not None and not await confirm_quote(launcher, interaction, spec, cost):
            raise JobCancelled("quote declined")
    except KontextError as err:
        # our own private "thinking…" message becomes the answer (a quote card included)
        if not (deferred_here and await _status(interaction, err.user_message(locale), view=None)):
            await reply_error(interaction, err)
        return None
    sink = InteractionSink(bot, interaction, job_id=spec.job_id)
    sink.show(t("status.accepted", locale), after=ACCEPTED_STATUS_AFTER_S)
    try:
        return await launcher.run(spec, sink)
    finally:
        sink.close()


async def _status(interaction: discord.Interaction, text: str, **kwargs: Any) -> bool:
    """Edit the private status message; False when that failed."""
    try:
        await interaction.edit_original_response(content=text, **kwargs)
    except discord.HTTPException as exc:
        log.debug("status edit failed: %s", exc)
        return False
    return True


async def confirm_quote(
    launcher: JobLauncher, interaction: discord.Interaction, spec: JobSpec, cost: int
) -> bool:
    """Show cost, balance after and wait, with Confirm / Cancel. True when confirmed."""
    locale = spec.locale
    quote = await launcher.quote(spec, cost)
    view = QuoteView(spec.user_id, locale or "en-US")
    text = t(
        "quote.card",
        locale,
        cost=quote.cost,
        balance=quote.balance,
        after=quote.after,
        eta=round(quote.eta_s),
        queue=quote.waiting,
    )
    await _status(interaction, text, view=view)
    await view.done.wait()
    await _status(interaction, text, view=None)
    return bool(view.confirmed)

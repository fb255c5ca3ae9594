"""The sink of a job this process did not receive: another process did, or one that stopped.

While the interaction token lives (15 minutes), a :class:`StoredInteraction` rebuilt from the
job lets :class:`~cogs.sinks.InteractionSink` edit the member's private status and post the
result as a follow-up; after that the job talks through the channel with a mention.
"""

from __future__ import annotations

import time
from typing import Any, cast

import discord

from cogs.base import KontextBotBase
from cogs.sinks import ChannelSink, InteractionSink
from kontext.jobs import JobSink
from kontext.store import Job

#: an interaction token lives 15 minutes; past this age a recovered job talks through the channel
TOKEN_USABLE_S = 14 * 60.0


class StoredInteraction:
    """Just enough of a ``discord.Interaction``, rebuilt from a stored job, for
    :class:`~cogs.sinks.InteractionSink`: a recovered job can still edit the member's private status and
    post its result as a follow-up while the interaction token lives."""

    def __init__(self, bot: KontextBotBase, job: Job, *, application_id: int, token: str) -> None:
        self._bot = bot
        self.id = job.id
        self.application_id = application_id
        self.token = token
        self.guild_id = job.guild_id
        self.channel_id = job.channel_id
        self.user = discord.Object(job.user_id)
        try:
            self.locale = discord.Locale(job.locale or "en-US")
        except ValueError:
            self.locale = discord.Locale.american_english
        self.followup = discord.Webhook.from_state(
            data={"id": application_id, "type": 3, "token": token},
            state=bot._connection,
        )

    @property
    def filesize_limit(self) -> int:
        guild = self._bot.get_guild(self.guild_id) if self.guild_id else None
        return guild.filesize_limit if guild is not None else 10 * 1024 * 1024

    async def edit_original_response(self, **kwargs: Any) -> discord.WebhookMessage:
        message: discord.WebhookMessage = await self.followup.edit_message("@original", **kwargs)  # type: ignore[call-overload]  # discord.py takes "@original" (typed int only)
        return message


def token_age(job: Job, lease_s: float) -> float:
    """Seconds since the job's interaction, by the database's clock when it can be told.

    A claimed job's lease expiry is the database's now + ``lease_s`` at the claim, and its
    ``queued_at`` the database's now at the reservation: their difference does not depend on
    any process's clock (a process whose clock is off would misjudge the token's 15 minutes).
    """
    if job.lease_expires_at is not None and job.queued_at is not None:
        return max(0.0, float(job.lease_expires_at) - lease_s - float(job.queued_at))
    return time.time() - float(job.created_at)


def recovered_sink(bot: KontextBotBase, job: Job) -> JobSink:
    """How to talk to the member of a job this process did not receive (another process did,
    or one that stopped): through its interaction while the token lives (private status
    edits, the result as a follow-up), else through the channel with a mention."""
    fresh = token_age(job, bot.services.knobs.lease_s) < TOKEN_USABLE_S
    token, application_id = job.interaction_token, job.application_id
    if token and application_id and fresh:
        # StoredInteraction has what InteractionSink uses of a discord.Interaction
        stored = cast(
            discord.Interaction,
            StoredInteraction(bot, job, application_id=application_id, token=token),
        )
        return InteractionSink(bot, stored, job_id=job.id)
    return ChannelSink(bot, job.channel_id, job.user_id, job.locale, job_id=job.id)

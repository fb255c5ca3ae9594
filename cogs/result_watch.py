"""Sees the bot's own result messages on the gateway and records them on their job.

A result whose post got no clear answer (a 5xx after Discord created it, a dropped connection,
a restart mid-upload) is still proven posted when its MESSAGE_CREATE arrives: the message is the
bot's (or its application's, for an interaction follow-up) and carries ``kontext-<job id>.<ext>``.
The job's ``result_message_id`` is then filled while it is posting
(:meth:`kontext.store.jobs.JobStore.note_result_seen`), so a moderator deleting the message
later does not make it look unposted. Needs the ``GUILD_MESSAGES`` intent (not privileged: the
bot's own messages arrive with their attachments without the message content intent).
"""

from __future__ import annotations

import logging
import re

import discord
from discord.ext import commands

from cogs.base import KontextBotBase

log = logging.getLogger("kontext.cogs.result_watch")

RESULT_FILENAME = re.compile(r"kontext-(\d+)\.[A-Za-z0-9]+")


def result_job_id(message: discord.Message, own_ids: set[int]) -> int | None:
    """The job whose result ``message`` is, when it is one of the bot's results."""
    if message.author.id not in own_ids and message.webhook_id not in own_ids:
        return None
    for attachment in message.attachments:
        match = RESULT_FILENAME.fullmatch(attachment.filename)
        if match:
            return int(match.group(1))
    return None


class ResultWatch(commands.Cog):
    """Records every result message of the bot that the gateway shows."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot

    def own_ids(self) -> set[int]:
        return {i for i in (getattr(self.bot.user, "id", None), self.bot.application_id) if i}

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not message.attachments:
            return  # every other message of the servers: nothing to read
        job_id = result_job_id(message, self.own_ids())
        if job_id is None:
            return
        try:
            noted = await self.bot.services.store.jobs.note_result_seen(
                job_id, message.channel.id, message.id
            )
        except Exception:  # the post itself decides the job; this is extra proof
            log.warning("job %s: could not record result message %s", job_id, message.id, exc_info=True)
            return
        if noted:
            log.info("job %s: result message %s seen while posting", job_id, message.id)


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(ResultWatch(bot))

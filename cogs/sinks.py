"""The job sinks: how the core pipeline talks to a member through Discord.

A *sink* (:class:`kontext.jobs.JobSink`) is how the core pipeline talks to a member:
:class:`InteractionSink` answers through the interaction (status edits, the result, ephemeral
errors) and falls back to the channel when the interaction token has died; :class:`ChannelSink`
talks through the channel only. The sink of a job this process did not receive is in
:mod:`cogs.recovered`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import discord
from discord.http import Route

from cogs.base import KontextBotBase
from cogs.common import locale_of
from cogs.result_message import delivery_of, jump_url, post_result
from kontext.errors import KontextError, ResultNotDelivered
from kontext.i18n import t
from kontext.jobs import Delivery, ResultInfo

log = logging.getLogger("kontext.cogs")

TOKEN_DEAD_CODES = {10015, 10062, 50027}  # unknown webhook / interaction, invalid webhook token
BAR_WIDTH = 12
#: "posting" appears only when the upload takes longer than this
POSTING_STATUS_AFTER_S = 0.3
DISCORD_EPOCH_S = discord.utils.DISCORD_EPOCH / 1000


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``▰▰▰▱▱▱`` for ``fraction`` in 0..1."""
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    return "▰" * full + "▱" * (width - full)


def token_dead(exc: discord.HTTPException) -> bool:
    """True when the interaction's token can no longer be used."""
    return exc.code in TOKEN_DEAD_CODES or exc.status == 401 or isinstance(exc, discord.NotFound)

def since_snowflake(since: float) -> int:
    """The ``after=`` snowflake that includes every message created at unix time ``since``
    or later (same millisecond included)."""
    moment = datetime.fromtimestamp(max(since, DISCORD_EPOCH_S), UTC)
    return max(0, discord.utils.time_snowflake(moment) - 1)


class ChannelSink:
    """Talks to a member through a channel (no interaction): recovered jobs, dead tokens."""

    def __init__(
        self, bot: KontextBotBase, channel_id: int, user_id: int, locale: str | None, *, job_id: int
    ) -> None:
        self.bot = bot
        self.channel_id = channel_id
        self.user_id = user_id
        self.locale = locale
        self.job_id = job_id

    async def channel(self) -> discord.abc.Messageable:
        channel = self.bot.get_channel(self.channel_id)
        if channel is None:
            channel = await self.bot.fetch_channel(self.channel_id)
        return channel  # type: ignore[return-value]  # a job's channel is a text channel or thread

    @property
    def upload_limit(self) -> int:
        channel = self.bot.get_channel(self.channel_id)
        guild = getattr(channel, "guild", None)
        return guild.filesize_limit if guild is not None else 10 * 1024 * 1024

    async def queued(self, position: int, total: int, eta_s: float) -> None:
        return None

    async def generating(self, elapsed_s: float, estimate_s: float) -> None:
        return None

    async def deliver(self, result: ResultInfo) -> Delivery:
        """Post the result in the channel with a mention, once (:func:`post_once`)."""
        route = Route("POST", "/channels/{channel_id}/messages", channel_id=self.channel_id)
        try:
            data = await post_result(
                self.bot,
                route,
                result,
                self.locale,
                bot_auth=True,
                content=f"<@{self.user_id}>",
                allowed_mentions=discord.AllowedMentions(users=True),
            )
        except discord.HTTPException as exc:
            raise ResultNotDelivered(f"channel post failed: HTTP {exc.status} code {exc.code}") from exc
        return delivery_of(data, self.channel_id)

    async def failed(self, error: KontextError, *, refunded: int) -> None:
        channel = await self.channel()
        await channel.send(
            f"<@{self.user_id}> {error.user_message(self.locale)}",
            allowed_mentions=discord.AllowedMentions(users=True),
        )

    async def find_result(self, since: float = 0.0) -> Delivery | None:
        """This job's result among every message of the channel created since unix time
        ``since`` (None: not there).

        A result is the bot's own message (or its application's, for a follow-up) carrying
        ``kontext-<job id>.<ext>``. The search pages through the channel oldest first from
        ``since`` (a snowflake ``after=``), with no fixed count: a result pushed behind any
        number of newer messages is found. Raises when the channel cannot be read.
        """
        channel = await self.channel()
        own = {i for i in (getattr(self.bot.user, "id", None), self.bot.application_id) if i}
        prefix = f"kontext-{self.job_id}."
        after = discord.Object(since_snowflake(since))
        async for msg in channel.history(limit=None, after=after, oldest_first=True):
            if msg.author.id not in own and msg.webhook_id not in own:
                continue
            if any(a.filename.startswith(prefix) for a in msg.attachments):
                return Delivery(msg.id, msg.channel.id)
        return None


class InteractionSink:
    """Talks to a member through their interaction, with the channel as the fallback.

    The interaction is deferred ephemerally: queue position, progress and errors edit that
    private message; the result goes out as a public follow-up (after one edit of the original,
    so that Discord does not turn the follow-up into the ephemeral "thinking" message), and the
    private message then links to it. When the token has died (15 minutes, or a restart), the
    result is posted in the channel with a mention instead.
    """

    def __init__(self, bot: KontextBotBase, interaction: discord.Interaction, *, job_id: int) -> None:
        self.bot = bot
        self.interaction = interaction
        self.locale = locale_of(interaction)
        self.fallback = ChannelSink(
            bot, interaction.channel_id or 0, interaction.user.id, self.locale, job_id=job_id
        )
        self.dead = False
        #: the private message was edited at least once: Discord's "thinking…" state is over,
        #: so a follow-up is a new message
        self.edited = False
        self._lock = asyncio.Lock()  # one edit of the private message at a time
        self._issued = 0  # sequence number of the newest status asked for
        self._shown = 0  # sequence number of the status on screen
        self._pending: tuple[int, str] | None = None  # the newest background status not sent yet
        self._background: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []  # statuses asked for with ``after``

    @property
    def upload_limit(self) -> int:
        return int(self.interaction.filesize_limit)

    def show(self, text: str, *, after: float = 0.0) -> None:
        """Show ``text`` in the private message soon, without waiting for Discord.

        Statuses appear in the order they were asked for; one overtaken by a newer status
        before it was sent is never sent at all, so a quick job skips straight ahead. With
        ``after``, the status waits that many seconds first: a step that is over by then (the
        image checks, a quick upload) costs no edit at all.
        """
        self._issued += 1
        if after > 0:
            self._timers.append(
                asyncio.get_running_loop().call_later(
                    after, self._show_if_newest, self._issued, text
                )
            )
            return
        self._show_if_newest(self._issued, text)

    def close(self) -> None:
        """The job is over here: statuses asked for but not sent yet are dropped.

        Called when :meth:`~kontext.pipeline.JobPipeline.run` returns or raises, so that no
        delayed status lands after the last word — nor on an interaction that another process
        took over (a duplicate delivery).
        """
        self._issued += 1
        self._pending = None
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    def _show_if_newest(self, seq: int, text: str) -> None:
        if seq != self._issued:
            return  # overtaken (or the job ended) while it waited
        self._pending = (seq, text)
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(
                self._send_pending(), name=f"kontext-status-{self.interaction.id}"
            )

    async def _send_pending(self) -> None:
        while self._pending is not None:
            seq, text = self._pending
            self._pending = None
            await self._edit(seq, text)

    async def settle(self) -> None:
        """Wait until the background statuses asked for so far were sent (or dropped)."""
        if self._background is not None:
            await asyncio.gather(self._background, return_exceptions=True)

    async def _status(self, text: str, **kwargs: Any) -> bool:
        """Edit the private message now; it overtakes every status asked for before."""
        self._issued += 1
        self._pending = None
        return await self._edit(self._issued, text, **kwargs)

    async def _edit(self, seq: int, text: str, **kwargs: Any) -> bool:
        async with self._lock:
            if self.dead:
                return False
            if seq < self._shown:  # cannot happen while the lock is first come first served
                return True  # a newer status is already on screen: never go back
            try:
                await self.interaction.edit_original_response(content=text, **kwargs)
            except discord.HTTPException as exc:
                if token_dead(exc):
                    self.dead = True
                log.debug("status edit failed: %s", exc)
                return False
            except Exception as exc:  # noqa: BLE001 - a status is best-effort (transport errors)
                log.debug("status edit failed: %s: %s", type(exc).__name__, exc)
                return False
            self._shown = seq
            self.edited = True
            return True

    async def queued(self, position: int, total: int, eta_s: float) -> None:
        await self._status(
            t("status.queued", self.locale, position=position, total=total, eta=round(eta_s))
        )

    async def generating(self, elapsed_s: float, estimate_s: float) -> None:
        if elapsed_s < 0:
            await self._status(t("status.handed_over", self.locale))
            return
        bar = progress_bar(elapsed_s / estimate_s if estimate_s > 0 else 0.0)
        await self._status(
            t(
                "status.generating",
                self.locale,
                bar=bar,
                elapsed=round(elapsed_s),
                estimate=round(estimate_s),
            )
        )

    async def _ready_for_followup(self) -> bool:
        """True once the private message was edited (else a follow-up would replace it)."""
        if self.dead:
            return False
        if self.edited:
            self.show(t("status.posting", self.locale), after=POSTING_STATUS_AFTER_S)
            return True
        await self.settle()
        return self.edited or await self._status(t("status.posting", self.locale))

    async def deliver(self, result: ResultInfo) -> Delivery:
        """Post the result as a public follow-up, once (:func:`post_once`); through the channel
        when the interaction's token has died (a 4xx that proves nothing was posted)."""
        if await self._ready_for_followup():
            route = Route(
                "POST",
                "/webhooks/{webhook_id}/{webhook_token}",
                webhook_id=self.interaction.application_id,
                webhook_token=self.interaction.token,
            )
            try:
                data = await post_result(
                    self.bot,
                    route,
                    result,
                    self.locale,
                        bot_auth=False,
                    query={"wait": "true"},
                )
            except discord.HTTPException as exc:
                if not token_dead(exc):
                    raise ResultNotDelivered(
                        f"post failed: HTTP {exc.status} code {exc.code}"
                    ) from exc
                log.info(
                    "job %s: interaction token dead; posting through the channel",
                    result.spec.job_id,
                )
                self.dead = True
            else:
                delivery = delivery_of(data, self.fallback.channel_id)
                url = jump_url(self.interaction.guild_id, delivery.channel_id, delivery.message_id)
                # the image is public now: whatever happens to this status edit, it was posted
                try:
                    await self._status(t("status.posted", self.locale, url=url))
                except Exception as exc:  # noqa: BLE001
                    log.debug("job %s: status after the post failed: %s", result.spec.job_id, exc)
                return delivery
        return await self.fallback.deliver(result)

    async def find_result(self, since: float = 0.0) -> Delivery | None:
        return await self.fallback.find_result(since)

    async def failed(self, error: KontextError, *, refunded: int) -> None:
        if await self._status(error.user_message(self.locale), embed=None, view=None):
            return
        await self.fallback.failed(error, refunded=refunded)


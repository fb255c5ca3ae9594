"""The result message as members see it: the embed card (prompt, inputs, settings, seed, time,
credits left), the image file (streamed from its temporary file or from its bytes without a
copy), the buttons, and its one upload (:func:`post_result`, through :func:`cogs.upload.post_once`).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import discord
from discord.http import Route, handle_message_parameters

from cogs import result_buttons
from cogs.base import KontextBotBase
from cogs.common import aspect_name, safety_name
from cogs.upload import post_once
from kontext.i18n import t
from kontext.jobs import Delivery, ResultInfo

log = logging.getLogger("kontext.cogs")


def result_filename(result: ResultInfo) -> str:
    return f"kontext-{result.spec.job_id}.{result.image.filename_ext}"


def result_embed(result: ResultInfo, locale: str | None) -> discord.Embed:
    """The card under a result: prompt, inputs, settings, seed, time, credits left."""
    spec = result.spec
    prompt = spec.prompt if len(spec.prompt) <= 1000 else spec.prompt[:999] + "…"
    embed = discord.Embed(description=prompt, colour=discord.Colour.blurple())
    embed.set_author(name=t("embed.title", locale))
    embed.set_image(url=f"attachment://{result_filename(result)}")
    embed.set_thumbnail(url=spec.image_1.url)
    embed.add_field(
        name=t("embed.inputs", locale),
        value=f"[{t('embed.image', locale, n=1)}]({spec.image_1.url}) · "
        f"[{t('embed.image', locale, n=2)}]({spec.image_2.url})",
        inline=False,
    )
    embed.add_field(name=t("embed.aspect_ratio", locale), value=aspect_name(spec.aspect_ratio, locale))
    embed.add_field(name=t("embed.seed", locale), value=f"`{spec.seed}`")
    embed.add_field(name=t("embed.format", locale), value=result.image.format.upper())
    embed.add_field(name=t("embed.safety", locale), value=safety_name(spec.safety_tolerance, locale))
    embed.add_field(name=t("embed.time", locale), value=f"{result.total_seconds:.1f} s")
    if result.balance_after >= 0:
        embed.add_field(name=t("embed.credits_left", locale), value=str(result.balance_after))
    embed.add_field(name=t("embed.maker", locale), value=f"<@{spec.user_id}>")
    footer = t("embed.footer", locale)
    if result.image.reencoded:
        footer += " · " + t("embed.reencoded", locale)
    embed.set_footer(text=footer)
    return embed


class UploadBuffer(io.BytesIO):
    """An ``io.BytesIO`` over a result's bytes that never copies them.

    aiohttp sizes an ``io.BytesIO`` upload with ``getbuffer()``, and CPython copies a buffer it
    still shares with the ``bytes`` it was made from the moment one is asked for: one more copy
    of every result for as long as it uploads (50 results of 1 MiB: 50 MiB). The view handed out
    here is read-only, of the very bytes the buffer reads from.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._data = data

    def getbuffer(self) -> memoryview:
        return memoryview(self._data)


def result_file(result: ResultInfo) -> discord.File:
    """The result as an upload: from its temporary file when it has one (aiohttp streams the
    file in pieces; nothing is read into memory here), else from its bytes without a copy.

    The file stays the pipeline's: discord.py never closes a file object it did not open, and
    the pipeline closes it when the job ends. Each call starts at the first byte (a post that
    falls back to the channel uploads again)."""
    file = result.image.file
    if file is not None:
        # discord.File reads any binary stream; its annotation names only BufferedIOBase
        return discord.File(file.stream(), filename=result_filename(result))  # type: ignore[arg-type]  # see above
    return discord.File(UploadBuffer(result.image.data), filename=result_filename(result))

async def result_view(bot: KontextBotBase, result: ResultInfo) -> discord.ui.View | None:
    """The buttons under a result (:mod:`cogs.result_buttons`); None when they cannot be built:
    a failure to build them never stops the result from being posted."""
    try:
        return await result_buttons.result_view(bot.services.store, result.spec)
    except Exception:
        log.exception("job %s: could not build the result buttons", result.spec.job_id)
        return None


def jump_url(guild_id: int | None, channel_id: int, message_id: int) -> str:
    """The link to a message (what :attr:`discord.Message.jump_url` gives)."""
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


async def post_result(
    bot: KontextBotBase,
    route: Route,
    result: ResultInfo,
    locale: str | None,
    *,
    bot_auth: bool,
    content: str | None = None,
    allowed_mentions: discord.AllowedMentions | None = None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The result (embed, file, buttons) posted once at ``route`` (:func:`post_once`).

    The buttons (:mod:`cogs.result_buttons`) are answered by their custom id by the persistent
    ``ResultButton`` of :mod:`cogs.results`: the view needs no registering with the message.
    """
    missing: Any = discord.utils.MISSING
    view = await result_view(bot, result)
    params = handle_message_parameters(
        content=missing if content is None else content,
        embed=result_embed(result, locale),
        file=result_file(result),
        view=missing if view is None else view,
        allowed_mentions=missing if allowed_mentions is None else allowed_mentions,
        previous_allowed_mentions=bot.allowed_mentions,
    )
    with params:
        return await post_once(
            bot,
            route,
            files=params.files or (),
            multipart=params.multipart or (),
            bot_auth=bot_auth,
            query=query,
        )


def delivery_of(data: dict[str, Any], channel_id: int) -> Delivery:
    return Delivery(int(data["id"]), int(data.get("channel_id") or channel_id))

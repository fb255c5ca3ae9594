"""Fresh input URLs for a new job from an old one (buttons, the showcase's thumbnails).

Attachment URLs expire (~1 day): inputs that came from a message (the context menu, a previous
result) are re-read from that message for fresh URLs; others are probed, and when they are gone
the member is told plainly (``input.expired``).
"""

from __future__ import annotations

import dataclasses

import aiohttp
import discord

from cogs.base import KontextBotBase
from kontext.errors import InputError
from kontext.jobs import InputImage, JobSpec
from kontext.store import Job

PROBE_TIMEOUT_S = 10.0


async def fetch_message(bot: KontextBotBase, channel_id: int, message_id: int) -> discord.Message | None:
    """The message with fresh attachment URLs, or None when it is gone or unreadable."""
    if not channel_id or not message_id:
        return None
    try:
        return await bot.get_partial_messageable(channel_id).fetch_message(message_id)
    except (discord.NotFound, discord.Forbidden):
        return None

async def url_alive(bot: KontextBotBase, url: str) -> bool:
    """False when the CDN says the signed URL is gone (403/404/410)."""
    session = bot.services.http
    try:
        async with session.head(
            url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S), allow_redirects=True
        ) as resp:
            return resp.status not in (401, 403, 404, 410)
    except (aiohttp.ClientError, TimeoutError):
        return True  # unknown: let the job's own download report it

def input_from_attachment(att: discord.Attachment, message_id: int | None = None) -> InputImage:
    """A job input from a Discord attachment (of the message ``message_id`` when known)."""
    return InputImage(
        url=att.url,
        filename=att.filename,
        size=att.size,
        content_type=att.content_type,
        attachment_id=att.id,
        message_id=message_id,
    )


async def fresh_input(bot: KontextBotBase, image: InputImage, channel_ids: list[int]) -> InputImage:
    """``image`` with a URL that works now; InputError ``input.expired`` when it is gone."""
    if image.message_id and image.attachment_id:
        for cid in dict.fromkeys(c for c in channel_ids if c):
            msg = await fetch_message(bot, cid, image.message_id)
            if msg is None:
                continue
            att = next((a for a in msg.attachments if a.id == image.attachment_id), None)
            if att is not None:
                return dataclasses.replace(
                    image, url=att.url, size=att.size, content_type=att.content_type
                )
        raise InputError("input message gone", key="input.expired")
    if await url_alive(bot, image.url):
        return image
    raise InputError("input URL expired", key="input.expired")

async def fresh_inputs(bot: KontextBotBase, job: Job, which: tuple[int, ...]) -> list[InputImage]:
    spec = JobSpec.from_job(job)
    channels = [job.channel_id, job.result_channel_id or 0]
    images = {1: spec.image_1, 2: spec.image_2}
    return [await fresh_input(bot, images[n], channels) for n in which]

async def result_input(bot: KontextBotBase, job: Job, message_id: int | None = None) -> InputImage:
    """The posted result image of ``job`` as an input (fresh URL from its message)."""
    channel_id = job.result_channel_id or job.channel_id
    msg = await fetch_message(bot, channel_id, job.result_message_id or message_id or 0)
    att = pick_result_attachment(msg, job.id) if msg is not None else None
    if msg is None or att is None:
        raise InputError("result message gone", key="input.expired")
    return input_from_attachment(att, msg.id)


def pick_result_attachment(msg: discord.Message, job_id: int) -> discord.Attachment | None:
    """The result image among a result message's attachments."""
    for att in msg.attachments:
        if att.filename.startswith(f"kontext-{job_id}."):
            return att
    images = [a for a in msg.attachments if (a.content_type or "").startswith("image/")]
    return images[0] if images else (msg.attachments[0] if msg.attachments else None)

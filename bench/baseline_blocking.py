"""ANTI-PATTERN BASELINE — for the benchmark only. The bot never imports this module.

This is ``/kontext`` written the way the seed's sample
(``shared/seed/segmind-multi-image-kontext-max.txt``) calls the API: a blocking
``requests.post(url, headers=headers, json=data)`` — here ``urllib.request.urlopen`` from the
standard library, which blocks in exactly the same way — straight inside the command's coroutine.
While it waits for the API (~18 s in production) the whole event loop is frozen: no other
command, no gateway heartbeat, no other member's job. The benchmark runs it in the same harness
as the real bot to show what that costs (event-loop lag, throughput), as a ratio.

It keeps the seed's shape on purpose: no credits, no queue, no checks; defer, call, post.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import urllib.request

import discord
import yarl
from discord import app_commands
from discord.ext import commands


class BlockingKontextCog(commands.Cog):
    """``/kontext`` with the API call made the seed's way: blocking, in the event loop."""

    def __init__(self, bot: commands.Bot, base_url: str, api_key: str) -> None:
        self.bot = bot
        self.url = f"{base_url.rstrip('/')}/v1/multi-image-kontext-max"
        self.api_key = api_key

    @app_commands.command(name="kontext", description="Combine two images (blocking baseline)")
    async def kontext(
        self,
        interaction: discord.Interaction,
        image_1: discord.Attachment,
        image_2: discord.Attachment,
        prompt: str,
    ) -> None:
        await interaction.response.defer(thinking=True)
        data = {
            "seed": 42,
            "prompt": prompt,
            "aspect_ratio": "1:1",
            "input_image_1": image_1.url,
            "input_image_2": image_2.url,
            "output_format": "jpg",
            "safety_tolerance": 1,
        }
        request = urllib.request.Request(  # noqa: S310 - a fixed http(s) URL from the settings
            self.url,
            data=json.dumps(data).encode(),
            headers={"x-api-key": self.api_key, "Content-Type": "application/json"},
            method="POST",
        )
        # THE ANTI-PATTERN: a blocking HTTP call inside a coroutine freezes the event loop.
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: ASYNC210, S310
            image = response.read()
        await interaction.followup.send(file=discord.File(io.BytesIO(image), filename="result.jpg"))


class BaselineBot(commands.Bot):
    def __init__(self, base_url: str, api_key: str) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, help_command=None)
        self.segmind_base_url = base_url
        self.segmind_api_key = api_key

    async def setup_hook(self) -> None:
        await self.add_cog(BlockingKontextCog(self, self.segmind_base_url, self.segmind_api_key))
        await self.tree.sync()


async def run_baseline() -> int:
    """Run the baseline bot from the same environment variables as the real bot; SIGTERM stops it."""
    env = os.environ
    if env.get("DISCORD_API_BASE_URL"):
        discord.http.Route.BASE = env["DISCORD_API_BASE_URL"]
    if env.get("DISCORD_GATEWAY_URL"):
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(env["DISCORD_GATEWAY_URL"])
    bot = BaselineBot(env["SEGMIND_BASE_URL"], env["SEGMIND_API_KEY"])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    async with bot:
        await bot.start(env["DISCORD_TOKEN"])
    return 0

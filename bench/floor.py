"""THE FLOOR — for the benchmark only. The bot never imports this module.

The least one ``/kontext`` job can cost on this machine: a bare :mod:`aiohttp` client making the
same HTTP exchanges as the real bot, against the same emulators, with nothing else — no
discord.py, no database, no credits, no queue, no checks, no image decoding. It is what the
bot's own figures are divided by, measured in the same run, so that a figure reads as "so many
times the floor" whatever the shared machine's speed is that day.

The exchanges, in the real bot's order (read off the emulators' request logs for one job):

1. the gateway's ``INTERACTION_CREATE`` arrives on a plain websocket (JSON, no compression);
2. ``POST /interactions/{id}/{token}/callback?with_response=1`` — defer (type 5);
3. ``GET`` both input attachments from the CDN (the bot reads them to check them);
4. ``POST /v1/multi-image-kontext-max`` to Segmind, with the inputs' URLs; the image comes back;
5. ``PATCH …/messages/@original`` — the "uploading" status;
6. ``POST /webhooks/{app}/{token}?wait=1`` — the follow-up with the image (multipart);
7. ``PATCH …/messages/@original`` — "✅ Done".

It registers a ``/kontext`` command of the same shape at start (not measured). SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any

import aiohttp

#: /kontext as the floor registers it: the options the benchmark sends
COMMAND = {
    "name": "kontext",
    "description": "Combine two images (floor)",
    "type": 1,
    "options": [
        {"type": 11, "name": "image_1", "description": "first image", "required": True},
        {"type": 11, "name": "image_2", "description": "second image", "required": True},
        {"type": 3, "name": "prompt", "description": "instruction", "required": True},
    ],
}


class FloorBot:
    """A gateway websocket and an HTTP session; each interaction is one task of 6 requests."""

    def __init__(self, env: dict[str, str]) -> None:
        self.token = env["DISCORD_TOKEN"]
        self.api = env["DISCORD_API_BASE_URL"].rstrip("/")
        self.gateway = env["DISCORD_GATEWAY_URL"]
        self.segmind = env["SEGMIND_BASE_URL"].rstrip("/") + "/v1/multi-image-kontext-max"
        self.segmind_key = env["SEGMIND_API_KEY"]
        self.app_id = ""
        self.seq: int | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        auth = {"Authorization": f"Bot {self.token}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            self.http = http
            async with http.ws_connect(f"{self.gateway}?v=10&encoding=json", max_msg_size=0) as ws:
                reader = asyncio.create_task(self._read(ws))
                stop = asyncio.create_task(self.stopping.wait())
                await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
                reader.cancel()
                stop.cancel()
                if self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        beat: asyncio.Task[None] | None = None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frame = json.loads(msg.data)
                if frame.get("s") is not None:
                    self.seq = frame["s"]
                op, data = frame.get("op"), frame.get("d")
                if op == 10:
                    beat = asyncio.create_task(self._heartbeat(ws, data["heartbeat_interval"] / 1000))
                    await ws.send_json({"op": 2, "d": {
                        "token": self.token, "intents": 1,
                        "properties": {"os": "linux", "browser": "floor", "device": "floor"},
                    }})
                elif op == 0 and frame.get("t") == "READY":
                    self.app_id = str(data["application"]["id"])
                    async with self.http.put(f"{self.api}/applications/{self.app_id}/commands",
                                             json=[COMMAND]) as resp:
                        resp.raise_for_status()
                elif op == 0 and frame.get("t") == "INTERACTION_CREATE":
                    task = asyncio.create_task(self._job(data))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        finally:
            if beat is not None:
                beat.cancel()

    async def _heartbeat(self, ws: aiohttp.ClientWebSocketResponse, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await ws.send_json({"op": 1, "d": self.seq})

    async def _job(self, interaction: dict[str, Any]) -> None:
        http, api = self.http, self.api
        options = {o["name"]: o.get("value") for o in interaction["data"].get("options", [])}
        attachments = interaction["data"].get("resolved", {}).get("attachments", {})
        urls = [attachments[str(options[name])]["url"] for name in ("image_1", "image_2")]
        token = interaction["token"]
        webhook = f"{api}/webhooks/{self.app_id}/{token}"
        async with http.post(f"{api}/interactions/{interaction['id']}/{token}/callback",
                             params={"with_response": "1"}, json={"type": 5}) as resp:
            await resp.read()
        for url in urls:
            async with http.get(url) as resp:
                await resp.read()
        payload = {
            "prompt": options["prompt"], "input_image_1": urls[0], "input_image_2": urls[1],
            "aspect_ratio": "1:1", "output_format": "jpg", "seed": 42, "safety_tolerance": 2,
        }
        async with http.post(self.segmind, json=payload, headers={"x-api-key": self.segmind_key}) as resp:
            resp.raise_for_status()
            image = await resp.read()
        async with http.patch(f"{webhook}/messages/@original", json={"content": "📤 Uploading…"}) as resp:
            await resp.read()
        form = aiohttp.FormData()
        form.add_field("payload_json", json.dumps({
            "content": "", "attachments": [{"id": 0, "filename": "kontext.jpg"}],
        }), content_type="application/json")
        form.add_field("files[0]", image, filename="kontext.jpg", content_type="image/jpeg")
        async with http.post(webhook, params={"wait": "1"}, data=form) as resp:
            await resp.read()
        async with http.patch(f"{webhook}/messages/@original", json={"content": "✅ Done"}) as resp:
            await resp.read()


async def run_floor() -> int:
    """Run the floor from the same environment variables as the real bot; SIGTERM stops it."""
    bot = FloorBot(dict(os.environ))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, bot.stopping.set)
    await bot.run()
    return 0

"""The offline demo: both emulators, the real bot as its own process, one ``/kontext`` job.

Run with ``make demo``. Nothing leaves this machine: Discord and Segmind are the project's own
emulators on 127.0.0.1 (the ``emulators`` package), and the bot is started exactly as a PaaS would
(``python bot.py``), only with its settings pointed at them. The posted image is saved under
``demo-output/``, and the steps are printed as they happen.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulators.discord import DiscordEmulator  # noqa: E402
from emulators.segmind import SegmindEmulator  # noqa: E402

OUT = ROOT / "demo-output"
TOKEN = "demo-discord-token"
KEY = "demo-segmind-key"
PROMPT = "put the green dress on the person, keep the pose"


def picture(kind: str) -> bytes:
    """A small drawn input image: a 'person' or a 'dress'."""
    img = Image.new("RGB", (512, 512), "#f4efe6")
    d = ImageDraw.Draw(img)
    if kind == "person":
        d.ellipse((206, 60, 306, 160), fill="#e0b08c")
        d.rectangle((216, 160, 296, 360), fill="#5470c6")
        d.rectangle((216, 360, 246, 480), fill="#333")
        d.rectangle((266, 360, 296, 480), fill="#333")
    else:
        d.polygon([(256, 80), (176, 180), (136, 460), (376, 460), (336, 180)], fill="#2e9e5b")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def say(step: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step}", flush=True)


async def main() -> int:
    OUT.mkdir(exist_ok=True)
    async with DiscordEmulator(token=TOKEN) as discord_emu, SegmindEmulator(
        api_key=KEY, latency=1.5, output_long_side=768
    ) as segmind_emu:
        guild = discord_emu.add_guild(name="Demo Showcase")
        channel = discord_emu.add_channel(guild.id, name="showcase")
        member = discord_emu.add_member(guild.id, name="demo-member")
        say(f"Discord emulator on {discord_emu.base_url}, Segmind emulator on {segmind_emu.base_url}")

        with tempfile.TemporaryDirectory(prefix="kontext-demo-") as tmp:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SEGMIND_", "DATABASE_"))},
                "DISCORD_TOKEN": TOKEN,
                "SEGMIND_API_KEY": KEY,
                "SEGMIND_BASE_URL": segmind_emu.base_url,
                "DISCORD_API_BASE_URL": discord_emu.api_base,
                "DISCORD_GATEWAY_URL": discord_emu.gateway_url,
                "DATABASE_URL": f"sqlite:///{tmp}/demo.db",
                "LOG_LEVEL": "INFO",
                "PORT": "",
            }
            say("starting the bot: python bot.py")
            log_file = (OUT / "bot.log").open("wb")  # noqa: ASYNC230 - opened once, before the loop is busy
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "bot.py"), cwd=tmp, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            )
            try:
                await discord_emu.wait_connected(1, timeout=30)
                await discord_emu.wait_until(lambda: discord_emu.find_command("kontext") is not None, 30)
                commands = discord_emu.synced_commands[None]
                say("bot connected and synced its commands: "
                    + ", ".join("/" + c["name"] for c in commands if c.get("type", 1) == 1)
                    + " and the message menu "
                    + ", ".join(f"'{c['name']}'" for c in commands if c.get("type", 1) == 3))
                say(f"member runs /kontext with two images: '{PROMPT}'")
                rec = await discord_emu.invoke_slash(
                    "kontext",
                    {
                        "image_1": (picture("person"), "person.png", "image/png"),
                        "image_2": (picture("dress"), "dress.png", "image/png"),
                        "prompt": PROMPT,
                        "aspect_ratio": "1:1",
                        "seed": 42,
                    },
                    user_id=int(member["user"]["id"]),
                    guild_id=guild.id,
                    channel_id=int(channel["id"]),
                )
                await rec.wait_response(10)
                say("bot deferred the interaction (ephemeral 'thinking…')")
                msg = await discord_emu.wait_for_message(
                    int(channel["id"]),
                    lambda m: bool(m.get("attachments")) and not (m.get("flags", 0) & 64),
                    timeout=60,
                    include_ephemeral=False,
                )
                data = discord_emu.attachment_bytes(msg["attachments"][0])
                name = msg["attachments"][0]["filename"]
                (OUT / name).write_bytes(data)
                (OUT / "result-message.json").write_text(json.dumps(msg, indent=2))
                (OUT / "names.json").write_text(json.dumps({member["user"]["id"]: "demo-member"}))
                from devtools.render_message import render

                picture_path = OUT / "result-message.png"
                render(msg, data, names={member["user"]["id"]: "demo-member"}).save(picture_path)
                embed = msg["embeds"][0]
                fields = {f["name"]: f["value"] for f in embed.get("fields", [])}
                say(f"result posted publicly in #showcase: {name} ({len(data):,} bytes; the emulator's "
                    "'generation' puts the two inputs side by side, the real API edits them)")
                for key in ("Aspect ratio", "Seed", "Format", "Time taken", "Credits left"):
                    if key in fields:
                        print(f"           {key}: {fields[key]}")
                call = segmind_emu.calls[-1]
                say(f"Segmind saw 1 call (HTTP {call.status}); body keys: {', '.join(sorted(call.payload))}")
                await rec.wait_for(lambda r: any("Done" in (e.get("content") or "") for e in r.edits), 10)
                statuses = [e.get("content") for e in rec.edits if e.get("content")]
                say("the member's private status went: " + " → ".join(s.split("\n")[0][:40] for s in statuses))
                say(f"saved {OUT / name} and a picture of the message: {picture_path}")
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    code = await proc.wait()
                log_file.close()
                say(f"bot stopped on SIGTERM with exit code {code} (log: demo-output/bot.log)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

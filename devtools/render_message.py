"""Render a posted result message (as the Discord emulator stored it) to a PNG, Discord-style.

Used by the demo to produce ``demo-output/result-message.png`` — the picture in the README. It
draws what Discord would show: the bot's name, the embed with its colour bar, prompt, fields,
the result image and the buttons under it. Pillow only; no browser needed.
"""

from __future__ import annotations

import io
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BG = (49, 51, 56)
EMBED_BG = (43, 45, 49)
TEXT = (219, 222, 225)
MUTED = (148, 155, 164)
LINK = (0, 168, 252)
BUTTON = (78, 80, 88)
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in FONT_DIRS:
        path = Path(folder) / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _clean(value: str, names: dict[str, str] | None = None) -> str:
    """Markdown links, code ticks and mentions as Discord shows them."""
    out = value.replace("`", "")
    out = re.sub(r"<@!?(\d+)>", lambda m: "@" + (names or {}).get(m.group(1), "member"), out)
    while "](" in out and "[" in out:
        start = out.index("[")
        mid = out.index("](", start)
        end = out.index(")", mid)
        out = out[:start] + out[start + 1 : mid] + out[end + 1 :]
    return out


def render(
    message: dict[str, Any], image: bytes, width: int = 620, names: dict[str, str] | None = None
) -> Image.Image:
    """The message as a picture; ``names`` maps user ids to display names for mentions."""
    embed = (message.get("embeds") or [{}])[0]
    result = Image.open(io.BytesIO(image)).convert("RGB")
    img_w = width - 110
    result.thumbnail((img_w, img_w))
    fields = embed.get("fields") or []
    rows = [fields[i : i + 3] for i in range(0, len(fields), 3)]
    desc_lines = textwrap.wrap(embed.get("description") or "", 62)
    buttons = [
        c.get("label") or c.get("emoji", {}).get("name", "")
        for row in message.get("components") or []
        for c in row.get("components") or []
    ]
    height = 70 + 28 + 22 * len(desc_lines) + 46 * len(rows) + result.height + 70 + (46 if buttons else 0)
    canvas = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(canvas)
    d.ellipse((14, 14, 54, 54), fill=(88, 101, 242))
    d.text((66, 16), "Kontext Bot", font=_font(16, True), fill=TEXT)
    bx = 66 + int(d.textlength("Kontext Bot", font=_font(16, True))) + 8
    d.rounded_rectangle((bx, 18, bx + 34, 34), 3, fill=(88, 101, 242))
    d.text((bx + 6, 19), "APP", font=_font(11, True), fill=(255, 255, 255))
    d.text((66, 38), _clean(message.get("content") or "", names), font=_font(14), fill=LINK)
    top = 64
    bottom = height - (56 if buttons else 14)
    d.rectangle((66, top, width - 14, bottom), fill=EMBED_BG)
    colour = embed.get("color") or 0x5865F2
    d.rectangle((66, top, 70, bottom), fill=((colour >> 16) & 255, (colour >> 8) & 255, colour & 255))
    y = top + 10
    d.text((82, y), (embed.get("author") or {}).get("name", ""), font=_font(13, True), fill=TEXT)
    y += 26
    for line in desc_lines:
        d.text((82, y), line, font=_font(14), fill=TEXT)
        y += 22
    y += 6
    for row in rows:
        for i, f in enumerate(row):
            x = 82 + i * ((width - 110) // 3)
            d.text((x, y), f["name"], font=_font(12, True), fill=TEXT)
            d.text((x, y + 18), _clean(f["value"], names)[:28], font=_font(13), fill=MUTED)
        y += 46
    canvas.paste(result, (82, y))
    y += result.height + 10
    footer = (embed.get("footer") or {}).get("text", "")
    d.text((82, y), footer[:80], font=_font(11), fill=MUTED)
    if buttons:
        x, by = 66, height - 46
        for label in buttons:
            w = int(d.textlength(label, font=_font(13))) + 24
            d.rounded_rectangle((x, by, x + w, by + 32), 4, fill=BUTTON)
            d.text((x + 12, by + 8), label, font=_font(13), fill=TEXT)
            x += w + 8
    return canvas


def main(folder: str = "demo-output") -> int:
    out = Path(folder)
    message = json.loads((out / "result-message.json").read_text())
    names_file = out / "names.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else None
    name = message["attachments"][0]["filename"]
    render(message, (out / name).read_bytes(), names=names).save(out / "result-message.png")
    print(f"rendered {out / 'result-message.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

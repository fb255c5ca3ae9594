"""The images the Segmind emulator makes and checks (Pillow; run in threads by the server).

Outputs are deterministic for the same inputs, aspect ratio, format and seed: the two inputs
side by side, tinted by a colour the seed picks.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageOps


def sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def decode_check(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        if img.format not in ("PNG", "JPEG", "WEBP"):
            raise ValueError(f"unsupported format {img.format}")
        img.load()


def save(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(out, "JPEG", quality=90)
    elif fmt == "png":
        img.save(out, "PNG")
    elif fmt == "gif":
        img.convert("P").save(out, "GIF")
    else:
        img.save(out, fmt.upper())
    return out.getvalue()


def output_size(aspect: str, first: tuple[int, int], long_side: int) -> tuple[int, int]:
    if aspect == "match_input_image":
        rw, rh = first
    else:
        a, _, b = aspect.partition(":")
        rw, rh = int(a), int(b)
    if rw >= rh:
        return long_side, max(8, round(long_side * rh / rw))
    return max(8, round(long_side * rw / rh)), long_side


def render(img1: bytes, img2: bytes, aspect: str, fmt: str, seed: int, long_side: int) -> bytes:
    """The two inputs side by side at the aspect's size, tinted by a seed-chosen colour."""
    with Image.open(io.BytesIO(img1)) as a, Image.open(io.BytesIO(img2)) as b:
        first = a.convert("RGB")
        second = b.convert("RGB")
    width, height = output_size(aspect, first.size, long_side)
    half = max(1, width // 2)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(ImageOps.fit(first, (half, height)), (0, 0))
    canvas.paste(ImageOps.fit(second, (width - half, height)), (half, 0))
    rng = random.Random(seed)
    tint = Image.new(
        "RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    )
    return save(Image.blend(canvas, tint, 0.25), fmt)


def solid(fmt: str, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (64, 48), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for x in range(0, 64, 4):  # some detail so that the file is not trivially small
        img.putpixel((x, x % 48), (255 - x, x * 3 % 256, 128))
    return save(img, fmt)


def noisy_image(target_bytes: int, fmt: str) -> bytes:
    """A valid image of at least ``target_bytes`` (random noise barely compresses).

    A JPEG is saved at quality 100 without chroma subsampling (about 4 bytes a pixel): a fifth
    of the pixels, and of the time, that quality 95 with 4:2:0 needs for the same size (0.1 s
    instead of 0.6 s for 12 MiB), so an oversize answer is not slowed by making it.
    """
    per_pixel = 3.0 if fmt == "png" else 4.0
    side = max(16, int((target_bytes / per_pixel) ** 0.5) + 1)
    rng = random.Random(target_bytes)
    while True:
        img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        out = io.BytesIO()
        if fmt == "png":
            img.save(out, "PNG", compress_level=1)
        else:
            img.save(out, "JPEG", quality=100, subsampling=0)
        data = out.getvalue()
        if len(data) >= target_bytes:
            return data
        side = int(side * 1.25) + 1

"""Abuse suite: hostile or broken inputs through ``/kontext``, end to end.

A refused input costs nothing: no API call, no credit, a plain sentence naming what is wrong —
and the bot serves the next job. Valid but unusual text (emoji, right-to-left scripts, exactly
1000 characters) is accepted and reaches the API payload intact.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest

from kontext.images import validate_prompt
from tests.e2e.harness import Harness, harness, make_image
from tests.e2e.test_faults import START, assert_plain, seen_by, serves_next

MB = 1024 * 1024


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def one_bit_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG, tiny on disk whatever its dimensions (the bomb recipe of
    tests/kontext/test_images.py)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _bomb() -> bytes:
    data = one_bit_png(30_000, 30_000)  # 900 megapixels claimed, ~100 KB on the wire
    assert len(data) < 200_000
    return data


GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!DOCTYPE html><html><head><title>cat</title></head><body><img src=x></body></html>"

# (id, which option, attachment (bytes, filename, content type), phrase of the refusal)
BAD_FILES = [
    ("zero-byte", "image_1", (b"", "empty.png", "image/png"), "Image 1 is not a PNG, JPEG or WebP"),
    ("truncated-png", "image_2", (make_image(size=(64, 64))[:70], "cut.png", "image/png"),
     "Image 2 could not be read"),
    ("gif-named-png", "image_1", (GIF, "cat.png", "image/png"), "Image 1 is not a PNG, JPEG or WebP"),
    ("pdf-named-png", "image_2", (PDF, "doc.png", "image/png"), "Image 2 is not a PNG, JPEG or WebP"),
    ("html-named-jpg", "image_1", (HTML, "page.jpg", "image/jpeg"), "Image 1 is not a PNG, JPEG or WebP"),
    ("decompression-bomb", "image_2", (_bomb(), "bomb.png", "image/png"),
     "Image 2 is 30000×30000 pixels; the limit is 40.0 megapixels"),
    ("over-max-image-pixels", "image_1", (one_bit_png(7000, 6000), "huge.png", "image/png"),
     "Image 1 is 7000×6000 pixels; the limit is 40.0 megapixels"),
]


async def assert_refused_for_free(h: Harness, rec: Any, phrase: str) -> None:
    """Refused before any money or API call moved; told plainly; the bot still serves."""
    text = seen_by(h, rec)
    assert phrase in text, text
    assert_plain(text)
    outcome = h.outcomes.get(rec.id)
    assert outcome is None or outcome.status == "rejected", outcome
    assert h.segmind.calls == []
    assert h.result_messages() == []
    assert await h.balance() == START
    assert await h.bot.store.audit.check_invariants() == []
    await serves_next(h, balance_after=START - 1)


@pytest.mark.parametrize(("option", "attachment", "phrase"), [p[1:] for p in BAD_FILES],
                         ids=[p[0] for p in BAD_FILES])
async def test_bad_file_is_refused_for_free(option: str, attachment: tuple, phrase: str) -> None:
    async with harness() as h:
        rec = await h.kontext(**{option: attachment})
        await assert_refused_for_free(h, rec, phrase)


async def test_declared_size_over_the_limit_is_refused_without_download() -> None:
    async with harness() as h:
        att = h.discord.add_attachment(make_image(), "big.png", "image/png")
        att["size"] = 25 * MB  # Discord's declared size; the bytes are never fetched
        rec = await h.kontext(image_1=att)
        assert h.discord.attachment_fetches[int(att["id"])] == 0
        await assert_refused_for_free(h, rec, "Image 1 is 25.0 MB; the limit is 20.0 MB")


async def test_size_that_lies_is_caught_while_downloading() -> None:
    """A declared size under the limit, real bytes over it: refused from the Content-Length
    or while reading (never read past the limit)."""
    async with harness(MAX_IMAGE_BYTES=str(64 * 1024)) as h:
        big = make_image(size=(400, 400), colour="white")
        big += b"\0" * (200 * 1024)  # trailing junk after IEND: a file of ~200 KB
        att = h.discord.add_attachment(big, "liar.png", "image/png")
        att["size"] = 1000
        rec = await h.kontext(image_2=att)
        await assert_refused_for_free(h, rec, "Image 2 is")


# --- the prompt ---------------------------------------------------------------------------------

EMOJI_RTL = (
    "ضع القبعة من الصورة 2 على القطة في الصورة 1 🎩🐈‍⬛ — "
    "שים את הכובע 👩🏽‍🎨 \u200fעל החתול\u200e, keep the 🇯🇵 flag"
)


@pytest.mark.parametrize(
    ("prompt", "sent"),
    [
        pytest.param(EMOJI_RTL, EMOJI_RTL, id="emoji-and-rtl"),
        pytest.param("x" * 1000, "x" * 1000, id="exactly-1000"),
        pytest.param("  \n" + "z" * 1000 + " \t\n", "z" * 1000, id="1000-after-trimming"),
        pytest.param("put\x00 the hat\x07 on\x1b the\x7f cat\x0c", "put the hat on the cat",
                     id="nul-and-control-chars-stripped"),
    ],
)
async def test_unusual_prompt_is_accepted_and_sent_intact(prompt: str, sent: str) -> None:
    async with harness() as h:
        _allow_long_prompts(h)
        rec = await h.kontext(prompt=prompt)
        assert h.outcomes[rec.id].status == "posted", seen_by(h, rec)
        assert h.segmind.calls[-1].payload["prompt"] == sent == validate_prompt(prompt)
        embed = h.result_messages()[0]["embeds"][0]
        assert embed["description"] == sent
        assert await h.balance() == START - 1
        assert await h.bot.store.audit.check_invariants() == []
        await serves_next(h, balance_after=START - 2)


@pytest.mark.parametrize(
    ("prompt", "phrase"),
    [
        pytest.param("y" * 1001, "Your prompt is 1001 characters long; the limit is 1000", id="1001"),
        pytest.param(" " + "y" * 1001 + " ", "Your prompt is 1001 characters long", id="1001-after-trimming"),
        pytest.param("\x00\x01\x02 \n\t\x7f", "Your prompt is empty", id="only-control-chars"),
    ],
)
async def test_bad_prompt_is_refused_for_free(prompt: str, phrase: str) -> None:
    # Discord's client enforces max_length 1000 on the option; a modified client (or a future
    # change of the option) must still meet the bot's own check.
    async with harness() as h:
        _allow_long_prompts(h)
        rec = await h.kontext(prompt=prompt)
        await assert_refused_for_free(h, rec, phrase)


def _allow_long_prompts(h: Harness) -> None:
    """Let the emulator deliver prompts Discord's client would refuse (max_length 1000)."""
    cmd = h.discord.find_command("kontext")
    assert cmd is not None
    option = next(o for o in cmd["options"] if o["name"] == "prompt")
    assert option["max_length"] == 1000  # what the bot declares
    option["max_length"] = 6000
    option["min_length"] = 0

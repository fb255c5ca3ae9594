"""``/kontext`` end to end: the real bot, real discord.py, both emulators, a real database."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from kontext import spool
from tests.e2e.harness import harness, make_image

PRODUCT_ASPECTS = 14


async def test_commands_synced_and_valid() -> None:
    async with harness() as h:
        cmds = {c["name"]: c for c in h.discord.synced_commands[None]}
        assert {"kontext", "credits", "kontext-admin"} <= set(cmds)
        kontext = cmds["kontext"]
        names = [o["name"] for o in kontext["options"]]
        assert names == [
            "image_1", "image_2", "prompt", "aspect_ratio", "output_format", "safety_tolerance", "seed",
        ]
        aspect = next(o for o in kontext["options"] if o["name"] == "aspect_ratio")
        assert len(aspect["choices"]) == PRODUCT_ASPECTS
        seed = next(o for o in kontext["options"] if o["name"] == "seed")
        assert seed["min_value"] == 0 and seed["max_value"] == 4294967295
        admin = cmds["kontext-admin"]
        assert admin["default_member_permissions"] == str(1 << 5)  # Manage Server


async def test_happy_path_posts_the_api_image() -> None:
    async with harness() as h:
        rec = await h.kontext(seed=1234, aspect_ratio="1:1", output_format="png")
        outcome = h.outcomes[rec.id]
        assert outcome.status == "posted", outcome
        # deferred privately within the interaction, then the result went out publicly
        assert rec.deferred and rec.ephemeral
        results = h.result_messages()
        assert len(results) == 1
        msg = results[0]
        data = h.discord.attachment_bytes(msg["attachments"][0])
        call = h.segmind.calls[-1]
        assert call.payload["seed"] == 1234
        assert call.payload["aspect_ratio"] == "1:1"
        assert call.payload["output_format"] == "png"
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert data == call.image  # exactly the API's image: it fitted, so no re-encode
        embed = msg["embeds"][0]
        text = str(embed)
        assert "1234" in text and "Square 1:1" in text and "PNG" in text
        assert "put the hat" in embed["description"]
        assert embed["image"]["url"].startswith("http")  # resolved from attachment://
        # the private status links to the result
        assert "Done" in h.last_status(rec)
        assert await h.balance() == 9


async def test_random_seed_is_shown_and_used() -> None:
    async with harness() as h:
        await h.kontext()
        seed = h.segmind.calls[-1].payload["seed"]
        assert 0 <= seed <= 4294967295
        assert str(seed) in str(h.result_messages()[0]["embeds"][0])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"image_1": (b"GIF89a" + b"\0" * 64, "cat.png", "image/png")}, "Image 1 is not a PNG"),
        ({"image_2": (b"%PDF-1.4 hello", "doc.png", "image/png")}, "Image 2 is not a PNG"),
        ({"image_1": (b"", "empty.png", "image/png")}, "Image 1"),
        ({"image_2": (make_image()[:60], "cut.png", "image/png")}, "Image 2 could not be read"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"safety_tolerance": 2}, "age-restricted"),
    ],
)
async def test_bad_inputs_are_refused_without_api_call_or_charge(kwargs: dict, expected: str) -> None:
    async with harness() as h:
        rec = await h.kontext(**kwargs)
        assert expected in h.reply_text(rec)
        assert h.segmind.calls == []
        assert h.result_messages() == []
        assert await h.balance() == 10


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (400, "could not use"),
        (401, "needs attention"),
        (403, "needs attention"),
        (404, "needs attention"),
        (406, "needs attention"),
        (422, "could not use"),
        (500, "had an error"),
        (504, "took too long"),
    ],
)
async def test_api_failures_refund_and_explain(status: int, phrase: str) -> None:
    async with harness() as h:
        h.segmind.fail_next(status, times=10)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        text = h.last_status(rec)
        assert phrase in text and "refunded" in text
        assert h.result_messages() == []
        assert await h.balance() == 10


async def test_rate_limit_and_bad_gateway_are_retried() -> None:
    async with harness() as h:
        h.segmind.fail_next(429)
        h.segmind.fail_next(502)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "posted"
        assert len(h.result_messages()) == 1
        assert h.segmind.charged_count == 1


@pytest.mark.parametrize("kind", ["html", "json", "truncated", "empty", "wrong_format"])
async def test_garbage_200_refunds(kind: str) -> None:
    async with harness() as h:
        h.segmind.garbage_next(kind)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        assert "not an image" in h.last_status(rec)
        assert h.result_messages() == []
        assert await h.balance() == 10


async def test_hang_times_out_and_reset_is_not_retried() -> None:
    async with harness(SEGMIND_TIMEOUT_SECONDS="1") as h:
        h.segmind.hang_next()
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        assert "took too long" in h.last_status(rec)
        h.segmind.reset_next()
        rec2 = await h.kontext()
        assert h.outcomes[rec2.id].status == "refunded"
        assert len([c for c in h.segmind.calls if c.fault == "reset"]) == 1  # never re-sent
        assert await h.balance() == 10


async def test_oversized_result_is_fitted_under_the_limit() -> None:
    before = spool.open_count()
    async with harness() as h:
        h.segmind.oversize_next(12 * 1024 * 1024)
        rec = await h.kontext(output_format="png")
        assert h.outcomes[rec.id].status == "posted"
        msg = h.result_messages()[0]
        data = h.discord.attachment_bytes(msg["attachments"][0])
        assert len(data) <= rec.attachment_size_limit
        Image.open(io.BytesIO(data)).verify()
        assert "fit" in str(msg["embeds"][0]["footer"]).lower()
        # the API's 12 MB went to a file, and so did the re-encoded copy: both closed
        assert spool.open_count() == before


async def test_dead_token_posts_through_the_channel() -> None:
    async with harness(segmind_latency=0.3) as h:
        rec = await h.kontext(wait=False)
        await rec.wait_response()
        h.discord.expire_token(rec)
        await h.wait_settled(rec)
        assert h.outcomes[rec.id].status == "posted"
        msgs = [m for m in h.discord.public_messages(h.channel_id) if m.get("attachments")]
        assert len(msgs) == 1
        assert f"<@{h.member_id}>" in msgs[0]["content"]

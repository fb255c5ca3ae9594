"""The "Kontext: edit these images" message command, and the localized command payload."""

from __future__ import annotations

import pytest

from emulators.discord import VALID_LOCALES, validate_commands
from tests.e2e.harness import make_image
from tests.e2e.test_results_buttons import (
    assert_money_ok,
    call_inputs,
    click,
    community,
    private_text,
    result_of,
)

MENU = "Kontext: edit these images"


def png(colour: str) -> tuple[bytes, str, str]:
    return (make_image(colour=colour), f"{colour}.png", "image/png")


async def test_menu_on_two_images_starts_a_normal_job() -> None:
    async with community() as h:
        source = h.discord.add_message(
            h.channel_id, "two pics", author_id=h.member_id, attachments=[png("red"), png("blue")]
        )
        menu = await h.discord.invoke_message_command(MENU, source, user_id=h.member_id)
        await menu.wait_response()
        assert menu.response_type == 9 and menu.modal is not None
        submit = await h.discord.submit_modal(menu, {"prompt": "swap the colours"})
        await h.wait_settled(submit)
        outcome = h.outcomes[submit.id]
        assert outcome.status == "posted", outcome
        assert submit.deferred and submit.ephemeral
        ids = [int(a["id"]) for a in source["attachments"]]
        assert list(call_inputs(h)) == ids
        assert h.segmind.calls[-1].payload["prompt"] == "swap the colours"
        job = await h.bot.store.jobs.get(submit.id)
        assert job is not None and job.params["source"] == "context_menu"
        assert job.params["image_1"]["message_id"] == int(source["id"])
        assert await h.balance() == 9
        await assert_money_ok(h)


async def test_inputs_from_a_message_are_refetched_when_their_urls_expired() -> None:
    async with community() as h:
        source = h.discord.add_message(
            h.channel_id, "", author_id=h.member_id, attachments=[png("red"), png("blue")]
        )
        menu = await h.discord.invoke_message_command(MENU, source, user_id=h.member_id)
        await menu.wait_response()
        submit = await h.discord.submit_modal(menu, {"prompt": "merge them"})
        await h.wait_settled(submit)
        for att in source["attachments"]:
            h.discord.expire_attachment(att)  # every URL handed out so far now answers 404
        reroll = await click(h, result_of(h, submit.id), "reroll", submit.id)
        assert h.outcomes[reroll.id].status == "posted", private_text(reroll)
        assert list(call_inputs(h)) == [int(a["id"]) for a in source["attachments"]]
        assert h.segmind.calls[-1].payload["input_image_1"] != h.segmind.calls[0].payload["input_image_1"]
        await assert_money_ok(h)


@pytest.mark.parametrize("count", [0, 1, 3])
async def test_menu_needs_exactly_two_images(count: int) -> None:
    async with community() as h:
        colours = ["red", "blue", "green"][:count]
        source = h.discord.add_message(
            h.channel_id, "pics", author_id=h.member_id, attachments=[png(c) for c in colours]
        )
        menu = await h.discord.invoke_message_command(MENU, source, user_id=h.member_id)
        await menu.wait_response()
        assert menu.modal is None and menu.ephemeral
        assert "exactly two images" in private_text(menu) and f"has {count}" in private_text(menu)
        assert h.segmind.calls == []


async def test_menu_refused_outside_the_allowed_channels() -> None:
    async with community() as h:
        allowed = h.discord.add_channel(h.guild_id, name="kontext-here")
        await h.bot.store.settings.update(
            h.guild_id, h.admin_id, allowed_channel_ids=[int(allowed["id"])]
        )
        source = h.discord.add_message(
            h.channel_id, "", author_id=h.member_id, attachments=[png("red"), png("blue")]
        )
        menu = await h.discord.invoke_message_command(MENU, source, user_id=h.member_id)
        await menu.wait_response()
        assert menu.modal is None
        assert f"<#{allowed['id']}>" in private_text(menu)


async def test_synced_payload_is_localized_and_valid() -> None:
    async with community() as h:
        assert h.discord.rejected_syncs == []
        commands = h.discord.synced_commands[None]
        assert validate_commands([_as_input(c) for c in commands]) == {}
        by_name = {(c.get("type", 1), c["name"]): c for c in commands}
        menu = by_name[(3, MENU)]
        assert set(menu["name_localizations"]) >= {"de", "fr", "es-ES", "es-419"}
        assert all(len(v) <= 32 for v in menu["name_localizations"].values())
        kontext = by_name[(1, "kontext")]
        assert kontext["description_localizations"]["de"].startswith("Kombiniere")
        assert set(kontext["description_localizations"]) >= {"de", "fr", "es-ES"}
        aspect = next(o for o in kontext["options"] if o["name"] == "aspect_ratio")
        square = next(c for c in aspect["choices"] if c["value"] == "1:1")
        assert square["name_localizations"]["fr"] == "Carré 1:1"
        credits = by_name[(1, "credits")]
        assert credits["name_localizations"]["de"] == "guthaben"
        admin = by_name[(1, "kontext-admin")]
        grant = next(o for o in admin["options"] if o["name"] == "grant")
        assert "de" in grant["description_localizations"]
        for cmd in commands:
            for key in ("name_localizations", "description_localizations"):
                assert set(cmd.get(key) or {}) <= VALID_LOCALES
                assert "en-US" not in (cmd.get(key) or {})


def _as_input(cmd: dict) -> dict:
    return {k: v for k, v in cmd.items() if k not in ("id", "application_id", "version", "guild_id")}

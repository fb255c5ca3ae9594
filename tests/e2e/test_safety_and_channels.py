"""Per-server rules through the whole bot: safety tolerance, age-restricted channels, blocked
words, allowed channels, and member-facing text in the member's language."""

from __future__ import annotations

from tests.e2e.harness import Harness, make_image
from tests.e2e.test_results_buttons import (
    assert_money_ok,
    click,
    community,
    first_result,
    private_text,
)


async def refused_without_charge(h: Harness, rec: object, phrase: str) -> None:
    text = h.last_status(rec)  # type: ignore[arg-type]
    assert phrase in text, text
    assert h.outcomes.get(rec.id) is None or h.outcomes[rec.id].status == "rejected"  # type: ignore[attr-defined]
    assert h.segmind.calls == []
    assert h.result_messages() == []
    assert await h.balance() == 10
    await assert_money_ok(h)


async def test_safety_above_the_servers_maximum_is_refused() -> None:
    async with community() as h:
        await h.bot.store.settings.update(h.guild_id, h.admin_id, max_safety_tolerance=0)
        rec = await h.kontext(safety_tolerance=1)
        await refused_without_charge(h, rec, "at most 0")


async def test_default_safety_follows_a_lower_server_maximum() -> None:
    async with community() as h:
        await h.bot.store.settings.update(h.guild_id, h.admin_id, max_safety_tolerance=0)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "posted"
        assert h.segmind.calls[-1].payload["safety_tolerance"] == 0


async def test_permissive_only_in_age_restricted_channels() -> None:
    async with community() as h:
        await h.bot.store.settings.update(h.guild_id, h.admin_id, max_safety_tolerance=2)
        rec = await h.kontext(safety_tolerance=2)
        await refused_without_charge(h, rec, "age-restricted channels")
        ok = await h.kontext(safety_tolerance=2, channel_id=h.nsfw_channel_id)
        assert h.outcomes[ok.id].status == "posted"
        assert h.segmind.calls[-1].payload["safety_tolerance"] == 2


async def test_blocked_words_refused_plainly_without_charge() -> None:
    async with community() as h:
        await h.bot.store.settings.update(h.guild_id, h.admin_id, blocked_words=["gore", "ugly thing"])
        rec = await h.kontext(prompt="Add some GÖRE to image 1")
        await refused_without_charge(h, rec, "contains a word this server does not allow")
        rec2 = await h.kontext(prompt="an Ugly Thing in image 2")
        await refused_without_charge(h, rec2, "does not allow")
        ok = await h.kontext(prompt="a gorgeous hat")  # whole words only
        assert h.outcomes[ok.id].status == "posted"


async def test_blocked_words_also_hold_for_edited_prompts() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        await h.bot.store.settings.update(h.guild_id, h.admin_id, blocked_words=["gore"])
        edit = await click(h, msg, "edit", rec.id, settle=False)
        await edit.wait_response()
        submit = await h.discord.submit_modal(edit, {"prompt": "more gore please"})
        await h.wait_settled(submit)
        assert "does not allow" in private_text(submit)
        assert len(h.segmind.calls) == 1 and await h.balance() == 9
        await assert_money_ok(h)


async def test_kontext_only_in_allowed_channels() -> None:
    async with community() as h:
        allowed = h.discord.add_channel(h.guild_id, name="kontext-here")
        aid = int(allowed["id"])
        await h.bot.store.settings.update(h.guild_id, h.admin_id, allowed_channel_ids=[aid])
        rec = await h.kontext()
        text = h.last_status(rec)
        assert "can't be used here" in text and f"<#{aid}>" in text
        assert h.segmind.calls == [] and await h.balance() == 10
        ok = await h.kontext(channel_id=aid)
        assert h.outcomes[ok.id].status == "posted"
        assert await h.balance() == 9


async def test_buttons_follow_the_channel_rules_too() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        allowed = h.discord.add_channel(h.guild_id, name="kontext-here")
        await h.bot.store.settings.update(
            h.guild_id, h.admin_id, allowed_channel_ids=[int(allowed["id"])]
        )
        reroll = await click(h, msg, "reroll", rec.id)
        assert "can't be used here" in private_text(reroll)
        edit = await click(h, msg, "edit", rec.id, settle=False)
        await edit.wait_response()
        assert edit.modal is None and "can't be used here" in private_text(edit)
        assert len(h.segmind.calls) == 1


async def test_member_with_german_client_gets_german_errors() -> None:
    async with community() as h:
        await h.bot.store.settings.update(h.guild_id, h.admin_id, blocked_words=["gore"])
        rec = await h.discord.invoke_slash(
            "kontext",
            {
                "image_1": (make_image(), "a.png", "image/png"),
                "image_2": (make_image(colour="blue"), "b.png", "image/png"),
                "prompt": "gore",
            },
            user_id=h.member_id, guild_id=h.guild_id, channel_id=h.channel_id, locale="de",
        )
        await h.wait_settled(rec)
        assert "Wort" in h.last_status(rec) and "nicht erlaubt" in h.last_status(rec)
        bad = await h.discord.invoke_slash(
            "kontext",
            {
                "image_1": (b"GIF89a" + b"\0" * 64, "a.png", "image/png"),
                "image_2": (make_image(colour="blue"), "b.png", "image/png"),
                "prompt": "ok",
            },
            user_id=h.member_id, guild_id=h.guild_id, channel_id=h.channel_id, locale="fr",
        )
        await h.wait_settled(bad)
        assert "L'image 1 n'est pas une image PNG" in h.last_status(bad)
        assert h.segmind.calls == []

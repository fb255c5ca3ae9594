"""The buttons under a result, end to end: each makes the right new job (or refusal), charged
once, and they keep working after the bot process is replaced on the same database.

The community cogs (results, showcase, context menu) and the translator are enabled on the
harness bot by :func:`community` when ``bot.py`` does not load them yet.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

from cogs.translation import KontextTranslator
from emulators.discord import EPHEMERAL, InteractionRecord
from tests.e2e.harness import Harness, harness, running_bot

EXTRA_COGS = ("cogs.results", "cogs.showcase", "cogs.context_menu")
MANAGE_MESSAGES = 1 << 13
ACTIONS = ("reroll", "edit", "swap", "use", "delete")


async def enable_community(bot: Any) -> None:
    """Load the community cogs and the translator on ``bot`` (if bot.py did not), then sync."""
    changed = False
    for ext in EXTRA_COGS:
        if ext not in bot.extensions:
            await bot.load_extension(ext)
            changed = True
    if not isinstance(bot.tree.translator, KontextTranslator):
        await bot.tree.set_translator(KontextTranslator())
        changed = True
    if changed:
        await bot.tree.sync()


@contextlib.asynccontextmanager
async def community(database_url: str | None = None, **env: str) -> AsyncIterator[Harness]:
    async with harness(database_url, **env) as h:
        await enable_community(h.bot)
        yield h


def result_of(h: Harness, job_id: int) -> dict[str, Any]:
    """The public result message of job ``job_id``."""
    for msg in h.result_messages():
        if any(a["filename"].startswith(f"kontext-{job_id}.") for a in msg["attachments"]):
            return msg
    raise LookupError(f"no result message for job {job_id}")


def custom_ids(msg: dict[str, Any]) -> list[str]:
    return [c["custom_id"] for row in msg.get("components", []) for c in row.get("components", [])]


def attachment_id(url: str) -> int:
    match = re.search(r"/attachments/(\d+)/", url)
    assert match, url
    return int(match.group(1))


def call_inputs(h: Harness, index: int = -1) -> tuple[int, int]:
    payload = h.segmind.calls[index].payload
    return attachment_id(payload["input_image_1"]), attachment_id(payload["input_image_2"])


def slash_inputs(rec: InteractionRecord) -> tuple[int, int]:
    """Attachment ids of /kontext's image_1 and image_2 options."""
    opts = {o["name"]: o["value"] for o in rec.data["options"]}
    return int(opts["image_1"]), int(opts["image_2"])


async def click(
    h: Harness, msg: dict[str, Any], action: str, job_id: int, *, user_id: int | None = None,
    settle: bool = True,
) -> InteractionRecord:
    rec = await h.discord.click_button(msg, f"kontext:{action}:{job_id}", user_id=user_id or h.member_id)
    if settle:
        await h.wait_settled(rec)
    return rec


def private_text(rec: InteractionRecord) -> str:
    """Every ephemeral text the member saw for ``rec``."""
    parts = [(rec.original or {}).get("content") or ""]
    for resp in rec.responses:
        parts.append(((resp.get("data") or {}).get("content")) or "")
    parts += [m.get("content") or "" for m in rec.followups]
    return "\n".join(p for p in parts if p)


async def assert_money_ok(h: Harness, store: Any = None) -> None:
    assert await (store or h.bot.store).audit.check_invariants() == []


async def first_result(h: Harness, **options: Any) -> tuple[InteractionRecord, dict[str, Any]]:
    rec = await h.kontext(**options)
    assert h.outcomes[rec.id].status == "posted", h.outcomes[rec.id]
    return rec, result_of(h, rec.id)


# --- the view -------------------------------------------------------------------------------------


async def test_every_result_carries_persistent_buttons() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        ids = custom_ids(msg)
        assert ids == [f"kontext:{a}:{rec.id}" for a in ACTIONS]  # no showcase channel: no Share
        labels = [c["label"] for row in msg["components"] for c in row["components"]]
        assert labels == ["Reroll", "Edit prompt", "Swap images", "Use as input", "Delete"]
        showcase = h.discord.add_channel(h.guild_id, name="showcase")
        await h.bot.store.settings.update(h.guild_id, h.admin_id, showcase_channel_id=int(showcase["id"]))
        rec2, msg2 = await first_result(h)
        assert f"kontext:share:{rec2.id}" in custom_ids(msg2)


async def test_buttons_are_labelled_in_the_makers_language() -> None:
    async with community() as h:
        rec = await h.discord.invoke_slash(
            "kontext",
            {"image_1": _png("red"), "image_2": _png("blue"), "prompt": "zwei Bilder"},
            user_id=h.member_id, guild_id=h.guild_id, channel_id=h.channel_id, locale="de",
        )
        await h.wait_settled(rec)
        msg = result_of(h, rec.id)
        labels = [c["label"] for row in msg["components"] for c in row["components"]]
        assert labels[0] == "Neu würfeln" and "Löschen" in labels
        assert msg["embeds"][0]["fields"][0]["name"] == "Eingaben"


# --- new jobs from buttons --------------------------------------------------------------------------


async def test_reroll_same_inputs_and_prompt_new_seed_charged_once() -> None:
    async with community() as h:
        rec, msg = await first_result(h, seed=1234, aspect_ratio="1:1")
        assert await h.balance() == 9
        click_rec = await click(h, msg, "reroll", rec.id)
        outcome = h.outcomes[click_rec.id]
        assert outcome.status == "posted", outcome
        assert click_rec.deferred and click_rec.ephemeral
        first, second = h.segmind.calls[0].payload, h.segmind.calls[1].payload
        assert second["prompt"] == first["prompt"]
        assert second["aspect_ratio"] == "1:1"
        assert second["seed"] != 1234
        assert call_inputs(h, 1) == call_inputs(h, 0) == slash_inputs(rec)
        job = await h.bot.store.jobs.get(click_rec.id)
        assert job is not None and job.parent_job_id == rec.id and job.params["source"] == "reroll"
        assert await h.balance() == 8
        assert len(h.result_messages()) == 2
        # the new result has its own buttons
        assert f"kontext:reroll:{click_rec.id}" in custom_ids(result_of(h, click_rec.id))
        await assert_money_ok(h)


async def test_reroll_by_another_member_is_their_job_and_their_credits() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        other = int(h.discord.add_member(h.guild_id, name="other")["user"]["id"])
        click_rec = await click(h, msg, "reroll", rec.id, user_id=other)
        assert h.outcomes[click_rec.id].status == "posted"
        assert await h.balance() == 9
        assert await h.balance(other) == 9
        await assert_money_ok(h)


async def test_edit_prompt_modal_prefilled_then_new_job_same_seed() -> None:
    async with community() as h:
        rec, msg = await first_result(h, seed=77, prompt="a cat wearing the hat")
        click_rec = await click(h, msg, "edit", rec.id, settle=False)
        await click_rec.wait_response()
        assert click_rec.response_type == 9 and click_rec.modal is not None
        assert "a cat wearing the hat" in str(click_rec.modal["components"])
        submit = await h.discord.submit_modal(click_rec, {"prompt": "a dog wearing the hat"})
        await h.wait_settled(submit)
        assert h.outcomes[submit.id].status == "posted"
        payload = h.segmind.calls[-1].payload
        assert payload["prompt"] == "a dog wearing the hat" and payload["seed"] == 77
        assert call_inputs(h) == slash_inputs(rec)
        job = await h.bot.store.jobs.get(submit.id)
        assert job is not None and job.parent_job_id == rec.id
        assert await h.balance() == 8
        await assert_money_ok(h)


async def test_swap_exchanges_the_images() -> None:
    async with community() as h:
        rec, msg = await first_result(h, seed=5)
        click_rec = await click(h, msg, "swap", rec.id)
        assert h.outcomes[click_rec.id].status == "posted"
        one, two = slash_inputs(rec)
        assert call_inputs(h) == (two, one)
        assert h.segmind.calls[-1].payload["seed"] == 5
        await assert_money_ok(h)


async def test_use_as_input_edits_the_result_with_the_kept_original() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        result_att = msg["attachments"][0]
        h.discord.expire_attachment(result_att)  # the result URL is refetched from its message
        click_rec = await click(h, msg, "use", rec.id, settle=False)
        await click_rec.wait_response()
        assert click_rec.response_type == 9
        submit = await h.discord.submit_modal(
            click_rec, {"prompt": "make it night", "keep": ["2"]}
        )
        await h.wait_settled(submit)
        assert h.outcomes[submit.id].status == "posted", h.outcomes[submit.id]
        assert call_inputs(h) == (int(result_att["id"]), slash_inputs(rec)[1])
        assert h.segmind.calls[-1].payload["prompt"] == "make it night"
        job = await h.bot.store.jobs.get(submit.id)
        assert job is not None and job.params["image_1"]["message_id"] == int(msg["id"])
        await assert_money_ok(h)


async def test_button_jobs_follow_credits_and_cooldown() -> None:
    async with community(STARTING_CREDITS="1") as h:
        rec, msg = await first_result(h)
        click_rec = await click(h, msg, "reroll", rec.id)
        assert h.outcomes[click_rec.id].status == "rejected"
        assert h.outcomes[click_rec.id].cause == "insufficient_credits"
        assert "1 image costs 1" in private_text(click_rec) or "costs" in private_text(click_rec)
        assert len(h.segmind.calls) == 1
        await assert_money_ok(h)
    async with community(COOLDOWN_SECONDS="300") as h:
        rec, msg = await first_result(h)
        click_rec = await click(h, msg, "swap", rec.id)
        assert h.outcomes[click_rec.id].cause == "cooldown"
        assert len(h.segmind.calls) == 1 and await h.balance() == 9


async def test_expired_inputs_are_explained_without_charge() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        one, _two = slash_inputs(rec)
        h.discord.expire_attachment(one)
        click_rec = await click(h, msg, "reroll", rec.id)
        assert click_rec.id not in h.outcomes
        assert "no longer available" in private_text(click_rec)
        assert len(h.segmind.calls) == 1 and await h.balance() == 9
        await assert_money_ok(h)


# --- delete ---------------------------------------------------------------------------------------


async def test_delete_only_by_the_maker_or_a_moderator() -> None:
    async with community() as h:
        rec, msg = await first_result(h)
        other = int(h.discord.add_member(h.guild_id, name="other")["user"]["id"])
        refused = await click(h, msg, "delete", rec.id, user_id=other, settle=False)
        await refused.wait_response()
        assert refused.ephemeral and "Only the member who made" in private_text(refused)
        assert int(msg["id"]) in {int(m["id"]) for m in h.result_messages()}
        deleted = await click(h, msg, "delete", rec.id, settle=False)
        await deleted.wait_for(lambda r: r.followups)
        assert "Deleted" in private_text(deleted)
        assert h.result_messages() == []
        # a moderator may delete someone else's result
        mod = int(h.discord.add_member(h.guild_id, name="mod", permissions=MANAGE_MESSAGES)["user"]["id"])
        rec2, msg2 = await first_result(h)
        by_mod = await click(h, msg2, "delete", rec2.id, user_id=mod, settle=False)
        await by_mod.wait_for(lambda r: r.followups)
        assert h.result_messages() == []
        assert all(m["flags"] & EPHEMERAL for m in by_mod.followups)
        await assert_money_ok(h)


# --- restart ----------------------------------------------------------------------------------------


async def test_buttons_work_after_the_bot_restarts_on_the_same_database() -> None:
    async with community() as h:
        rec, msg = await first_result(h, seed=99)
        old_bot = h.bot
        await old_bot.close()
        async with running_bot(h.settings, h.record) as bot2:
            await enable_community(bot2)
            h.bot = bot2
            await h.discord.wait_connected(1)
            reroll = await click(h, msg, "reroll", rec.id)
            assert h.outcomes[reroll.id].status == "posted", h.outcomes[reroll.id]
            edit = await click(h, msg, "edit", rec.id, settle=False)
            await edit.wait_response()
            submit = await h.discord.submit_modal(edit, {"prompt": "after the restart"})
            await h.wait_settled(submit)
            assert h.outcomes[submit.id].status == "posted"
            assert h.segmind.calls[-1].payload["prompt"] == "after the restart"
            assert h.segmind.calls[-1].payload["seed"] == 99
            assert await h.balance() == 7
            refused = await click(h, msg, "delete", rec.id, user_id=h.admin_id, settle=False)
            await refused.wait_response()
            assert "Only the member who made" in private_text(refused)
            await assert_money_ok(h, bot2.store)
        h.bot = old_bot


def _png(colour: str) -> tuple[bytes, str, str]:
    from tests.e2e.harness import make_image

    return (make_image(colour=colour), f"{colour}.png", "image/png")


async def test_delete_removes_only_the_jobs_own_result_message() -> None:
    async with community() as h:
        showcase = h.discord.add_channel(h.guild_id, name="showcase")
        await h.bot.store.settings.update(h.guild_id, h.admin_id, showcase_channel_id=int(showcase["id"]))
        victim_rec, victim_msg = await first_result(h)
        attacker = int(h.discord.add_member(h.guild_id, name="attacker")["user"]["id"])
        own = await h.kontext(user_id=attacker)
        own_msg = result_of(h, own.id)
        shared = await click(h, own_msg, "share", own.id, user_id=attacker, settle=False)
        await shared.wait_for(lambda r: r.followups, 10)
        assert len(h.discord.public_messages(int(showcase["id"]))) == 1
        notice = h.discord.add_message(h.channel_id, "server rules", author_id=h.admin_id)
        # a crafted custom id: the attacker's own job, on someone else's result or on any message
        for target in (victim_msg, notice):
            forged = f"kontext:delete:{own.id}"
            target.setdefault("components", []).append(
                {"type": 1, "components": [{"type": 2, "style": 4, "label": "x", "custom_id": forged}]}
            )
            crafted = await h.discord.click_button(target, forged, user_id=attacker)
            await crafted.wait_for(
                lambda r: r.followups or (r.responses and r.responses[0]["type"] == 4), 10
            )
            ids = {int(m["id"]) for m in h.discord.public_messages(h.channel_id)}
            assert {int(victim_msg["id"]), int(notice["id"]), int(own_msg["id"])} <= ids
            assert crafted.ephemeral and "doesn't belong to this result" in private_text(crafted)
        # nothing happened to the named job's showcase post either
        assert len(h.discord.public_messages(int(showcase["id"]))) == 1
        # the maker's own button on their own result still works
        deleted = await click(h, own_msg, "delete", own.id, user_id=attacker, settle=False)
        await deleted.wait_for(lambda r: r.followups)
        assert "Deleted" in private_text(deleted)
        assert int(own_msg["id"]) not in {int(m["id"]) for m in h.discord.public_messages(h.channel_id)}
        assert h.discord.public_messages(int(showcase["id"])) == []
        assert result_of(h, victim_rec.id) is not None
        await assert_money_ok(h)

"""Sharing to the showcase channel, end to end: one card per job, the approval flow, safety
gating, and removal together with the original."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.dbutil import ensure_postgres, temp_postgres_url
from tests.e2e.harness import Harness, running_bot
from tests.e2e.test_results_buttons import (
    MANAGE_MESSAGES,
    assert_money_ok,
    click,
    community,
    custom_ids,
    enable_community,
    first_result,
    private_text,
    result_of,
    slash_inputs,
)


async def setup_showcase(h: Harness, *, nsfw: bool = False, approval: bool = False) -> int:
    channel = h.discord.add_channel(h.guild_id, name="showcase", nsfw=nsfw)
    cid = int(channel["id"])
    await h.bot.store.settings.update(
        h.guild_id, h.admin_id, showcase_channel_id=cid, showcase_requires_approval=approval
    )
    return cid


def add_moderator(h: Harness) -> int:
    """A member with Manage Messages through a role, as on a real server (discord.py computes a
    channel's permissions from the roles and that channel's overwrites)."""
    role = next(
        (r for r in h.discord.guilds[h.guild_id].roles.values() if r["name"] == "Moderators"), None
    ) or h.discord.add_role(h.guild_id, "Moderators", MANAGE_MESSAGES)
    return int(h.discord.add_member(h.guild_id, name="mod", roles=[int(role["id"])])["user"]["id"])


def add_member(h: Harness, name: str) -> int:
    return int(h.discord.add_member(h.guild_id, name=name)["user"]["id"])


def request_of(h: Harness, job_id: int) -> dict[str, Any]:
    """The moderators' Approve / Reject card of ``job_id`` (in the result's channel)."""
    return next(
        m for m in h.discord.public_messages(h.channel_id)
        if f"kontext:approve:{job_id}" in custom_ids(m)
    )


async def decide(h: Harness, request: dict[str, Any], decision: str, job_id: int, user_id: int) -> Any:
    rec = await h.discord.click_button(request, f"kontext:{decision}:{job_id}", user_id=user_id)
    await rec.wait_for(lambda r: r.followups or (r.responses and r.responses[0]["type"] == 4), 10)
    return rec


async def share(h: Harness, msg: dict[str, Any], job_id: int, user_id: int | None = None) -> Any:
    rec = await click(h, msg, "share", job_id, user_id=user_id, settle=False)
    await rec.wait_for(lambda r: r.followups or (r.responses and r.responses[0]["type"] == 4), 10)
    return rec


async def test_share_posts_one_complete_card() -> None:
    async with community() as h:
        showcase = await setup_showcase(h)
        rec, msg = await first_result(h, seed=4242, prompt="a fox in a teacup", aspect_ratio="16:9")
        shared = await share(h, msg, rec.id)
        assert "Shared to the showcase" in private_text(shared) and shared.ephemeral
        posts = h.discord.public_messages(showcase)
        assert len(posts) == 1
        card = posts[0]
        text = str(card["embeds"])
        assert "a fox in a teacup" in text and "4242" in text and "Widescreen 16:9" in text
        assert f"<@{h.member_id}>" in text
        assert f"/channels/{h.guild_id}/{h.channel_id}/{msg['id']}" in text  # link back
        names = [a["filename"] for a in card["attachments"]]
        assert names == [f"kontext-{rec.id}.jpg", "input-1.jpg", "input-2.jpg"]
        result_bytes = h.discord.attachment_bytes(msg["attachments"][0])
        assert h.discord.attachment_bytes(card["attachments"][0]) == result_bytes
        assert card["mentions"] == []  # credit without a ping
        # clicked again: still one card
        again = await share(h, msg, rec.id)
        assert "already in the showcase" in private_text(again)
        assert len(h.discord.public_messages(showcase)) == 1
        assert await h.bot.store.showcase.count(h.guild_id, "posted") == 1
        await assert_money_ok(h)


async def _double_click(h: Harness) -> None:
    showcase = await setup_showcase(h)
    rec, msg = await first_result(h)
    first, second = await asyncio.gather(
        click(h, msg, "share", rec.id, settle=False), click(h, msg, "share", rec.id, settle=False)
    )
    for r in (first, second):
        await r.wait_for(lambda x: x.followups, 10)
    texts = sorted([private_text(first), private_text(second)])
    assert any("Shared to the showcase" in t for t in texts), texts
    assert any("already in the showcase" in t for t in texts), texts
    assert len(h.discord.public_messages(showcase)) == 1


async def test_simultaneous_shares_make_one_card() -> None:
    async with community() as h:
        await _double_click(h)


async def test_simultaneous_shares_make_one_card_on_postgres() -> None:
    await ensure_postgres()
    async with temp_postgres_url() as url, community(url) as h:
        await _double_click(h)


async def test_only_the_maker_or_a_moderator_may_share() -> None:
    async with community() as h:
        showcase = await setup_showcase(h)
        rec, msg = await first_result(h)
        other = int(h.discord.add_member(h.guild_id, name="other")["user"]["id"])
        refused = await share(h, msg, rec.id, user_id=other)
        assert "Only the member who made this image" in private_text(refused)
        assert h.discord.public_messages(showcase) == []
        ok = await share(h, msg, rec.id, user_id=add_moderator(h))
        assert "Shared" in private_text(ok)
        assert len(h.discord.public_messages(showcase)) == 1


async def test_approval_flow() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        mod = add_moderator(h)
        rec, msg = await first_result(h)
        pending = await share(h, msg, rec.id)
        assert "Sent to the moderators" in private_text(pending)
        assert h.discord.public_messages(showcase) == []
        request = next(
            m for m in h.discord.public_messages(h.channel_id)
            if f"kontext:approve:{rec.id}" in custom_ids(m)
        )
        assert request["message_reference"]["message_id"] == msg["id"]
        assert f"<@{h.member_id}>" in request["content"]
        # a member without Manage Messages cannot decide
        nope = await h.discord.click_button(request, f"kontext:approve:{rec.id}", user_id=h.member_id)
        await nope.wait_response()
        assert "Only moderators" in private_text(nope)
        assert h.discord.public_messages(showcase) == []
        # sharing again while pending: still one request
        again = await share(h, msg, rec.id)
        assert "already waiting" in private_text(again)
        # two moderators decide at once: exactly one decision counts
        mod2 = add_moderator(h)
        approve, late = await asyncio.gather(
            h.discord.click_button(request, f"kontext:approve:{rec.id}", user_id=mod),
            h.discord.click_button(request, f"kontext:reject:{rec.id}", user_id=mod2),
        )
        for r in (approve, late):
            await r.wait_for(lambda x: x.followups, 10)
        post = await h.bot.store.showcase.get(rec.id)
        assert post is not None
        winner, loser = (approve, late) if post.state == "posted" else (late, approve)
        assert "already decided" in private_text(loser)
        assert "already decided" not in private_text(winner)
        assert len(h.discord.public_messages(showcase)) == (1 if post.state == "posted" else 0)
        assert request["components"] == []
        assert ("approved" if post.state == "posted" else "decided not to share") in request["content"]

        rec2, msg2 = await first_result(h)
        await share(h, msg2, rec2.id)
        request2 = next(
            m for m in h.discord.public_messages(h.channel_id)
            if f"kontext:reject:{rec2.id}" in custom_ids(m)
        )
        shown = len(h.discord.public_messages(showcase))
        reject = await h.discord.click_button(request2, f"kontext:reject:{rec2.id}", user_id=mod)
        await reject.wait_for(lambda r: r.followups, 10)
        assert len(h.discord.public_messages(showcase)) == shown
        assert f"<@{h.member_id}>" in request2["content"] and "decided not to share" in request2["content"]
        assert request2["components"] == []
        after = await share(h, msg2, rec2.id)
        assert "already decided not to" in private_text(after)
        await assert_money_ok(h)


async def test_a_moderators_own_share_needs_no_approval() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        mod = add_moderator(h)
        rec = await h.kontext(user_id=mod)
        msg = result_of(h, rec.id)
        done = await share(h, msg, rec.id, user_id=mod)
        assert "Shared" in private_text(done)
        assert len(h.discord.public_messages(showcase)) == 1


async def test_deleting_the_original_removes_its_showcase_post() -> None:
    async with community() as h:
        showcase = await setup_showcase(h)
        rec, msg = await first_result(h)
        await share(h, msg, rec.id)
        assert len(h.discord.public_messages(showcase)) == 1
        deleted = await click(h, msg, "delete", rec.id, settle=False)
        await deleted.wait_for(lambda r: r.followups)
        assert h.discord.public_messages(showcase) == []
        post = await h.bot.store.showcase.get(rec.id)
        assert post is not None and post.state == "removed"


async def test_deleting_the_original_withdraws_a_pending_request() -> None:
    async with community() as h:
        await setup_showcase(h, approval=True)
        rec, msg = await first_result(h)
        await share(h, msg, rec.id)
        assert any(f"kontext:approve:{rec.id}" in custom_ids(m) for m in h.discord.public_messages(h.channel_id))
        deleted = await click(h, msg, "delete", rec.id, settle=False)
        await deleted.wait_for(lambda r: r.followups)
        assert not any(custom_ids(m) for m in h.discord.public_messages(h.channel_id))


@pytest.mark.parametrize("showcase_nsfw", [False, True])
async def test_permissive_results_only_go_to_an_age_restricted_showcase(showcase_nsfw: bool) -> None:
    async with community() as h:
        showcase = await setup_showcase(h, nsfw=showcase_nsfw)
        await h.bot.store.settings.update(h.guild_id, h.admin_id, max_safety_tolerance=2)
        rec = await h.kontext(channel_id=h.nsfw_channel_id, safety_tolerance=2)
        assert h.outcomes[rec.id].status == "posted"
        msg = result_of(h, rec.id)
        answer = await share(h, msg, rec.id)
        if showcase_nsfw:
            assert "Shared" in private_text(answer)
            assert len(h.discord.public_messages(showcase)) == 1
        else:
            assert "age-restricted showcase" in private_text(answer)
            assert h.discord.public_messages(showcase) == []
            assert await h.bot.store.showcase.get(rec.id) is None


async def test_card_without_inputs_when_they_expired() -> None:
    async with community() as h:
        showcase = await setup_showcase(h)
        rec, msg = await first_result(h)
        h.discord.expire_attachment(slash_inputs(rec)[0])
        await share(h, msg, rec.id)
        card = h.discord.public_messages(showcase)[0]
        assert [a["filename"] for a in card["attachments"]] == [f"kontext-{rec.id}.jpg"]
        assert "no longer available" in str(card["embeds"])


async def test_approve_posts_the_card() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        mod = add_moderator(h)
        rec, msg = await first_result(h)
        await share(h, msg, rec.id)
        request = next(
            m for m in h.discord.public_messages(h.channel_id)
            if f"kontext:approve:{rec.id}" in custom_ids(m)
        )
        approve = await h.discord.click_button(request, f"kontext:approve:{rec.id}", user_id=mod)
        await approve.wait_for(lambda r: r.followups, 10)
        assert "Shared to the showcase" in private_text(approve)
        cards = h.discord.public_messages(showcase)
        assert len(cards) == 1 and cards[0]["attachments"][0]["filename"] == f"kontext-{rec.id}.jpg"
        assert "approved" in request["content"] and request["components"] == []
        post = await h.bot.store.showcase.get(rec.id)
        assert post is not None and post.state == "posted" and post.decided_by == mod


async def test_approval_buttons_work_after_a_restart() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        mod = add_moderator(h)
        rec, msg = await first_result(h)
        await share(h, msg, rec.id)
        request = next(
            m for m in h.discord.public_messages(h.channel_id)
            if f"kontext:approve:{rec.id}" in custom_ids(m)
        )
        old_bot = h.bot
        await old_bot.close()
        async with running_bot(h.settings, h.record) as bot2:
            await enable_community(bot2)
            approve = await h.discord.click_button(request, f"kontext:approve:{rec.id}", user_id=mod)
            await approve.wait_for(lambda r: r.followups, 10)
            assert len(h.discord.public_messages(showcase)) == 1
            # and Delete after the restart takes the card down again
            deleted = await click(h, msg, "delete", rec.id, settle=False)
            await deleted.wait_for(lambda r: r.followups, 10)
            assert h.discord.public_messages(showcase) == []
            post = await bot2.store.showcase.get(rec.id)
            assert post is not None and post.state == "removed"


# --- who moderates the showcase: Manage Messages in the showcase channel itself ----------------------


async def test_manage_messages_in_the_results_channel_only_is_not_a_showcase_moderator() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        # Manage Messages in #general (where results are posted) but not in the showcase
        local_mod = add_member(h, "general-mod")
        h.discord.set_overwrite(h.channel_id, local_mod, allow=MANAGE_MESSAGES, member=True)
        rec = await h.kontext(user_id=local_mod)
        own = await share(h, result_of(h, rec.id), rec.id, user_id=local_mod)
        assert "Sent to the moderators" in private_text(own)  # no approval skipped
        assert h.discord.public_messages(showcase) == []
        # nor may they decide on someone else's request
        rec2, msg2 = await first_result(h)
        await share(h, msg2, rec2.id)
        for decision in ("approve", "reject"):
            refused = await decide(h, request_of(h, rec2.id), decision, rec2.id, local_mod)
            assert refused.ephemeral and "Only moderators" in private_text(refused)
        assert h.discord.public_messages(showcase) == []
        post = await h.bot.store.showcase.get(rec2.id)
        assert post is not None and post.state == "pending" and post.decided_by is None
        # a server-wide moderator role whose Manage Messages the showcase channel takes away
        mod = add_moderator(h)
        mods_role = next(r for r in h.discord.guilds[h.guild_id].roles.values() if r["name"] == "Moderators")
        h.discord.set_overwrite(showcase, int(mods_role["id"]), deny=MANAGE_MESSAGES)
        refused = await decide(h, request_of(h, rec2.id), "approve", rec2.id, mod)
        assert "Only moderators" in private_text(refused)
        assert h.discord.public_messages(showcase) == []
        await assert_money_ok(h)


async def test_manage_messages_in_the_showcase_channel_alone_makes_a_moderator() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        curator = add_member(h, "curator")
        h.discord.set_overwrite(showcase, curator, allow=MANAGE_MESSAGES, member=True)
        rec, msg = await first_result(h)
        await share(h, msg, rec.id)
        approved = await decide(h, request_of(h, rec.id), "approve", rec.id, curator)
        assert "Shared to the showcase" in private_text(approved)
        assert len(h.discord.public_messages(showcase)) == 1
        post = await h.bot.store.showcase.get(rec.id)
        assert post is not None and post.state == "posted" and post.decided_by == curator
        # the curator's own result goes straight to the showcase
        own = await h.kontext(user_id=curator)
        done = await share(h, result_of(h, own.id), own.id, user_id=curator)
        assert "Shared to the showcase" in private_text(done)
        assert len(h.discord.public_messages(showcase)) == 2


async def test_nobody_decides_on_their_own_request() -> None:
    async with community() as h:
        showcase = await setup_showcase(h, approval=True)
        rec, msg = await first_result(h)
        pending = await share(h, msg, rec.id)
        assert "Sent to the moderators" in private_text(pending)
        request = request_of(h, rec.id)
        # the maker becomes a moderator (here and in the showcase) while the request waits
        for channel in (h.channel_id, showcase):
            h.discord.set_overwrite(channel, h.member_id, allow=MANAGE_MESSAGES, member=True)
        for decision in ("approve", "reject"):
            refused = await decide(h, request, decision, rec.id, h.member_id)
            assert refused.ephemeral and "your own image" in private_text(refused)
        assert h.discord.public_messages(showcase) == []
        post = await h.bot.store.showcase.get(rec.id)
        assert post is not None and post.state == "pending"
        assert custom_ids(request)  # the card still waits for another moderator
        approved = await decide(h, request, "approve", rec.id, add_moderator(h))
        assert "Shared to the showcase" in private_text(approved)
        assert len(h.discord.public_messages(showcase)) == 1

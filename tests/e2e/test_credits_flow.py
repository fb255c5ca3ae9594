"""Credits, cooldowns, the budget and the admin commands, end to end.

The real bot (real discord.py, real cogs, a real SQLite file) against both emulators. Every
scenario ends with the ledger's invariants checked: balances equal their ledger sums, no job is
charged twice, the budget is never passed.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from emulators.discord import InteractionRecord
from tests.dbutil import FakeClock
from tests.e2e.harness import Harness, harness

MANAGE_GUILD = 1 << 5
DAY = 86_400.0


# --- helpers --------------------------------------------------------------------------------------


async def settle_all(h: Harness, recs: list[InteractionRecord], timeout: float = 30.0) -> None:
    """Wait until every interaction's job ended (or it was answered without one)."""
    await asyncio.gather(*(h.wait_settled(r, timeout) for r in recs))


async def kontext_burst(
    h: Harness, n: int, *, user_ids: list[int] | None = None
) -> list[InteractionRecord]:
    """Send ``n`` /kontext interactions at once (without waiting for any), then wait for all."""
    users = user_ids or [h.member_id] * n
    recs = list(await asyncio.gather(*(h.kontext(wait=False, user_id=u) for u in users)))
    await settle_all(h, recs)
    return recs


def statuses(h: Harness, recs: list[InteractionRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in recs:
        status = h.outcomes[r.id].status
        out[status] = out.get(status, 0) + 1
    return out


def embed_text(rec: InteractionRecord) -> str:
    """Every embed text of ``rec``'s answers (responses and followups)."""
    parts: list[str] = []
    msgs = [(r.get("data") or {}) for r in rec.responses] + rec.followups
    for msg in msgs:
        parts.append(msg.get("content") or "")
        for e in msg.get("embeds") or []:
            parts += [e.get("title") or "", e.get("description") or ""]
            parts += [f"{f['name']}: {f['value']}" for f in e.get("fields") or []]
    return "\n".join(p for p in parts if p)


async def admin(h: Harness, sub: str, **options: Any) -> InteractionRecord:
    """Run ``/kontext-admin <sub>`` as the server admin; returns once it answered."""
    return await h.slash(f"kontext-admin {sub}", options, user_id=h.admin_id)


async def credits_text(h: Harness, user_id: int | None = None) -> str:
    rec = await h.slash("credits", user_id=user_id or h.member_id)
    return embed_text(rec)


async def assert_ledger_ok(h: Harness) -> None:
    assert h.bot.store is not None
    assert await h.bot.store.audit.check_invariants() == []


def add_members(h: Harness, n: int, **kwargs: Any) -> list[int]:
    return [
        int(h.discord.add_member(h.guild_id, name=f"m{i}", **kwargs)["user"]["id"])
        for i in range(n)
    ]


# --- the 100-concurrent burst ---------------------------------------------------------------------


async def test_hundred_concurrent_kontext_with_one_credit_accept_exactly_one() -> None:
    async with harness(STARTING_CREDITS="1", JOBS_PER_MEMBER="10") as h:
        recs = await kontext_burst(h, 100)
        assert statuses(h, recs) == {"posted": 1, "rejected": 99}
        assert len(h.segmind.calls) == 1
        assert h.segmind.charged_count == 1
        assert len(h.result_messages()) == 1
        refused = [r for r in recs if h.outcomes[r.id].status == "rejected"]
        for r in refused:
            assert h.outcomes[r.id].cause == "insufficient_credits"
            assert "You have 0 credits; one image costs 1" in h.last_status(r)
        assert await h.balance() == 0
        ledger = await h.bot.store.credits.recent(h.guild_id, h.member_id, limit=50)
        assert sorted(e.kind for e in ledger) == ["commit", "reserve", "start"]
        await assert_ledger_ok(h)


# --- refusals -------------------------------------------------------------------------------------


async def test_out_of_credits_is_refused_plainly_without_api_call() -> None:
    async with harness(STARTING_CREDITS="0") as h:
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "rejected"
        text = h.last_status(rec)
        assert "You have 0 credits; one image costs 1" in text
        assert "admin" in text  # says what to do about it
        assert h.segmind.calls == []
        assert h.result_messages() == []
        assert await h.balance() == 0
        await assert_ledger_ok(h)


async def test_member_who_spent_out_is_refused_without_api_call() -> None:
    async with harness(STARTING_CREDITS="2") as h:
        for _ in range(2):
            rec = await h.kontext()
            assert h.outcomes[rec.id].status == "posted"
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "rejected"
        assert "You have 0 credits" in h.last_status(rec)
        assert len(h.segmind.calls) == 2
        await assert_ledger_ok(h)


@pytest.mark.parametrize(
    "fault",
    [("status", 500), ("status", 401), ("status", 400), ("garbage", "html"), ("reset", None)],
    ids=["500", "401", "400", "garbage", "reset"],
)
async def test_api_failure_leaves_the_balance_unchanged(fault: tuple[str, Any]) -> None:
    async with harness() as h:
        kind, arg = fault
        if kind == "status":
            h.segmind.fail_next(arg, times=10)
        elif kind == "garbage":
            h.segmind.garbage_next(arg)
        else:
            h.segmind.reset_next()
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        assert "refunded" in h.last_status(rec)
        assert await h.balance() == 10
        kinds = [e.kind for e in await h.bot.store.credits.recent(h.guild_id, h.member_id)]
        assert kinds[:2] == ["refund", "reserve"]
        job = await h.bot.store.jobs.get(rec.id)
        assert job is not None and job.state == "refunded" and job.failure_cause
        await assert_ledger_ok(h)


# --- cooldowns ------------------------------------------------------------------------------------


async def test_cooldown_refusal_shows_the_seconds_left() -> None:
    async with harness(COOLDOWN_SECONDS="120") as h:
        first = await h.kontext()
        assert h.outcomes[first.id].status == "posted"
        second = await h.kontext()
        assert h.outcomes[second.id].status == "rejected"
        assert h.outcomes[second.id].cause == "cooldown"
        assert len(h.segmind.calls) == 1
        text = h.last_status(second)
        m = re.search(r"(\d+)\s*s\b", text)
        assert m is not None, text
        assert 110 <= int(m.group(1)) <= 120, text


async def test_cooldown_is_stored_and_refused_with_its_seconds() -> None:
    """What holds today: the refusal happens, the database holds the cooldown, /credits shows it."""
    async with harness(COOLDOWN_SECONDS="120") as h:
        first = await h.kontext()
        assert h.outcomes[first.id].status == "posted"
        second = await h.kontext()
        outcome = h.outcomes[second.id]
        assert outcome.status == "rejected" and outcome.cause == "cooldown"
        assert 110 <= outcome.error.params["seconds"] <= 120
        assert len(h.segmind.calls) == 1
        status = await h.bot.store.credits.member_status(h.guild_id, h.member_id)
        assert 110 <= status.cooldown_remaining <= 120
        text = await credits_text(h)
        m = re.search(r"Cooldown: (\d+) s left", text)
        assert m is not None and 110 <= int(m.group(1)) <= 120, text
        await assert_ledger_ok(h)


async def test_cooldown_cleared_after_a_failure_not_the_members() -> None:
    async with harness(COOLDOWN_SECONDS="120") as h:
        h.segmind.fail_next(500, times=10)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        h.segmind.clear_faults()
        retry = await h.kontext()
        assert h.outcomes[retry.id].status == "posted"
        # ... and the successful job set the cooldown again
        third = await h.kontext()
        assert h.outcomes[third.id].cause == "cooldown"
        assert await h.balance() == 9
        await assert_ledger_ok(h)


async def test_exempt_role_skips_the_cooldown() -> None:
    async with harness(COOLDOWN_SECONDS="120") as h:
        role = h.discord.add_role(h.guild_id, "patron")
        (vip,) = add_members(h, 1, roles=[int(role["id"])])
        rec = await admin(h, "settings", exempt_roles=f"<@&{role['id']}>")
        assert "Saved" in embed_text(rec)
        gs = await h.bot.store.settings.get(h.guild_id)
        assert gs.exempt_role_ids == (int(role["id"]),)
        for _ in range(3):
            r = await h.kontext(user_id=vip)
            assert h.outcomes[r.id].status == "posted"
        # a member without the role is still held by the cooldown
        await h.kontext()
        blocked = await h.kontext()
        assert h.outcomes[blocked.id].cause == "cooldown"
        assert await h.balance(vip) == 7
        await assert_ledger_ok(h)


async def test_jobs_per_member_holds_under_a_burst() -> None:
    async with harness(segmind_latency=0.3, JOBS_PER_MEMBER="2") as h:
        recs = await kontext_burst(h, 6)
        assert statuses(h, recs) == {"posted": 2, "rejected": 4}
        for r in recs:
            if h.outcomes[r.id].status == "rejected":
                assert h.outcomes[r.id].cause == "too_many_jobs"
                assert "You already have 2 job(s) running" in h.last_status(r)
        assert len(h.segmind.calls) == 2
        assert await h.balance() == 8
        await assert_ledger_ok(h)


# --- the owner's budget ---------------------------------------------------------------------------


async def test_daily_budget_refuses_the_third_job_without_api_call() -> None:
    async with harness(COST_PER_IMAGE_USD="0.10", DAILY_BUDGET_USD="0.25") as h:
        users = add_members(h, 5)
        recs = await kontext_burst(h, 5, user_ids=users)
        assert statuses(h, recs) == {"posted": 2, "rejected": 3}
        assert len(h.segmind.calls) == 2
        for r in recs:
            if h.outcomes[r.id].status == "rejected":
                assert h.outcomes[r.id].cause == h.outcomes[r.id].error.cause
                assert "today's spending limit" in h.last_status(r)
                assert "midnight UTC" in h.last_status(r)
        for u in users:
            # refused members keep all their credits
            assert await h.balance(u) in (9, 10)
        budget = await h.bot.store.budgets.status()
        assert budget.generations == 2 and budget.reserved_usd == pytest.approx(0.20)
        # sequential attempts later in the day are refused too
        late = await h.kontext()
        assert "today's spending limit" in h.last_status(late)
        assert len(h.segmind.calls) == 2
        await assert_ledger_ok(h)


async def test_failed_job_gives_its_budget_share_back() -> None:
    """A call the API refused before generating anything (400) gives its budget share back."""
    async with harness(COST_PER_IMAGE_USD="0.10", DAILY_BUDGET_USD="0.15") as h:
        h.segmind.fail_next(400, times=10)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        h.segmind.clear_faults()
        ok = await h.kontext()
        assert h.outcomes[ok.id].status == "posted"
        refused = await h.kontext()
        assert "today's spending limit" in h.last_status(refused)
        await assert_ledger_ok(h)


# --- daily free credits ---------------------------------------------------------------------------


async def test_daily_free_credits_top_up_once_per_utc_day() -> None:
    async with harness(STARTING_CREDITS="0", DAILY_FREE_CREDITS="3") as h:
        store = h.bot.store
        clock = FakeClock()  # 2025-03-01 12:00 UTC
        store.clock = clock
        text = await credits_text(h)
        assert "Balance: 0" in text and "topped up to 3" in text
        for _ in range(2):
            rec = await h.kontext()
            assert h.outcomes[rec.id].status == "posted"
        assert await h.balance() == 1  # topped up to 3 once, two images
        clock.advance(DAY)  # 2025-03-02 12:00 UTC
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "posted"
        assert await h.balance() == 2  # 1 → topped up to 3 → one image
        entries = await store.credits.recent(h.guild_id, h.member_id, limit=20)
        daily = [e for e in entries if e.kind == "daily"]
        assert [e.delta for e in daily] == [2, 3]  # newest first
        assert "2025-03-02" in (daily[0].reason or "")
        text = await credits_text(h)
        assert "`+2` daily top-up" in text
        await assert_ledger_ok(h)


# --- admin commands -------------------------------------------------------------------------------


async def test_admin_commands_are_hidden_from_members_by_default() -> None:
    async with harness() as h:
        cmds = {c["name"]: c for c in h.discord.synced_commands[None]}
        assert cmds["kontext-admin"]["default_member_permissions"] == str(MANAGE_GUILD)
        assert cmds["kontext-admin"].get("contexts") in (None, [0])  # servers only
        # the member's own commands stay visible to everyone
        assert cmds["credits"].get("default_member_permissions") is None
        assert cmds["kontext"].get("default_member_permissions") is None


async def test_admin_grant_shows_up_in_credits() -> None:
    async with harness() as h:
        rec = await admin(h, "grant", member=h.member_id, amount=5, reason="contest winner")
        text = embed_text(rec)
        assert "Granted 5 credit(s)" in text and "New balance: 15" in text
        assert rec.ephemeral
        text = await credits_text(h)
        assert "Balance: 15" in text
        assert "`+5` granted · contest winner" in text
        entry = (await h.bot.store.credits.recent(h.guild_id, h.member_id, limit=1))[0]
        assert (entry.kind, entry.delta, entry.actor_id) == ("grant", 5, h.admin_id)
        # the credits are spendable
        run = await h.kontext()
        assert h.outcomes[run.id].status == "posted"
        assert await h.balance() == 14
        await assert_ledger_ok(h)


async def test_admin_revoke_never_goes_below_zero() -> None:
    async with harness() as h:
        rec = await admin(h, "revoke", member=h.member_id, amount=25, reason="abuse")
        assert "Revoked 10 credit(s)" in embed_text(rec) and "New balance: 0" in embed_text(rec)
        rec = await admin(h, "revoke", member=h.member_id, amount=3)
        assert "Revoked 0 credit(s)" in embed_text(rec)
        assert await h.balance() == 0
        entries = await h.bot.store.credits.recent(h.guild_id, h.member_id, limit=10)
        assert [(e.kind, e.delta) for e in entries] == [("revoke", -10), ("start", 10)]
        run = await h.kontext()
        assert h.outcomes[run.id].status == "rejected"
        assert h.segmind.calls == []
        await assert_ledger_ok(h)


async def test_admin_balance_shows_a_members_credits() -> None:
    async with harness(COOLDOWN_SECONDS="120") as h:
        await h.kontext()
        rec = await admin(h, "balance", member=h.member_id)
        text = embed_text(rec)
        assert f"<@{h.member_id}> has 9 credit(s), 0 job(s) in progress" in text
        m = re.search(r"cooldown (\d+) s", text)
        assert m is not None and 110 <= int(m.group(1)) <= 120
        await assert_ledger_ok(h)


async def test_admin_settings_change_show_validate_and_reset() -> None:
    async with harness() as h:
        store = h.bot.store
        rec = await admin(h, "settings")
        shown = embed_text(rec)
        assert "Starting credits: 10" in shown and "Cooldown: 0 s" in shown
        rec = await admin(h, "settings", cooldown_seconds=30, credits_per_image=2, jobs_per_member=3)
        text = embed_text(rec)
        assert "Saved" in text and "Cooldown: 30 s" in text and "Credits per image: 2" in text
        gs = await store.settings.get(h.guild_id)
        assert (gs.cooldown_seconds, gs.credits_per_image, gs.jobs_per_member) == (30, 2, 3)
        # a job now costs 2 credits
        run = await h.kontext()
        assert h.outcomes[run.id].status == "posted"
        assert await h.balance() == 8
        # validation: nothing changes, the admin is told why
        rec = await admin(h, "settings", blocked_words="x" * 150, cooldown_seconds=5)
        text = embed_text(rec)
        assert "was not changed" in text and "blocked_words" in text
        assert (await store.settings.get(h.guild_id)).cooldown_seconds == 30
        # reset one setting to the process default
        rec = await admin(h, "settings", reset="cooldown_seconds")
        assert "Saved" in embed_text(rec) and "Cooldown: 0 s" in embed_text(rec)
        gs = await store.settings.get(h.guild_id)
        assert "cooldown_seconds" not in gs.overridden and gs.credits_per_image == 2
        history = await store.audit.settings_history(h.guild_id)
        changes = [(r["key"], r["new_value"]) for r in history]
        assert changes[0] == ("cooldown_seconds", None)  # newest first: the reset
        assert sorted(changes[1:]) == [
            ("cooldown_seconds", "30"), ("credits_per_image", "2"), ("jobs_per_member", "3"),
        ]
        assert {r["actor_id"] for r in history} == {h.admin_id}
        assert history[0]["old_value"] == "30"
        await assert_ledger_ok(h)


async def test_admin_stats_show_generations_failures_and_top_members() -> None:
    async with harness() as h:
        (other,) = add_members(h, 1)
        for _ in range(2):
            await h.kontext()
        await h.kontext(user_id=other)
        h.segmind.fail_next(500, times=10)
        await h.kontext(user_id=other)
        h.segmind.clear_faults()
        h.segmind.garbage_next("html")
        await h.kontext(user_id=other)
        rec = await admin(h, "stats")
        text = embed_text(rec)
        assert rec.ephemeral
        today = text.split("Last 30 days")[0]
        assert "3 image(s) posted" in today and "3 credit(s) spent" in today
        # the garbage answer was billed by the API, and a 500 may have been: both count in the
        # owner's spend
        assert "$0.50 API spend" in today and "2 refund(s)" in today
        assert "api_server_error: 1" in today and "api_bad_response: 1" in today
        top = re.search(r"Top members: (.*)", today)
        assert top is not None
        assert top.group(1).startswith(f"<@{h.member_id}> (2), <@{other}> (1)")
        assert "3 image(s) posted" in text.split("Last 30 days")[1]
        assert "$0.50 of $20.00 used today" in text
        await assert_ledger_ok(h)


async def test_billed_failures_keep_their_budget_share() -> None:
    async with harness(COST_PER_IMAGE_USD="0.10", DAILY_BUDGET_USD="0.15") as h:
        h.segmind.garbage_next("html")
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        assert h.segmind.charged_count == 1  # the API billed it
        assert await h.balance() == 10  # the member is not charged ...
        budget = await h.bot.store.budgets.status()
        assert budget.reserved_usd == pytest.approx(0.10)  # ... but the owner's spend counts
        refused = await h.kontext()
        assert "today's spending limit" in h.last_status(refused)
        assert h.segmind.charged_count == 1
        await assert_ledger_ok(h)

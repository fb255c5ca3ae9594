"""The owner's money across many servers (issue 10): allowed servers, per-server budgets, owner
blocks from a console, and an intake that costs nothing until it may."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.e2e.harness import harness
from tests.e2e.proc import clean_env, run_cli, until, world


async def test_a_server_not_in_allowed_guild_ids_is_refused_with_no_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with harness(ALLOWED_GUILD_IDS="1") as h:  # not this server
        rec = await h.kontext(wait=False)
        await until(lambda: rec.responses, 10, "the refusal")
        said = h.reply_text(rec)
        assert "not enabled in this server" in said and "Traceback" not in said
        assert rec.ephemeral
        credits = await h.slash("credits")
        assert "not enabled in this server" in h.reply_text(credits)
        assert h.segmind.calls == []
        async with h.bot.store.db.read() as conn:
            from sqlalchemy import func, select

            from kontext.schema import jobs, ledger

            assert (await conn.execute(select(func.count()).select_from(jobs))).scalar_one() == 0
            assert (await conn.execute(select(func.count()).select_from(ledger))).scalar_one() == 0
        assert any(str(h.guild_id) in r.getMessage() and "not enabled" in r.getMessage()
                   for r in caplog.records)


async def test_a_server_budget_refuses_the_third_job_naming_the_server_s_limit() -> None:
    async with harness(GUILD_DAILY_BUDGET_USD="0.20", COST_PER_IMAGE_USD="0.10",
                       DAILY_BUDGET_USD="100", JOBS_PER_MEMBER="10") as h:
        await h.slash("kontext-admin grant", {"member": h.member_id, "amount": 100}, user_id=h.admin_id)
        await h.slash("kontext-admin settings", {"credits_per_image": 0}, user_id=h.admin_id)
        for _ in range(2):
            rec = await h.kontext()
            assert h.outcomes[rec.id].status == "posted"
        third = await h.kontext()
        said = h.last_status(third)
        assert "This server has used today's image budget" in said and "midnight UTC" in said
        assert len(h.segmind.calls) == 2
        assert await h.bot.store.audit.check_invariants() == []


async def test_a_burst_of_20_cannot_pass_a_server_budget() -> None:
    async with harness(GUILD_DAILY_BUDGET_USD="0.20", COST_PER_IMAGE_USD="0.10",
                       DAILY_BUDGET_USD="100", MAX_CONCURRENT_JOBS="8") as h:
        users = [int(h.discord.add_member(h.guild_id, name=f"m{i}")["user"]["id"]) for i in range(20)]
        recs = await asyncio.gather(*(h.kontext(user_id=u, wait=False) for u in users))
        for rec in recs:
            await h.wait_settled(rec)
        posted = [r for r in recs if h.outcomes[r.id].status == "posted"]
        refused = [r for r in recs if h.outcomes[r.id].status == "rejected"]
        assert len(posted) == 2 and len(refused) == 18
        assert all("server has used today's image budget" in h.last_status(r) for r in refused)
        assert len(h.segmind.calls) == 2
        assert await h.bot.store.audit.check_invariants() == []


async def test_owner_console_lists_blocks_and_sets_budgets(tmp_path: Path) -> None:
    async with world() as w:
        env = clean_env(**w.env)
        code, out, err = await run_cli("owner", "servers", env=env)
        assert code == 0 and "no server has used the bot yet" in out, err
        gid = str(w.guild_id)
        assert (await run_cli("owner", "block", gid, env=env))[0] == 0
        assert (await run_cli("owner", "budget", gid, "0.50", env=env))[0] == 0
        code, out, _ = await run_cli("owner", "servers", env=env)
        line = next(x for x in out.splitlines() if x.startswith(gid))
        assert "blocked" in line and "$0.50" in line
        code, _, err = await run_cli("owner", "block", "not-a-server", env=env)
        assert code == 2 and "not a server id" in err and "Traceback" not in err
        assert (await run_cli("owner", "unblock", gid, env=env))[0] == 0
        assert (await run_cli("owner", "budget", gid, "default", env=env))[0] == 0
        async with w.store() as store:
            control = await store.owner.control(w.guild_id)
            assert not control.blocked and control.daily_budget_usd is None


async def test_a_blocked_server_is_refused_within_seconds_everywhere() -> None:
    async with harness() as h:
        await h.bot.store.owner.set_blocked(h.guild_id, True)
        h.bot.gate._blocked.clear()  # the 5 s cache: the owner's change reaches every process
        rec = await h.kontext(wait=False)
        await until(lambda: rec.responses, 10, "the refusal")
        assert "not enabled in this server" in h.reply_text(rec)
        assert h.segmind.calls == []
        await h.bot.store.owner.set_blocked(h.guild_id, False)
        h.bot.gate._blocked.clear()
        ok = await h.kontext()
        assert h.outcomes[ok.id].status == "posted"


async def test_a_block_is_rechecked_inside_the_reservation() -> None:
    """Even past the gate's cache, nothing is charged in a blocked server."""
    async with harness() as h:
        assert await h.bot.gate.allows(h.guild_id)  # cached as allowed
        await h.bot.store.owner.set_blocked(h.guild_id, True)
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "rejected"
        assert "not enabled in this server" in h.last_status(rec)
        assert h.segmind.calls == [] and await h.balance() == 10


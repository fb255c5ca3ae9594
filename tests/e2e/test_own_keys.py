"""Servers that bring their own Segmind key (issue 10): checked before it is saved, encrypted at
rest, never shown back; that server's jobs run on it and leave the owner's budgets alone."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from kontext.schema import guild_api_keys
from tests.e2e.harness import SEGMIND_KEY, harness
from tests.e2e.test_credits_flow import embed_text

SERVER_KEY = "SG_server_own_key_0123456789"
ENC = Fernet.generate_key().decode()


async def set_key(h: Any, key: str) -> str:
    """Run /kontext-admin api-key, type ``key`` in the modal; returns what the admin was told."""
    rec = await h.discord.invoke_slash(
        "kontext-admin api-key", {}, user_id=h.admin_id, guild_id=h.guild_id,
        channel_id=h.channel_id,
    )
    await rec.wait_for(lambda r: r.modal is not None or r.responses, 10)
    assert rec.response_type == 9 and rec.modal is not None, h.reply_text(rec)
    submit = await h.discord.submit_modal(rec, {"api_key": key}, user_id=h.admin_id)
    await submit.wait_followup(timeout=10)
    text = "\n".join(str(m.get("content") or "") for m in submit.followups)
    assert key not in text and key not in str(rec.modal)
    return text


async def test_a_server_key_runs_its_jobs_and_leaves_the_owner_budget_alone() -> None:
    async with harness(ENCRYPTION_KEY=ENC, DAILY_BUDGET_USD="0.10", GUILD_DAILY_BUDGET_USD="0.10") as h:
        h.segmind.add_key(SERVER_KEY)
        said = await set_key(h, SERVER_KEY)
        assert "Saved" in said and "own Segmind key" in said
        shown = await h.slash("kontext-admin settings", user_id=h.admin_id)
        assert "this server's images run on its own key" in embed_text(shown)
        assert SERVER_KEY not in embed_text(shown)
        async with h.bot.store.db.read() as conn:
            stored = (await conn.execute(select(guild_api_keys.c.key_encrypted))).scalar_one()
        assert SERVER_KEY not in stored  # encrypted at rest
        for _ in range(3):  # past both of the owner's caps: the server pays for these
            rec = await h.kontext()
            assert h.outcomes[rec.id].status == "posted", h.last_status(rec)
        assert [c.api_key for c in h.segmind.calls] == [SERVER_KEY] * 3
        budget = await h.bot.store.budgets.status()
        assert budget.reserved_usd == 0 and budget.generations == 0
        assert await h.bot.store.audit.check_invariants() == []
        # removed: the owner's key again (and the owner's budget, which allows one)
        rec = await h.slash("kontext-admin api-key", {"remove": True}, user_id=h.admin_id)
        assert "removed" in h.reply_text(rec)
        job = await h.kontext()
        assert h.outcomes[job.id].status == "posted"
        assert h.segmind.calls[-1].api_key == SEGMIND_KEY


async def test_a_bad_key_is_refused_at_save_time_and_nothing_is_stored() -> None:
    async with harness(ENCRYPTION_KEY=ENC) as h:
        said = await set_key(h, "SG_not_a_real_key_000")
        assert "did not accept that key" in said and "not saved" in said
        assert await h.bot.store.owner.api_keys() == []
        rec = await h.kontext()
        assert h.segmind.calls[-1].api_key == SEGMIND_KEY and h.outcomes[rec.id].status == "posted"


async def test_without_encryption_key_the_command_says_it_is_off() -> None:
    async with harness() as h:
        rec = await h.slash("kontext-admin api-key", user_id=h.admin_id)
        assert rec.modal is None and "turned off" in h.reply_text(rec)


async def test_a_refused_server_key_pauses_only_that_server() -> None:
    async with harness(ENCRYPTION_KEY=ENC) as h:
        h.segmind.add_key(SERVER_KEY)
        await set_key(h, SERVER_KEY)
        h.segmind.other_keys.discard(SERVER_KEY)  # the server's Segmind account revoked it
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        said = h.last_status(rec)
        assert "own Segmind key was refused" in said and "/kontext-admin api-key" in said
        assert SERVER_KEY not in said
        assert not h.bot.pipeline.paused  # the owner's account is fine
        again = await h.kontext()
        assert "own Segmind key was refused" in h.last_status(again)
        shown = await h.slash("kontext-admin settings", user_id=h.admin_id)
        assert "refused by Segmind" in embed_text(shown)  # what the admins see
        assert len(h.segmind.calls) == 1  # nothing more was sent on the refused key
        # a new key un-pauses the server
        h.segmind.add_key(SERVER_KEY + "2")
        await set_key(h, SERVER_KEY + "2")
        ok = await h.kontext()
        assert h.outcomes[ok.id].status == "posted"
        assert h.segmind.calls[-1].api_key == SERVER_KEY + "2"


async def test_admin_commands_check_manage_server_themselves() -> None:
    """A server may show /kontext-admin to everyone; the bot still refuses non-admins."""
    async with harness() as h:
        rec = await h.slash(
            "kontext-admin grant", {"member": h.member_id, "amount": 1000}, user_id=h.member_id
        )
        assert "not allowed" in h.reply_text(rec)
        assert await h.balance() == 10


async def test_a_server_key_echoed_by_segmind_reaches_no_log_and_no_member(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with harness(ENCRYPTION_KEY=ENC) as h:
        h.segmind.add_key(SERVER_KEY)
        await set_key(h, SERVER_KEY)
        h.segmind.fail_next(401, error=f"Unauthorized: invalid API key {SERVER_KEY}")
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        assert SERVER_KEY not in h.last_status(rec)
        outcome = h.outcomes[rec.id]
        assert outcome.error is not None and SERVER_KEY not in outcome.error.detail
        # discord.py's own gateway DEBUG lines carry whatever a modal sends (the bot keeps the
        # discord loggers at INFO, see setup_logging); everything else, at any level, is clean
        for record in caplog.records:
            if record.name.startswith("discord") and record.levelno < logging.INFO:
                continue
            assert SERVER_KEY not in record.getMessage(), record.getMessage()
        metrics = h.bot.metrics.render()
        assert SERVER_KEY.encode() not in metrics

"""Crash recovery: ``kill -9`` the real bot process mid-job, start another one.

Async mode (``SEGMIND_API_MODE=async``): the request id is stored before polling, so the next
process resumes the job, posts its result (through the interaction while its token lives, else
through the channel with a mention) and charges it exactly once. Sync mode: the next process
refunds the job and tells the member. A killed worker's jobs are claimed after
``KONTEXT_LEASE_SECONDS`` (a dev/test knob: the lease life, 60 s by default).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.proc import bot_process, until, world

STALE = "2"


async def job_state(store, job_id: int) -> str | None:
    job = await store.jobs.get(job_id)
    return job.state if job else None


async def until_async(get, expected: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := await get()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, expected {expected!r}"
        await asyncio.sleep(0.05)


def status_text(rec) -> str:
    return (rec.original or {}).get("content") or ""


@pytest.mark.parametrize("token_alive", [True, False], ids=["through-interaction", "token-expired"])
async def test_kill_9_mid_job_then_restart_posts_the_result_once(token_alive: bool) -> None:
    async with world(segmind_latency=2.5) as w:
        env = {"SEGMIND_API_MODE": "async", "KONTEXT_LEASE_SECONDS": STALE}
        async with bot_process(w, "first", **env) as bot:
            rec = await w.kontext()
            await w.segmind.wait_calls(1, timeout=10)
            # polling started: the request id is in the database
            await until(lambda: any("/status" in p for _, _, p, _ in w.segmind.requests_log), 10)
            bot.kill()
            await bot.wait_exit(5)
        if not token_alive:
            w.discord.expire_token(rec)
        async with bot_process(w, "second", **env):
            await until(lambda: w.result_messages(), 20, "the resumed result")
            async with w.store() as store:
                await until_async(lambda: job_state(store, rec.id), "posted")
        # one v2 submission, one billed generation, one post
        assert len([c for c in w.segmind.calls if c.api == "v2"]) == 1
        assert w.segmind.charged_count == 1
        results = w.result_messages()
        assert len(results) == 1
        if token_alive:
            assert len(rec.followups) == 1 and rec.followups[0]["id"] == results[0]["id"]
            assert "Done" in status_text(rec)
        else:
            assert rec.followups == []
            assert f"<@{w.member_id}>" in results[0]["content"]
        async with w.store() as store:
            job = await store.jobs.get(rec.id)
            assert job is not None and job.state == "posted"
            ledger = await store.credits.recent(w.guild_id, w.member_id, limit=50)
            kinds = [e.kind for e in ledger if e.job_id == rec.id]
            assert sorted(kinds) == ["commit", "reserve"], kinds
            assert (await store.credits.member_status(w.guild_id, w.member_id)).balance == 9
            assert await store.audit.check_invariants() == []


async def test_kill_9_mid_job_in_sync_mode_refunds_on_restart() -> None:
    async with world(segmind_latency=6.0) as w:
        env = {"KONTEXT_LEASE_SECONDS": STALE}
        async with bot_process(w, "first", **env) as bot:
            rec = await w.kontext()
            await w.segmind.wait_calls(1, timeout=10)
            bot.kill()
            await bot.wait_exit(5)
        async with bot_process(w, "second", **env):
            await until(lambda: "refunded" in status_text(rec), 15, "the refund message")
        assert "restarted" in status_text(rec)
        assert len(w.segmind.calls) == 1  # never re-sent: v1 is not idempotent
        assert w.result_messages() == []
        async with w.store() as store:
            job = await store.jobs.get(rec.id)
            assert job is not None and job.state == "refunded"
            assert (await store.credits.member_status(w.guild_id, w.member_id)).balance == 10
            assert await store.audit.check_invariants() == []

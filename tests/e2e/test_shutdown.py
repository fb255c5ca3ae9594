"""SIGTERM with jobs in flight: the real ``python bot.py`` process against the emulators.

Sync mode: a job that can finish within ``SHUTDOWN_GRACE_SECONDS`` finishes and is charged; one
that cannot is refunded and its member told; either way the process exits 0 within the grace.
New commands during the drain get "restarting, try again in a minute". A cleanly stopped
process retires its worker, so the next one claims what is left at once.
"""

from __future__ import annotations

import asyncio
import time

from tests.e2e.proc import bot_process, until, world


def status_text(rec) -> str:
    return (rec.original or {}).get("content") or ""


async def test_sigterm_lets_a_short_job_finish_and_refuses_new_ones() -> None:
    async with world(segmind_latency=1.0) as w:
        other = w.add_member("late-member")
        async with bot_process(w, SHUTDOWN_GRACE_SECONDS="6") as bot:
            rec = await w.kontext()
            await w.segmind.wait_calls(1, timeout=10)
            sent = bot.terminate()
            # a member asking during the drain is told to come back, and nothing is charged
            late = await w.kontext(user_id=other)
            await late.wait_for(lambda r: "restarting" in status_text(r), 5)
            code = await bot.wait_exit(10)
            took = time.monotonic() - sent
            print(f"SIGTERM with a 1 s job in flight (grace 6 s): exit 0 after {took:.2f} s")
            assert code == 0, bot.output()[-3000:]
            assert took < 6.0, took
            assert "stopped cleanly" in bot.output()
        assert len(w.result_messages()) == 1
        assert "Done" in status_text(rec)
        assert len(w.segmind.calls) == 1
        async with w.store() as store:
            assert (await store.credits.member_status(w.guild_id, w.member_id)).balance == 9
            assert (await store.credits.member_status(w.guild_id, other)).balance == 10
            job = await store.jobs.get(rec.id)
            assert job is not None and job.state == "posted"
            assert await store.audit.check_invariants() == []


async def test_sigterm_refunds_a_job_longer_than_the_grace_and_exits_in_time() -> None:
    grace = 1.5
    async with world(segmind_latency=8.0) as w:
        async with bot_process(w, SHUTDOWN_GRACE_SECONDS=str(grace)) as bot:
            rec = await w.kontext()
            await w.segmind.wait_calls(1, timeout=10)
            sent = bot.terminate()
            code = await bot.wait_exit(10)
            took = time.monotonic() - sent
            print(f"SIGTERM with an 8 s job in flight (grace {grace} s): exit 0 after {took:.2f} s")
            assert code == 0, bot.output()[-3000:]
            assert took < grace + 1.0, took
        text = status_text(rec)
        assert "restarted" in text and "refunded" in text, text
        assert w.result_messages() == []
        async with w.store() as store:
            assert (await store.credits.member_status(w.guild_id, w.member_id)).balance == 10
            job = await store.jobs.get(rec.id)
            assert job is not None and job.state == "refunded"
            assert await store.audit.check_invariants() == []


async def test_async_job_is_handed_over_and_the_next_process_posts_it_at_once() -> None:
    """Async mode: SIGTERM hands the running job over (request id stored, worker retired); the
    next process claims it at once (no stale wait) and posts it; charged once."""
    async with world(segmind_latency=3.0) as w:
        env = {
            "SEGMIND_API_MODE": "async",
            "SHUTDOWN_GRACE_SECONDS": "1",
            "KONTEXT_LEASE_SECONDS": "60",  # only the retirement can free the job early
        }
        async with bot_process(w, "first", **env) as bot:
            rec = await w.kontext()
            await w.segmind.wait_calls(1, timeout=10)
            await until(lambda: any("/status" in p for _, _, p, _ in w.segmind.requests_log), 10)
            bot.terminate()
            assert await bot.wait_exit(10) == 0
        assert "still being made" in status_text(rec)
        async with bot_process(w, "second", **env), w.store() as store:
            await until(lambda: w.result_messages(), 15, "the handed-over result")
            await until(lambda: "Done" in status_text(rec), 5)
            for _ in range(250):  # the commit follows the "Done" edit: wait for it, then stop
                job = await store.jobs.get(rec.id)
                if job is not None and job.state == "posted":
                    break
                await asyncio.sleep(0.02)
        assert len([c for c in w.segmind.calls if c.api == "v2"]) == 1
        assert w.segmind.charged_count == 1
        assert len(w.result_messages()) == 1
        async with w.store() as store:
            job = await store.jobs.get(rec.id)
            assert job is not None and job.state == "posted"
            assert (await store.credits.member_status(w.guild_id, w.member_id)).balance == 9
            assert await store.audit.check_invariants() == []

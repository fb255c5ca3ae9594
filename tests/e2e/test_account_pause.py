"""The API account needs the owner (401/403/404/406): new jobs pause, members are told in plain
words, the log says it loudly, the account is probed (``GET /v1/get-user-credits``) and jobs
resume once it works. ``KONTEXT_ACCOUNT_PROBE_SECONDS`` (a test knob; 60 s by default) keeps the
probes quick here.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.e2e.harness import harness
from tests.e2e.proc import until

PROBE = "0.2"


def probes(h) -> list[int | None]:
    return [s for _, _, path, s in h.segmind.requests_log if path == "/v1/get-user-credits"]


@pytest.mark.parametrize("problem", ["401-revoked-key", "406-no-credits"])
async def test_account_problem_pauses_then_recovers(
    problem: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KONTEXT_ACCOUNT_PROBE_SECONDS", PROBE)
    caplog.set_level(logging.WARNING, logger="kontext")
    async with harness() as h:
        key, credits = h.segmind.api_key, h.segmind.credits
        if problem.startswith("401"):
            h.segmind.api_key = "revoked"
        else:
            h.segmind.credits = 0.0
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "refunded"
        assert "needs attention" in h.last_status(rec) and "refunded" in h.last_status(rec)
        assert h.bot.pipeline.paused
        assert any("PAUSING new jobs" in r.message and r.levelno == logging.ERROR for r in caplog.records)
        # while paused, a new job is refused in plain words without touching the API or credits
        calls = len(h.segmind.calls)
        rec2 = await h.kontext(user_id=h.admin_id)
        assert "needs attention" in h.reply_text(rec2) and "paused" in h.reply_text(rec2)
        assert len(h.segmind.calls) == calls
        # the probes keep failing: still paused
        await until(lambda: len(probes(h)) >= 2, 5, "two probes")
        assert h.bot.pipeline.paused
        # the owner fixes the account: the next probe resumes the jobs
        h.segmind.api_key, h.segmind.credits = key, credits
        await until(lambda: not h.bot.pipeline.paused, 5, "the pause to lift")
        rec3 = await h.kontext()
        assert h.outcomes[rec3.id].status == "posted"
        assert await h.balance() == 9
        assert await h.balance(h.admin_id) == 10
        assert await h.bot.store.audit.check_invariants() == []
        assert 'kontext_api_paused 0.0' in h.bot.metrics.render().decode()


@pytest.mark.parametrize("status", [403, 404])
async def test_forbidden_or_unknown_model_pauses_until_a_probe_succeeds(
    status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KONTEXT_ACCOUNT_PROBE_SECONDS", PROBE)
    async with harness() as h:
        h.segmind.fail_next(status)
        rec = await h.kontext()
        assert "needs attention" in h.last_status(rec)
        assert h.bot.pipeline.paused
        await until(lambda: not h.bot.pipeline.paused, 5, "the pause to lift")
        assert probes(h) == [200]
        rec2 = await h.kontext()
        assert h.outcomes[rec2.id].status == "posted"


async def test_waiting_jobs_are_refunded_when_the_account_pauses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KONTEXT_ACCOUNT_PROBE_SECONDS", "30")
    async with harness(segmind_latency=0.5, MAX_CONCURRENT_JOBS="1") as h:
        third = int(h.discord.add_member(h.guild_id, name="third")["user"]["id"])
        a = await h.kontext(wait=False)
        await h.segmind.wait_calls(1)
        b = await h.kontext(user_id=h.admin_id, wait=False)
        c = await h.kontext(user_id=third, wait=False)
        deadline = time.monotonic() + 5
        while await h.bot.store.queue.count_waiting() != 2:  # the queue is the database's
            assert time.monotonic() < deadline, "two waiting jobs"
            await asyncio.sleep(0.02)
        h.segmind.api_key = "revoked"  # A already got in; B will be refused
        for rec in (a, b, c):
            await h.wait_settled(rec)
        assert [h.outcomes[r.id].status for r in (a, b, c)] == ["posted", "refunded", "refunded"]
        assert "needs attention" in h.last_status(b) and "needs attention" in h.last_status(c)
        assert len(h.segmind.calls) == 2  # C never reached the API
        assert await h.balance(h.admin_id) == 10 and await h.balance(third) == 10
        assert await h.bot.store.audit.check_invariants() == []

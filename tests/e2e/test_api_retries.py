"""One owner per retry, through the real bot: the Segmind client is the only thing that repeats
an API request, so one job sends at most ``DEFAULT_MAX_RETRIES + 1`` POSTs (the bound in
``SegmindClient``'s docstring), each 429 slows the shared queue down once, and an answer that may
have billed is never followed by a second POST."""

from __future__ import annotations

import asyncio

import pytest

from kontext.accounts import guild_account
from kontext.segmind import DEFAULT_MAX_RETRIES
from tests.e2e.harness import harness
from tests.e2e.test_faults import START, serves_next, settle_and_check
from tests.e2e.test_own_keys import ENC, SERVER_KEY, set_key

MODES = [pytest.param("sync", id="v1"), pytest.param("async", id="v2")]


@pytest.mark.parametrize("mode", MODES)
async def test_a_429_that_never_ends_costs_the_documented_posts_and_a_refund(mode: str) -> None:
    async with harness(SEGMIND_API_MODE=mode) as h:
        h.bot.segmind.backoff_base_s, h.bot.segmind.backoff_max_s = 0.01, 0.02
        h.segmind.fail_next(429, times=100, headers={"Retry-After": "0.05"})
        rec = await h.kontext()
        text = await settle_and_check(h, rec, status="refunded", balance=START)
        assert "busy" in text and "refunded" in text, text
        assert DEFAULT_MAX_RETRIES + 1 == 6
        assert len(h.segmind.calls) == 6 and h.segmind.charged_count == 0
        # each 429 slowed the queue down once (the pipeline adds no hold of its own)
        assert h.bot.metrics.rate_limited._value.get() == 6
        h.segmind.clear_faults()
        await serves_next(h, balance_after=START - 1)


@pytest.mark.parametrize("mode", MODES)
async def test_a_bad_gateway_that_never_ends_costs_the_documented_posts(mode: str) -> None:
    async with harness(SEGMIND_API_MODE=mode) as h:
        h.bot.segmind.backoff_base_s, h.bot.segmind.backoff_max_s = 0.01, 0.02
        h.segmind.fail_next(502, times=100)
        rec = await h.kontext()
        await settle_and_check(h, rec, status="refunded", balance=START)
        assert len(h.segmind.calls) == DEFAULT_MAX_RETRIES + 1
        assert h.bot.metrics.rate_limited._value.get() == 0
        h.segmind.clear_faults()
        await serves_next(h, balance_after=START - 1)


@pytest.mark.parametrize("mode", MODES)
async def test_a_500_is_one_post_and_settled_without_another(mode: str) -> None:
    async with harness(SEGMIND_API_MODE=mode) as h:
        h.segmind.fail_next(500, times=100)
        rec = await h.kontext()
        await settle_and_check(h, rec, status="refunded", balance=START)
        assert len(h.segmind.calls) == 1
        h.segmind.clear_faults()
        await serves_next(h, balance_after=START - 1)


async def test_a_server_keys_429_holds_its_own_account_not_the_owners() -> None:
    async with harness(ENCRYPTION_KEY=ENC) as h:
        h.segmind.add_key(SERVER_KEY)
        await set_key(h, SERVER_KEY)
        # asks for longer than the client waits (30 s): told once, then refunded at once
        h.segmind.fail_next(429, headers={"Retry-After": "40"})
        rec = await h.kontext()
        text = await settle_and_check(h, rec, status="refunded", balance=START)
        assert "busy" in text, text
        assert [c.api_key for c in h.segmind.calls] == [SERVER_KEY]
        assert h.bot.metrics.rate_limited._value.get() == 1
        # the hold is written by a task the 429 started: wait for it, then read it
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t.get_name() == "kontext-hold"))
        store = h.bot.store
        own = await store.queue.view(guild_account(h.guild_id))
        assert own.blocked_until - own.now > 30  # the server's own account waits out the 429
        owner = await store.queue.view()
        assert owner.blocked_until <= owner.now  # the owner's account was not held for it

"""One owner per retry, through the real bot: the Segmind client is the only thing that repeats
an API request, so one job sends at most ``DEFAULT_MAX_RETRIES + 1`` POSTs (the bound in
``SegmindClient``'s docstring), each 429 slows the shared queue down once, and an answer that may
have billed is never followed by a second POST."""

from __future__ import annotations

import pytest

from kontext.segmind import DEFAULT_MAX_RETRIES
from tests.e2e.harness import harness
from tests.e2e.test_faults import START, serves_next, settle_and_check

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

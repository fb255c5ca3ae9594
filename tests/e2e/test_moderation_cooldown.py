"""A result the image API refuses for its content: the credit comes back, the cooldown stays
(the member's prompt or images caused it), in both API modes, through the Segmind emulator."""

from __future__ import annotations

import pytest

from tests.e2e.harness import harness

MODERATED = "Output flagged by content moderation"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_content_rejection_refunds_but_keeps_the_cooldown(mode: str) -> None:
    async with harness(COOLDOWN_SECONDS="120", SEGMIND_API_MODE=mode) as h:
        if mode == "sync":
            h.segmind.fail_next(422, error=MODERATED)
        else:
            h.segmind.fail_v2_next(MODERATED)
        rec = await h.kontext()
        outcome = h.outcomes[rec.id]
        assert (outcome.status, outcome.cause) == ("refunded", "api_moderated"), outcome
        assert "safety filter" in h.last_status(rec)
        assert await h.balance() == 10
        status = await h.bot.store.credits.member_status(h.guild_id, h.member_id)
        assert 110 <= status.cooldown_remaining <= 120
        calls = len(h.segmind.calls)
        again = await h.kontext()
        assert h.outcomes[again.id].cause == "cooldown"
        assert len(h.segmind.calls) == calls  # no second call to the API
        assert await h.bot.store.audit.check_invariants() == []

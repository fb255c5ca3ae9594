"""Whose fault an error is decides whether the member's cooldown stays after a refund."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontext import errors
from kontext.segmind import error_for_status
from tests.kontext.test_pipeline import GUILD, FakeSink, pipeline_env

MODERATED = "Output flagged by content moderation"


def test_a_content_rejection_is_the_members_fault() -> None:
    rejected = error_for_status(422, "422", message=MODERATED)
    assert type(rejected) is errors.ApiContentRejected
    assert rejected.members_fault
    assert isinstance(rejected, errors.ApiError)  # still an API failure: refunded, not billed


@pytest.mark.parametrize(
    "cls",
    [
        c for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.ApiError) and c is not errors.ApiContentRejected
    ],
)
def test_other_api_failures_are_not_the_members_fault(cls: type[errors.ApiError]) -> None:
    assert not cls.members_fault


@pytest.mark.parametrize(
    ("status", "message", "cause", "cooldown_kept"),
    [
        (422, MODERATED, "api_moderated", True),
        (500, "Internal Server Error", "api_server_error", False),
    ],
)
async def test_refund_keeps_the_cooldown_only_when_the_member_caused_it(
    tmp_path: Path, status: int, message: str, cause: str, cooldown_kept: bool
) -> None:
    async with pipeline_env(tmp_path) as env:
        await env.store.settings.update(GUILD, 1, cooldown_seconds=300)
        env.semu.fail_next(status, error=message, times=10)
        spec = env.spec()
        sink = FakeSink()
        out = await env.pipeline.run(spec, sink)
        assert (out.status, out.cause) == ("refunded", cause)
        assert sink.events[-1][0] == "failed" and sink.events[-1][2] == 1
        member = await env.store.credits.member_status(GUILD, spec.user_id)
        assert member.balance == 10  # the credit came back either way
        assert (member.cooldown_remaining > 290) is cooldown_kept, member

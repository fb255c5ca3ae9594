"""A result is posted once and its fate told honestly; its search sees the whole channel.

The sinks (:mod:`cogs.sinks`) are driven directly with real discord.py against the Discord
emulator: a 5xx after Discord created the message, a cancellation mid-upload, refusals, a rate
limit; the search of the channel since a post began (:meth:`ChannelSink.find_result`); and the
listener that records a result seen on the gateway (:mod:`cogs.result_watch`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import discord
import pytest
from sqlalchemy import update

from cogs.recovered import StoredInteraction
from cogs.sinks import ChannelSink, InteractionSink
from emulators.discord import InteractionRecord
from emulators.discord.models import snowflake_time
from kontext import images
from kontext.errors import PostFateUnknown, ResultNotDelivered
from kontext.jobs import Delivery, JobSpec, ResultInfo
from kontext.schema import jobs
from kontext.segmind import GenerationResult
from kontext.store import Job
from kontext.vocab import ImageFormat, JobState
from tests.e2e.harness import Harness, harness, make_image

WEBHOOK_POST = r"^/webhooks/\d+/[^/]+$"  # a follow-up (the result upload); edits are PATCH
CHANNEL_POST = r"^/channels/\d+/messages$"
CHANNEL_READ = r"^/channels/\d+/messages$"


@dataclasses.dataclass
class Posted:
    """A finished ``/kontext`` job whose interaction token still lives."""

    h: Harness
    rec: InteractionRecord
    job: Job

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_job(self.job)

    def result(self, job_id: int) -> ResultInfo:
        """A result of job ``job_id`` (its file is ``kontext-<job_id>.png``)."""
        data = make_image(colour="green")
        fitted = images.FittedImage(
            data, ImageFormat.PNG, "png", 64, 48, reencoded=False, scale=1.0
        )
        generation = GenerationResult(
            image=data,
            content_type="image/png",
            output_format=ImageFormat.PNG,
            request_id=None,
            cost_usd=None,
            remaining_credits=None,
            seed=None,
            elapsed_s=0.1,
            attempts=1,
        )
        spec = dataclasses.replace(self.spec, job_id=job_id)
        return ResultInfo(spec, fitted, generation, 0.1, 0.2, balance_after=9, cost=1)

    def interaction_sink(self, job_id: int) -> InteractionSink:
        """The sink of a job taken over while its interaction token lives."""
        stored = StoredInteraction(
            self.h.bot, self.job, application_id=self.h.discord.application_id, token=self.rec.token
        )
        return InteractionSink(self.h.bot, cast(discord.Interaction, stored), job_id=job_id)

    def channel_sink(self, job_id: int) -> ChannelSink:
        return ChannelSink(
            self.h.bot, self.spec.channel_id, self.spec.user_id, None, job_id=job_id
        )

    def copies(self, job_id: int) -> list[dict[str, Any]]:
        """The messages in the channel that carry job ``job_id``'s result."""
        name = f"kontext-{job_id}.png"
        return [
            m
            for m in self.h.discord.public_messages(self.h.channel_id)
            if any(a["filename"] == name for a in m.get("attachments") or [])
        ]


@pytest.fixture
async def posted() -> AsyncIterator[Posted]:
    async with harness() as h:
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "posted"
        job = await h.bot.store.jobs.get(rec.id)
        assert job is not None
        yield Posted(h, rec, job)


# --- single-shot posts ------------------------------------------------------------------------


async def test_502_after_the_followup_was_created_is_fate_unknown_and_one_copy(
    posted: Posted,
) -> None:
    job_id = posted.rec.id + 1
    rule = posted.h.discord.fail_next("POST", WEBHOOK_POST, 502, process=True)
    with pytest.raises(PostFateUnknown):
        await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    assert rule.hits == 1
    assert len(posted.copies(job_id)) == 1  # posted, and not posted again


async def test_502_after_the_channel_post_was_created_is_fate_unknown_and_one_copy(
    posted: Posted,
) -> None:
    job_id = posted.rec.id + 1
    posted.h.discord.fail_next("POST", CHANNEL_POST, 502, process=True)
    with pytest.raises(PostFateUnknown):
        await posted.channel_sink(job_id).deliver(posted.result(job_id))
    assert len(posted.copies(job_id)) == 1


async def test_a_502_that_created_nothing_is_still_fate_unknown_and_not_sent_again(
    posted: Posted,
) -> None:
    job_id = posted.rec.id + 1
    posted.h.discord.fail_next("POST", WEBHOOK_POST, 502)
    posts = len([r for r in posted.h.discord.requests if r.method == "POST"])
    with pytest.raises(PostFateUnknown):
        await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    assert len([r for r in posted.h.discord.requests if r.method == "POST"]) == posts + 1
    assert posted.copies(job_id) == []


async def test_cancelled_mid_upload_is_fate_unknown(
    posted: Posted, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = posted.rec.id + 1
    emu = posted.h.discord
    emu.delay("POST", WEBHOOK_POST, 3.0, times=1)  # Discord takes its time to answer
    arrived = asyncio.Event()
    wait_delays = emu.faults.wait_delays

    async def noting_delays(method: str, path: str) -> None:
        if method == "POST" and "/webhooks/" in path:
            arrived.set()
        await wait_delays(method, path)

    monkeypatch.setattr(emu.faults, "wait_delays", noting_delays)
    sink = posted.interaction_sink(job_id)
    task = asyncio.create_task(sink.deliver(posted.result(job_id)))
    async with asyncio.timeout(10):
        await arrived.wait()  # the upload reached Discord
    task.cancel()
    with pytest.raises(PostFateUnknown) as caught:
        await task
    assert isinstance(caught.value.__cause__, asyncio.CancelledError)


async def test_a_refused_followup_is_not_delivered(posted: Posted) -> None:
    job_id = posted.rec.id + 1
    posted.h.discord.fail_next("POST", WEBHOOK_POST, 403)
    with pytest.raises(ResultNotDelivered):
        await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    assert posted.copies(job_id) == []


async def test_a_refused_channel_post_is_not_delivered(posted: Posted) -> None:
    job_id = posted.rec.id + 1
    posted.h.discord.fail_next("POST", CHANNEL_POST, 400, code=50035)
    with pytest.raises(ResultNotDelivered):
        await posted.channel_sink(job_id).deliver(posted.result(job_id))
    assert posted.copies(job_id) == []


async def test_an_upload_that_could_not_connect_is_not_delivered(
    posted: Posted, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = posted.rec.id + 1
    monkeypatch.setattr(discord.http.Route, "BASE", "http://127.0.0.1:9/api/v10")  # refused
    with pytest.raises(ResultNotDelivered):
        await posted.channel_sink(job_id).deliver(posted.result(job_id))


async def test_a_dead_token_falls_back_to_one_channel_post(posted: Posted) -> None:
    job_id = posted.rec.id + 1
    posted.h.discord.fail_next("POST", WEBHOOK_POST, 404, code=10015, message="Unknown Webhook")
    delivery = await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    [copy] = posted.copies(job_id)
    assert delivery == Delivery(int(copy["id"]), posted.h.channel_id)
    assert copy["content"] == f"<@{posted.spec.user_id}>" and "webhook_id" not in copy


async def test_a_rate_limited_post_waits_and_posts_once(posted: Posted) -> None:
    job_id = posted.rec.id + 1
    rule = posted.h.discord.fail_next("POST", WEBHOOK_POST, 429, retry_after=0.05)
    delivery = await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    assert rule.hits == 1
    [copy] = posted.copies(job_id)
    assert delivery.message_id == int(copy["id"])
    assert copy["id"] in posted.h.last_status(posted.rec)  # the private status links to it


async def test_a_post_rate_limited_too_long_or_too_often_is_not_delivered(
    posted: Posted, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 proves nothing was created: past the longest wait, or its tries, the post is not
    delivered (refunded by the pipeline), never sent again later."""
    from cogs import upload

    job_id = posted.rec.id + 1
    long = posted.h.discord.fail_next("POST", WEBHOOK_POST, 429, retry_after=60.0)
    with pytest.raises(ResultNotDelivered):
        await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    assert long.hits == 1 and posted.copies(job_id) == []
    monkeypatch.setattr(upload, "POST_RATE_LIMIT_TRIES", 3)
    often = posted.h.discord.fail_next("POST", WEBHOOK_POST, 429, retry_after=0.01, times=None)
    with pytest.raises(ResultNotDelivered):
        await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    assert often.hits == 3 and posted.copies(job_id) == []


# --- the search ----------------------------------------------------------------------------


async def test_find_result_sees_a_result_behind_150_newer_messages(posted: Posted) -> None:
    job_id = posted.rec.id + 1
    since = time.time()
    delivery = await posted.channel_sink(job_id).deliver(posted.result(job_id))
    for n in range(150):
        posted.h.discord.add_message(posted.h.channel_id, f"chatter {n}")
    found = await posted.interaction_sink(job_id).find_result(since)
    assert found == delivery
    assert await posted.channel_sink(job_id).find_result(since) == delivery


async def test_find_result_is_none_when_the_result_is_not_there(posted: Posted) -> None:
    job_id = posted.rec.id + 1
    delivery = await posted.channel_sink(job_id).deliver(posted.result(job_id))
    for n in range(120):
        posted.h.discord.add_message(posted.h.channel_id, f"chatter {n}")
    # another job's result is not this one's
    assert await posted.channel_sink(job_id + 1).find_result(0.0) is None
    # a result posted before the post began is not this post's
    after_it = snowflake_time(delivery.message_id) + 0.002
    assert await posted.channel_sink(job_id).find_result(after_it) is None
    assert await posted.channel_sink(job_id).find_result(after_it - 0.01) == delivery


async def test_find_result_raises_when_the_channel_cannot_be_read(posted: Posted) -> None:
    posted.h.discord.fail_next("GET", CHANNEL_READ, 403, times=None)
    with pytest.raises(discord.Forbidden):
        await posted.channel_sink(posted.rec.id).find_result(0.0)


# --- the listener ------------------------------------------------------------------------------


async def test_a_result_seen_on_the_gateway_is_recorded_while_posting(
    posted: Posted, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = posted.h
    posting = JobState.POSTING
    job_id = posted.rec.id
    async with h.bot.store.db.write() as conn:
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(state=posting, result_message_id=None, result_channel_id=None)
        )
    seen = asyncio.Event()
    note = h.bot.store.jobs.note_result_seen

    async def noting(*args: Any) -> bool:
        try:
            return await note(*args)
        finally:
            seen.set()

    monkeypatch.setattr(h.bot.store.jobs, "note_result_seen", noting)
    h.discord.fail_next("POST", WEBHOOK_POST, 502, process=True)  # the answer is lost
    with pytest.raises(PostFateUnknown):
        await posted.interaction_sink(job_id).deliver(posted.result(job_id))
    async with asyncio.timeout(10):
        await seen.wait()
    copy = posted.copies(job_id)[-1]  # the first is the job's own result, posted before
    job = await h.bot.store.jobs.get(job_id)
    assert job is not None
    assert (job.result_message_id, job.result_channel_id) == (int(copy["id"]), h.channel_id)
    # a moderator deleting it later changes nothing: it was posted
    await h.bot.http.delete_message(h.channel_id, int(copy["id"]))
    job = await h.bot.store.jobs.get(job_id)
    assert job is not None and job.result_message_id == int(copy["id"])

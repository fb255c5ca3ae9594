"""The Discord adapter's sinks, in pieces that need no Discord: the order of a job's private status
edits (``InteractionSink``) and uploads that do not copy the result (``UploadBuffer``)."""

from __future__ import annotations

import asyncio
import io
import tracemalloc
from types import SimpleNamespace
from typing import Any

import aiohttp.payload
import discord
import pytest

from cogs.result_message import UploadBuffer
from cogs.sinks import InteractionSink


class FakeInteraction:
    """What InteractionSink uses of a ``discord.Interaction``; edits take ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.id = 42
        self.channel_id = 5
        self.user = SimpleNamespace(id=7)
        self.locale = discord.Locale.american_english
        self.filesize_limit = 10 * 1024 * 1024
        self.delay = delay
        self.shown: list[str] = []  # contents, in the order Discord applied them
        self.in_flight = 0
        self.max_in_flight = 0

    async def edit_original_response(self, *, content: str, **_: Any) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            self.shown.append(content)
        finally:
            self.in_flight -= 1


def sink_for(interaction: FakeInteraction) -> InteractionSink:
    return InteractionSink(SimpleNamespace(), interaction, job_id=1)  # type: ignore[arg-type]


async def test_background_statuses_keep_their_order_and_skip_the_overtaken() -> None:
    it = FakeInteraction(delay=0.02)
    sink = sink_for(it)
    sink.show("one")
    await asyncio.sleep(0)  # "one" is being sent
    sink.show("two")
    sink.show("three")  # overtakes "two" before it was sent
    await sink.settle()
    assert it.shown == ["one", "three"]
    assert it.max_in_flight == 1 and sink.edited


async def test_a_direct_status_overtakes_pending_background_ones() -> None:
    it = FakeInteraction(delay=0.02)
    sink = sink_for(it)
    sink.show("checking")
    await asyncio.sleep(0)
    sink.show("stale")
    assert await sink._status("failed: not charged")
    await sink.settle()
    assert it.shown == ["checking", "failed: not charged"]


async def test_delayed_status_only_when_the_step_is_slow() -> None:
    it = FakeInteraction()
    sink = sink_for(it)
    sink.show("checking your images", after=0.05)
    await sink._status("generating")  # the step ended before 0.05 s
    await asyncio.sleep(0.1)
    await sink.settle()
    assert it.shown == ["generating"]

    sink.show("posting", after=0.01)
    await asyncio.sleep(0.05)  # a slow step: the status appears
    await sink.settle()
    assert it.shown == ["generating", "posting"]


async def test_closed_sink_sends_nothing_more() -> None:
    it = FakeInteraction()
    sink = sink_for(it)
    sink.show("checking your images", after=0.01)
    sink.close()  # e.g. a duplicate delivery: another process owns the message
    await asyncio.sleep(0.05)
    await sink.settle()
    assert it.shown == []


async def test_follow_up_waits_for_a_first_edit_only_when_there_was_none() -> None:
    it = FakeInteraction(delay=0.01)
    sink = sink_for(it)
    assert await sink._ready_for_followup()  # nothing shown yet: "posting" is sent first
    assert it.shown and sink.edited
    before = list(it.shown)
    assert await sink._ready_for_followup()  # already edited: does not wait for another edit
    assert it.shown == before


def test_upload_buffer_is_not_copied_by_aiohttp() -> None:
    data = bytes(range(256)) * 40_000  # ~10 MB
    tracemalloc.start()
    try:
        payload = aiohttp.payload.get_payload(UploadBuffer(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert payload.size == len(data)
    assert peak < len(data) // 10  # a plain io.BytesIO would copy all of it here
    buf = UploadBuffer(data)
    assert buf.read() == data and bytes(buf.getbuffer()) == data
    assert discord.File(UploadBuffer(data), filename="x.jpg").fp.read() == data
    plain = io.BytesIO(data)
    tracemalloc.start()
    try:
        aiohttp.payload.get_payload(plain)
        _, plain_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plain_peak >= len(data)  # what UploadBuffer avoids (CPython unshares the buffer)


class _PostedThenBrokenInteraction(FakeInteraction):
    """The result follow-up goes out; the status edit after it hits a transport error."""

    def __init__(self) -> None:
        super().__init__()
        self.edits = 0
        self.application_id = 3
        self.token = "token"
        self.guild_id = 2

    async def edit_original_response(self, *, content: str, **kw: Any) -> None:
        self.edits += 1
        if self.edits > 1:  # the edit after the public post
            raise aiohttp.ClientOSError(104, "Connection reset by peer")
        await super().edit_original_response(content=content, **kw)


async def test_a_transport_error_after_the_post_does_not_undo_the_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review finding (d): the image is public, so the job must end posted, not refunded."""
    from cogs import sinks
    from kontext.images import FittedImage
    from kontext.job_options import JobOptions

    async def posted(*_: Any, **__: Any) -> dict[str, Any]:  # the follow-up went out
        return {"id": "99", "channel_id": "5"}

    monkeypatch.setattr(sinks, "post_result", posted)
    from kontext.pipeline import InputImage, JobSpec, ResultInfo

    it = _PostedThenBrokenInteraction()
    bot = SimpleNamespace(services=None)
    sink = InteractionSink(bot, it, job_id=1)  # type: ignore[arg-type]
    await sink._status("generating")  # the private message was edited once already
    options = JobOptions(
        prompt="p", image_1=InputImage("https://cdn.discordapp.com/a.png"),
        image_2=InputImage("https://cdn.discordapp.com/b.png"),
        aspect_ratio="match_input_image", safety_tolerance=1, seed=42,
    )
    spec = JobSpec(job_id=1, guild_id=2, channel_id=5, user_id=7, options=options)
    image = FittedImage(
        body=b"\xff\xd8\xff" + b"0" * 10, format="jpg", filename_ext="jpg", width=1, height=1,
        reencoded=False, scale=1.0,
    )
    info = ResultInfo(
        spec=spec, image=image, generation=SimpleNamespace(), api_seconds=1.0,  # type: ignore[arg-type]
        total_seconds=1.0, balance_after=9, cost=1,
    )
    delivery = await sink.deliver(info)
    assert (delivery.message_id, delivery.channel_id) == (99, 5)
    assert it.edits == 2  # the status edit after the post was tried, failed, and was shrugged off

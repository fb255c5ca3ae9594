"""A bot process killed mid-job (SIGKILL, no clean-up) and a new one started on the same database.

The new process claims the dead worker's unfinished job once the dead worker's heartbeat is
expired (``KONTEXT_LEASE_SECONDS``, shortened here from 60 s), refunds it (sync API mode)
or resumes it (async mode, the request id was stored), and tells the member. One API call in
all, and the ledger balances.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from emulators.discord import EPHEMERAL, DiscordEmulator, InteractionRecord
from emulators.segmind import SegmindEmulator
from kontext.store import Store
from tests.dbutil import backend_url, make_settings
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image
from tests.e2e.procbot import BotProcess, logs, start_bot, wait_connected, wait_for, wait_job

STALE = "2"  # lease life: a killed process's running jobs are taken over after it
RESTART_TEXT = "The bot restarted while your image was being made"


def database(backend: str, tmp_path: Path) -> contextlib.AbstractAsyncContextManager[str]:
    return backend_url(backend, tmp_path, "kontext.db")


@contextlib.asynccontextmanager
async def world(latency: float) -> AsyncIterator[tuple[DiscordEmulator, SegmindEmulator, dict[str, int]]]:
    async with (
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY, latency=latency) as semu,
    ):
        guild = demu.add_guild(name="Crash Server")
        channel = int(demu.add_channel(guild.id, name="general")["id"])
        member = int(demu.add_member(guild.id, name="member")["user"]["id"])
        yield demu, semu, {"guild": guild.id, "channel": channel, "member": member}


async def kontext(demu: DiscordEmulator, ids: dict[str, int]) -> InteractionRecord:
    return await demu.invoke_slash(
        "kontext",
        {
            "image_1": (make_image(), "one.png", "image/png"),
            "image_2": (make_image(colour="blue"), "two.png", "image/png"),
            "prompt": "put the hat on the cat",
        },
        user_id=ids["member"], guild_id=ids["guild"], channel_id=ids["channel"],
    )


async def crash_mid_job(
    demu: DiscordEmulator, semu: SegmindEmulator, url: str, ids: dict[str, int], tmp: Path, **env: str
) -> tuple[InteractionRecord, BotProcess]:
    """Start a bot, run /kontext until the API call is in flight, SIGKILL the bot."""
    first = await start_bot(
        demu, semu, url, workdir=tmp, name="first", KONTEXT_LEASE_SECONDS=STALE, **env
    )
    await wait_connected(demu, [first], 1)
    conns = list(demu.connections)
    rec = await kontext(demu, ids)
    await rec.wait_response(10)
    try:
        await semu.wait_calls(1, timeout=15)
        if env.get("SEGMIND_API_MODE") == "async":
            # kill only once the request id is stored: before that a crash cannot be resumed
            await wait_job(url, rec.id, lambda job: job.api_request_id is not None)
    except TimeoutError:
        raise AssertionError(logs(first)) from None
    first.kill()
    assert await first.wait(10) == -9
    await demu.wait_until(lambda: all(c.closed for c in conns), 10, description="gateway closed")
    return rec, first


def member_told_in_channel(demu: DiscordEmulator, ids: dict[str, int]) -> list[dict[str, Any]]:
    return [
        m
        for m in demu.public_messages(ids["channel"])
        if f"<@{ids['member']}>" in (m.get("content") or "") and RESTART_TEXT in m["content"]
    ]


async def check_database(url: str, ids: dict[str, int], job_id: int, *, state: str, balance: int) -> None:
    store = await Store.open(url, make_settings())
    try:
        job = await store.jobs.get(job_id)
        assert job is not None and job.state == state, job
        assert (await store.credits.member_status(ids["guild"], ids["member"])).balance == balance
        entries = [
            e for e in await store.credits.recent(ids["guild"], ids["member"], limit=20)
            if e.job_id == job_id
        ]
        expected = {"refunded": ["refund", "reserve"], "posted": ["commit", "reserve"]}[state]
        assert [e.kind for e in entries] == expected
        if state == "refunded":
            assert entries[0].delta == 1 and entries[0].reason
        assert await store.jobs.count_active() == 0
        assert await store.audit.check_invariants() == []
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_sigkill_mid_job_then_restart_refunds_and_tells_the_member(
    backend: str, tmp_path: Path
) -> None:
    async with database(backend, tmp_path) as url, world(latency=60) as (demu, semu, ids):
        rec, first = await crash_mid_job(demu, semu, url, ids, tmp_path)
        second = await start_bot(
            demu, semu, url, workdir=tmp_path, name="second", KONTEXT_LEASE_SECONDS=STALE
        )
        try:
            await wait_connected(demu, [second], 1)
            # the interaction token still lives: the member's private status says what happened
            await wait_for(
                lambda: RESTART_TEXT in ((rec.original or {}).get("content") or ""),
                20, demu, first, second,
            )
            text = rec.original["content"]
            assert "1 credit(s) were refunded" in text
            assert rec.original["flags"] & EPHEMERAL
            assert len(semu.calls) == 1, logs(first, second)
            assert [m for m in demu.public_messages(ids["channel"]) if m.get("attachments")] == []
        finally:
            await second.stop()
        await check_database(url, ids, rec.id, state="refunded", balance=10)


async def test_sigkill_then_restart_with_a_dead_token_tells_the_member_in_the_channel(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'kontext.db'}"
    async with world(latency=60) as (demu, semu, ids):
        rec, first = await crash_mid_job(demu, semu, url, ids, tmp_path)
        demu.expire_token(rec)
        second = await start_bot(
            demu, semu, url, workdir=tmp_path, name="second", KONTEXT_LEASE_SECONDS=STALE
        )
        try:
            await wait_connected(demu, [second], 1)
            await wait_for(lambda: member_told_in_channel(demu, ids), 20, demu, first, second)
            (msg,) = member_told_in_channel(demu, ids)
            assert "1 credit(s) were refunded" in msg["content"]
            assert str(ids["member"]) in [u["id"] for u in msg.get("mentions", [])] or (
                f"<@{ids['member']}>" in msg["content"]
            )
            assert len(semu.calls) == 1, logs(first, second)
        finally:
            await second.stop()
        await check_database(url, ids, rec.id, state="refunded", balance=10)


async def test_sigkill_in_async_mode_resumes_and_posts_without_a_second_call(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'kontext.db'}"
    async with world(latency=3) as (demu, semu, ids):
        rec, first = await crash_mid_job(demu, semu, url, ids, tmp_path, SEGMIND_API_MODE="async")
        second = await start_bot(
            demu, semu, url, workdir=tmp_path, name="second",
            KONTEXT_LEASE_SECONDS=STALE, SEGMIND_API_MODE="async",
        )
        try:
            await wait_connected(demu, [second], 1)
            await wait_for(
                lambda: [m for m in demu.public_messages(ids["channel"]) if m.get("attachments")],
                30, demu, first, second,
            )
            submits = [c for c in semu.calls if c.api == "v2"]
            assert len(submits) == 1, logs(first, second)
            assert semu.charged_count == 1
        finally:
            await second.stop()
        await check_database(url, ids, rec.id, state="posted", balance=9)

"""Two bot processes on one database, like an overlapping deploy on a PaaS.

Both ``python bot.py`` processes are connected to one Discord emulator, which sends every
interaction to both of them (as Discord does while two sessions overlap). Exactly one of them
acknowledges it and runs the job: one API call, one charge, one posted result; the other one's
defer is refused with 40060 and it backs off. Run on one SQLite file and on one Postgres
database (skipped without a server, failed when ``KONTEXT_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from emulators.discord import DiscordEmulator, InteractionRecord
from emulators.segmind import SegmindEmulator
from kontext.store import Store
from tests.dbutil import backend_url, make_settings
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, make_image
from tests.e2e.procbot import BotProcess, bot_processes, logs, wait_for, wait_job

ALREADY_ACKNOWLEDGED = 40060


def database(backend: str, tmp_path: Path) -> contextlib.AbstractAsyncContextManager[str]:
    return backend_url(backend, tmp_path, "shared.db")


def kontext_options(prompt: str) -> dict[str, Any]:
    return {
        "image_1": (make_image(), "one.png", "image/png"),
        "image_2": (make_image(colour="blue"), "two.png", "image/png"),
        "prompt": prompt,
    }


def result_followups(rec: InteractionRecord) -> list[dict[str, Any]]:
    return [m for m in rec.followups if m.get("attachments")]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_two_processes_same_interaction_one_call_one_charge(
    backend: str, tmp_path: Path
) -> None:
    async with (
        database(backend, tmp_path) as url,
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY, latency=0.05) as semu,
    ):
        guild = demu.add_guild(name="Deploy Server")
        channel = int(demu.add_channel(guild.id, name="general")["id"])
        members = [int(demu.add_member(guild.id, name=f"m{i}")["user"]["id"]) for i in range(4)]
        async with bot_processes(demu, semu, url, 2, workdir=tmp_path) as bots:
            assert len(demu.connections) == 2

            async def run(user_id: int, prompt: str) -> InteractionRecord:
                rec = await demu.invoke_slash(
                    "kontext", kontext_options(prompt),
                    user_id=user_id, guild_id=guild.id, channel_id=channel, to="all",
                )
                await wait_for(
                    lambda: result_followups(rec) and rec.rejected, 30, demu, *bots
                )
                # the charge is committed just after the post: wait for it before the next one
                await wait_job(url, rec.id, lambda job: job.state == "posted")
                return rec

            # a handful of interactions: four members at once, then one member three times
            recs = list(await asyncio.gather(*(run(u, f"job of {u}") for u in members)))
            for n in range(3):
                recs.append(await run(members[0], f"again {n}"))
            await assert_one_of_each(recs, demu, semu, bots)

        # both processes are stopped: the database tells the rest
        store = await Store.open(url, make_settings())
        try:
            assert await store.audit.check_invariants() == []
            posted = await store.jobs.in_state("posted", guild_id=guild.id)
            assert sorted(j.id for j in posted) == sorted(r.id for r in recs)
            assert await store.jobs.count_active() == 0
            balances = {u: (await store.credits.member_status(guild.id, u)).balance for u in members}
            assert balances == {members[0]: 6, members[1]: 9, members[2]: 9, members[3]: 9}
            for rec in recs:
                kinds = [
                    e.kind
                    for e in await store.credits.recent(guild.id, rec.user_id, limit=50)
                    if e.job_id == rec.id
                ]
                assert sorted(kinds) == ["commit", "reserve"], (rec.id, kinds)
        finally:
            await store.close()


async def assert_one_of_each(
    recs: list[InteractionRecord],
    demu: DiscordEmulator,
    semu: SegmindEmulator,
    bots: list[BotProcess],
) -> None:
    """Each interaction: delivered to both, acknowledged once, one call, one posted result."""
    why = logs(*bots)
    assert len(semu.calls) == len(recs), why
    assert semu.charged_count == len(recs), why
    prompts = sorted(c.payload["prompt"] for c in semu.calls)
    assert prompts == sorted(r.data["options"][2]["value"] for r in recs), why
    for rec in recs:
        assert len(rec.delivered_to) == 2
        assert len(rec.responses) == 1 and rec.deferred and rec.ephemeral
        assert [r["code"] for r in rec.rejected] == [ALREADY_ACKNOWLEDGED], (rec.rejected, why)
        assert len(result_followups(rec)) == 1, why
    public = [m for m in demu.all_messages() if m.get("attachments") and not m["flags"] & 64]
    assert len(public) == len(recs), why


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_burst_split_across_two_processes_spends_one_credit_once(
    backend: str, tmp_path: Path
) -> None:
    """40 /kontext at once from a member with 1 credit, half to each process: one accepted."""
    async with (
        database(backend, tmp_path) as url,
        DiscordEmulator(token=DISCORD_TOKEN) as demu,
        SegmindEmulator(api_key=SEGMIND_KEY) as semu,
    ):
        guild = demu.add_guild(name="Deploy Server")
        channel = int(demu.add_channel(guild.id, name="general")["id"])
        member = int(demu.add_member(guild.id, name="member")["user"]["id"])
        env = {"STARTING_CREDITS": "1", "JOBS_PER_MEMBER": "10"}
        async with bot_processes(demu, semu, url, 2, workdir=tmp_path, **env) as bots:
            recs = list(
                await asyncio.gather(
                    *(
                        demu.invoke_slash(
                            "kontext", kontext_options(f"burst {i}"),
                            user_id=member, guild_id=guild.id, channel_id=channel, to=i % 2,
                        )
                        for i in range(40)
                    )
                )
            )

            def answered(rec: InteractionRecord) -> bool:
                text = (rec.original or {}).get("content") or ""
                return bool(result_followups(rec)) or "You have 0 credits" in text

            await wait_for(lambda: all(answered(r) for r in recs), 30, demu, *bots)
            why = logs(*bots)
            winners = [r for r in recs if result_followups(r)]
            assert len(winners) == 1, why
            assert len(semu.calls) == 1 and semu.charged_count == 1, why
            assert all(not r.rejected for r in recs)  # each went to one process only
        store = await Store.open(url, make_settings())
        try:
            assert await store.audit.check_invariants() == []
            assert (await store.credits.member_status(guild.id, member)).balance == 0
            kinds = sorted(e.kind for e in await store.credits.recent(guild.id, member, limit=100))
            assert kinds == ["commit", "reserve", "start"]
        finally:
            await store.close()

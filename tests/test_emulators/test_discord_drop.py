"""``Faults.drop_next``: the Discord emulator carries a request out, then drops its connection
without an answer (the client cannot tell whether the message exists)."""

from __future__ import annotations

import aiohttp
import pytest

from emulators.discord import DiscordEmulator

TOKEN = "drop-token"


async def test_a_dropped_post_creates_the_message_and_answers_nothing() -> None:
    async with DiscordEmulator(token=TOKEN) as emu:
        guild = emu.add_guild(name="Drop Server")
        channel = int(emu.add_channel(guild.id, name="general")["id"])
        rule = emu.faults.drop_next("POST", rf"^/channels/{channel}/messages$")
        url = f"{emu.api_base}/channels/{channel}/messages"
        headers = {"Authorization": f"Bot {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.post(url, json={"content": "one"}, headers=headers) as resp:
                    await resp.read()
            async with session.post(url, json={"content": "two"}, headers=headers) as resp:
                assert resp.status == 200
        assert [m["content"] for m in emu.public_messages(channel)] == ["one", "two"]
        assert rule.hits == 1
        assert [r.status for r in emu.find_requests("POST", rf"/channels/{channel}/messages$")] == [
            0, 200,
        ]

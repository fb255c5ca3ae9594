"""``bot.shard_options`` and ``bot.bot_class``: how ``SHARD_COUNT`` / ``SHARD_IDS`` become
discord.py's client and its shard options (the processes themselves: tests/e2e/test_shards.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from discord.ext import commands

import bot
from kontext.services import open_services
from kontext.settings import settings_from_env

CASES = [
    # (environment, shard options, class)
    ({}, {}, bot.KontextBot),
    ({"SHARD_COUNT": "1"}, {"shard_count": 1}, bot.KontextBot),
    ({"SHARD_COUNT": "3"}, {"shard_count": 3}, bot.ShardedKontextBot),
    ({"SHARD_COUNT": "4", "SHARD_IDS": "2"}, {"shard_id": 2, "shard_count": 4}, bot.KontextBot),
    ({"SHARD_COUNT": "1", "SHARD_IDS": "0"}, {"shard_id": 0, "shard_count": 1}, bot.KontextBot),
    (
        {"SHARD_COUNT": "4", "SHARD_IDS": "3,1"},
        {"shard_ids": [1, 3], "shard_count": 4},
        bot.ShardedKontextBot,
    ),
    (
        {"SHARD_COUNT": "2", "SHARD_IDS": "0,1"},
        {"shard_ids": [0, 1], "shard_count": 2},
        bot.ShardedKontextBot,
    ),
]
IDS = ["nothing", "count-1", "count-only", "one-id", "one-id-of-one", "several-ids", "all-ids"]


def settings(env: dict[str, str], tmp_path: Path | None = None) -> Any:
    if tmp_path is not None:
        env = {**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'kontext.db'}"}
    return settings_from_env({"DISCORD_TOKEN": "test-token", **env})


@pytest.mark.parametrize(("env", "options", "cls"), CASES, ids=IDS)
def test_shard_options_and_bot_class(
    env: dict[str, str], options: dict[str, Any], cls: type[bot.KontextBot]
) -> None:
    s = settings(env)
    assert bot.shard_options(s) == options
    assert bot.bot_class(s) is cls


@pytest.mark.parametrize(("env", "options", "cls"), CASES, ids=IDS)
async def test_the_client_gets_the_shard_options(
    env: dict[str, str], options: dict[str, Any], cls: type[bot.KontextBot], tmp_path: Path
) -> None:
    """The options reach discord.py through the class's constructor (and its MRO)."""
    s = settings(env, tmp_path)
    async with open_services(s) as services:
        client = bot.bot_class(s)(services)
        async with client:  # set up as ``run_bot`` does (no login, no connection), closed after
            assert isinstance(client, bot.KontextBot)
            sharded = isinstance(client, commands.AutoShardedBot)
            assert sharded == (cls is bot.ShardedKontextBot)
            assert client.shard_count == options.get("shard_count")
            if sharded:
                assert client.shard_ids == options.get("shard_ids")
            else:
                assert client.shard_id == options.get("shard_id")

"""``python bot.py`` as an owner runs it: bad settings are one line and exit code 2."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from tests.e2e.proc import BASE_ENV, clean_env, run_cli, world


async def test_bad_settings_and_arguments_are_one_line_exit_2() -> None:
    no_token = {k: v for k, v in BASE_ENV.items() if k != "DISCORD_TOKEN"}
    runs = await asyncio.gather(
        run_cli(env=clean_env(**no_token)),
        run_cli(env=clean_env(**{**BASE_ENV, "PORT": "eighty"})),
        run_cli(env=clean_env(**{**BASE_ENV, "PORT": "70000"})),
        run_cli("bogus", env=clean_env(**BASE_ENV)),
        run_cli("--help", env=clean_env(**BASE_ENV)),
    )
    (c1, o1, e1), (c2, o2, e2), (c3, o3, e3), (c4, o4, e4), (c5, o5, e5) = runs
    for code, out, err, name in ((c1, o1, e1, "DISCORD_TOKEN"), (c2, o2, e2, "PORT"), (c3, o3, e3, "PORT")):
        assert code == 2, (code, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert name in lines[0] and "Traceback" not in err
    assert "whole number" in e2
    assert c4 == 2 and "usage: python bot.py [sync]" in e4 and "Traceback" not in e4
    assert c5 == 0 and "usage" in o5


async def test_sync_registers_the_commands_and_exits_0(tmp_path: Path) -> None:
    corrupt = tmp_path / "kontext.db"
    corrupt.write_bytes(b"not a database at all\n" * 100)
    async with world() as w:
        (code, _, err), (c2, _, e2), (c3, _, e3) = await asyncio.gather(
            run_cli("sync", env=clean_env(**w.env), timeout=30),
            run_cli(env=clean_env(**{**w.env, "DATABASE_URL": f"sqlite:///{corrupt}"})),
            run_cli(env=clean_env(**{**w.env, "DISCORD_API_BASE_URL": "http://127.0.0.1:9/api/v10"})),
        )
        # a database that cannot be opened: one line naming DATABASE_URL among the log lines
        assert c2 == 2 and "Traceback" not in e2, e2[-2000:]
        assert len([line for line in e2.splitlines() if "DATABASE_URL" in line]) == 1, e2[-2000:]
        # Discord unreachable: a clear line, no traceback
        assert c3 == 1 and "Traceback" not in e3 and "could not reach Discord" in e3, e3[-2000:]
        assert code == 0, err[-3000:]
        names = {c["name"] for c in w.discord.synced_commands[None]}
        assert {"kontext", "credits", "kontext-admin"} <= names
        assert "synced" in err
        assert not w.discord.connections  # synced over REST, never stayed on the gateway


async def test_leaving_dev_guild_mode_removes_the_server_copies() -> None:
    """DEV_GUILD_ID syncs to one server; the next global sync removes that server's copies, so
    the server does not list every command twice."""
    async with world() as w:
        dev = {**w.env, "DEV_GUILD_ID": str(w.guild_id)}
        code, _, err = await run_cli("sync", env=clean_env(**dev), timeout=30)
        assert code == 0, err[-3000:]
        assert {c["name"] for c in w.discord.synced_commands.get(w.guild_id, [])} >= {"kontext"}
        assert "lists each command twice" in err  # the owner is told what dev mode leaves behind
        code, _, err = await run_cli("sync", env=clean_env(**w.env), timeout=30)
        assert code == 0, err[-3000:]
        assert w.discord.synced_commands.get(w.guild_id, []) == []
        assert {c["name"] for c in w.discord.synced_commands[None]} >= {"kontext", "credits"}


async def test_upgrade_brings_the_database_up_to_date_without_discord(tmp_path: Path) -> None:
    """``python bot.py upgrade`` migrates the database and exits (no Discord needed: the
    token here would be refused); a database that cannot be opened is one line, exit code 2."""
    fresh = tmp_path / "fresh.db"
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database at all\n" * 100)
    offline = {**BASE_ENV, "DISCORD_API_BASE_URL": "http://127.0.0.1:9/api/v10"}
    (code, out, err), (c2, o2, e2) = await asyncio.gather(
        run_cli("upgrade", env=clean_env(**{**offline, "DATABASE_URL": f"sqlite:///{fresh}"})),
        run_cli("upgrade", env=clean_env(**{**offline, "DATABASE_URL": f"sqlite:///{corrupt}"})),
    )
    assert code == 0 and "up to date" in out, err[-2000:]
    with sqlite3.connect(fresh) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"ledger", "jobs"} <= tables
    assert c2 == 2 and o2 == "" and "Traceback" not in e2, e2[-2000:]
    assert len([line for line in e2.splitlines() if "DATABASE_URL" in line]) == 1, e2[-2000:]
    assert corrupt.read_bytes() == b"not a database at all\n" * 100  # left untouched

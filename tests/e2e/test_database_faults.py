"""Database faults: a corrupt or unreachable database at start, and a Postgres that goes away.

* At start, ``python bot.py`` (a real process, against the Discord emulator) with a database it
  cannot use must stop with one clear line naming ``DATABASE_URL``, exit code 2 (as for any bad
  setting), no traceback — and never touch the file it could not read.
* While running, Postgres connections are killed (``pg_terminate_backend``) or the database
  refuses connections for a while: jobs either succeed (``pool_pre_ping`` replaces dead
  connections) or are refused / refunded cleanly; no credit is lost, and once the database is
  back the next job posts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from emulators.discord import DiscordEmulator
from tests.dbutil import _dsn, ensure_postgres, postgres_base_url, temp_postgres_url
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY, Harness, harness
from tests.e2e.test_faults import START, assert_plain, seen_by, serves_next

ROOT = Path(__file__).resolve().parents[2]


# --- at start -----------------------------------------------------------------------------------


async def _run_bot_process(database_url: str, cwd: Path, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``python bot.py`` against a Discord emulator; return (exit code, stdout+stderr)."""
    async with DiscordEmulator(token=DISCORD_TOKEN) as demu:
        demu.add_guild(name="Showcase Server")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(cwd),
            "DISCORD_TOKEN": DISCORD_TOKEN,
            "SEGMIND_API_KEY": SEGMIND_KEY,
            "DATABASE_URL": database_url,
            "DISCORD_API_BASE_URL": demu.api_base,
            "DISCORD_GATEWAY_URL": demu.gateway_url,
            "LOG_LEVEL": "INFO",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bot.py"), cwd=str(cwd), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
            pytest.fail(f"bot.py kept running with an unusable database:\n{out.decode()[-3000:]}")
        return proc.returncode or 0, out.decode(errors="replace")


def _garbage_sqlite(tmp_path: Path) -> tuple[str, Path, bytes]:
    path = tmp_path / "kontext.db"
    data = b"this is not a database, just a file that lost its header\n" * 200
    path.write_bytes(data)
    return f"sqlite:///{path}", path, data


async def test_corrupt_sqlite_file_is_not_touched_and_start_fails(tmp_path: Path) -> None:
    url, path, data = _garbage_sqlite(tmp_path)
    code, output = await _run_bot_process(url, tmp_path)
    assert code != 0, output
    assert _untouched(path, data)  # never "repaired" or overwritten
    for secret in (DISCORD_TOKEN, SEGMIND_KEY):
        assert secret not in output


def _untouched(path: Path, data: bytes) -> bool:
    wal = Path(f"{path}-wal")
    return path.read_bytes() == data and (not wal.exists() or wal.stat().st_size == 0)


def _unreachable_postgres(tmp_path: Path) -> tuple[str, None, None]:
    return "postgresql://postgres@127.0.0.1:1/kontext", None, None


@pytest.mark.parametrize("make_db", [_garbage_sqlite, _unreachable_postgres],
                         ids=["corrupt-sqlite", "postgres-unreachable"])
async def test_unusable_database_at_start_is_one_clear_line_exit_2(tmp_path: Path, make_db) -> None:
    url, _, _ = make_db(tmp_path)
    code, output = await _run_bot_process(url, tmp_path)
    assert "Traceback" not in output, output[-2000:]
    problem = [line for line in output.splitlines() if "DATABASE_URL" in line]
    assert len(problem) == 1, output[-2000:]
    assert code == 2, (code, output[-2000:])


# --- Postgres goes away and comes back ------------------------------------------------------------


@contextlib.asynccontextmanager
async def postgres_harness(**env: str) -> AsyncIterator[tuple[Harness, str]]:
    await ensure_postgres()
    async with temp_postgres_url() as url, harness(database_url=url, **env) as h:
        yield h, make_url(url).database or ""


async def _admin(sql: str, *args: object) -> object:
    conn = await asyncpg.connect(_dsn(postgres_base_url()), timeout=10)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def kill_connections(dbname: str) -> int:
    """Terminate every server process connected to ``dbname``; return how many."""
    return int(
        await _admin(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            dbname,
        )
    )


async def set_allow_connections(dbname: str, allow: bool) -> None:
    ident = '"' + dbname.replace('"', '""') + '"'
    await _admin(f"ALTER DATABASE {ident} WITH ALLOW_CONNECTIONS {'true' if allow else 'false'}")


async def test_postgres_connections_killed_between_jobs() -> None:
    async with postgres_harness() as (h, db):
        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "posted"
        assert await kill_connections(db) >= 1  # the bot's pooled connections
        await serves_next(h, balance_after=START - 2)  # pre-ping replaced the dead ones


async def test_postgres_connections_killed_during_a_job() -> None:
    async with postgres_harness() as (h, db):
        h.segmind.latency = 0.3
        rec = await h.kontext(wait=False)
        await h.segmind.wait_calls(1)
        assert await kill_connections(db) >= 1
        await h.wait_settled(rec)
        assert h.outcomes[rec.id].status == "posted", seen_by(h, rec)
        assert await h.bot.store.audit.check_invariants() == []
        assert await h.balance() == START - 1
        h.segmind.latency = 0.0
        await serves_next(h, balance_after=START - 2)


async def test_postgres_down_then_back_refuses_cleanly_then_serves() -> None:
    async with postgres_harness() as (h, db):
        await serves_next(h, balance_after=START - 1)
        await set_allow_connections(db, False)
        try:
            await kill_connections(db)
            rec = await h.kontext(prompt="while the database is down", wait=False)
            # the reservation fails: the member's private status says so plainly, "not charged"
            outcome = await h.wait_outcome(rec.id)
            assert outcome.status == "rejected" and outcome.cause == "internal"
            assert "not charged" in h.last_status(rec)
            assert_plain(seen_by(h, rec))
            assert len(h.result_messages()) == 1  # nothing new was posted
            assert len(h.segmind.calls) == 1  # no API call without a reservation
        finally:
            await set_allow_connections(db, True)
        assert await h.bot.store.audit.check_invariants() == []
        assert await h.balance() == START - 1  # nothing was charged while it was down
        await serves_next(h, balance_after=START - 2)


async def _wait_member(h: Harness, *, balance: int, inflight: int, timeout: float = 5.0) -> None:
    """Wait until the member's balance and jobs in flight are as given (AssertionError if not)."""
    status = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        status = await h.bot.store.credits.member_status(h.guild_id, h.member_id)
        if status.balance == balance and status.inflight == inflight:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"member still at {status} after the database came back")


async def test_postgres_down_after_the_api_answered_refund_is_retried() -> None:
    async with postgres_harness() as (h, db):
        h.segmind.latency = 0.3
        # the job cannot be marked ``posting`` (the database is down when the API answers), so
        # nothing is uploaded: it must be refunded once the database is back
        rec = await h.kontext(wait=False)
        await h.segmind.wait_calls(1)
        await set_allow_connections(db, False)
        try:
            await kill_connections(db)
            outcome = await h.wait_outcome(rec.id)
            assert outcome.status == "refunded"
            assert_plain(seen_by(h, rec))
        finally:
            await set_allow_connections(db, True)
        await _wait_member(h, balance=START, inflight=0)  # the refund went through after all
        assert await h.bot.store.audit.check_invariants() == []
        h.segmind.latency = 0.0
        await serves_next(h, balance_after=START - 1)


async def test_postgres_down_after_posting_commit_is_retried() -> None:
    async with postgres_harness() as (h, db):
        h.discord.delay("POST", r"^/webhooks/\d+/[^/]+$", 0.5, times=1)  # the result upload
        rec = await h.kontext(wait=False)
        await rec.wait_for(lambda r: any("Posting" in (e.get("content") or "") for e in r.edits), 5)
        await set_allow_connections(db, False)
        try:
            await kill_connections(db)
            outcome = await h.wait_outcome(rec.id)
            assert outcome.status == "posted"
        finally:
            await set_allow_connections(db, True)
        await _wait_member(h, balance=START - 1, inflight=0)  # the charge was committed after all
        job = await h.bot.store.jobs.get(rec.id)
        assert job is not None and job.state == "posted"
        assert await h.bot.store.audit.check_invariants() == []
        await serves_next(h, balance_after=START - 2)

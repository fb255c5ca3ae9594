"""The store's fences under races and changed rules (issue 15, findings L1 and L3).

* L1 (Postgres): a takeover must not overwrite a renewal that landed between its look at the
  expired leases and its update: of "the holder renewed" and "another process took over", at
  most one may succeed. Two transactions are made to race on real connections: a third holds
  the job's row lock while the renewal and the takeover queue up behind it.
* L3: a job queued before its server was blocked (or left ``ALLOWED_GUILD_IDS``) is never
  claimed: a claim re-checks both.

Only the store's public methods and the jobs rows are used.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from kontext.store import ReserveRequest, Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits
from tests.dbutil import job_options, make_settings, open_test_store

#: a job that no process holds and that is not finished
UNCLAIMED = ("accepted", "refunded", "failed")


def limits() -> AccountLimits:
    return AccountLimits(OWNER_ACCOUNT, 5, 100)


async def queue_job(store: Store, job_id: int, guild_id: int, user_id: int) -> None:
    """A member's job waiting in the queue (reserved, not claimed)."""
    await store.ledger.reserve(
        ReserveRequest(
            job_id=job_id, guild_id=guild_id, channel_id=5, user_id=user_id,
            options=job_options(),
        )
    )


async def state_of(store: Store, job_id: int) -> str:
    job = await store.jobs.get(job_id)
    assert job is not None
    return str(job.state)


# --- L1: a takeover re-checks the expiry it selected by ------------------------------------------


async def _blocked_behind(engine: Any, blocker_pid: int) -> int:
    """How many backends wait, directly or in a queue, on ``blocker_pid``'s locks (a new
    transaction each time: ``pg_stat_activity`` is a snapshot per transaction)."""
    async with engine.connect() as conn:
        found = await conn.execute(WAITING_BEHIND, {"b": blocker_pid})
        return int(found.scalar_one())


WAITING_BEHIND = text(
    """
    WITH RECURSIVE w(pid) AS (
        SELECT pid FROM pg_stat_activity WHERE CAST(:b AS integer) = ANY(pg_blocking_pids(pid))
        UNION
        SELECT a.pid FROM pg_stat_activity a, w WHERE w.pid = ANY(pg_blocking_pids(a.pid))
    )
    SELECT count(*) FROM w
    """
)


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.01)


async def test_l1_a_takeover_does_not_overwrite_a_renewal_that_raced_it(tmp_path: Path) -> None:
    """The holder's lease has just expired. Its renewal and another process's takeover run at
    once: the takeover reads the job as expired, the renewal commits, then the takeover's
    update runs. Before the fix the update matched on the epoch alone (renew keeps it) and
    both won: the holder went on with a lease the database had given to someone else."""
    async with open_test_store(
        "postgres", make_settings(cooldown_seconds=0), tmp_dir=tmp_path
    ) as store:
        engine = store.db.engine
        await queue_job(store, 1, guild_id=1, user_id=100)
        claim = await store.queue.claim_next("holder", limits(), lease_s=0.05)
        assert claim.job is not None and claim.lease is not None
        held = claim.lease

        async def expired() -> bool:
            async with engine.connect() as c:
                return bool(
                    (
                        await c.execute(
                            text(
                                "SELECT lease_expires_at < EXTRACT(EPOCH FROM clock_timestamp()) "
                                "FROM jobs WHERE id = 1"
                            )
                        )
                    ).scalar_one()
                )

        await _until(expired, 5, "the lease to expire by the database's clock")

        watcher = engine
        async with engine.connect() as blocker:
            await blocker.begin()
            blocker_pid = int((await blocker.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            # hold the job's row: both racers' updates queue up behind this transaction
            await blocker.execute(text("SELECT id FROM jobs WHERE id = 1 FOR UPDATE"))
            renewal = asyncio.create_task(store.leases.renew("holder", 30))
            await _until(
                lambda: _eq(_blocked_behind(watcher, blocker_pid), 1), 10, "the renewal waiting"
            )
            takeover = asyncio.create_task(store.leases.take_over_expired("other", 30))
            try:
                # the takeover read the job as expired and now waits (behind the renewal), or,
                # taking row locks as it reads (SKIP LOCKED), found nothing it could take
                await _until(
                    lambda: _takeover_waiting_or_done(watcher, blocker_pid, takeover),
                    10, "the takeover waiting behind the renewal",
                )
            finally:
                await blocker.rollback()  # let both go: the renewal commits first
            renewed, taken = await asyncio.wait_for(asyncio.gather(renewal, takeover), 10)

        job = await store.jobs.get(1)
        assert job is not None
        renewal_won = renewed.get(1) == held.epoch
        takeover_won = [j.id for j, _ in taken] == [1]
        assert not (renewal_won and takeover_won), (
            f"both won: the holder's renewal kept epoch {held.epoch} and the takeover took the "
            f"job as epoch {job.lease_epoch} for {job.lease_owner!r} — two processes now run it"
        )
        assert renewal_won or takeover_won, (renewed, taken, job)


async def _eq(value: Any, expected: int) -> bool:
    return bool((await value) == expected)


async def _takeover_waiting_or_done(watcher: Any, blocker_pid: int, takeover: Any) -> bool:
    return takeover.done() or await _blocked_behind(watcher, blocker_pid) >= 2


# --- L3: a claim re-checks blocks and ALLOWED_GUILD_IDS ------------------------------------------


async def test_l3_a_job_queued_before_its_server_was_blocked_is_never_claimed(
    store_factory: Any,
) -> None:
    store = await store_factory(cooldown_seconds=0)
    await queue_job(store, 1, guild_id=1, user_id=100)  # queued while server 1 was allowed
    await queue_job(store, 2, guild_id=2, user_id=200)
    await store.owner.set_blocked(1, True)
    claimed = []
    for _ in range(3):
        claim = await store.queue.claim_next("w", limits(), lease_s=30)
        if claim.job is not None:
            claimed.append((claim.job.id, claim.job.guild_id))
    assert (2, 2) in claimed, claimed  # the claim works for a server still allowed
    assert all(guild != 1 for _, guild in claimed), (
        f"claimed {claimed}: server 1's job would run on the owner's key after the owner "
        f"blocked server 1"
    )
    assert await state_of(store, 1) in UNCLAIMED


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_l3_a_job_of_a_server_no_longer_allowed_is_never_claimed(
    fresh_db: tuple[str, dict[str, Any]],
) -> None:
    """The bot restarts with ``ALLOWED_GUILD_IDS`` narrowed; a job of a server left out was
    queued before: no process claims it."""
    url, kwargs = fresh_db
    before = await Store.open(url, make_settings(cooldown_seconds=0), engine_kwargs=kwargs)
    try:
        await queue_job(before, 1, guild_id=1, user_id=100)
        await queue_job(before, 2, guild_id=2, user_id=200)
    finally:
        await before.close()
    after = await Store.open(
        url,
        make_settings(cooldown_seconds=0, allowed_guild_ids=frozenset({2})),
        engine_kwargs=kwargs,
    )
    try:
        claimed = []
        for _ in range(3):
            claim = await after.queue.claim_next("w", limits(), lease_s=30)
            if claim.job is not None:
                claimed.append((claim.job.id, claim.job.guild_id))
        assert (2, 2) in claimed, claimed
        assert all(guild != 1 for _, guild in claimed), (
            f"claimed {claimed}: server 1 is not in ALLOWED_GUILD_IDS any more"
        )
        assert await state_of(after, 1) in UNCLAIMED
    finally:
        await after.close()

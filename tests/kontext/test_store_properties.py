"""Concurrency properties of the credits ledger, on SQLite and Postgres.

* many concurrent reservations by one member with one credit: exactly one wins;
* the same interaction delivered many times at once: one job, one charge;
* random interleavings (hypothesis) of grant, revoke, reserve, commit, refund, daily top-ups
  across UTC days and duplicate deliveries, run as concurrent asyncio batches;
* two OS processes reserving against one database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from kontext.errors import (
    InsufficientCredits,
    JobAlreadyExists,
    KontextError,
    OnCooldown,
    TooManyJobs,
)
from kontext.schema import budget_days, jobs, ledger
from kontext.store import Reservation, ReserveRequest, Store
from tests.dbutil import (
    BACKENDS,
    FakeClock,
    ensure_postgres,
    job_options,
    make_settings,
    open_test_store,
    temp_postgres_url,
    temp_sqlite_url,
)

ROOT = Path(__file__).resolve().parents[2]
G, U, CH = 1001, 2001, 3001


def req(job_id: int, guild_id: int = G, user_id: int = U, **kw: Any) -> ReserveRequest:
    return ReserveRequest(
        job_id=job_id,
        guild_id=guild_id,
        channel_id=CH,
        user_id=user_id,
        options=job_options(seed=job_id),
        **kw,
    )


async def _attempt(store: Store, request: ReserveRequest) -> Reservation | KontextError:
    try:
        return await store.ledger.reserve(request)
    except KontextError as err:
        return err


# --- (a) one credit, 100 concurrent reservations -------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected_errors"),
    [
        ({}, (OnCooldown, TooManyJobs, InsufficientCredits)),
        ({"cooldown_seconds": 0, "jobs_per_member": 10}, (InsufficientCredits,)),
    ],
    ids=["defaults", "balance-only"],
)
async def test_one_credit_many_concurrent_reserves(
    store_factory: Any, overrides: dict[str, Any], expected_errors: tuple[type, ...]
) -> None:
    store = await store_factory(starting_credits=1, **overrides)
    results = await asyncio.gather(*(_attempt(store, req(i)) for i in range(1, 101)))
    wins = [r for r in results if isinstance(r, Reservation)]
    errors = [r for r in results if not isinstance(r, Reservation)]
    assert len(wins) == 1 and len(errors) == 99
    assert all(isinstance(e, expected_errors) for e in errors), Counter(type(e) for e in errors)
    status = await store.credits.member_status(G, U)
    assert (status.balance, status.inflight) == (0, 1)
    assert await store.jobs.count_active() == 1
    assert await store.audit.check_invariants() == []


# --- (b) one interaction delivered 20 times at once -------------------------------------------------


async def test_same_interaction_concurrently(store: Store) -> None:
    results = await asyncio.gather(*(_attempt(store, req(77)) for _ in range(20)))
    wins = [r for r in results if isinstance(r, Reservation)]
    assert len(wins) == 1
    assert all(isinstance(r, JobAlreadyExists) for r in results if r not in wins)
    assert (await store.credits.member_status(G, U)).balance == 9
    async with store.db.read() as conn:
        reserve_rows = await conn.scalar(
            select(func.count()).where(ledger.c.kind == "reserve", ledger.c.job_id == 77)
        )
        job_rows = await conn.scalar(select(func.count()).select_from(jobs))
    assert (reserve_rows, job_rows) == (1, 1)
    assert await store.audit.check_invariants() == []


# --- (c) random interleavings ---------------------------------------------------------------------

MEMBERS = ((G, U), (G, U + 1), (G + 1, U))
PROPERTY_SETTINGS = {
    "starting_credits": 2,
    "credits_per_image": 1,
    "daily_free_credits": 2,
    "cooldown_seconds": 10,
    "jobs_per_member": 2,
    "daily_budget_usd": 0.3,  # three images a day: it binds
    "cost_per_image_usd": 0.1,
}
member_idx = st.integers(0, len(MEMBERS) - 1)
#: a job by recency: 0 = the id most recently delivered, 1 = the one before, …
recent = st.integers(0, 5)
copies = st.integers(1, 3)  # >1: the same delivery arrives several times at once
operation = st.one_of(
    st.tuples(st.just("grant"), member_idx, st.integers(1, 3)),
    st.tuples(st.just("revoke"), member_idx, st.integers(1, 4)),
    # a new interaction (None) or a late duplicate of a recent one
    st.tuples(
        st.just("reserve"),
        member_idx,
        st.sampled_from([None, None, None, 0, 1, 3]),
        st.booleans(),
        copies,
    ),
    st.tuples(st.just("reserve"), member_idx, st.none(), st.booleans(), st.just(1)),
    st.tuples(st.just("commit"), recent, copies),
    st.tuples(st.just("refund"), recent, st.booleans(), st.booleans(), copies),
    # a commit and a refund of one job racing each other
    st.tuples(st.just("finish"), recent, st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([3.0, 11.0, 3600.0, 43_200.0, 86_400.0])),
)
batches = st.lists(st.lists(operation, min_size=2, max_size=12), min_size=2, max_size=8)


class Outcomes:
    """What the store's answers claimed, to compare with what it wrote."""

    def __init__(self) -> None:
        self.reserved: Counter[int] = Counter()
        self.committed: Counter[int] = Counter()
        self.refunded: Counter[int] = Counter()
        self.granted = 0
        self.revoked = 0
        self.delivered: list[int] = []  # job ids in the order they were first delivered

    def job(self, back: int | None) -> int:
        """A recent job id (``back`` steps back), or a new one when ``back`` is None."""
        if back is None or not self.delivered:
            self.delivered.append(len(self.delivered) + 1)
            return self.delivered[-1]
        return self.delivered[-1 - back % len(self.delivered)]


async def _commit(store: Store, job_id: int, out: Outcomes) -> None:
    if await store.ledger.commit(job_id, result_message_id=job_id, result_channel_id=CH):
        out.committed[job_id] += 1


async def _refund(
    store: Store, job_id: int, out: Outcomes, api_charged: bool = False, clear: bool = True
) -> None:
    if await store.ledger.refund(job_id, cause="api_error", api_charged=api_charged, clear_cooldown=clear):
        out.refunded[job_id] += 1


async def _run_op(store: Store, clock: FakeClock, op: tuple[Any, ...], out: Outcomes) -> None:
    kind = op[0]
    if kind == "grant":
        guild, user = MEMBERS[op[1]]
        await store.credits.grant(guild, user, op[2], actor_id=1)
        out.granted += op[2]
    elif kind == "revoke":
        guild, user = MEMBERS[op[1]]
        taken, balance = await store.credits.revoke(guild, user, op[2], actor_id=1)
        assert 0 <= taken <= op[2] and balance >= 0
        out.revoked += taken
    elif kind == "reserve":
        guild, user = MEMBERS[op[1]]
        job_id = out.job(op[2])
        request = req(job_id, guild, user, exempt_from_cooldown=op[3])
        for result in await asyncio.gather(*(_attempt(store, request) for _ in range(op[4]))):
            event(f"reserve: {type(result).__name__}")
            if isinstance(result, Reservation):
                assert result.balance_after >= 0
                out.reserved[job_id] += 1
    elif kind == "commit":
        job_id = out.job(op[1])
        await asyncio.gather(*(_commit(store, job_id, out) for _ in range(op[2])))
    elif kind == "refund":
        job_id = out.job(op[1])
        await asyncio.gather(*(_refund(store, job_id, out, op[2], op[3]) for _ in range(op[4])))
    elif kind == "finish":
        job_id = out.job(op[1])
        await asyncio.gather(_commit(store, job_id, out), _refund(store, job_id, out, op[2]))
    else:
        clock.advance(op[1])


async def _interleavings(backend: str, plan: list[list[tuple[Any, ...]]]) -> None:
    clock = FakeClock(start=1_740_873_600.0 - 7_200)  # 22:00 UTC: days turn over soon
    async with open_test_store(backend, make_settings(**PROPERTY_SETTINGS), clock=clock) as store:
        out = Outcomes()
        for batch in plan:
            await asyncio.gather(*(_run_op(store, clock, op, out) for op in batch))
        assert await store.audit.check_invariants() == []
        assert all(n == 1 for n in out.reserved.values())  # each job charged at most once
        assert all(n == 1 for n in out.committed.values())
        assert all(n == 1 for n in out.refunded.values())
        assert not set(out.committed) & set(out.refunded)
        async with store.db.read() as conn:
            rows = Counter(
                {
                    kind: int(total or 0)
                    for kind, total in await conn.execute(
                        select(ledger.c.kind, func.sum(ledger.c.delta)).group_by(ledger.c.kind)
                    )
                }
            )
            counts = Counter(
                {
                    kind: int(n)
                    for kind, n in await conn.execute(
                        select(ledger.c.kind, func.count()).group_by(ledger.c.kind)
                    )
                }
            )
            max_reserved = await conn.scalar(select(func.max(budget_days.c.reserved_micros)))
            balances = [b for (b,) in await conn.execute(select(func.min(ledger.c.balance_after)))]
        assert rows["grant"] == out.granted and -rows["revoke"] == out.revoked
        assert counts["reserve"] == sum(out.reserved.values())
        assert counts["commit"] == sum(out.committed.values())
        assert counts["refund"] == sum(out.refunded.values())
        assert (max_reserved or 0) <= 300_000  # the budget was never passed
        assert all(b is None or b >= 0 for b in balances)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_interleavings(backend: str) -> None:
    if backend == "postgres":
        asyncio.run(ensure_postgres())

    @settings(
        max_examples=25,
        deadline=None,
        # shrinking replays hundreds of examples (minutes on Postgres): opt in when debugging
        phases=[p for p in Phase if p is not Phase.shrink or os.environ.get("KONTEXT_SHRINK")],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(plan=batches)
    def run(plan: list[list[tuple[Any, ...]]]) -> None:
        asyncio.run(_interleavings(backend, plan))

    run()


# --- (d) two OS processes on one database ------------------------------------------------------------


async def _two_processes(url: str) -> None:
    overrides = {
        "starting_credits": 50,
        "cooldown_seconds": 0,
        "jobs_per_member": 1000,
        "daily_budget_usd": 1000.0,
        # the credits are what binds here: no queue bound, no per-server budget in the way
        "max_queue_size": 10_000,
        "guild_daily_budget_usd": 0.0,
    }
    start_at = time.time() + 3.0  # both open (and migrate) the fresh database, then go at once
    ranges = (range(1, 61), range(31, 91))  # ids 31..60 are delivered to both processes
    procs = []
    for i, ids in enumerate(ranges):
        config = {
            "settings": overrides,
            "guild_id": G,
            "user_id": U,
            "job_ids": list(ids),
            "start_at": start_at,
            "worker_id": f"proc-{i}",
        }
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.dbutil",
                "reserve-worker",
                url,
                json.dumps(config),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        )
    results = []
    for proc in procs:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=90)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    ok_a, ok_b = set(results[0]["ok"]), set(results[1]["ok"])
    assert not ok_a & ok_b  # no job made twice
    assert len(ok_a) + len(ok_b) == 50  # exactly the balance, never more
    for res, ids in zip(results, ranges, strict=True):
        assert len(res["ok"]) + sum(res["errors"].values()) == len(ids)
        assert set(res["errors"]) <= {"insufficient_credits", "duplicate"}
    async with await Store.open(url, make_settings(**overrides)) as store:
        status = await store.credits.member_status(G, U)
        assert (status.balance, status.inflight) == (0, 0)
        assert len(await store.jobs.in_state("posted")) == 50
        assert await store.audit.check_invariants() == []


async def test_two_processes_sqlite(tmp_path: Path) -> None:
    async with temp_sqlite_url(tmp_path) as url:
        await _two_processes(url)


async def test_two_processes_postgres() -> None:
    await ensure_postgres()
    async with temp_postgres_url() as url:
        await _two_processes(url)

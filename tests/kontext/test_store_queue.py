"""The shared queue in the database (kontext/store/queue.py, kontext/store/leases.py), on SQLite and Postgres.

Claims honour the account's global limits and member fairness; leases fence every change; a
lease that expired by the database's clock is taken over with a new epoch; a process that lost
its lease can change nothing of the job any more.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kontext.schema import jobs
from kontext.store import ReserveRequest, Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits, Lease
from tests.dbutil import job_options

G = 1


def req(job_id: int, user_id: int, **kw: Any) -> ReserveRequest:
    return ReserveRequest(
        job_id=job_id, guild_id=G, channel_id=5, user_id=user_id, options=job_options(),
        **kw,
    )


def limits(concurrent: int = 2, rpm: int = 100) -> AccountLimits:
    return AccountLimits(OWNER_ACCOUNT, concurrent, rpm)


async def open_store(store_factory: Any) -> Store:
    return await store_factory(cooldown_seconds=0, jobs_per_member=5, max_queue_size=10)


async def test_fair_order_a_members_second_job_waits_behind_everyone_s_first(
    store_factory: Any,
) -> None:
    store = await open_store(store_factory)
    for job_id, user in ((1, 100), (2, 100), (3, 100), (4, 200), (5, 300)):
        await store.ledger.reserve(req(job_id, user))
    view = await store.queue.view()
    assert view.waiting == [1, 4, 5, 2, 3]
    claimed = []
    for _ in range(5):
        claim = await store.queue.claim_next("w1", limits(concurrent=5), lease_s=30)
        assert claim.job is not None
        claimed.append(claim.job.id)
    assert claimed == [1, 4, 5, 2, 3]
    assert (await store.queue.claim_next("w1", limits(concurrent=5), lease_s=30)).empty


async def test_global_concurrency_and_rpm_hold_across_workers(store_factory: Any) -> None:
    store = await open_store(store_factory)
    for job_id in range(1, 6):
        await store.ledger.reserve(req(job_id, 100 + job_id))
    first = await store.queue.claim_next("a", limits(concurrent=2), lease_s=30)
    second = await store.queue.claim_next("b", limits(concurrent=2), lease_s=30)
    assert first.job and second.job
    full = await store.queue.claim_next("a", limits(concurrent=2), lease_s=30)
    assert full.job is None and not full.empty and full.wait_s == 0
    assert first.lease is not None
    assert not await store.leases.api_done(first.lease)  # never sent: nothing answered
    assert await store.leases.mark_sent(first.lease)
    assert await store.leases.api_done(first.lease)  # its API call ended: the slot is free
    job = await store.jobs.get(first.job.id)
    assert job is not None and job.state == "posting" and job.posting_at and job.api_done_at
    third = await store.queue.claim_next("b", limits(concurrent=2), lease_s=30)
    assert third.job is not None
    # three starts in the window: with rpm 3 the next one waits about a minute
    held = await store.queue.claim_next("a", limits(concurrent=5, rpm=3), lease_s=30)
    assert held.job is None and 55 < held.wait_s <= 60
    await store.queue.hold_account(OWNER_ACCOUNT, 30)  # a 429, for every process
    blocked = await store.queue.claim_next("a", limits(concurrent=5), lease_s=30)
    assert blocked.job is None and 25 < blocked.wait_s <= 30


async def test_a_queue_full_reservation_is_refused_and_nothing_is_charged(
    store_factory: Any,
) -> None:
    from kontext.errors import QueueFull

    store = await store_factory(cooldown_seconds=0, max_queue_size=2)
    await store.ledger.reserve(req(1, 101))
    await store.ledger.reserve(req(2, 102))
    try:
        await store.ledger.reserve(req(3, 103))
    except QueueFull:
        pass
    else:
        raise AssertionError("the third job should not fit")
    assert await store.jobs.get(3) is None
    assert await store.queue.count_waiting() == 2
    assert await store.audit.check_invariants() == []


async def test_fencing_a_lost_lease_changes_nothing(store_factory: Any) -> None:
    store = await open_store(store_factory)
    await store.ledger.reserve(req(1, 100))
    claim = await store.queue.claim_next("a", limits(), lease_s=0.2)
    assert claim.job is not None and claim.lease is not None
    old = claim.lease
    await asyncio.sleep(0.3)  # the lease expires by the database's clock
    taken = await store.leases.take_over_expired("b", lease_s=30)
    assert [(job.id, lease.owner) for job, lease in taken] == [(1, "b")]
    new = taken[0][1]
    assert new.epoch == old.epoch + 1
    # the old holder can neither renew, store a request id, commit, refund nor let go
    assert await store.leases.renew("a", 30) == {}
    assert not await store.jobs.set_api_request(1, "rid", lease=old)
    assert not await store.ledger.commit(1, result_message_id=9, result_channel_id=5, lease=old)
    assert not await store.ledger.refund(1, cause="x", lease=old)
    assert not await store.leases.let_go(old)
    assert not await store.leases.holds(old) and await store.leases.holds(new)
    assert not await store.leases.mark_sent(old) and not await store.leases.requeue(old)
    # the new holder can, step by step: claimed → sent → posting → posted
    assert await store.leases.renew("b", 30) == {1: new.epoch}
    assert not await store.ledger.commit(1, result_message_id=9, result_channel_id=5, lease=new)
    assert not await store.leases.mark_posting(new)  # not sent yet
    assert await store.leases.mark_sent(new) and not await store.leases.mark_sent(new)
    assert not await store.leases.requeue(new)  # sent: it may be billed, never queued again
    assert await store.leases.mark_posting(new)
    assert await store.ledger.commit(1, result_message_id=9, result_channel_id=5, lease=new)
    assert await store.audit.check_invariants() == []


async def test_a_live_lease_is_not_taken_over(store_factory: Any) -> None:
    store = await open_store(store_factory)
    await store.ledger.reserve(req(1, 100))
    claim = await store.queue.claim_next("a", limits(), lease_s=30)
    assert claim.job is not None
    assert await store.leases.take_over_expired("b", lease_s=30) == []
    assert claim.lease is not None and await store.leases.let_go(claim.lease)  # a clean handover
    taken = await store.leases.take_over_expired("b", lease_s=30)
    assert [lease.owner for _, lease in taken] == ["b"]


async def test_requeue_puts_an_unsent_job_back_and_frees_its_rpm_start(store_factory: Any) -> None:
    store = await open_store(store_factory)
    await store.ledger.reserve(req(1, 100))
    claim = await store.queue.claim_next("a", limits(rpm=1), lease_s=30)
    assert claim.lease is not None
    assert await store.leases.requeue(claim.lease)
    job = await store.jobs.get(1)
    assert job is not None and job.state == "accepted" and not job.api_charged
    again = await store.queue.claim_next("b", limits(rpm=1), lease_s=30)
    assert again.job is not None and again.lease is not None
    assert again.lease.epoch == claim.lease.epoch + 1


async def test_refund_after_a_claim_keeps_the_budget_unless_nothing_was_generated(
    store_factory: Any,
) -> None:
    store = await open_store(store_factory)
    for job_id in (1, 2):
        await store.ledger.reserve(req(job_id, 100 + job_id))
    a = await store.queue.claim_next("a", limits(), lease_s=30)
    b = await store.queue.claim_next("a", limits(), lease_s=30)
    assert a.lease and b.lease
    assert await store.leases.mark_sent(a.lease) and await store.leases.mark_sent(b.lease)
    # not known (a shutdown mid-call): the database's record stands: billed
    assert await store.ledger.refund(1, cause="shutdown", api_charged=None, lease=a.lease)
    # the answer proves nothing was generated (a 400): the budget share comes back
    assert await store.ledger.refund(2, cause="api_bad_request", api_charged=False, lease=b.lease)
    one, two = await store.jobs.get(1), await store.jobs.get(2)
    assert one is not None and one.api_charged and two is not None and not two.api_charged
    budget = await store.budgets.status()
    assert budget.reserved_usd == 0.10
    assert await store.audit.check_invariants() == []


async def test_a_claimed_job_never_sent_is_not_billed(store_factory: Any) -> None:
    """Billing begins at ``sent``: a takeover refund of a job only claimed gives the budget back."""
    store = await open_store(store_factory)
    await store.ledger.reserve(req(1, 101))
    claim = await store.queue.claim_next("a", limits(), lease_s=30)
    assert claim.lease is not None
    assert await store.ledger.refund(1, cause="shutdown", api_charged=None, lease=claim.lease)
    job = await store.jobs.get(1)
    assert job is not None and not job.api_charged and job.sent_at is None
    assert (await store.budgets.status()).reserved_usd == 0
    assert await store.audit.check_invariants() == []


async def test_waiting_refund_only_touches_a_job_still_waiting(store_factory: Any) -> None:
    store = await open_store(store_factory)
    await store.ledger.reserve(req(1, 100))
    claim = await store.queue.claim_next("a", limits(), lease_s=30)
    assert claim.job is not None
    assert not await store.ledger.refund(1, cause="queue_timeout", waiting_only=True)
    assert not await store.ledger.refund(1, cause="nobody's")  # claimed: not an unleased job
    async with store.db.write() as conn:  # it waited long ago
        await conn.execute(jobs.update().values(queued_at=jobs.c.queued_at - 3600))
    await store.ledger.reserve(req(2, 200))
    async with store.db.write() as conn:
        await conn.execute(
            jobs.update().where(jobs.c.id == 2).values(queued_at=jobs.c.queued_at - 3600)
        )
    expired = await store.queue.expired_waiting(1800)
    assert [j.id for j in expired] == [2]
    assert await store.ledger.refund(2, cause="queue_timeout", waiting_only=True)


async def test_invariants_see_a_lease_held_by_a_retired_worker(store_factory: Any) -> None:
    store = await open_store(store_factory)
    await store.audit.register_worker("a")
    await store.ledger.reserve(req(1, 100))
    claim = await store.queue.claim_next("a", limits(), lease_s=30)
    assert claim.job is not None
    assert await store.audit.check_invariants() == []
    await store.audit.retire_worker("a")
    problems = await store.audit.check_invariants()
    assert any("retired" in p for p in problems), problems
    assert isinstance(claim.lease, Lease)

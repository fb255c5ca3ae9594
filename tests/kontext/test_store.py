"""Unit tests of :class:`kontext.store.Store`, each on SQLite and Postgres.

Every scenario ends with ``check_invariants() == []``.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from kontext.errors import (
    BudgetExhausted,
    InsufficientCredits,
    JobAlreadyExists,
    OnCooldown,
    TooManyJobs,
)
from kontext.schema import ledger, settings_audit
from kontext.store import ReserveRequest, Store
from tests.dbutil import FakeClock, job_options, put_job_in_state

G, U, U2, CH = 1001, 2001, 2002, 3001
DAY = 86_400.0


def req(job_id: int, user_id: int = U, guild_id: int = G, **kw: Any) -> ReserveRequest:
    """A reserve request with sensible defaults."""
    return ReserveRequest(
        job_id=job_id,
        guild_id=guild_id,
        channel_id=CH,
        user_id=user_id,
        options=kw.pop("options", job_options("a cat", seed=42, aspect_ratio="1:1")),
        **kw,
    )


async def assert_ok(store: Store) -> None:
    assert await store.audit.check_invariants() == []


async def kinds(store: Store, user_id: int = U) -> list[str]:
    """The member's ledger kinds, oldest first."""
    return [e.kind for e in reversed(await store.credits.recent(G, user_id, limit=100))]


# --- reserve ------------------------------------------------------------------------------------


async def test_reserve_creates_job_and_charges(store: Store, clock: FakeClock) -> None:
    r = await store.ledger.reserve(
        req(11, locale="de", application_id=77, interaction_token="secret-token", worker_id="w1")
    )
    assert (r.job_id, r.cost, r.balance_after) == (11, 1, 9)
    assert r.cooldown_until == clock() + 60
    job = await store.jobs.get(11)
    assert job is not None
    assert job.state == "accepted" and job.params == job_options("a cat", seed=42, aspect_ratio="1:1").params()
    assert (job.cost_credits, job.cost_usd_micros, job.seed) == (1, 100_000, 42)
    assert (job.locale, job.application_id, job.worker_id) == ("de", 77, "w1")
    assert job.interaction_token == "secret-token" and "secret-token" not in repr(job)
    status = await store.credits.member_status(G, U)
    assert (status.balance, status.inflight, status.exists) == (9, 1, True)
    assert status.cooldown_remaining == pytest.approx(60)
    assert await kinds(store) == ["start", "reserve"]
    budget = await store.budgets.status()
    assert (budget.generations, budget.reserved_usd, budget.cap_usd) == (1, 0.1, 20.0)
    assert await store.jobs.count_active() == 1
    await assert_ok(store)


async def test_duplicate_job_changes_nothing(store: Store) -> None:
    await store.ledger.reserve(req(11))
    with pytest.raises(JobAlreadyExists) as err:
        await store.ledger.reserve(req(11, user_id=U2))
    assert err.value.job_id == 11
    assert (await store.credits.member_status(G, U2)).exists is False
    assert (await store.credits.member_status(G, U)).balance == 9
    assert (await store.budgets.status()).generations == 1
    await assert_ok(store)


async def test_insufficient_credits_rolls_back_job_and_member(store_factory: Any) -> None:
    store = await store_factory(starting_credits=0)
    with pytest.raises(InsufficientCredits) as err:
        await store.ledger.reserve(req(11))
    assert (err.value.balance, err.value.needed) == (0, 1)
    assert await store.jobs.get(11) is None
    assert (await store.credits.member_status(G, U)).exists is False
    await store.credits.grant(G, U, 1, actor_id=9)
    r = await store.ledger.reserve(req(11))  # the same interaction may retry
    assert r.balance_after == 0
    await assert_ok(store)


async def test_cooldown_then_expiry_and_exempt(store: Store, clock: FakeClock) -> None:
    await store.ledger.reserve(req(1))
    await store.ledger.commit(1, result_message_id=5, result_channel_id=CH)
    clock.advance(20)
    with pytest.raises(OnCooldown) as err:
        await store.ledger.reserve(req(2))
    assert err.value.retry_after == pytest.approx(40)
    assert await store.jobs.get(2) is None
    r = await store.ledger.reserve(req(2, exempt_from_cooldown=True))
    assert r.cooldown_until is None
    status = await store.credits.member_status(G, U)
    assert status.cooldown_remaining == pytest.approx(40)  # exempt leaves it unchanged
    await store.ledger.commit(2, result_message_id=6, result_channel_id=CH)
    clock.advance(40)
    await store.ledger.reserve(req(3))
    await assert_ok(store)


async def test_error_priority(store_factory: Any, clock: FakeClock) -> None:
    store = await store_factory(starting_credits=1, jobs_per_member=1)
    await store.ledger.reserve(req(1))
    # on cooldown, at the job limit and out of credits: cooldown wins
    with pytest.raises(OnCooldown):
        await store.ledger.reserve(req(2))
    clock.advance(61)
    with pytest.raises(TooManyJobs) as err:
        await store.ledger.reserve(req(2))
    assert err.value.limit == 1
    await store.ledger.commit(1, result_message_id=5, result_channel_id=CH)
    with pytest.raises(InsufficientCredits):
        await store.ledger.reserve(req(2))
    await assert_ok(store)


async def test_jobs_per_member_limit(store_factory: Any) -> None:
    store = await store_factory(cooldown_seconds=0, jobs_per_member=2)
    await store.ledger.reserve(req(1))
    await store.ledger.reserve(req(2))
    with pytest.raises(TooManyJobs):
        await store.ledger.reserve(req(3))
    await store.ledger.refund(2, cause="api_error")
    await store.ledger.reserve(req(3))
    assert [j.id for j in await store.jobs.in_state("accepted", guild_id=G, user_id=U)] == [1, 3]
    assert await store.jobs.count_active(G, U) == 2
    await assert_ok(store)


async def test_budget_binds_and_refund_gives_it_back(store_factory: Any, clock: FakeClock) -> None:
    store = await store_factory(daily_budget_usd=0.25, cooldown_seconds=0, jobs_per_member=10)
    await store.ledger.reserve(req(1))
    await store.ledger.reserve(req(2))
    with pytest.raises(BudgetExhausted):
        await store.ledger.reserve(req(3))
    assert (await store.credits.member_status(G, U)).balance == 8  # nothing charged for job 3
    assert await store.jobs.get(3) is None
    assert await store.ledger.refund(2, cause="api_server_error")  # not billed: budget back
    await store.ledger.reserve(req(3))
    assert await store.ledger.refund(3, cause="post_failed", api_charged=True)  # billed: budget kept
    with pytest.raises(BudgetExhausted):
        await store.ledger.reserve(req(4))
    status = await store.budgets.status()
    assert (status.generations, status.reserved_usd) == (2, pytest.approx(0.2))
    clock.advance(DAY)  # a new UTC day, a new budget
    await store.ledger.reserve(req(4))
    assert (await store.budgets.status()).generations == 1
    # a refund the next day gives the budget back to the day it was reserved
    assert await store.ledger.refund(1, cause="shutdown")
    await assert_ok(store)


async def test_zero_cost_jobs(store_factory: Any) -> None:
    store = await store_factory(credits_per_image=0, starting_credits=0, cooldown_seconds=0)
    r = await store.ledger.reserve(req(1))
    assert (r.cost, r.balance_after) == (0, 0)
    assert await store.ledger.refund(1, cause="api_error")
    job = await store.jobs.get(1)
    assert job is not None and job.state == "failed" and job.failure_cause == "api_error"
    await store.ledger.reserve(req(2))
    assert await store.ledger.commit(2, result_message_id=1, result_channel_id=CH)
    assert await kinds(store) == ["reserve", "refund", "reserve", "commit"]
    await assert_ok(store)


# --- commit / refund ----------------------------------------------------------------------------


async def test_commit_is_idempotent_and_final(store: Store, clock: FakeClock) -> None:
    await store.ledger.reserve(req(1))
    assert await put_job_in_state(store, 1, "posting")
    clock.advance(18)
    assert await store.ledger.commit(1, result_message_id=55, result_channel_id=CH)
    assert not await store.ledger.commit(1, result_message_id=56, result_channel_id=CH)
    assert not await store.ledger.refund(1, cause="api_error")
    job = await store.jobs.get(1)
    assert job is not None
    assert (job.state, job.result_message_id, job.duration_s) == ("posted", 55, 18)
    status = await store.credits.member_status(G, U)
    assert (status.balance, status.inflight) == (9, 0)
    assert await kinds(store) == ["start", "reserve", "commit"]
    await assert_ok(store)


async def test_refund_restores_and_is_exclusive(store: Store) -> None:
    await store.ledger.reserve(req(1))
    assert await store.ledger.refund(1, cause="api_timeout")
    assert not await store.ledger.refund(1, cause="api_timeout")
    assert not await store.ledger.commit(1, result_message_id=1, result_channel_id=CH)
    assert not await put_job_in_state(store, 1, "claimed")
    status = await store.credits.member_status(G, U)
    assert (status.balance, status.inflight, status.cooldown_remaining) == (10, 0, 0)
    job = await store.jobs.get(1)
    assert job is not None and (job.state, job.failure_cause) == ("refunded", "api_timeout")
    assert await kinds(store) == ["start", "reserve", "refund"]
    assert await store.ledger.refund(999, cause="x") is False  # unknown job
    await assert_ok(store)


async def test_refund_keeps_cooldown_when_asked_or_newer(
    store_factory: Any, clock: FakeClock
) -> None:
    store = await store_factory(jobs_per_member=3)
    await store.ledger.reserve(req(1))
    assert await store.ledger.refund(1, cause="bad_input", clear_cooldown=False)
    assert (await store.credits.member_status(G, U)).cooldown_remaining == pytest.approx(60)
    clock.advance(60)
    await store.ledger.reserve(req(2))
    clock.advance(60)
    r3 = await store.ledger.reserve(req(3))
    assert await store.ledger.refund(2, cause="api_error")  # job 3's newer cooldown stays
    assert (await store.credits.member_status(G, U)).cooldown_remaining == pytest.approx(60)
    assert r3.cooldown_until == clock() + 60
    assert await store.ledger.refund(3, cause="api_error")  # its own cooldown is cleared
    assert (await store.credits.member_status(G, U)).cooldown_remaining == 0
    await assert_ok(store)


async def test_api_request_fields_and_charged_flag(store: Store) -> None:
    await store.ledger.reserve(req(1))
    assert await store.jobs.set_api_request(1, "req-1", "https://s/1", "https://r/1")
    job = await store.jobs.get(1)
    assert job is not None
    assert (job.api_request_id, job.api_status_url, job.api_response_url) == (
        "req-1",
        "https://s/1",
        "https://r/1",
    )
    assert job.api_charged is False
    assert await store.ledger.refund(1, cause="post_failed", api_charged=True)  # billed: budget stays
    assert (await store.budgets.status()).generations == 1
    job = await store.jobs.get(1)
    assert job is not None and job.api_charged is True
    assert not await store.jobs.set_api_request(1, "late")
    await store.ledger.reserve(req(2))
    assert await store.ledger.commit(2, result_message_id=20, result_channel_id=5)
    job = await store.jobs.get(2)
    assert job is not None and job.api_charged is True  # a posted image was billed
    await assert_ok(store)


# --- daily credits ------------------------------------------------------------------------------


async def test_daily_top_up_counts_credits_held_by_unfinished_jobs(
    store_factory: Any, clock: FakeClock
) -> None:
    """Review finding: credits held by an unfinished job are the member's. With 2 in the balance
    and 1 held by a job still running at midnight, a daily top-up to 3 adds nothing (topping the
    balance up to 3 would leave the member 3 + 1 held = 4 against a daily 3)."""
    store = await store_factory(
        starting_credits=3, daily_free_credits=3, cooldown_seconds=0, jobs_per_member=2
    )
    first = await store.ledger.reserve(req(1))  # day 1: 3 -> 2, one held
    assert first.balance_after == 2
    clock.advance(DAY)  # job 1 still runs past midnight
    second = await store.ledger.reserve(req(2))  # day 2's first job: 2 + 1 held >= 3: no top-up
    assert second.balance_after == 1
    assert "daily" not in [e.kind for e in await store.credits.recent(G, U, limit=20)]
    await store.ledger.commit(1, result_message_id=1, result_channel_id=CH)
    await store.ledger.commit(2, result_message_id=2, result_channel_id=CH)
    await assert_ok(store)


async def test_daily_top_up_once_per_utc_day(store_factory: Any, clock: FakeClock) -> None:
    store = await store_factory(
        starting_credits=2, daily_free_credits=5, cooldown_seconds=0, jobs_per_member=2
    )
    assert (await store.credits.member_status(G, U)).daily_pending == 3
    r = await store.ledger.reserve(req(1))
    assert r.balance_after == 4  # 2 + 3 daily - 1
    await store.ledger.commit(1, result_message_id=1, result_channel_id=CH)
    assert (await store.credits.member_status(G, U)).daily_pending == 0
    r = await store.ledger.reserve(req(2))
    assert r.balance_after == 3  # same day: no top-up
    await store.ledger.commit(2, result_message_id=2, result_channel_id=CH)
    clock.advance(12 * 3600)  # past midnight UTC
    assert (await store.credits.member_status(G, U)).daily_pending == 2
    r = await store.ledger.reserve(req(3))
    assert r.balance_after == 4  # topped up to 5, minus 1
    await store.credits.grant(G, U, 10, actor_id=9)
    clock.advance(DAY)
    assert (await store.credits.member_status(G, U)).daily_pending == 0  # above the cap: nothing
    await store.ledger.reserve(req(4))
    assert await kinds(store) == [
        "start", "daily", "reserve", "commit", "reserve", "commit",
        "daily", "reserve", "grant", "reserve",
    ]  # fmt: skip
    await assert_ok(store)


async def test_failed_reserve_does_not_claim_the_day(store_factory: Any, clock: FakeClock) -> None:
    store = await store_factory(
        starting_credits=0, daily_free_credits=1, jobs_per_member=1, cooldown_seconds=0
    )
    await store.ledger.reserve(req(1))
    clock.advance(DAY)
    with pytest.raises(TooManyJobs):
        await store.ledger.reserve(req(2))
    status = await store.credits.member_status(G, U)  # the rolled-back attempt claimed nothing
    assert (status.balance, status.daily_pending) == (0, 1)
    await store.ledger.commit(1, result_message_id=1, result_channel_id=CH)
    assert (await store.ledger.reserve(req(2))).balance_after == 0
    assert await kinds(store) == ["daily", "reserve", "commit", "daily", "reserve"]
    await assert_ok(store)


# --- grant / revoke / status ----------------------------------------------------------------------


async def test_grant_and_revoke(store: Store) -> None:
    assert await store.credits.grant(G, U, 5, actor_id=9, reason="event prize") == 15
    assert await store.credits.revoke(G, U, 4, actor_id=9) == (4, 11)
    assert await store.credits.revoke(G, U, 100, actor_id=9, reason="abuse") == (11, 0)
    assert await store.credits.revoke(G, U, 1, actor_id=9) == (0, 0)
    entries = await store.credits.recent(G, U, limit=3)
    assert [(e.kind, e.delta, e.balance_after) for e in entries] == [
        ("revoke", -11, 0),
        ("revoke", -4, 11),
        ("grant", 5, 15),
    ]
    assert entries[0].reason == "abuse" and entries[2].actor_id == 9
    assert (await store.credits.revoke(G, U2, 3, actor_id=9)) == (3, 7)  # new member: from starting
    for bad in (0, -1, 1_000_001, True, 2.5):
        with pytest.raises(ValueError, match="amount"):
            await store.credits.grant(G, U, bad, actor_id=9)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="amount"):
            await store.credits.revoke(G, U, bad, actor_id=9)  # type: ignore[arg-type]
    await assert_ok(store)


async def test_member_status_does_not_create(store: Store) -> None:
    status = await store.credits.member_status(G, U)
    assert (status.balance, status.exists, status.inflight, status.cooldown_remaining) == (
        10,
        False,
        0,
        0,
    )
    assert await store.credits.recent(G, U) == []
    assert (await store.credits.member_status(G, U)).exists is False
    await assert_ok(store)


async def test_recent_ledger_newest_first_with_limit(store: Store) -> None:
    for amount in range(1, 8):
        await store.credits.grant(G, U, amount, actor_id=9)
    entries = await store.credits.recent(G, U)
    assert [e.delta for e in entries] == [7, 6, 5, 4, 3]
    assert all(a.id > b.id for a, b in zip(entries, entries[1:], strict=False))
    await assert_ok(store)


# --- guild settings ---------------------------------------------------------------------------------


async def test_guild_settings_defaults_update_audit_reset(store: Store) -> None:
    gs = await store.settings.get(G)
    assert (gs.starting_credits, gs.cooldown_seconds, gs.allowed_channel_ids) == (10, 60, ())
    gs = await store.settings.update(
        G,
        9,
        cooldown_seconds=5,
        allowed_channel_ids=[3, "4", 3],
        blocked_words=["  Bad  Word ", "bad word", ""],
        confirm_quote=True,
        default_aspect_ratio="16:9",
        showcase_channel_id=77,
    )
    assert gs.cooldown_seconds == 5 and gs.allowed_channel_ids == (3, 4)
    assert gs.blocked_words == ("bad word",) and gs.confirm_quote is True
    assert gs.showcase_channel_id == 77 and gs.default_aspect_ratio == "16:9"
    assert (await store.settings.get(G)).cooldown_seconds == 5  # cache invalidated
    # unchanged values write no audit row
    await store.settings.update(G, 9, cooldown_seconds=5)
    await store.settings.reset(G, 10, "cooldown_seconds")
    gs = await store.settings.get(G)
    assert gs.cooldown_seconds == 60 and "cooldown_seconds" not in gs.overridden
    async with store.db.read() as conn:
        rows = (await conn.execute(select(settings_audit).order_by(settings_audit.c.id))).all()
    audit = [(r.key, r.old_value, r.new_value, r.actor_id) for r in rows]
    assert ("cooldown_seconds", None, "5", 9) in audit
    assert ("cooldown_seconds", "5", None, 10) in audit
    assert ("allowed_channel_ids", None, "[3, 4]", 9) in audit
    assert len(audit) == 7
    assert (await store.settings.get(G + 1)).cooldown_seconds == 60  # other server
    await assert_ok(store)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("starting_credits", -1),
        ("credits_per_image", 1_000_001),
        ("cooldown_seconds", 86_401),
        ("jobs_per_member", 0),
        ("jobs_per_member", 11),
        ("max_safety_tolerance", 3),
        ("default_aspect_ratio", "7:3"),
        ("allowed_channel_ids", "123"),
        ("allowed_channel_ids", list(range(1, 102))),
        ("exempt_role_ids", [0]),
        ("blocked_words", ["x" * 101]),
        ("confirm_quote", "maybe"),
        ("cooldown_seconds", True),
        ("no_such_setting", 1),
    ],
)
async def test_guild_settings_validation(store: Store, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        await store.settings.update(G, 9, **{"jobs_per_member": 3, key: value})
    assert (await store.settings.get(G)).overridden == frozenset()  # nothing written


async def test_guild_settings_apply_to_reserve(store: Store) -> None:
    await store.settings.update(G, 9, credits_per_image=3, starting_credits=4)
    r = await store.ledger.reserve(req(1))
    assert (r.cost, r.balance_after) == (3, 1)
    await assert_ok(store)


# --- workers / orphans --------------------------------------------------------------------------------


async def test_stats(store_factory: Any, clock: FakeClock) -> None:
    store = await store_factory(cooldown_seconds=0, jobs_per_member=10)
    await store.ledger.reserve(req(1))
    await store.ledger.commit(1, result_message_id=1, result_channel_id=CH)
    clock.advance(DAY)
    for job_id, user in ((2, U), (3, U2), (4, U2), (5, U)):
        await store.ledger.reserve(req(job_id, user_id=user))
    await store.ledger.commit(2, result_message_id=2, result_channel_id=CH)
    await store.ledger.commit(3, result_message_id=3, result_channel_id=CH)
    await store.ledger.refund(4, cause="api_timeout")
    await store.ledger.refund(5, cause="post_failed", api_charged=True)
    stats = await store.stats.guild(G)
    assert stats.today.generations == 2 and stats.last_30_days.generations == 3
    assert stats.today.credits_spent == 2
    assert stats.today.usd_spent == pytest.approx(0.3)  # two posted + one billed failure
    assert stats.today.failures_by_cause == {"api_timeout": 1, "post_failed": 1}
    assert stats.today.refunds == 2
    assert stats.last_30_days.top_members == [(U, 2), (U2, 1)]
    assert (await store.stats.guild(G + 1)).today.generations == 0
    await assert_ok(store)


async def test_check_invariants_detects_damage(store: Store) -> None:
    await store.ledger.reserve(req(1))
    async with store.db.write() as conn:  # a stray ledger row the balance does not reflect
        await conn.execute(
            ledger.insert().values(
                guild_id=G,
                user_id=U,
                delta=5,
                kind="grant",
                balance_after=14,
                created_at=0.0,
                job_id=1,
            )  # fmt: skip
        )
    problems = await store.audit.check_invariants()
    assert any("ledger sum" in p for p in problems)
    assert any("unexpected ledger kinds" in p for p in problems)


async def test_ping_and_close(store: Store) -> None:
    assert await store.ping()


async def test_meta_roundtrip(store: Store) -> None:
    assert await store.get_meta("commands_hash:global") is None
    await store.set_meta("commands_hash:global", "abc")
    await store.set_meta("commands_hash:global", "def")
    assert await store.get_meta("commands_hash:global") == "def"


async def test_budget_cap_below_one_job_on_a_new_day(store_factory: Any) -> None:
    """The budget upsert creates a day's row with the job's share: it must respect the cap too."""
    store = await store_factory(daily_budget_usd=0.05, cooldown_seconds=0)
    with pytest.raises(BudgetExhausted):
        await store.ledger.reserve(req(1))
    assert await store.jobs.get(1) is None
    status = await store.budgets.status()
    assert (status.generations, status.reserved_usd) == (0, 0)
    assert (await store.credits.member_status(G, U)).exists is False
    await assert_ok(store)


async def test_budget_cap_of_exactly_one_job(store_factory: Any) -> None:
    store = await store_factory(daily_budget_usd=0.10, cooldown_seconds=0, jobs_per_member=3)
    await store.ledger.reserve(req(1))  # a brand-new day: the row is created at the cap
    with pytest.raises(BudgetExhausted):
        await store.ledger.reserve(req(2))
    assert await store.ledger.refund(1, cause="api_error")
    await store.ledger.reserve(req(2))
    assert (await store.budgets.status()).generations == 1
    await assert_ok(store)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_prebuilt_statements_compile(dialect: str) -> None:
    """Every statement of the money transactions compiles for both engines, without expanding IN."""
    from sqlalchemy.dialects import postgresql, sqlite

    from kontext.store.budgets import BudgetStatements
    from kontext.store.credits import CreditStatements
    from kontext.store.jobs import JobStatements
    from kontext.store.leases import LeaseStatements
    from kontext.store.ledger import LedgerStatements
    from kontext.store.queue import QueueStatements

    target = sqlite.dialect() if dialect == "sqlite" else postgresql.dialect()
    built: dict[str, Any] = {}
    for area in (
        LedgerStatements, CreditStatements, BudgetStatements, JobStatements, LeaseStatements,
        QueueStatements,
    ):
        built.update({f"{area.__name__}.{k}": v for k, v in vars(area(dialect)).items()})
    assert len(built) >= 20
    flat = {}
    for name, stmt in built.items():  # fenced statements come as {fence: statement}
        variants = stmt.items() if isinstance(stmt, dict) else [("", stmt)]
        flat.update({f"{name}[{fence}]": s for fence, s in variants})
    for name, stmt in flat.items():
        sql = str(stmt.compile(dialect=target))
        assert "POSTCOMPILE" not in sql, name

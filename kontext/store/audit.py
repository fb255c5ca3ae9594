"""What the store keeps for looking back: who changed a server's settings, which processes
exist (leases name them), and the money rules checked over every table (:meth:`Audit.check_invariants`)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select, update

from kontext.schema import (
    ACTIVE_STATES,
    LEASED_STATES,
    UNPOSTED_STATES,
    budget_days,
    guild_budget_days,
    jobs,
    ledger,
    members,
    settings_audit,
    workers,
)
from kontext.store.base import StoreContext
from kontext.store.types import OWNER_ACCOUNT, usd_to_micros, utc_day
from kontext.vocab import JobState, LedgerKind

_j = jobs.c
_w = workers.c


class Audit:
    """``store.audit``: ``settings_history``, ``register_worker`` / ``retire_worker``,
    ``check_invariants``."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db

    async def settings_history(self, guild_id: int, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` settings changes of a server (dicts of the audit columns)."""
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(settings_audit)
                .where(settings_audit.c.guild_id == guild_id)
                .order_by(settings_audit.c.id.desc())
                .limit(limit)
            )
            return [dict(r._mapping) for r in rows]

    # --- workers --------------------------------------------------------------------------------

    async def register_worker(self, worker_id: str) -> None:
        """Announce a live worker (a bot process). Worker ids must be unique per process start."""
        now = self.ctx.now()
        async with self.db.write() as conn:
            stmt = self.ctx.insert(workers).values(
                id=worker_id, started_at=now, heartbeat_at=now, retired_at=None
            )
            await conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["id"],
                    set_={"started_at": now, "heartbeat_at": now, "retired_at": None},
                )
            )

    async def retire_worker(self, worker_id: str) -> None:
        """Mark the worker gone (clean shutdown): its unfinished jobs become claimable at once."""
        async with self.db.write() as conn:
            await conn.execute(
                update(workers)
                .where(_w.id == worker_id, _w.retired_at.is_(None))
                .values(retired_at=self.ctx.now())
            )

    # --- invariants -------------------------------------------------------------------------------

    async def check_invariants(
        self, posts: Mapping[int, int] | None = None, *, max_age_s: float | None = None
    ) -> list[str]:
        """Every broken money rule found (empty when all hold). A diagnostic: scans the tables.

        Beside the ledger's rules: the budget booked is the cost of every call counted as billed
        (plus the jobs still reserved); every job that reached ``sent`` stays billed unless an
        answer of the API itself proved nothing was made (its failure cause is the API's); no
        lease is held by a retired process or by a finished job; members' jobs in flight are
        their unfinished jobs; given ``max_age_s``, no job is unfinished longer than that (by
        its creation); and, given ``posts`` (job id → result messages seen in the channels, e.g.
        from an emulator), each job was posted at most once.
        """
        problems: list[str] = []
        async with self.db.read() as conn:
            member_rows = (await conn.execute(select(members))).all()
            sums = {
                (g, u): (int(total), int(last_id))
                for g, u, total, last_id in await conn.execute(
                    select(
                        ledger.c.guild_id,
                        ledger.c.user_id,
                        func.sum(ledger.c.delta),
                        func.max(ledger.c.id),
                    ).group_by(ledger.c.guild_id, ledger.c.user_id)
                )
            }
            last_after = {
                i: int(after)
                for i, after in await conn.execute(
                    select(ledger.c.id, ledger.c.balance_after).where(
                        ledger.c.id.in_([last for _, last in sums.values()] or [-1])
                    )
                )
            }
            per_job: dict[int, Counter[str]] = defaultdict(Counter)
            job_delta: dict[tuple[int, str], int] = defaultdict(int)
            for job_id, kind, n, total in await conn.execute(
                select(ledger.c.job_id, ledger.c.kind, func.count(), func.sum(ledger.c.delta))
                .where(ledger.c.job_id.is_not(None))
                .group_by(ledger.c.job_id, ledger.c.kind)
            ):
                per_job[int(job_id)][kind] = int(n)
                job_delta[(int(job_id), kind)] = int(total)
            job_rows = (
                await conn.execute(
                    select(
                        _j.id,
                        _j.guild_id,
                        _j.user_id,
                        _j.state,
                        _j.cost_credits,
                        _j.cost_usd_micros,
                        _j.created_at,
                        _j.api_charged,
                        _j.lease_owner,
                        _j.account,
                        _j.sent_at,
                        _j.failure_cause,
                    )
                )
            ).all()
            budget_rows = (await conn.execute(select(budget_days))).all()
            guild_budget_rows = (await conn.execute(select(guild_budget_days))).all()
            retired = {
                str(w)
                for (w,) in await conn.execute(select(_w.id).where(_w.retired_at.is_not(None)))
            }

        now = self.ctx.now()
        active: Counter[tuple[int, int]] = Counter()
        budget_expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        guild_expected: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
        for job in job_rows:
            problems.extend(_job_problems(job, per_job.get(int(job.id), Counter()), job_delta))
            if job.state in ACTIVE_STATES:
                active[(job.guild_id, job.user_id)] += 1
            owners_money = job.account == OWNER_ACCOUNT
            if owners_money and (job.state in (*ACTIVE_STATES, JobState.POSTED) or job.api_charged):
                for counts in (
                    budget_expected[utc_day(job.created_at)],
                    guild_expected[(int(job.guild_id), utc_day(job.created_at))],
                ):
                    counts[0] += int(job.cost_usd_micros)
                    counts[1] += 1
            if job.state in LEASED_STATES and job.lease_owner in retired:
                problems.append(f"job {job.id}: lease held by retired worker {job.lease_owner}")
            if job.state not in ACTIVE_STATES and job.lease_owner is not None:
                problems.append(f"job {job.id} ({job.state}): finished but leased by {job.lease_owner}")
            if (
                max_age_s is not None
                and job.state in ACTIVE_STATES
                and now - float(job.created_at) > max_age_s
            ):
                problems.append(
                    f"job {job.id} ({job.state}): unfinished after {now - float(job.created_at):.0f} s"
                )
        known_jobs = {int(j.id) for j in job_rows}
        for job_id, n in (posts or {}).items():
            if n > 1:
                problems.append(f"job {job_id}: posted {n} times")
        for job_id in per_job.keys() - known_jobs:
            problems.append(f"ledger rows for unknown job {job_id}")

        for m in member_rows:
            who = f"member {m.guild_id}/{m.user_id}"
            if m.balance < 0:
                problems.append(f"{who}: negative balance {m.balance}")
            if m.inflight < 0:
                problems.append(f"{who}: negative inflight {m.inflight}")
            total, last_id = sums.get((m.guild_id, m.user_id), (0, None))
            if total != m.balance:
                problems.append(f"{who}: balance {m.balance} != ledger sum {total}")
            if last_id is not None and last_after.get(last_id) != m.balance:
                problems.append(f"{who}: last balance_after {last_after.get(last_id)} != balance")
            if m.inflight != active[(m.guild_id, m.user_id)]:
                problems.append(
                    f"{who}: inflight {m.inflight} != active jobs {active[(m.guild_id, m.user_id)]}"
                )

        cap = usd_to_micros(self.ctx.config.daily_budget_usd)
        seen_days: set[str] = set()
        for b in budget_rows:
            seen_days.add(b.day)
            if b.reserved_micros < 0 or b.generations < 0:
                problems.append(f"budget {b.day}: negative ({b.reserved_micros}, {b.generations})")
            if b.reserved_micros > cap:
                problems.append(f"budget {b.day}: reserved {b.reserved_micros} > cap {cap}")
            expected = budget_expected.get(b.day, [0, 0])
            if [int(b.reserved_micros), int(b.generations)] != expected:
                problems.append(
                    f"budget {b.day}: (reserved, generations) = "
                    f"({b.reserved_micros}, {b.generations}), jobs say {tuple(expected)}"
                )
        for day in budget_expected.keys() - seen_days:
            problems.append(f"budget {day}: no row but jobs reserved budget that day")
        seen_guild_days = set()
        for b in guild_budget_rows:
            key = (int(b.guild_id), str(b.day))
            seen_guild_days.add(key)
            expected = guild_expected.get(key, [0, 0])
            if [int(b.reserved_micros), int(b.generations)] != expected:
                problems.append(
                    f"server {key[0]} budget {key[1]}: (reserved, generations) = "
                    f"({b.reserved_micros}, {b.generations}), jobs say {tuple(expected)}"
                )
        for g, day in guild_expected.keys() - seen_guild_days:
            problems.append(f"server {g} budget {day}: no row but jobs reserved budget that day")
        return problems


def _job_problems(
    job: Any, kinds: Counter[str], job_delta: dict[tuple[int, str], int]
) -> list[str]:
    """The broken rules of one job, given the count of its ledger rows per kind."""
    out: list[str] = []
    name = f"job {job.id} ({job.state})"
    if kinds[LedgerKind.RESERVE] != 1:
        out.append(f"{name}: {kinds[LedgerKind.RESERVE]} reserve rows")
    elif job_delta[(int(job.id), LedgerKind.RESERVE)] != -int(job.cost_credits):
        out.append(f"{name}: reserve delta != -cost")
    if kinds[LedgerKind.COMMIT] > 1 or kinds[LedgerKind.REFUND] > 1:
        out.append(f"{name}: {kinds[LedgerKind.COMMIT]} commit rows, {kinds[LedgerKind.REFUND]} refund rows")
    if kinds[LedgerKind.COMMIT] and kinds[LedgerKind.REFUND]:
        out.append(f"{name}: both committed and refunded")
    if job.state == JobState.POSTED and kinds[LedgerKind.COMMIT] != 1:
        out.append(f"{name}: posted without a commit row")
    if job.state in UNPOSTED_STATES and kinds[LedgerKind.REFUND] != 1:
        out.append(f"{name}: ended without a refund row")
    if kinds[LedgerKind.REFUND] and job_delta[(int(job.id), LedgerKind.REFUND)] != int(job.cost_credits):
        out.append(f"{name}: refund delta != cost")
    if job.state in ACTIVE_STATES and (kinds[LedgerKind.COMMIT] or kinds[LedgerKind.REFUND]):
        out.append(f"{name}: active but has a commit/refund row")
    if job.state in (JobState.SENT, JobState.POSTING) and not (job.sent_at and job.api_charged):
        out.append(f"{name}: reached sent but is not counted as billed")
    if job.sent_at is not None and not job.api_charged:
        # only the API's own answer can prove a sent request made nothing
        if not str(job.failure_cause or "").startswith("api_"):
            out.append(f"{name}: its request was sent, yet its budget share was given back "
                       f"({job.failure_cause})")
    other = set(kinds) - {LedgerKind.RESERVE, LedgerKind.COMMIT, LedgerKind.REFUND}
    if other:
        out.append(f"{name}: unexpected ledger kinds {sorted(other)}")
    return out

"""Members' credits (admin grants and revocations) and the read-only queries of the store."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import Connection, func, select

from kontext.db import execute
from kontext.schema import ACTIVE_STATES, budget_days, jobs, ledger, members
from kontext.store_base import StoreBase, job_from_row
from kontext.store_types import (
    BudgetStatus,
    GuildSettings,
    Job,
    LedgerEntry,
    MemberStatus,
    utc_day,
)
from kontext.vocab import LedgerKind

MAX_GRANT = 1_000_000
_m = members.c
_j = jobs.c


def _check_amount(amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError("amount must be a whole number")
    if not 1 <= amount <= MAX_GRANT:
        raise ValueError(f"amount must be between 1 and {MAX_GRANT}, got {amount}")
    return amount


class MembersMixin(StoreBase):
    """``grant``, ``revoke``, ``member_status``, ``recent_ledger`` and the job queries."""

    if TYPE_CHECKING:  # provided by GuildSettingsMixin in the composed Store

        async def get_guild_settings(self, guild_id: int) -> GuildSettings: ...

    # --- admin credit changes ----------------------------------------------------------------

    async def grant(
        self,
        guild_id: int,
        user_id: int,
        amount: int,
        *,
        actor_id: int | None,
        reason: str | None = None,
    ) -> int:
        """Add ``amount`` (1..1,000,000) credits; returns the new balance."""
        _check_amount(amount)
        gs = await self.get_guild_settings(guild_id)

        def tx(conn: Connection) -> int:
            now = self.now()
            self._ensure_member(conn, guild_id, user_id, gs.starting_credits, now)
            balance = execute(
                conn, self._sql.add_balance, {"g": guild_id, "u": user_id, "delta": amount}
            ).scalar_one()
            self._ledger(
                conn,
                guild_id=guild_id,
                user_id=user_id,
                delta=amount,
                kind=LedgerKind.GRANT,
                balance_after=balance,
                now=now,
                reason=reason,
                actor_id=actor_id,
            )
            return int(balance)

        return await self.db.transact(tx)

    async def revoke(
        self,
        guild_id: int,
        user_id: int,
        amount: int,
        *,
        actor_id: int | None,
        reason: str | None = None,
    ) -> tuple[int, int]:
        """Take up to ``amount`` credits (never below 0); returns (revoked, new balance)."""
        _check_amount(amount)
        gs = await self.get_guild_settings(guild_id)

        def tx(conn: Connection) -> tuple[int, int]:
            now = self.now()
            self._ensure_member(conn, guild_id, user_id, gs.starting_credits, now)
            row = self._member_row(conn, guild_id, user_id, lock=True)
            assert row is not None
            take = min(amount, int(row.balance))
            if take == 0:
                return 0, int(row.balance)
            balance = execute(
                conn, self._sql.take_balance, {"g": guild_id, "u": user_id, "take": take}
            ).scalar_one()  # the row is locked: the condition holds
            self._ledger(
                conn,
                guild_id=guild_id,
                user_id=user_id,
                delta=-take,
                kind=LedgerKind.REVOKE,
                balance_after=balance,
                now=now,
                reason=reason,
                actor_id=actor_id,
            )
            return take, int(balance)

        return await self.db.transact(tx)

    # --- reading ------------------------------------------------------------------------------

    async def member_status(self, guild_id: int, user_id: int) -> MemberStatus:
        """Balance, cooldown, jobs in flight; a member without a row shows the starting credits."""
        gs = await self.get_guild_settings(guild_id)
        now = self.now()
        async with self.db.read() as conn:
            row = (await conn.execute(self._sql.member_row, {"g": guild_id, "u": user_id})).first()
        daily = gs.daily_free_credits
        if row is None:
            return MemberStatus(
                balance=gs.starting_credits,
                cooldown_remaining=0.0,
                inflight=0,
                exists=False,
                daily_pending=max(0, daily - gs.starting_credits),
            )
        pending = 0
        if daily > 0 and row.last_daily != utc_day(now):
            pending = max(0, daily - int(row.balance))
        remaining = 0.0
        if row.cooldown_until is not None:
            remaining = max(0.0, float(row.cooldown_until) - now)
        return MemberStatus(
            balance=int(row.balance),
            cooldown_remaining=remaining,
            inflight=int(row.inflight),
            exists=True,
            daily_pending=pending,
        )

    async def recent_ledger(self, guild_id: int, user_id: int, limit: int = 5) -> list[LedgerEntry]:
        """The member's newest ``limit`` ledger rows, newest first."""
        c = ledger.c
        async with self.db.read() as conn:
            rows = await conn.execute(
                select(
                    c.id,
                    c.delta,
                    c.kind,
                    c.reason,
                    c.job_id,
                    c.actor_id,
                    c.balance_after,
                    c.created_at,
                )
                .where(c.guild_id == guild_id, c.user_id == user_id)
                .order_by(c.id.desc())
                .limit(limit)
            )
            return [LedgerEntry(**r._mapping) for r in rows]

    async def get_job(self, job_id: int) -> Job | None:
        """The job, or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(jobs).where(_j.id == job_id))).first()
        return None if row is None else job_from_row(row)

    async def jobs_in_state(
        self,
        states: str | Iterable[str],
        *,
        guild_id: int | None = None,
        user_id: int | None = None,
    ) -> list[Job]:
        """Jobs in any of ``states``, oldest first."""
        wanted = [states] if isinstance(states, str) else list(states)
        stmt = select(jobs).where(_j.state.in_(wanted))
        if guild_id is not None:
            stmt = stmt.where(_j.guild_id == guild_id)
        if user_id is not None:
            stmt = stmt.where(_j.user_id == user_id)
        async with self.db.read() as conn:
            rows = await conn.execute(stmt.order_by(_j.created_at, _j.id))
            return [job_from_row(r) for r in rows]

    async def count_active_jobs(
        self, guild_id: int | None = None, user_id: int | None = None
    ) -> int:
        """How many jobs are accepted or running (optionally of one server / member)."""
        stmt = select(func.count()).select_from(jobs).where(_j.state.in_(ACTIVE_STATES))
        if guild_id is not None:
            stmt = stmt.where(_j.guild_id == guild_id)
        if user_id is not None:
            stmt = stmt.where(_j.user_id == user_id)
        async with self.db.read() as conn:
            return int(await conn.scalar(stmt) or 0)

    async def budget_status(self) -> BudgetStatus:
        """Today's reserved spend against ``DAILY_BUDGET_USD``."""
        today = self.today()
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(budget_days).where(budget_days.c.day == today))
            ).first()
        reserved, generations = (0, 0) if row is None else (row.reserved_micros, row.generations)
        return BudgetStatus(
            day=today,
            reserved_usd=reserved / 1_000_000,
            cap_usd=self.settings.daily_budget_usd,
            generations=int(generations),
        )

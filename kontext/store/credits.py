"""Members' credits: their rows, the ledger's rows, the daily top-up, admins' grants and
revocations, and what ``/credits`` reads.

Every balance change is one ledger row in the same transaction (the ledger is append-only, so
a member's balance always equals the sum of their ledger). A job's own money (reserve, commit,
refund) is :mod:`kontext.store.ledger`, whose transactions create members, top them up and append
their rows through :class:`Credits`' sync helpers.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import BigInteger, Connection, Row, Text, and_, func, or_, select, update

from kontext.db import execute
from kontext.schema import ACTIVE_STATES, jobs, ledger, members
from kontext.store.base import StoreContext, bind, dialect_insert, state_in
from kontext.store.guild_settings import GuildSettingsStore
from kontext.store.types import GuildSettings, LedgerEntry, MemberStatus, utc_day
from kontext.vocab import LedgerKind

MAX_GRANT = 1_000_000
_m = members.c
_j = jobs.c


class CreditStatements:
    """Members' rows and ledger rows, built once per dialect (bind names where built)."""

    def __init__(self, dialect: str) -> None:
        g, u = bind("g", BigInteger), bind("u", BigInteger)
        who = and_(_m.guild_id == g, _m.user_id == u)
        today = bind("today", Text)
        job_id = bind("job_id", BigInteger)
        # binds the ledger's columns (but ``id``); the ledger is only ever appended to
        self.insert_ledger = ledger.insert()
        # binds guild_id, user_id, balance, inflight, created_at; returns a row when created
        self.insert_member = (
            dialect_insert(dialect, members)
            .on_conflict_do_nothing(index_elements=["guild_id", "user_id"])
            .returning(_m.balance)
        )
        self.member_row = select(members).where(who)
        # locks the row on Postgres (SQLite: the write lock is already held)
        self.member_row_locked = self.member_row.with_for_update()
        # returns the new balance
        self.add_balance = (
            update(members)
            .where(who)
            .values(balance=_m.balance + bind("delta", BigInteger))
            .returning(_m.balance)
        )
        # returns the new balance; nothing when the balance is short
        self.take_balance = (
            update(members)
            .where(who, _m.balance >= bind("take", BigInteger))
            .values(balance=_m.balance - bind("take", BigInteger))
            .returning(_m.balance)
        )
        # claims today's top-up; returns the balance when it claimed
        self.claim_daily = (
            update(members)
            .where(who, or_(_m.last_daily.is_(None), _m.last_daily != today))
            .values(last_daily=today)
            .returning(_m.balance)
        )
        # credits held by the member's other unfinished jobs
        self.held_credits = select(func.coalesce(func.sum(_j.cost_credits), 0)).where(
            _j.guild_id == g, _j.user_id == u, state_in(ACTIVE_STATES), _j.id != job_id
        )


@functools.cache
def credit_statements(dialect: str) -> CreditStatements:
    return CreditStatements(dialect)


def _check_amount(amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError("amount must be a whole number")
    if not 1 <= amount <= MAX_GRANT:
        raise ValueError(f"amount must be between 1 and {MAX_GRANT}, got {amount}")
    return amount


class Credits:
    """``store.credits``: ``grant``, ``revoke``, ``member_status``, ``recent`` (the ledger)."""

    def __init__(self, ctx: StoreContext, settings: GuildSettingsStore) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self._settings = settings
        self._sql = credit_statements(ctx.dialect)

    # --- helpers of the sync transaction bodies (the ledger's too) --------------------------

    def append(
        self,
        conn: Connection,
        *,
        guild_id: int,
        user_id: int,
        delta: int,
        kind: str,
        balance_after: int,
        now: float,
        reason: str | None = None,
        job_id: int | None = None,
        actor_id: int | None = None,
    ) -> None:
        """Append one ledger row (the ledger is never updated nor deleted from)."""
        execute(
            conn,
            self._sql.insert_ledger,
            {
                "guild_id": guild_id,
                "user_id": user_id,
                "delta": delta,
                "kind": kind,
                "reason": reason,
                "job_id": job_id,
                "actor_id": actor_id,
                "balance_after": balance_after,
                "created_at": now,
            },
        )

    def ensure_member(
        self, conn: Connection, guild_id: int, user_id: int, starting: int, now: float
    ) -> bool:
        """Create the member with ``starting`` credits (and a ``start`` row) if new.

        Returns True when the member was created.
        """
        created = (
            execute(
                conn,
                self._sql.insert_member,
                {
                    "guild_id": guild_id,
                    "user_id": user_id,
                    "balance": starting,
                    "inflight": 0,
                    "created_at": now,
                },
            ).first()
            is not None
        )
        if created and starting:
            self.append(
                conn,
                guild_id=guild_id,
                user_id=user_id,
                delta=starting,
                kind=LedgerKind.START,
                balance_after=starting,
                now=now,
                reason="starting credits",
            )
        return created

    def member_row(
        self, conn: Connection, guild_id: int, user_id: int, *, lock: bool = False
    ) -> Row[Any] | None:
        """The member's row; ``lock`` takes the row lock (Postgres; SQLite holds the write lock)."""
        stmt = self._sql.member_row_locked if lock else self._sql.member_row
        row: Row[Any] | None = execute(conn, stmt, {"g": guild_id, "u": user_id}).first()
        return row

    def add(self, conn: Connection, guild_id: int, user_id: int, delta: int) -> int:
        """Add ``delta`` to the member's balance (no ledger row: the caller appends it)."""
        balance = execute(
            conn, self._sql.add_balance, {"g": guild_id, "u": user_id, "delta": delta}
        ).scalar_one()
        return int(balance)

    # --- admin credit changes ----------------------------------------------------------------

    def daily_topup(
        self,
        conn: Connection,
        gs: GuildSettings,
        user_id: int,
        today: str,
        now: float,
        job_id: int,
    ) -> None:
        """Claim today's free credits (once per UTC day) and top the balance up to the cap.

        Credits held by the member's unfinished jobs count as theirs: 4 + 1 held against a
        daily 3 tops up nothing.
        """
        if gs.daily_free_credits <= 0:
            return
        who = {"g": gs.guild_id, "u": user_id}
        claimed = execute(conn, self._sql.claim_daily, {**who, "today": today}).first()
        if claimed is None:
            return
        held = execute(conn, self._sql.held_credits, {**who, "job_id": job_id}).scalar_one()
        delta = max(0, gs.daily_free_credits - int(claimed.balance) - int(held))
        if delta == 0:
            return
        balance = self.add(conn, gs.guild_id, user_id, delta)
        self.append(
            conn,
            guild_id=gs.guild_id,
            user_id=user_id,
            delta=delta,
            kind=LedgerKind.DAILY,
            balance_after=balance,
            now=now,
            reason=f"daily free credits {today}",
        )

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
        gs = await self._settings.get(guild_id)

        def tx(conn: Connection) -> int:
            now = self.ctx.now()
            self.ensure_member(conn, guild_id, user_id, gs.starting_credits, now)
            balance = self.add(conn, guild_id, user_id, amount)
            self.append(
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
        gs = await self._settings.get(guild_id)

        def tx(conn: Connection) -> tuple[int, int]:
            now = self.ctx.now()
            self.ensure_member(conn, guild_id, user_id, gs.starting_credits, now)
            row = self.member_row(conn, guild_id, user_id, lock=True)
            assert row is not None
            take = min(amount, int(row.balance))
            if take == 0:
                return 0, int(row.balance)
            balance = execute(
                conn, self._sql.take_balance, {"g": guild_id, "u": user_id, "take": take}
            ).scalar_one()  # the row is locked: the condition holds
            self.append(
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
        gs = await self._settings.get(guild_id)
        now = self.ctx.now()
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

    async def recent(self, guild_id: int, user_id: int, limit: int = 5) -> list[LedgerEntry]:
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

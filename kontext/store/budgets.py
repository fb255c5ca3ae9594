"""The owner's daily budgets: the whole bot's (``DAILY_BUDGET_USD``) and each server's
(``GUILD_DAILY_BUDGET_USD``, or the owner's own cap for it).

Each accepted job books its cost on both days in the same transaction that charges the member
(:meth:`Budgets.book`, inside :meth:`kontext.store.ledger.Ledger.reserve`), as one conditional
upsert per day, so no burst of concurrent jobs passes a cap; a refund of a job the API did not
bill gives its share back (:meth:`Budgets.release`).
"""

from __future__ import annotations

import functools

from sqlalchemy import BigInteger, Connection, Text, select, update

from kontext.db import execute
from kontext.errors import BudgetExhausted, GuildBudgetExhausted
from kontext.schema import budget_days, guild_budget_days
from kontext.store.base import StoreContext, bind, dialect_insert
from kontext.store.types import BudgetStatus, until_midnight_utc, usd_to_micros

#: the cap of a server without one (its spend is still booked, for the owner's listing)
NO_CAP = 2**62
_b = budget_days.c
_gb = guild_budget_days.c


class BudgetStatements:
    """Booking and giving back one generation's share of a day, built once per dialect."""

    def __init__(self, dialect: str) -> None:
        g = bind("g", BigInteger)
        b_day = bind("b_day", Text)
        usd = bind("usd", BigInteger)
        cap = bind("cap", BigInteger)
        # books one generation on the day (usd <= cap), creating the row when needed; returns
        # ``day`` when booked, nothing when the cap would be passed
        self.book_budget = (
            dialect_insert(dialect, budget_days)
            .values(day=b_day, reserved_micros=usd, generations=1)
            .on_conflict_do_update(
                index_elements=["day"],
                set_={
                    "reserved_micros": _b.reserved_micros + usd,
                    "generations": _b.generations + 1,
                },
                where=_b.reserved_micros + usd <= cap,
            )
            .returning(_b.day)
        )
        # the same on the server's day, per server
        self.book_guild_budget = (
            dialect_insert(dialect, guild_budget_days)
            .values(guild_id=g, day=b_day, reserved_micros=usd, generations=1)
            .on_conflict_do_update(
                index_elements=["guild_id", "day"],
                set_={
                    "reserved_micros": _gb.reserved_micros + usd,
                    "generations": _gb.generations + 1,
                },
                where=_gb.reserved_micros + usd <= cap,
            )
            .returning(_gb.day)
        )
        # gives one generation's share back (never below zero)
        self.release_budget = (
            update(budget_days)
            .where(_b.day == b_day, _b.reserved_micros >= usd, _b.generations > 0)
            .values(reserved_micros=_b.reserved_micros - usd, generations=_b.generations - 1)
        )
        self.release_guild_budget = (
            update(guild_budget_days)
            .where(
                _gb.guild_id == g,
                _gb.day == b_day,
                _gb.reserved_micros >= usd,
                _gb.generations > 0,
            )
            .values(reserved_micros=_gb.reserved_micros - usd, generations=_gb.generations - 1)
        )


@functools.cache
def budget_statements(dialect: str) -> BudgetStatements:
    return BudgetStatements(dialect)


class Budgets:
    """``store.budgets``: the status of today's budget; booking and release inside the ledger's
    transactions."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.config = ctx.config
        self._sql = budget_statements(ctx.dialect)

    def book(
        self, conn: Connection, *, guild_id: int, today: str, usd: int, guild_cap_usd: float,
        now: float,
    ) -> None:
        """Inside a transaction: book one generation on today's budgets, or raise
        BudgetExhausted / GuildBudgetExhausted (the caller's transaction rolls back)."""
        sql = self._sql
        g = guild_id
        cap = usd_to_micros(self.config.daily_budget_usd)
        # one upsert books the day's budget: a new day's row starts at this job's share (so the
        # cap is checked here first), an existing row grows only while it stays within the cap
        hours, minutes = until_midnight_utc(now)
        booked = usd <= cap and (
            execute(conn, sql.book_budget, {"b_day": today, "usd": usd, "cap": cap}).first()
            is not None
        )
        if not booked:
            raise BudgetExhausted(
                f"daily budget of {self.config.daily_budget_usd} USD",
                hours=hours, minutes=minutes,
            )
        # every server's spend is booked (the owner's listing); 0 means no cap
        guild_cap = usd_to_micros(guild_cap_usd) if guild_cap_usd > 0 else NO_CAP
        if not (
            usd <= guild_cap
            and execute(
                conn, sql.book_guild_budget, {"g": g, "b_day": today, "usd": usd, "cap": guild_cap}
            ).first()
            is not None
        ):
            raise GuildBudgetExhausted(
                f"server {g}: daily budget of {guild_cap_usd} USD", hours=hours, minutes=minutes
            )

    def release(self, conn: Connection, *, guild_id: int, day: str, usd: int) -> None:
        """Inside a transaction: give one generation's share of ``day`` back, on both budgets."""
        share = {"b_day": day, "usd": usd}
        execute(conn, self._sql.release_budget, share)
        execute(conn, self._sql.release_guild_budget, {**share, "g": guild_id})

    async def status(self) -> BudgetStatus:
        """Today's reserved spend against ``DAILY_BUDGET_USD``."""
        today = self.ctx.today()
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(budget_days).where(budget_days.c.day == today))
            ).first()
        reserved, generations = (0, 0) if row is None else (row.reserved_micros, row.generations)
        return BudgetStatus(
            day=today,
            reserved_usd=reserved / 1_000_000,
            cap_usd=self.config.daily_budget_usd,
            generations=int(generations),
        )

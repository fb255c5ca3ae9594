"""A server's activity for ``/kontext-admin stats``: generations, spend, failures, top members."""

from __future__ import annotations

from sqlalchemy import func, or_, select

from kontext.schema import UNPOSTED_STATES, jobs
from kontext.store.base import StoreContext
from kontext.store.types import DAY, GuildStats, StatsWindow, day_start
from kontext.vocab import JobState

_j = jobs.c


class Stats:
    """``store.stats``: :meth:`guild`."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db

    async def guild(self, guild_id: int) -> GuildStats:
        """Generations, spend, failures by cause and top members: today and the last 30 days."""
        now = self.ctx.now()
        today_start = day_start(now)
        return GuildStats(
            today=await self._window(guild_id, today_start),
            last_30_days=await self._window(guild_id, today_start - 29 * DAY),
        )

    async def _window(self, guild_id: int, since: float) -> StatsWindow:
        base = (_j.guild_id == guild_id, _j.created_at >= since)
        posted = _j.state == JobState.POSTED
        async with self.db.read() as conn:
            generations, credits = (
                await conn.execute(
                    select(func.count(), func.coalesce(func.sum(_j.cost_credits), 0)).where(
                        *base, posted
                    )
                )
            ).one()
            usd_micros = await conn.scalar(
                select(func.coalesce(func.sum(_j.cost_usd_micros), 0)).where(
                    *base, or_(posted, _j.api_charged.is_(True))
                )
            )
            failures = await conn.execute(
                select(_j.failure_cause, func.count())
                .where(*base, _j.state.in_(UNPOSTED_STATES))
                .group_by(_j.failure_cause)
            )
            failures_by_cause = {str(cause or "unknown"): int(n) for cause, n in failures}
            n_generations = func.count().label("n")
            top = await conn.execute(
                select(_j.user_id, n_generations)
                .where(*base, posted)
                .group_by(_j.user_id)
                .order_by(n_generations.desc(), _j.user_id)
                .limit(5)
            )
            top_members = [(int(user), int(n)) for user, n in top]
            refunds = await conn.scalar(select(func.count()).where(*base, _j.state == JobState.REFUNDED))
        return StatsWindow(
            generations=int(generations),
            credits_spent=int(credits),
            usd_spent=int(usd_micros or 0) / 1_000_000,
            failures_by_cause=failures_by_cause,
            top_members=top_members,
            refunds=int(refunds or 0),
        )

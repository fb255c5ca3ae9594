"""The owner's controls over servers: blocks, per-server budgets, and the servers listing.

None of this is reachable from Discord: the owner uses it from a console (``python bot.py owner
…``, e.g. through ``heroku run``), so no server admin can unblock a server or raise its budget.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from kontext.schema import guild_api_keys, guild_budget_days, guild_controls, jobs, members
from kontext.store.base import StoreContext
from kontext.store.types import DAY, GuildControl, GuildSpend, day_start, utc_day
from kontext.vocab import JobState

_gc = guild_controls.c
_gb = guild_budget_days.c
_j = jobs.c


class OwnerControls:
    """``store.owner``: server blocks and budgets (the owner's), servers' own API keys, and the
    listing of servers with their spend."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db

    async def control(self, guild_id: int) -> GuildControl:
        """The owner's controls of one server (defaults when never set)."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(guild_controls).where(_gc.guild_id == guild_id))
            ).first()
        if row is None:
            return GuildControl(guild_id)
        budget = None if row.daily_budget_usd is None else float(row.daily_budget_usd)
        return GuildControl(guild_id, bool(row.blocked), budget, row.name)

    async def _set_control(self, guild_id: int, **values: object) -> None:
        async with self.db.write() as conn:
            now = self.ctx.now()
            done = await conn.execute(
                update(guild_controls)
                .where(_gc.guild_id == guild_id)
                .values(**values, updated_at=now)
            )
            if done.rowcount == 0:
                await conn.execute(
                    self.ctx.insert(guild_controls)
                    .values(guild_id=guild_id, updated_at=now, **values)
                    .on_conflict_do_nothing(index_elements=["guild_id"])
                )

    async def set_blocked(self, guild_id: int, blocked: bool) -> None:
        """Block (or unblock) a server: its commands are refused, nothing charged or called."""
        await self._set_control(guild_id, blocked=blocked)

    async def set_budget(self, guild_id: int, usd: float | None) -> None:
        """Set a server's own daily cap in USD (0 = none; None = back to the default)."""
        await self._set_control(guild_id, daily_budget_usd=usd)

    async def note_name(self, guild_id: int, name: str) -> None:
        """Remember a server's name for the owner's listing (when it changed)."""
        current = await self.control(guild_id)
        if current.name != name:
            await self._set_control(guild_id, name=name)

    # --- servers' own keys (stored encrypted; see kontext.accounts) -------------------------

    async def api_keys(self) -> list[Any]:
        """Every server's own key row (encrypted)."""
        async with self.db.read() as conn:
            return list((await conn.execute(select(guild_api_keys))).all())

    async def set_api_key(self, guild_id: int, encrypted: str, actor_id: int) -> None:
        """Store (or replace) a server's own key, already encrypted."""
        async with self.db.write() as conn:
            now = self.ctx.now()
            done = await conn.execute(
                update(guild_api_keys)
                .where(guild_api_keys.c.guild_id == guild_id)
                .values(key_encrypted=encrypted, added_by=actor_id, added_at=now)
            )
            if done.rowcount == 0:
                await conn.execute(
                    self.ctx.insert(guild_api_keys).values(
                        guild_id=guild_id, key_encrypted=encrypted, added_by=actor_id, added_at=now
                    )
                )

    async def remove_api_key(self, guild_id: int) -> bool:
        """Forget a server's own key; True when there was one."""
        async with self.db.write() as conn:
            done = await conn.execute(
                guild_api_keys.delete().where(guild_api_keys.c.guild_id == guild_id)
            )
            return bool(done.rowcount)

    async def list_guilds(self) -> list[GuildSpend]:
        """Every server the bot knows (controls, members or jobs), most spend first."""
        now = self.ctx.now()
        today = utc_day(now)
        since = day_start(now) - 29 * DAY
        first_day = utc_day(since)
        async with self.db.read() as conn:
            controls = {
                int(r.guild_id): r for r in await conn.execute(select(guild_controls))
            }
            spend_today = {
                int(g): int(m)
                for g, m in await conn.execute(
                    select(_gb.guild_id, _gb.reserved_micros).where(_gb.day == today)
                )
            }
            spend_30 = {
                int(g): int(m or 0)
                for g, m in await conn.execute(
                    select(_gb.guild_id, func.sum(_gb.reserved_micros))
                    .where(_gb.day >= first_day)
                    .group_by(_gb.guild_id)
                )
            }
            images = {
                int(g): int(n)
                for g, n in await conn.execute(
                    select(_j.guild_id, func.count())
                    .where(_j.state == JobState.POSTED, _j.created_at >= since)
                    .group_by(_j.guild_id)
                )
            }
            member_counts = {
                int(g): int(n)
                for g, n in await conn.execute(
                    select(members.c.guild_id, func.count()).group_by(members.c.guild_id)
                )
            }
        out = []
        for g in set(controls) | set(spend_30) | set(member_counts) | set(images):
            c = controls.get(g)
            budget = self.ctx.config.guild_daily_budget_usd
            if c is not None and c.daily_budget_usd is not None:
                budget = float(c.daily_budget_usd)
            out.append(
                GuildSpend(
                    guild_id=g,
                    name=None if c is None else c.name,
                    blocked=bool(c is not None and c.blocked),
                    budget_usd=budget,
                    spent_today_usd=spend_today.get(g, 0) / 1_000_000,
                    spent_30d_usd=spend_30.get(g, 0) / 1_000_000,
                    images_30d=images.get(g, 0),
                    members=member_counts.get(g, 0),
                )
            )
        out.sort(key=lambda s: (-s.spent_30d_usd, s.guild_id))
        return out

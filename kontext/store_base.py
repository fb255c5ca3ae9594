"""Shared plumbing of the store: the database, the clock, and helpers used inside transactions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from kontext.db import Database, jobs, ledger, members
from kontext.settings import Settings
from kontext.store_types import Job, utc_day


class StoreBase:
    """State and low-level helpers shared by the store's parts."""

    def __init__(
        self, db: Database, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.settings = settings
        self._clock = clock
        self._settings_cache: dict[int, tuple[float, Any]] = {}

    def now(self) -> float:
        """The current time (epoch seconds) from the injected clock."""
        return float(self._clock())

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``, from the injected clock."""
        return utc_day(self.now())

    def _insert(self, table: Any) -> Insert:
        """A dialect-specific INSERT that supports ``on_conflict_do_nothing``."""
        if self.db.is_sqlite:
            return sqlite.insert(table)
        return postgresql.insert(table)

    async def _ledger(
        self,
        conn: AsyncConnection,
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
        await conn.execute(
            ledger.insert().values(
                guild_id=guild_id,
                user_id=user_id,
                delta=delta,
                kind=kind,
                reason=reason,
                job_id=job_id,
                actor_id=actor_id,
                balance_after=balance_after,
                created_at=now,
            )
        )

    async def _ensure_member(
        self, conn: AsyncConnection, guild_id: int, user_id: int, starting: int, now: float
    ) -> bool:
        """Create the member with ``starting`` credits (and a ``start`` row) if new.

        Returns True when the member was created.
        """
        stmt = (
            self._insert(members)
            .values(
                guild_id=guild_id,
                user_id=user_id,
                balance=starting,
                inflight=0,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["guild_id", "user_id"])
            .returning(members.c.balance)
        )
        created = (await conn.execute(stmt)).first() is not None
        if created and starting:
            await self._ledger(
                conn,
                guild_id=guild_id,
                user_id=user_id,
                delta=starting,
                kind="start",
                balance_after=starting,
                now=now,
                reason="starting credits",
            )
        return created

    async def _member_row(
        self, conn: AsyncConnection, guild_id: int, user_id: int, *, lock: bool = False
    ) -> Row[Any] | None:
        stmt = select(members).where(members.c.guild_id == guild_id, members.c.user_id == user_id)
        if lock:
            stmt = stmt.with_for_update()  # no-op on SQLite (the write lock is held)
        return (await conn.execute(stmt)).first()


def job_from_row(row: Row[Any]) -> Job:
    """A :class:`Job` from a ``jobs`` row."""
    m = row._mapping
    values = {c.name: m[c.name] for c in jobs.columns}
    values["params"] = json.loads(values["params"] or "{}")
    values["api_charged"] = bool(values["api_charged"])
    return Job(**values)

"""The persistence of the bot, by data area, behind one thin facade: :class:`Store`.

Discord-free. :meth:`Store.open` connects to ``DATABASE_URL``, applies pending migrations, and
exposes each area as a typed attribute; every area shares one database, one clock and the
process settings (:class:`~kontext.store.base.StoreContext`):

==================  ==========================  ===================================================
attribute           module                      what
==================  ==========================  ===================================================
``store.ledger``    :mod:`.ledger`              a job's money: reserve, precheck, commit, refund
``store.credits``   :mod:`.credits`             members' credits: grant, revoke, status, history
``store.budgets``   :mod:`.budgets`             the owner's daily budgets (status; booking)
``store.jobs``      :mod:`.jobs`                jobs: read, mark running, the API request id
``store.queue``     :mod:`.queue`               the shared queue: claims, views, API accounts
``store.leases``    :mod:`.leases`              leases of running jobs (fencing, takeovers)
``store.settings``  :mod:`.guild_settings`      each server's settings (cached; audited)
``store.showcase``  :mod:`.showcase`            showcase posts and their approval
``store.stats``     :mod:`.stats`               ``/kontext-admin stats``
``store.audit``     :mod:`.audit`               settings history, workers, invariant checks
``store.owner``     :mod:`.owner`               the owner's controls, servers' own API keys
==================  ==========================  ===================================================

The value types live in :mod:`.types` (the common ones are re-exported here). The process-wide
settings are ``store.config`` (``store.settings`` are the servers').
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

from sqlalchemy import select, update

from kontext.db import Database
from kontext.schema import bot_meta, run_migrations
from kontext.settings import Settings
from kontext.store.audit import Audit
from kontext.store.base import StoreContext
from kontext.store.budgets import Budgets
from kontext.store.credits import Credits
from kontext.store.guild_settings import GuildSettingsStore
from kontext.store.jobs import JobStore
from kontext.store.leases import LeaseStore
from kontext.store.ledger import Ledger
from kontext.store.owner import OwnerControls
from kontext.store.queue import QueueStore
from kontext.store.showcase import ShowcaseStore
from kontext.store.stats import Stats
from kontext.store.types import (
    BudgetStatus,
    GuildSettings,
    GuildStats,
    Job,
    Lease,
    LedgerEntry,
    MemberStatus,
    Reservation,
    ReserveRequest,
    StatsWindow,
)

__all__ = [
    "BudgetStatus",
    "GuildSettings",
    "GuildStats",
    "Job",
    "Lease",
    "LedgerEntry",
    "MemberStatus",
    "Reservation",
    "ReserveRequest",
    "StatsWindow",
    "Store",
]


class Store:
    """The whole persistence API, one attribute per data area. Open with :meth:`open`, close
    with :meth:`close`."""

    def __init__(
        self, db: Database, config: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.ctx = ctx = StoreContext(db, config, clock)
        self.db = db
        self.config = config
        self.settings = GuildSettingsStore(ctx)
        self.queue = QueueStore(ctx)
        self.leases = LeaseStore(ctx)
        self.jobs = JobStore(ctx)
        self.credits = Credits(ctx, self.settings)
        self.budgets = Budgets(ctx)
        self.ledger = Ledger(
            ctx, settings=self.settings, credits=self.credits, budgets=self.budgets,
            queue=self.queue,
        )
        self.showcase = ShowcaseStore(ctx)
        self.stats = Stats(ctx)
        self.audit = Audit(ctx)
        self.owner = OwnerControls(ctx)

    @classmethod
    async def open(
        cls,
        url: str,
        settings: Settings,
        *,
        engine_kwargs: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Connect to ``url`` (``DATABASE_URL`` form), apply pending migrations, return the store."""
        db = Database.from_url(url, **(engine_kwargs or {}))
        try:
            await run_migrations(db)
        except BaseException:
            await db.dispose()
            raise
        return cls(db, settings, clock)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.db.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def clock(self) -> Callable[[], float]:
        """The clock every area reads (epoch seconds); tests swap it."""
        return self.ctx.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.ctx.clock = clock

    def now(self) -> float:
        """The current time (epoch seconds) from the injected clock."""
        return self.ctx.now()

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``, from the injected clock."""
        return self.ctx.today()

    async def get_meta(self, key: str) -> str | None:
        """A small process-wide fact stored by :meth:`set_meta` (None when unset)."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(bot_meta.c.value).where(bot_meta.c.key == key))
            ).first()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (insert or replace)."""
        async with self.db.write() as conn:
            changed = await conn.execute(
                update(bot_meta)
                .where(bot_meta.c.key == key)
                .values(value=value, updated_at=self.now())
            )
            if changed.rowcount == 0:
                await conn.execute(
                    self.ctx.insert(bot_meta)
                    .values(key=key, value=value, updated_at=self.now())
                    .on_conflict_do_nothing(index_elements=["key"])
                )

    async def ping(self) -> bool:
        """True when the database answers."""
        try:
            async with self.db.read() as conn:
                await conn.execute(select(1))
            return True
        except Exception:
            return False

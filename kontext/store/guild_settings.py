"""Per-server settings in the database: read through a short per-process cache, changed with
validation (the table of :mod:`kontext.guild_settings`), every change audited.

The audit's history is read by :meth:`kontext.store.audit.Audit.settings_history`.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Row, select

from kontext.guild_settings import (
    SETTING_KEYS,
    audit_json,
    defaults,
    from_column,
    setting,
    to_column,
    validate_setting,
)
from kontext.schema import guild_settings, settings_audit
from kontext.store.base import StoreContext
from kontext.store.types import GuildSettings

#: How long a server's settings may be served from this process's cache (seconds).
SETTINGS_CACHE_TTL = 5.0


class GuildSettingsStore:
    """``store.settings``: ``get`` / ``update`` / ``reset`` a server's settings."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self._cache: dict[int, tuple[float, GuildSettings]] = {}

    def _merge(self, guild_id: int, row: Row[Any] | None) -> GuildSettings:
        values = defaults(self.ctx.config)
        overridden: set[str] = set()
        if row is not None:
            for key in SETTING_KEYS:
                stored = from_column(key, row._mapping[key])
                if stored is not None:
                    values[key] = stored
                    overridden.add(key)
        return GuildSettings(guild_id=guild_id, overridden=frozenset(overridden), **values)

    async def get(self, guild_id: int) -> GuildSettings:
        """This server's settings (served from a cache for up to a few seconds)."""
        cache = self._cache
        hit = cache.get(guild_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(guild_settings).where(guild_settings.c.guild_id == guild_id)
                )
            ).first()
        result = self._merge(guild_id, row)
        cache[guild_id] = (time.monotonic() + SETTINGS_CACHE_TTL, result)
        return result

    async def update(
        self, guild_id: int, actor_id: int | None, **changes: Any
    ) -> GuildSettings:
        """Validate and store ``changes`` (``None`` = back to the default); audit each change.

        Raises ValueError (naming the setting) before writing anything when a value is invalid.
        """
        validated = {key: validate_setting(key, value) for key, value in changes.items()}
        return await self._write_settings(guild_id, actor_id, validated)

    async def reset(self, guild_id: int, actor_id: int | None, key: str) -> GuildSettings:
        """Put ``key`` back to the process default."""
        setting(key)  # ValueError for an unknown one
        return await self._write_settings(guild_id, actor_id, {key: None})

    async def _write_settings(
        self, guild_id: int, actor_id: int | None, values: dict[str, Any]
    ) -> GuildSettings:
        now = self.ctx.now()
        async with self.db.write() as conn:
            await conn.execute(
                self.ctx.insert(guild_settings)
                .values(guild_id=guild_id)
                .on_conflict_do_nothing(index_elements=["guild_id"])
            )
            where = guild_settings.c.guild_id == guild_id
            row = (await conn.execute(select(guild_settings).where(where).with_for_update())).one()
            updates: dict[str, Any] = {}
            for key, value in values.items():
                old = from_column(key, row._mapping[key])
                new = tuple(value) if setting(key).is_list and value is not None else value
                if old == new:
                    continue
                updates[key] = to_column(key, value)
                await conn.execute(
                    settings_audit.insert().values(
                        guild_id=guild_id,
                        actor_id=actor_id,
                        key=key,
                        old_value=audit_json(key, old),
                        new_value=audit_json(key, new),
                        created_at=now,
                    )
                )
            if updates:
                await conn.execute(
                    guild_settings.update()
                    .where(where)
                    .values(**updates, updated_at=now, updated_by=actor_id)
                )
            row = (await conn.execute(select(guild_settings).where(where))).one()
        result = self._merge(guild_id, row)
        self._cache[guild_id] = (time.monotonic() + SETTINGS_CACHE_TTL, result)
        return result

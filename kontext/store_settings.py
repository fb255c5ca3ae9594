"""Per-server settings: validation, storage, audit, and a short per-process cache."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Row, select

from kontext.schema import guild_settings, settings_audit
from kontext.settings import ASPECT_RATIOS
from kontext.store_base import StoreBase
from kontext.store_types import GuildSettings

#: How long a server's settings may be served from this process's cache (seconds).
SETTINGS_CACHE_TTL = 5.0
MAX_SNOWFLAKE = 2**63 - 1
MAX_CHANNEL_IDS = 100
MAX_ROLE_IDS = 250
MAX_BLOCKED_WORDS = 200
MAX_BLOCKED_WORD_LEN = 100
LIST_KEYS = frozenset({"allowed_channel_ids", "exempt_role_ids", "blocked_words"})


def _int_in(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{key} must be a whole number")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{key} must be a whole number, got {value!r}") from None
        if not lo <= number <= hi:
            raise ValueError(f"{key} must be between {lo} and {hi}, got {number}")
        return number

    return check


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "no", "off", "0"}:
        return False
    raise ValueError(f"{key} must be true or false")


def _aspect_ratio(key: str, value: Any) -> str:
    if value not in ASPECT_RATIOS:
        raise ValueError(f"{key} must be one of {', '.join(ASPECT_RATIOS)}")
    return str(value)


def _snowflake(key: str, value: Any) -> int:
    return _int_in(1, MAX_SNOWFLAKE)(key, value)


def _optional_snowflake(key: str, value: Any) -> int | None:
    return None if value is None else _snowflake(key, value)


def _ids(cap: int) -> Callable[[str, Any], list[int]]:
    def check(key: str, value: Any) -> list[int]:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ValueError(f"{key} must be a list of ids")
        out: list[int] = []
        for item in value:
            number = _snowflake(key, item)
            if number not in out:
                out.append(number)
        if len(out) > cap:
            raise ValueError(f"{key} can hold at most {cap} ids, got {len(out)}")
        return out

    return check


def _words(key: str, value: Any) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{key} must be a list of words")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{key} must be a list of words")
        word = " ".join(item.split()).casefold()
        if not word:
            continue
        if len(word) > MAX_BLOCKED_WORD_LEN:
            raise ValueError(f"{key}: each word can be at most {MAX_BLOCKED_WORD_LEN} characters")
        if word not in out:
            out.append(word)
    if len(out) > MAX_BLOCKED_WORDS:
        raise ValueError(f"{key} can hold at most {MAX_BLOCKED_WORDS} words, got {len(out)}")
    return out


#: setting name -> validator returning the value to store
VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "starting_credits": _int_in(0, 1_000_000),
    "credits_per_image": _int_in(0, 1_000_000),
    "daily_free_credits": _int_in(0, 1_000_000),
    "cooldown_seconds": _int_in(0, 86_400),
    "jobs_per_member": _int_in(1, 10),
    "max_safety_tolerance": _int_in(0, 2),
    "default_aspect_ratio": _aspect_ratio,
    "showcase_channel_id": _optional_snowflake,
    "showcase_requires_approval": _bool,
    "allowed_channel_ids": _ids(MAX_CHANNEL_IDS),
    "exempt_role_ids": _ids(MAX_ROLE_IDS),
    "blocked_words": _words,
    "confirm_quote": _bool,
}
SETTING_KEYS: tuple[str, ...] = tuple(VALIDATORS)


def validate_setting(key: str, value: Any) -> Any:
    """The value to store for ``key`` (lists as Python lists); ValueError naming the setting."""
    check = VALIDATORS.get(key)
    if check is None:
        raise ValueError(f"unknown setting {key!r}; known: {', '.join(SETTING_KEYS)}")
    return check(key, value)


def _to_column(key: str, value: Any) -> Any:
    return json.dumps(value) if key in LIST_KEYS and value is not None else value


def _from_column(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in LIST_KEYS:
        return tuple(json.loads(value))
    if key in {"showcase_requires_approval", "confirm_quote"}:
        return bool(value)
    return value


def _audit_json(key: str, value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(list(value) if key in LIST_KEYS else value)


class GuildSettingsMixin(StoreBase):
    """``get_guild_settings`` / ``update_guild_settings`` / ``reset_guild_setting``."""

    def _defaults(self) -> dict[str, Any]:
        s = self.settings
        return {
            "starting_credits": s.starting_credits,
            "credits_per_image": s.credits_per_image,
            "daily_free_credits": s.daily_free_credits,
            "cooldown_seconds": s.cooldown_seconds,
            "jobs_per_member": s.jobs_per_member,
            "max_safety_tolerance": s.max_safety_tolerance,
            "default_aspect_ratio": s.default_aspect_ratio,
            "showcase_channel_id": None,
            "showcase_requires_approval": False,
            "allowed_channel_ids": (),
            "exempt_role_ids": (),
            "blocked_words": (),
            "confirm_quote": s.confirm_quote,
        }

    def _merge(self, guild_id: int, row: Row[Any] | None) -> GuildSettings:
        values = self._defaults()
        overridden: set[str] = set()
        if row is not None:
            for key in SETTING_KEYS:
                stored = _from_column(key, row._mapping[key])
                if stored is not None:
                    values[key] = stored
                    overridden.add(key)
        return GuildSettings(guild_id=guild_id, overridden=frozenset(overridden), **values)

    async def get_guild_settings(self, guild_id: int) -> GuildSettings:
        """This server's settings (served from a cache for up to a few seconds)."""
        cache = self._settings_cache
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

    async def update_guild_settings(
        self, guild_id: int, actor_id: int | None, **changes: Any
    ) -> GuildSettings:
        """Validate and store ``changes`` (``None`` = back to the default); audit each change.

        Raises ValueError (naming the setting) before writing anything when a value is invalid.
        """
        validated = {key: validate_setting(key, value) for key, value in changes.items()}
        return await self._write_settings(guild_id, actor_id, validated)

    async def reset_guild_setting(
        self, guild_id: int, actor_id: int | None, key: str
    ) -> GuildSettings:
        """Put ``key`` back to the process default."""
        if key not in VALIDATORS:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(SETTING_KEYS)}")
        return await self._write_settings(guild_id, actor_id, {key: None})

    async def _write_settings(
        self, guild_id: int, actor_id: int | None, values: dict[str, Any]
    ) -> GuildSettings:
        now = self.now()
        async with self.db.write() as conn:
            await conn.execute(
                self._insert(guild_settings)
                .values(guild_id=guild_id)
                .on_conflict_do_nothing(index_elements=["guild_id"])
            )
            where = guild_settings.c.guild_id == guild_id
            row = (await conn.execute(select(guild_settings).where(where).with_for_update())).one()
            updates: dict[str, Any] = {}
            for key, value in values.items():
                old = _from_column(key, row._mapping[key])
                new = tuple(value) if key in LIST_KEYS and value is not None else value
                if old == new:
                    continue
                updates[key] = _to_column(key, value)
                await conn.execute(
                    settings_audit.insert().values(
                        guild_id=guild_id,
                        actor_id=actor_id,
                        key=key,
                        old_value=_audit_json(key, old),
                        new_value=_audit_json(key, new),
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
        cache = self._settings_cache
        cache[guild_id] = (time.monotonic() + SETTINGS_CACHE_TTL, result)
        return result

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

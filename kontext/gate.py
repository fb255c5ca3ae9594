"""Which servers the bot works in: ``ALLOWED_GUILD_IDS`` and the owner's blocks.

:class:`GuildGate` answers from the settings and a short per-server cache of the owner's
controls (a block takes effect everywhere within ``ttl_s``; the reservation re-checks it inside
its transaction, so nothing is ever charged in a blocked server).
"""

from __future__ import annotations

import time
from typing import Any

from kontext.settings import Settings


class GuildGate:
    """``await gate.allows(guild_id)``: True where the bot may work."""

    def __init__(self, settings: Settings, store: Any, *, ttl_s: float = 5.0) -> None:
        self.settings = settings
        self.store = store
        self.ttl_s = ttl_s
        self._blocked: dict[int, tuple[float, bool]] = {}

    async def allows(self, guild_id: int | None) -> bool:
        if guild_id is None:
            return True  # DMs: the commands themselves are server-only
        allowed = self.settings.allowed_guild_ids
        if allowed and guild_id not in allowed:
            return False
        cached = self._blocked.get(guild_id)
        now = time.monotonic()
        if cached is None or now - cached[0] > self.ttl_s:
            control = await self.store.owner.control(guild_id)
            cached = (now, control.blocked)
            self._blocked[guild_id] = cached
        return not cached[1]

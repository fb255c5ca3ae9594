"""Snowflakes: Discord's timestamp-based ids, strictly increasing across the whole emulator."""

from __future__ import annotations

import time

from .models import DISCORD_EPOCH_MS


class Snowflakes:
    """Issues new snowflakes (one generator per emulator, shared by every part)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        """A new, strictly increasing, timestamp-based snowflake."""
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        candidate = (ms << 22) | (1 << 17)
        if candidate <= self._last:
            candidate = self._last + 1
        self._last = candidate
        return candidate

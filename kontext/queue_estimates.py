"""Where the whole bot's queue stands, for members and the owner: positions, durations, ETAs.

:class:`QueueEstimates` reads the database's queue (:meth:`kontext.store.queue.QueueStore.view`)
at most every ``view_s`` seconds, shared by every caller, and estimates a job's wait from the
rolling median of recent API durations in this process, the account's slots and RPM window and
any 429 hold. It tells the owner's account's pause, as the view reads it, to ``on_owner_paused``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kontext.store.types import AccountLimits, QueueView


class QueueEstimates:
    """Positions, durations and ETAs of the bot's queue (see the module)."""

    def __init__(
        self,
        store: Any,
        *,
        limits: AccountLimits,
        view_s: float = 0.5,
        default_duration_s: float = 18.0,
        on_owner_paused: Callable[[bool], None],
    ) -> None:
        self.store = store
        self.limits = limits
        self.view_s = view_s
        self._default_duration = default_duration_s
        self._durations: deque[float] = deque(maxlen=50)
        self._on_owner_paused = on_owner_paused
        self._view: QueueView | None = None
        self._view_at = float("-inf")
        self._view_lock = asyncio.Lock()
        self._other_views: dict[str, tuple[float, QueueView]] = {}

    def invalidate(self) -> None:
        """Positions moved (a claim here): the next :meth:`view` reads the database again."""
        self._view_at = float("-inf")

    def estimate_duration(self) -> float:
        """The rolling median of recent real API durations here (a default before any)."""
        if not self._durations:
            return self._default_duration
        return float(statistics.median(self._durations))

    def record_duration(self, seconds: float) -> None:
        if seconds > 0:
            self._durations.append(seconds)

    async def view(self, *, max_age: float | None = None, account: str | None = None) -> QueueView:
        """The whole bot's queue, read at most every ``view_s`` seconds (shared by callers).

        ``account``: a server's own account's queue instead of the owner's.
        """
        age = self.view_s if max_age is None else max_age
        if account is not None and account != self.limits.account:
            cached = self._other_views.get(account)
            if cached is None or time.monotonic() - cached[0] >= age:
                cached = (time.monotonic(), await self.store.queue.view(account))
                self._other_views[account] = cached
            return cached[1]
        async with self._view_lock:
            if self._view is None or time.monotonic() - self._view_at >= age:
                self._view = await self.store.queue.view(self.limits.account)
                self._view_at = time.monotonic()
                self._on_owner_paused(self._view.paused)
            return self._view

    @property
    def waiting_count(self) -> int:
        return len(self._view.waiting) if self._view is not None else 0

    @property
    def running_count(self) -> int:
        return len(self._view.running_started) if self._view is not None else 0

    def eta(self, view: QueueView, position: int) -> float:
        """Seconds until the job at ``position`` (1-based; 0 = running) has its result."""
        est = self.estimate_duration()
        running_left = sorted(max(0.0, est - (view.now - s)) for s in view.running_started)
        held = max(0.0, view.blocked_until - view.now)
        # the RPM window: the p-th next start waits for the (rpm - p + 1)-th newest start to age
        starts, rpm = view.recent_starts, self.limits.rpm
        index = len(starts) - rpm + max(1, position) - 1
        if 0 <= index < len(starts):
            held = max(held, starts[index] + 60.0 - view.now)
        slots = self.limits.max_concurrent
        free = max(0, slots - len(running_left))
        if position <= free:
            return held + est
        idx = position - free - 1
        rounds, slot = divmod(idx, slots)
        first_free = running_left[slot] if slot < len(running_left) else 0.0
        return max(first_free, held) + rounds * est + est

"""A :class:`~kontext.images.MemoryBudget` that remembers the most it ever held, for tests that
check how much a budget let run at once (the product's budget keeps no such record)."""

from __future__ import annotations

from kontext.images import MemoryBudget


class PeakBudget(MemoryBudget):
    """``peak_in_use``/``peak_holders``: the most bytes and holders granted at one time."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.peak_in_use = 0
        self.peak_holders = 0

    def _grant(self, take: int) -> None:  # under the budget's lock, as every grant is
        super()._grant(take)
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        self.peak_holders = max(self.peak_holders, self.holders)

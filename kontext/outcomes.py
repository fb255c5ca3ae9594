"""How jobs ended in this process: counts, metrics, and listeners (tests, tools)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from kontext.jobs import JobOutcome
from kontext.metrics import Metrics


class OutcomeLog:
    """Records each job's end here and tells the listeners subscribed to it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.counts: dict[str, int] = {}
        self._listeners: list[Callable[[JobOutcome], None]] = []

    def subscribe(self, listener: Callable[[JobOutcome], None]) -> None:
        """Call ``listener`` with every outcome from now on (an error in it is ignored)."""
        self._listeners.append(listener)

    def record(self, outcome: JobOutcome) -> JobOutcome:
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        self.metrics.job_finished(outcome.status, outcome.cause)
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener(outcome)
        return outcome

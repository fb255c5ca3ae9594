"""What the shared queue tells the pipeline: the events of :class:`~kontext.queue.SharedQueue`,
given to :meth:`~kontext.queue.SharedQueue.start` (no callback is assigned to the queue)."""

from __future__ import annotations

from typing import Protocol

from kontext.store.types import Job, Lease


class QueueHandler(Protocol):
    """What the queue tells the pipeline (every method is called from the queue's loops)."""

    def on_claim(self, job: Job, lease: Lease) -> None:
        """This process claimed ``job`` under ``lease``: run it."""

    def on_taken_over(self, job: Job, lease: Lease) -> None:
        """This process took ``job`` over from a stopped one: settle it from its row."""

    def on_lost(self, lease: Lease) -> None:
        """``lease`` is no longer this process's: stop its job here."""

    async def on_expired(self, job: Job) -> None:
        """``job`` waited past ``MAX_QUEUE_WAIT_SECONDS``."""

    async def on_refused(self, job: Job) -> None:
        """``job`` waits for a server the bot no longer serves."""

    def on_paused(self, paused: bool) -> None:
        """The owner's account was paused or resumed (by any process)."""

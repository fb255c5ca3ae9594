"""Leases on running jobs, and the fencing every change of a claimed job goes through.

A process works on a job under a *lease* (:class:`~kontext.store.types.Lease`): the owner (its
worker id), an *epoch* (``lease_epoch + 1`` at every claim or takeover) and an expiry by **the
database's clock**. The holder renews its leases (:meth:`LeaseStore.renew`); a running job whose
lease expired is taken over by another process (:meth:`LeaseStore.take_over_expired`), which
bumps the epoch.

Every change after the claim names the lease: a conditional update ``WHERE lease_owner = :owner
AND lease_epoch = :epoch`` (the ``leased`` fence of :data:`FENCES`), so a process that lost a job
changes nothing of it any more. A job nobody holds is changed under the ``unleased`` fence, a job
that must still wait in the queue under ``waiting``. The ledger's commit and refund, the jobs'
request id and this module's own statements all use these fences.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import BigInteger, Connection, Double, Text, and_, func, or_, select, update

from kontext.db import execute
from kontext.schema import ACTIVE_STATES, LEASED_STATES, jobs
from kontext.store.base import StoreContext, bind, db_now, job_from_row, state_in
from kontext.store.types import Job, Lease
from kontext.vocab import JobState

_j = jobs.c

#: The fences, by name; each takes ``job_id``, and ``leased`` also ``owner`` and ``epoch``.
FENCES: dict[str, Any] = {
    "leased": and_(
        _j.id == bind("job_id", BigInteger),
        state_in(LEASED_STATES),
        _j.lease_owner == bind("owner", Text),
        _j.lease_epoch == bind("epoch", BigInteger),
    ),
    "unleased": and_(
        _j.id == bind("job_id", BigInteger), _j.lease_owner.is_(None), state_in(ACTIVE_STATES)
    ),
    "waiting": and_(_j.id == bind("job_id", BigInteger), _j.state == JobState.ACCEPTED),
}


def fence_params(lease: Lease | None, *, waiting: bool = False) -> tuple[str, dict[str, Any]]:
    """The fence (a key of :data:`FENCES`) and its parameters for ``lease`` (None: nobody's
    job; ``waiting``: only while it still waits)."""
    if lease is not None:
        return "leased", {"owner": lease.owner, "epoch": lease.epoch}
    return ("waiting" if waiting else "unleased"), {}


class LeaseStatements:
    """The lease holder's own changes of its job, built once per dialect: the steps of the
    job's life (:class:`~kontext.vocab.JobState`) and the lease's own. Each takes the lease's
    ``job_id``, ``owner`` and ``epoch`` (:meth:`Lease.params`) and returns ``id`` when the lease
    still held and the job was in the state the step starts from."""

    def __init__(self, dialect: str) -> None:
        leased = FENCES["leased"]
        now = db_now(dialect)
        # claimed → sent, just before the first request to the API: billed from here on
        self.mark_sent = (
            update(jobs)
            .where(leased, _j.state == JobState.CLAIMED)
            .values(state=JobState.SENT, sent_at=now, api_charged=True)
            .returning(_j.id)
        )
        # sent → posting, just before the result's upload begins: never posted again (when the
        # api_done update below could not be written)
        self.mark_posting = (
            update(jobs)
            .where(leased, _j.state == JobState.SENT)
            .values(
                state=JobState.POSTING,
                posting_at=now,
                api_done_at=func.coalesce(_j.api_done_at, now),
            )
            .returning(_j.id)
        )
        # the API answered with the image: sent → posting, and the job leaves its API slot, in
        # one update (written while the image is fitted; the upload waits for it)
        self.api_done = (
            update(jobs)
            .where(leased, _j.state == JobState.SENT)
            .values(state=JobState.POSTING, posting_at=now, api_done_at=now)
            .returning(_j.id)
        )
        # claimed → accepted (no request was sent): it waits again, its place by arrival kept,
        # and counts neither as started nor as billed
        self.requeue = (
            update(jobs)
            .where(leased, _j.state == JobState.CLAIMED)
            .values(
                state=JobState.ACCEPTED,
                lease_owner=None,
                lease_expires_at=None,
                started_at=None,
                api_done_at=None,
                api_charged=False,
            )
            .returning(_j.id)
        )
        # let the lease go (the next process takes it at once)
        self.let_go = (
            update(jobs)
            .where(leased)
            .values(lease_owner=None, lease_expires_at=None)
            .returning(_j.id)
        )
        # a search that could not tell: let the lease go, counted, to be taken again only after
        # ``delay`` seconds (the API slot was freed when the job began posting)
        self.defer = (
            update(jobs)
            .where(leased, _j.state == JobState.POSTING)
            .values(
                lease_owner=None,
                lease_expires_at=now + bind("delay", Double),
                settle_tries=_j.settle_tries + 1,
            )
            .returning(_j.id)
        )


@functools.cache
def lease_statements(dialect: str) -> LeaseStatements:
    return LeaseStatements(dialect)


def api_done_tx(conn: Connection, dialect: str, lease: Lease) -> bool:
    """Inside a transaction: :meth:`LeaseStore.api_done` (True when the job moved to posting)."""
    return execute(conn, lease_statements(dialect).api_done, lease.params()).first() is not None


def read_db_now(conn: Connection, dialect: str) -> float:
    """The database's clock, read inside a transaction."""
    return float(conn.execute(select(db_now(dialect))).scalar_one())


class LeaseStore:
    """``store.leases``: renew, take over, let go, requeue, free the API slot, check a lease."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self._sql = lease_statements(ctx.dialect)

    async def renew(self, worker_id: str, lease_s: float) -> dict[int, int]:
        """Extend every lease ``worker_id`` still holds; returns ``{job_id: epoch}`` of those."""

        def tx(conn: Connection) -> dict[int, int]:
            now = read_db_now(conn, self.ctx.dialect)
            rows = conn.execute(
                update(jobs)
                .where(_j.lease_owner == worker_id, state_in(LEASED_STATES))
                .values(lease_expires_at=now + lease_s)
                .returning(_j.id, _j.lease_epoch)
            ).all()
            return {int(r.id): int(r.lease_epoch) for r in rows}

        return await self.db.transact(tx)

    async def take_over_expired(
        self, worker_id: str, lease_s: float, *, limit: int = 20
    ) -> list[tuple[Job, Lease]]:
        """Take running jobs whose lease expired (by the database's clock) or was let go.

        Each is moved with a conditional update on the epoch it was seen with, so when several
        processes sweep at once every job goes to exactly one of them, with a new epoch.
        """

        def tx(conn: Connection) -> list[tuple[Job, Lease]]:
            now = read_db_now(conn, self.ctx.dialect)
            # free: nobody's lease with no delay set, or a lease past its expiry. The UPDATE
            # checks it again (a renewal may land between the SELECT and the UPDATE on
            # Postgres, which does not lock the rows read): only a lease still expired moves
            free = or_(
                and_(_j.lease_owner.is_(None), _j.lease_expires_at.is_(None)),
                _j.lease_expires_at < now,
            )
            seen = conn.execute(
                select(_j.id, _j.lease_epoch)
                .where(state_in(LEASED_STATES), free)
                .order_by(_j.started_at, _j.id)
                .limit(limit)
            ).all()
            taken: list[tuple[Job, Lease]] = []
            for row in seen:
                moved = conn.execute(
                    update(jobs)
                    .where(
                        _j.id == row.id,
                        state_in(LEASED_STATES),
                        _j.lease_epoch == row.lease_epoch,
                        free,
                    )
                    .values(
                        lease_owner=worker_id,
                        lease_epoch=_j.lease_epoch + 1,
                        lease_expires_at=now + lease_s,
                        worker_id=worker_id,
                    )
                    .returning(*jobs.columns)
                ).first()
                if moved is not None:
                    job = job_from_row(moved)
                    taken.append((job, Lease(job.id, worker_id, int(moved.lease_epoch))))
            return taken

        return await self.db.transact(tx)

    async def let_go(self, lease: Lease) -> bool:
        """Give a running job's lease up (clean shutdown): the next process takes it at once."""
        return await self.ctx.update_one(self._sql.let_go, lease.params())

    async def requeue(self, lease: Lease) -> bool:
        """claimed → accepted: a job whose request was never sent goes back in the queue."""
        return await self.ctx.update_one(self._sql.requeue, lease.params())

    async def mark_sent(self, lease: Lease) -> bool:
        """claimed → sent, just before the first request to the API (the budget keeps it)."""
        return await self.ctx.update_one(self._sql.mark_sent, lease.params())

    async def mark_posting(self, lease: Lease) -> bool:
        """sent → posting, just before the result's upload begins (never posted again)."""
        return await self.ctx.update_one(self._sql.mark_posting, lease.params())

    async def defer(self, lease: Lease, delay_s: float) -> bool:
        """A posting job whose channel could not tell: let its lease go, the try counted, to be
        taken over again after ``delay_s`` seconds."""
        return await self.ctx.update_one(self._sql.defer, {**lease.params(), "delay": delay_s})

    async def api_done(self, lease: Lease) -> bool:
        """The API answered with the image: ``sent → posting`` (the upload may begin once this
        returned True), and the job no longer holds one of the account's slots."""
        return await self.ctx.update_one(self._sql.api_done, lease.params())

    async def holds(self, lease: Lease) -> bool:
        """True while ``lease`` is still the job's lease (a read; the database's truth)."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(_j.lease_owner, _j.lease_epoch, _j.state).where(_j.id == lease.job_id)
                )
            ).first()
        return (
            row is not None
            and row.state in LEASED_STATES
            and row.lease_owner == lease.owner
            and int(row.lease_epoch) == lease.epoch
        )

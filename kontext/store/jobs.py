"""Jobs as rows: reading them, and the two changes of a job that move no money.

A job is created by :meth:`kontext.store.ledger.Ledger.reserve` and ended by its commit or
refund; it is claimed and leased by :mod:`kontext.store.queue` and :mod:`kontext.store.leases`.
Here: the reads, the API's request id and polling URLs (fenced by the job's lease,
:data:`kontext.store.leases.FENCES`), and the result message the bot saw on the gateway.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from sqlalchemy import BigInteger, Text, func, select, update

from kontext.schema import ACTIVE_STATES, jobs
from kontext.store.base import StoreContext, bind, job_from_row
from kontext.store.leases import FENCES, fence_params
from kontext.store.types import Job, Lease
from kontext.vocab import JobState

_j = jobs.c


class JobStatements:
    """The job updates, built once per dialect (bind names where built)."""

    def __init__(self, dialect: str) -> None:
        job_id = bind("job_id", BigInteger)
        # the bot saw its own result message of a job that is posting: proof it was posted
        self.note_result_seen = (
            update(jobs)
            .where(
                _j.id == job_id,
                _j.state == JobState.POSTING,
                _j.result_message_id.is_(None),
            )
            .values(
                result_message_id=bind("message_id", BigInteger),
                result_channel_id=bind("channel_id", BigInteger),
            )
            .returning(_j.id)
        )
        # one per fence; returns ``id`` when the fence held
        self.set_api_request = {
            name: update(jobs)
            .where(where)
            .values(
                api_request_id=bind("request_id", Text),
                api_status_url=bind("status_url", Text),
                api_response_url=bind("response_url", Text),
            )
            .returning(_j.id)
            for name, where in FENCES.items()
        }


@functools.cache
def job_statements(dialect: str) -> JobStatements:
    return JobStatements(dialect)


class JobStore:
    """``store.jobs``: ``get``, ``in_state``, ``count_active``, ``set_api_request``,
    ``note_result_seen``."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self._sql = job_statements(ctx.dialect)

    async def get(self, job_id: int) -> Job | None:
        """The job, or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(jobs).where(_j.id == job_id))).first()
        return None if row is None else job_from_row(row)

    async def in_state(
        self,
        states: str | Iterable[str],
        *,
        guild_id: int | None = None,
        user_id: int | None = None,
    ) -> list[Job]:
        """Jobs in any of ``states``, oldest first."""
        wanted = [states] if isinstance(states, str) else list(states)
        stmt = select(jobs).where(_j.state.in_(wanted))
        if guild_id is not None:
            stmt = stmt.where(_j.guild_id == guild_id)
        if user_id is not None:
            stmt = stmt.where(_j.user_id == user_id)
        async with self.db.read() as conn:
            rows = await conn.execute(stmt.order_by(_j.created_at, _j.id))
            return [job_from_row(r) for r in rows]

    async def count_active(self, guild_id: int | None = None, user_id: int | None = None) -> int:
        """How many jobs are accepted or running (optionally of one server / member)."""
        stmt = select(func.count()).select_from(jobs).where(_j.state.in_(ACTIVE_STATES))
        if guild_id is not None:
            stmt = stmt.where(_j.guild_id == guild_id)
        if user_id is not None:
            stmt = stmt.where(_j.user_id == user_id)
        async with self.db.read() as conn:
            return int(await conn.scalar(stmt) or 0)

    async def note_result_seen(self, job_id: int, channel_id: int, message_id: int) -> bool:
        """The bot saw its own result message for ``job_id`` (on the gateway): while the job is
        ``posting``, remember the message, so whoever settles the job commits it even when the
        message is deleted or the channel cannot be read later. False when not posting."""
        return await self.ctx.update_one(
            self._sql.note_result_seen,
            {"job_id": job_id, "channel_id": channel_id, "message_id": message_id},
        )

    async def set_api_request(
        self,
        job_id: int,
        request_id: str | None,
        status_url: str | None = None,
        response_url: str | None = None,
        *,
        lease: Lease | None = None,
    ) -> bool:
        """Remember the API's request id and polling URLs (to resume after a restart).

        With ``lease``: only while that lease is the job's (else False, nothing changed).
        """
        fence, fence_args = fence_params(lease)
        return await self.ctx.update_one(
            self._sql.set_api_request[fence],
            {
                "job_id": job_id,
                "request_id": request_id,
                "status_url": status_url,
                "response_url": response_url,
                **fence_args,
            },
        )

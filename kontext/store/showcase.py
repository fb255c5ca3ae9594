"""Showcase posts: one per job, with its approval state (table ``showcase_posts``, migration 3).

Discord-free. :class:`ShowcaseStore` is ``store.showcase`` (it shares the store's database and
clock). Every state change is a conditional statement, so two clicks (or two
moderators, or two processes) racing on the same job settle on exactly one outcome:

* :meth:`ShowcaseStore.claim` inserts the row with ``ON CONFLICT DO NOTHING``: only the first
  share of a job wins; later ones read the existing row instead;
* :meth:`ShowcaseStore.transition` moves ``from_state → to_state`` with ``UPDATE … WHERE state =
  from_state``: only one moderator's Approve or Reject counts.

States: ``pending`` (waiting for a moderator), ``posted`` (the card is in the showcase channel,
or being posted), ``rejected`` (a moderator said no), ``removed`` (the original was deleted).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, select, update

from kontext.schema import showcase_posts
from kontext.store.base import StoreContext
from kontext.store.types import ShowcasePost
from kontext.vocab import ShowcaseState

#: the states a post may be in: the vocabulary the table's CHECK constraint is built from
STATES: tuple[str, ...] = tuple(ShowcaseState)
_s = showcase_posts.c


def _post(row: Any) -> ShowcasePost:
    return ShowcasePost(**{c.name: row._mapping[c.name] for c in showcase_posts.columns})


class ShowcaseStore:
    """``store.showcase``: the showcase posts."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db

    async def get(self, job_id: int) -> ShowcasePost | None:
        """The post of ``job_id``, or None when it was never shared."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(showcase_posts).where(_s.job_id == job_id))).first()
        return None if row is None else _post(row)

    async def claim(
        self,
        job_id: int,
        *,
        guild_id: int,
        requested_by: int,
        state: str,
        showcase_channel_id: int | None,
    ) -> bool:
        """Create the job's post in ``state``; False when the job already has one."""
        if state not in STATES:
            raise ValueError(f"unknown showcase state {state!r}")
        now = self.ctx.now()
        async with self.db.write() as conn:
            inserted = await conn.execute(
                self.ctx.insert(showcase_posts)
                .values(
                    job_id=job_id,
                    guild_id=guild_id,
                    state=state,
                    requested_by=requested_by,
                    showcase_channel_id=showcase_channel_id,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["job_id"])
                .returning(_s.job_id)
            )
            return inserted.first() is not None

    async def release(self, job_id: int, *, state: str) -> bool:
        """Forget a claim whose post could not be made (only while it is still in ``state``)."""
        async with self.db.write() as conn:
            result = await conn.execute(
                delete(showcase_posts)
                .where(_s.job_id == job_id, _s.state == state, _s.showcase_message_id.is_(None))
                .returning(_s.job_id)
            )
            return result.first() is not None

    async def transition(
        self,
        job_id: int,
        *,
        from_states: Iterable[str],
        to_state: str,
        decided_by: int | None = None,
        **values: Any,
    ) -> ShowcasePost | None:
        """Move the post from one of ``from_states`` to ``to_state``; None when it was not there.

        ``values`` may set ``showcase_channel_id``, ``showcase_message_id`` or
        ``approval_message_id`` in the same statement.
        """
        if to_state not in STATES:
            raise ValueError(f"unknown showcase state {to_state!r}")
        allowed = {"showcase_channel_id", "showcase_message_id", "approval_message_id"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)}")
        changes: dict[str, Any] = {"state": to_state, "updated_at": self.ctx.now(), **values}
        if decided_by is not None:
            changes["decided_by"] = decided_by
        async with self.db.write() as conn:
            row = (
                await conn.execute(
                    update(showcase_posts)
                    .where(_s.job_id == job_id, _s.state.in_(list(from_states)))
                    .values(**changes)
                    .returning(*showcase_posts.columns)
                )
            ).first()
        return None if row is None else _post(row)

    async def set_message(
        self, job_id: int, *, state: str, showcase_message_id: int | None = None,
        approval_message_id: int | None = None,
    ) -> bool:
        """Record where the card (or the moderators' request) was posted, if still in ``state``."""
        values: dict[str, Any] = {"updated_at": self.ctx.now()}
        if showcase_message_id is not None:
            values["showcase_message_id"] = showcase_message_id
        if approval_message_id is not None:
            values["approval_message_id"] = approval_message_id
        async with self.db.write() as conn:
            result = await conn.execute(
                update(showcase_posts)
                .where(_s.job_id == job_id, _s.state == state)
                .values(**values)
                .returning(_s.job_id)
            )
            return result.first() is not None

    async def count(self, guild_id: int, state: str | None = None) -> int:
        """How many posts a server has (in ``state``)."""
        stmt = select(_s.job_id).where(_s.guild_id == guild_id)
        if state is not None:
            stmt = stmt.where(_s.state == state)
        async with self.db.read() as conn:
            return len((await conn.execute(stmt)).all())

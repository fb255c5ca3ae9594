"""The shared job queue in the database: claims under the API accounts' limits, and the accounts.

Every process of the bot on one database serves one queue:

* a reserved job waits as a row in state ``accepted`` (no lease), ordered fairly: a member's
  second unfinished job waits behind everyone's first, then by arrival (``queued_at``);
* :meth:`QueueStore.claim_next` takes the next job for a process, under the API account's global
  limits (``MAX_CONCURRENT_JOBS`` generations in progress, ``SEGMIND_RPM`` starts in any 60 s,
  the account's pause and 429 hold) and gives it a *lease* (:mod:`kontext.store.leases`: the
  owner, a fresh epoch, an expiry by **the database's clock**). Claims are serialized (a
  Postgres advisory transaction lock; SQLite's write lock), so the limits hold across processes.

No process's own clock decides anything here: expiries and the RPM window are compared with the
database's ``now`` (:func:`kontext.store.base.db_now`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Double,
    Text,
    bindparam,
    func,
    select,
    text,
    update,
)

from kontext.db import execute
from kontext.schema import LEASED_STATES, api_accounts, guild_controls, jobs
from kontext.store.base import StoreContext, db_now, job_from_row, state_in
from kontext.store.leases import api_done_tx, read_db_now
from kontext.store.types import OWNER_ACCOUNT, AccountLimits, Claim, Job, Lease, QueueView
from kontext.vocab import JobState

_j = jobs.c
_a = api_accounts.c

#: Key of the Postgres advisory lock that serializes claims ("KQueue" in ASCII).
QUEUE_LOCK_KEY = 0x4B5175657565
RPM_WINDOW_S = 60.0


def fair_order(rows: list[Any], running: Counter[tuple[int, int]]) -> list[Any]:
    """Waiting rows in the order they start: a member's n-th unfinished job waits behind every
    member's (n-1)-th, then arrival. ``running`` counts each member's jobs already running."""
    seen: Counter[tuple[int, int]] = Counter(running)
    keyed = []
    for row in rows:  # rows come in arrival order
        member = (int(row.guild_id), int(row.user_id))
        keyed.append((seen[member], row.queued_at or 0.0, int(row.id), row))
        seen[member] += 1
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed]


class QueueStatements:
    """The claim's statements, built once per dialect (run through :func:`kontext.db.execute`),
    each with its bind parameters named where it is built."""

    def __init__(self, dialect: str) -> None:
        acct = bindparam("acct", type_=Text)
        # the database's clock
        self.now = select(db_now(dialect).label("now"))
        # every waiting job, oldest first
        self.waiting = (
            select(_j.id, _j.guild_id, _j.user_id, _j.queued_at, _j.account)
            .where(_j.state == JobState.ACCEPTED)
            .order_by(_j.queued_at, _j.id)
        )
        # the account's shared state (paused, 429 hold), if any
        self.account = select(_a.id, _a.paused, _a.blocked_until).where(_a.id == acct)
        # the account's running jobs (their members; still at the API or not)
        self.running = select(_j.guild_id, _j.user_id, _j.api_done_at).where(
            state_in(LEASED_STATES), _j.account == acct
        )
        # the servers the owner blocked (their waiting jobs are refused, never claimed)
        self.blocked = select(guild_controls.c.guild_id).where(guild_controls.c.blocked)
        # starts in the RPM window
        self.starts = (
            select(func.count())
            .select_from(jobs)
            .where(_j.started_at > bindparam("since", type_=Double), _j.account == acct)
        )
        now = bindparam("now", type_=Double)
        owner = bindparam("owner", type_=Text)
        # accepted → claimed with a new lease (nothing is sent yet: not billed)
        self.claim = (
            update(jobs)
            .where(_j.id == bindparam("job_id", type_=BigInteger), _j.state == JobState.ACCEPTED)
            .values(
                state=JobState.CLAIMED,
                lease_owner=owner,
                lease_epoch=_j.lease_epoch + 1,
                lease_expires_at=bindparam("expires", type_=Double),
                started_at=now,
                worker_id=owner,
            )
            .returning(*jobs.columns)
        )


@functools.cache
def queue_statements(dialect: str) -> QueueStatements:
    return QueueStatements(dialect)


class QueueStore:
    """``store.queue``: :meth:`claim_next`, the queue's views, and the API accounts' state."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self._queue_sql = queue_statements(ctx.dialect)

    def _now_sql(self) -> Any:
        return db_now(self.ctx.dialect)

    def _db_now(self, conn: Connection) -> float:
        return read_db_now(conn, self.ctx.dialect)

    def _lock_queue(self, conn: Connection) -> None:
        if self.ctx.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": QUEUE_LOCK_KEY})
        # SQLite: the transaction began with BEGIN IMMEDIATE (the write lock)

    # --- the queue --------------------------------------------------------------------------------

    async def claim_next(
        self,
        worker_id: str,
        limits: AccountLimits | Sequence[AccountLimits],
        *,
        lease_s: float,
        done: Lease | None = None,
    ) -> Claim:
        """Take the next waiting job for ``worker_id``, within its API account's limits.

        ``limits``: one account's, or every account's (the owner's and servers' own keys);
        accounts are served in the order of their oldest waiting job. The job moves
        ``accepted → claimed`` with a new lease; its ``started_at`` (the RPM window) is the
        database's now. It counts as billed only once it reaches ``sent``. Waiting jobs of
        servers the bot no longer serves (blocked by the owner, or outside
        ``ALLOWED_GUILD_IDS``) are never claimed: their ids come back in ``Claim.refused``.

        ``done``: a job of this worker whose API call just answered with the image: it moves to
        ``posting`` and frees its slot in the same transaction
        (:meth:`kontext.store.leases.LeaseStore.api_done`, told in ``Claim.done_posting``), so a
        freed slot is taken again in one round trip.
        """
        every = [limits] if isinstance(limits, AccountLimits) else list(limits)
        return await self.db.transact(
            lambda conn: self.claim_tx(conn, worker_id, every, lease_s, done)
        )

    def claim_tx(
        self,
        conn: Connection,
        worker_id: str,
        every: list[AccountLimits],
        lease_s: float,
        done: Lease | None = None,
    ) -> Claim:
        """:meth:`claim_next` inside a transaction (the ledger's reserve claims in its own)."""
        self._lock_queue(conn)
        posting = done is not None and api_done_tx(conn, self.ctx.dialect, done)
        claim = self._claim_any(conn, worker_id, every, lease_s)
        claim.done_posting = posting
        return claim

    def _claim_any(
        self, conn: Connection, worker_id: str, every: list[AccountLimits], lease_s: float
    ) -> Claim:
        q = self._queue_sql
        now = float(execute(conn, q.now, {}).scalar_one())
        known = {lim.account: lim for lim in every}
        by_account: dict[str, list[Any]] = {}
        refused: list[int] = []
        waiting_rows = execute(conn, q.waiting, {}).all()
        blocked = {int(g) for (g,) in execute(conn, q.blocked, {}).all()} if waiting_rows else set()
        allowed = self.ctx.config.allowed_guild_ids
        for row in waiting_rows:
            if int(row.guild_id) in blocked or (allowed and int(row.guild_id) not in allowed):
                refused.append(int(row.id))
            elif row.account in known:
                by_account.setdefault(row.account, []).append(row)
        accounts = {}
        for name in (OWNER_ACCOUNT, *by_account):
            state = execute(conn, q.account, {"acct": name}).first()
            if state is not None:
                accounts[name] = state
        owner = accounts.get(OWNER_ACCOUNT)
        result = Claim(
            empty=True, paused=bool(owner is not None and owner.paused), refused=refused
        )
        waits: list[float] = []
        for name, rows in by_account.items():  # oldest waiting job first (dicts keep order)
            state = accounts.get(name)
            if state is not None and state.paused:
                continue
            claim = self._claim_account(conn, worker_id, known[name], rows, state, now, lease_s)
            if claim.job is not None:
                claim.paused = result.paused
                claim.refused = refused
                return claim
            waits.append(claim.wait_s)
        if waits:
            result.empty = False
            result.wait_s = min(waits)
        return result

    def _claim_account(
        self,
        conn: Connection,
        worker_id: str,
        limits: AccountLimits,
        waiting: list[Any],
        state: Any,
        now: float,
        lease_s: float,
    ) -> Claim:
        q = self._queue_sql
        acct = {"acct": limits.account}
        mine = _j.account == limits.account
        if state is not None and state.blocked_until > now:
            return Claim(wait_s=float(state.blocked_until) - now)
        running_rows = execute(conn, q.running, acct).all()
        if sum(1 for r in running_rows if r.api_done_at is None) >= limits.max_concurrent:
            return Claim(wait_s=0.0)
        since = {**acct, "since": now - RPM_WINDOW_S}
        starts = execute(conn, q.starts, since).scalar_one()
        if starts >= limits.rpm:  # the rpm-th newest start must leave the window first
            in_window = (_j.started_at > now - RPM_WINDOW_S, mine)
            nth = conn.execute(
                select(_j.started_at)
                .where(*in_window)
                .order_by(_j.started_at.desc())
                .offset(limits.rpm - 1)
                .limit(1)
            ).scalar_one()
            return Claim(wait_s=max(0.001, float(nth) + RPM_WINDOW_S - now))
        running = Counter((int(r.guild_id), int(r.user_id)) for r in running_rows)
        for row in fair_order(waiting, running):
            claimed = execute(
                conn,
                q.claim,
                {"job_id": row.id, "owner": worker_id, "expires": now + lease_s, "now": now},
            ).first()
            if claimed is not None:
                job = job_from_row(claimed)
                return Claim(job=job, lease=Lease(job.id, worker_id, int(claimed.lease_epoch)))
        return Claim(empty=True)  # pragma: no cover - the rows were read under the queue lock

    async def view(self, account: str = OWNER_ACCOUNT) -> QueueView:
        """Every waiting job in start order, the generations in progress, the account's state."""
        async with self.db.read() as conn:
            now = float((await conn.execute(select(self._now_sql()))).scalar_one())
            mine = _j.account == account
            waiting = (
                await conn.execute(
                    select(_j.id, _j.guild_id, _j.user_id, _j.queued_at)
                    .where(_j.state == JobState.ACCEPTED, mine)
                    .order_by(_j.queued_at, _j.id)
                )
            ).all()
            running = (
                await conn.execute(
                    select(_j.guild_id, _j.user_id, _j.started_at, _j.api_done_at).where(
                        state_in(LEASED_STATES), mine
                    )
                )
            ).all()
            acct = (
                await conn.execute(
                    select(_a.paused, _a.blocked_until).where(_a.id == account)
                )
            ).first()
            starts = (
                await conn.execute(
                    select(_j.started_at)
                    .where(_j.started_at > now - RPM_WINDOW_S, mine)
                    .order_by(_j.started_at)
                )
            ).all()
        per_member = Counter((int(r.guild_id), int(r.user_id)) for r in running)
        order = fair_order(list(waiting), per_member)
        view = QueueView(now=now)
        view.waiting = [int(r.id) for r in order]
        view.running_started = sorted(
            float(r.started_at or now) for r in running if r.api_done_at is None
        )
        for r in waiting:
            key = (int(r.guild_id), int(r.user_id))
            view.waiting_members[key] = view.waiting_members.get(key, 0) + 1
        view.recent_starts = [float(t) for (t,) in starts]
        if acct is not None:
            view.paused = bool(acct.paused)
            view.blocked_until = float(acct.blocked_until)
        return view

    async def count_waiting(self) -> int:
        """Jobs waiting in the queue (every process's)."""
        async with self.db.read() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).select_from(jobs).where(_j.state == JobState.ACCEPTED)
                    )
                ).scalar_one()
            )

    async def expired_waiting(self, max_wait_s: float, *, limit: int = 50) -> list[Job]:
        """Waiting jobs older than ``max_wait_s`` by the database's clock (to refund)."""
        async with self.db.read() as conn:
            now = float((await conn.execute(select(self._now_sql()))).scalar_one())
            rows = (
                await conn.execute(
                    select(jobs)
                    .where(_j.state == JobState.ACCEPTED, _j.queued_at < now - max_wait_s)
                    .order_by(_j.queued_at)
                    .limit(limit)
                )
            ).all()
        return [job_from_row(r) for r in rows]

    async def waiting_jobs(self, *, limit: int = 10_000) -> list[Job]:
        """Every waiting job (in arrival order)."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(jobs).where(_j.state == JobState.ACCEPTED).order_by(_j.queued_at).limit(limit)
                )
            ).all()
        return [job_from_row(r) for r in rows]

    # --- API accounts -------------------------------------------------------------------------

    async def _account_update(self, account: str, values: dict[str, Any]) -> None:
        def tx(conn: Connection) -> None:
            now = self._db_now(conn)
            done = conn.execute(
                update(api_accounts).where(_a.id == account).values(**values, updated_at=now)
            ).rowcount
            if not done:
                conn.execute(
                    self.ctx.insert(api_accounts)
                    .values(id=account, updated_at=now, **values)
                    .on_conflict_do_nothing(index_elements=["id"])
                )

        await self.db.transact(tx)

    async def hold_account(self, account: str, seconds: float) -> None:
        """Start no job of ``account`` for ``seconds`` (a 429), in every process."""

        def tx(conn: Connection) -> None:
            now = self._db_now(conn)
            until = now + seconds
            row = conn.execute(select(_a.blocked_until).where(_a.id == account)).first()
            if row is None:
                conn.execute(
                    self.ctx.insert(api_accounts)
                    .values(id=account, blocked_until=until, updated_at=now)
                    .on_conflict_do_nothing(index_elements=["id"])
                )
            elif row.blocked_until < until:
                conn.execute(
                    update(api_accounts)
                    .where(_a.id == account)
                    .values(blocked_until=until, updated_at=now)
                )

        await self.db.transact(tx)

    async def set_account_paused(self, account: str, paused: bool, reason: str | None = None) -> None:
        """Pause (the account needs its owner) or resume ``account`` for every process."""
        await self._account_update(account, {"paused": paused, "paused_reason": reason})

    async def account_paused(self, account: str = OWNER_ACCOUNT) -> bool:
        async with self.db.read() as conn:
            row = (await conn.execute(select(_a.paused).where(_a.id == account))).first()
        return bool(row is not None and row.paused)

"""The persistence API of the bot: credits ledger, jobs, server settings, workers and stats.

Discord-free. Every balance change happens inside one transaction together with its ledger row,
and every check that guards money is part of a conditional ``UPDATE … WHERE … RETURNING``, so
concurrent tasks and processes can never overdraw a member, charge a job twice, or pass the daily
budget. The job id is the Discord interaction id; inserting it is the idempotency key.

Lifecycle of a job: :meth:`Store.reserve` (state ``accepted``, credits held, budget reserved) →
:meth:`Store.mark_running` → :meth:`Store.commit` (``posted``) or :meth:`Store.refund`
(``refunded``, or ``failed`` when it cost nothing). Both ends are idempotent and exclusive.

The money transactions are synchronous bodies run by :meth:`kontext.db.Database.transact` (one
hop off the event loop on SQLite, with group commit; ``run_sync`` on Postgres), built from the
prebuilt statements of :class:`kontext.store_base.Statements`.

The parts live in ``store_settings.py`` (server settings), ``store_admin.py`` (workers, stats,
invariants), ``store_base.py`` and ``store_types.py`` (the dataclasses, re-exported here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Self

from sqlalchemy import Connection, select, update

from kontext.db import Database, execute
from kontext.errors import (
    BudgetExhausted,
    GuildBudgetExhausted,
    GuildNotEnabled,
    InsufficientCredits,
    JobAlreadyExists,
    OnCooldown,
    QueueFull,
    TooManyJobs,
)
from kontext.schema import bot_meta, run_migrations
from kontext.settings import Settings
from kontext.store_admin import AdminMixin
from kontext.store_base import fence_params
from kontext.store_members import MembersMixin
from kontext.store_owner import OwnerMixin
from kontext.store_queue import OWNER_ACCOUNT, Lease, QueueMixin
from kontext.store_settings import GuildSettingsMixin
from kontext.store_types import (
    BudgetStatus,
    GuildSettings,
    GuildStats,
    Job,
    LedgerEntry,
    MemberStatus,
    Reservation,
    ReserveRequest,
    StatsWindow,
    until_midnight_utc,
    usd_to_micros,
    utc_day,
)
from kontext.vocab import JobState, LedgerKind

#: the cap of a server without one (its spend is still booked, for the owner's listing)
NO_CAP = 2**62

__all__ = [
    "BudgetStatus",
    "GuildSettings",
    "GuildStats",
    "Job",
    "Lease",
    "LedgerEntry",
    "MemberStatus",
    "Reservation",
    "ReserveRequest",
    "StatsWindow",
    "Store",
]


class Store(GuildSettingsMixin, MembersMixin, AdminMixin, QueueMixin, OwnerMixin):
    """The whole persistence API. Open with :meth:`open`, close with :meth:`close`."""

    @classmethod
    async def open(
        cls,
        url: str,
        settings: Settings,
        *,
        engine_kwargs: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Connect to ``url`` (``DATABASE_URL`` form), apply pending migrations, return the store."""
        db = Database.from_url(url, **(engine_kwargs or {}))
        try:
            await run_migrations(db, clock=clock)
        except BaseException:
            await db.dispose()
            raise
        return cls(db, settings, clock)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.db.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def get_meta(self, key: str) -> str | None:
        """A small process-wide fact stored by :meth:`set_meta` (None when unset)."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(select(bot_meta.c.value).where(bot_meta.c.key == key))
            ).first()
        return None if row is None else str(row[0])

    async def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` (insert or replace)."""
        async with self.db.write() as conn:
            changed = await conn.execute(
                update(bot_meta)
                .where(bot_meta.c.key == key)
                .values(value=value, updated_at=self.now())
            )
            if changed.rowcount == 0:
                await conn.execute(
                    self._insert(bot_meta)
                    .values(key=key, value=value, updated_at=self.now())
                    .on_conflict_do_nothing(index_elements=["key"])
                )

    async def ping(self) -> bool:
        """True when the database answers."""
        try:
            async with self.db.read() as conn:
                await conn.execute(select(1))
            return True
        except Exception:
            return False

    # --- reserve / commit / refund ---------------------------------------------------------
    #
    # Each of these is a sync transaction body run by Database.transact: on SQLite in one hop
    # to the database's transaction thread, on Postgres through run_sync. An exception raised
    # in a body rolls the whole transaction back.

    async def reserve(self, req: ReserveRequest) -> Reservation:
        """Create the job and hold its price, in one transaction.

        Raises JobAlreadyExists (nothing changed), or OnCooldown / TooManyJobs /
        InsufficientCredits / BudgetExhausted (everything rolled back, the job row too).
        Ledger rows: ``start`` (new member, when the starting credits are > 0), ``daily`` (first
        job of a UTC day, when it tops the balance up), always ``reserve`` (even at cost 0).
        The cooldown is neither checked nor set for exempt members or when the server's
        cooldown is 0.
        """
        gs = await self.get_guild_settings(req.guild_id)
        params = json.dumps(req.params, sort_keys=True, default=str)
        return await self.db.transact(lambda conn: self._reserve_tx(conn, req, gs, params))

    async def precheck(self, req: ReserveRequest) -> None:
        """Refuse early — before any download — what :meth:`reserve` would refuse now.

        One read transaction: the server enabled, the member's credits (with starting and daily
        credits), cooldown and jobs in flight, the owner's budgets and the queue's room. Raises
        the same errors as :meth:`reserve`; passing it guarantees nothing (reserve decides,
        atomically), it only keeps a member who cannot be served from costing any work.
        """
        g, u = req.guild_id, req.user_id
        gs = await self.get_guild_settings(g)
        now = self.now()
        today = utc_day(now)
        allowed = self.settings.allowed_guild_ids
        if allowed and g not in allowed:
            raise GuildNotEnabled(f"server {g} is not enabled")
        async with self.db.read() as conn:
            row = (
                await conn.execute(self._sql.precheck, {"g": g, "u": u, "today": today})
            ).one()
        if row.blocked:
            raise GuildNotEnabled(f"server {g} is blocked")
        cost = gs.credits_per_image
        if row.balance is None:  # a new member
            balance, inflight, cooldown_until = gs.starting_credits, 0, None
            topup = gs.daily_free_credits
        else:
            balance, inflight = int(row.balance), int(row.inflight)
            cooldown_until = row.cooldown_until
            topup = gs.daily_free_credits if row.last_daily != today else 0
        if not req.exempt_from_cooldown and gs.cooldown_seconds > 0 and cooldown_until:
            if float(cooldown_until) > now:
                raise OnCooldown(retry_after=float(cooldown_until) - now)
        if inflight >= gs.jobs_per_member:
            raise TooManyJobs(limit=gs.jobs_per_member)
        if max(balance, topup) < cost:  # a top-up never lowers: it tops up *to* the daily amount
            raise InsufficientCredits(balance=balance, needed=cost)
        if req.account == OWNER_ACCOUNT:
            usd = usd_to_micros(self.settings.cost_per_image_usd)
            hours, minutes = until_midnight_utc(now)
            if int(row.spent or 0) + usd > usd_to_micros(self.settings.daily_budget_usd):
                raise BudgetExhausted("daily budget", hours=hours, minutes=minutes)
            guild_cap_usd = self.settings.guild_daily_budget_usd
            if row.guild_cap is not None:
                guild_cap_usd = float(row.guild_cap)
            if guild_cap_usd > 0 and int(row.guild_spent or 0) + usd > usd_to_micros(guild_cap_usd):
                raise GuildBudgetExhausted(f"server {g}", hours=hours, minutes=minutes)
        if row.waiting >= self.settings.max_queue_size:
            raise QueueFull(f"queue at {self.settings.max_queue_size}")

    def _reserve_tx(
        self, conn: Connection, req: ReserveRequest, gs: GuildSettings, params: str
    ) -> Reservation:
        sql = self._sql
        cost = gs.credits_per_image
        usd = usd_to_micros(self.settings.cost_per_image_usd)
        cap = usd_to_micros(self.settings.daily_budget_usd)
        check_cooldown = not req.exempt_from_cooldown and gs.cooldown_seconds > 0
        g, u = req.guild_id, req.user_id
        now = self.now()
        today = utc_day(now)
        until = now + gs.cooldown_seconds if check_cooldown else None
        job_values = {
            "id": req.job_id,
            "guild_id": g,
            "channel_id": req.channel_id,
            "user_id": u,
            "state": JobState.ACCEPTED,
            "params": params,
            "seed": req.seed,
            "cost_credits": cost,
            "cost_usd_micros": usd,
            "cooldown_until": until,
            "locale": req.locale,
            "application_id": req.application_id,
            "interaction_token": req.interaction_token,
            "worker_id": req.worker_id,
            "created_at": now,
            "api_charged": False,
            "parent_job_id": req.parent_job_id,
            "account": req.account,
        }
        control = execute(conn, sql.guild_control, {"g": g}).first()
        allowed = self.settings.allowed_guild_ids
        if (allowed and g not in allowed) or (control is not None and control.blocked):
            raise GuildNotEnabled(f"server {g} is not enabled")
        guild_cap_usd = self.settings.guild_daily_budget_usd
        if control is not None and control.daily_budget_usd is not None:
            guild_cap_usd = float(control.daily_budget_usd)
        if execute(conn, sql.insert_job, job_values).first() is None:
            raise JobAlreadyExists(f"job {req.job_id} exists", job_id=req.job_id)
        # the whole bot's queue (every process's): this job is one of the waiting ones now
        waiting = execute(conn, sql.count_waiting, {}).scalar_one()
        if waiting > self.settings.max_queue_size:
            raise QueueFull(f"queue at {self.settings.max_queue_size}")
        self._ensure_member(conn, g, u, gs.starting_credits, now)
        self._daily_topup(conn, gs, u, today, now, req.job_id)
        balance = self._charge(conn, gs, u, cost, now, until, check_cooldown)
        self._ledger(
            conn,
            guild_id=g,
            user_id=u,
            delta=-cost,
            kind=LedgerKind.RESERVE,
            balance_after=balance,
            now=now,
            job_id=req.job_id,
        )
        # one upsert books the day's budget: a new day's row starts at this job's share (so the
        # cap is checked here first), an existing row grows only while it stays within the cap
        if req.account == OWNER_ACCOUNT:  # a server's own key spends none of the owner's money
            hours, minutes = until_midnight_utc(now)
            booked = usd <= cap and (
                execute(conn, sql.book_budget, {"b_day": today, "usd": usd, "cap": cap}).first()
                is not None
            )
            if not booked:
                raise BudgetExhausted(
                    f"daily budget of {self.settings.daily_budget_usd} USD",
                    hours=hours, minutes=minutes,
                )
            # every server's spend is booked (the owner's listing); 0 means no cap
            guild_cap = usd_to_micros(guild_cap_usd) if guild_cap_usd > 0 else NO_CAP
            if not (
                usd <= guild_cap
                and execute(
                    conn, sql.book_guild_budget, {"g": g, "b_day": today, "usd": usd, "cap": guild_cap}
                ).first()
                is not None
            ):
                raise GuildBudgetExhausted(
                    f"server {g}: daily budget of {guild_cap_usd} USD", hours=hours, minutes=minutes
                )
        claim = None
        if req.claim_for is not None and waiting == 1:
            # nothing else waits: claim it in this transaction when the account has room (one
            # commit, one round trip less for every job that does not have to queue)
            worker_id, every, lease_s = req.claim_for
            claim = self._claim_tx(conn, worker_id, every, lease_s)
        return Reservation(
            job_id=req.job_id, cost=cost, balance_after=balance, cooldown_until=until, claim=claim
        )

    def _daily_topup(
        self,
        conn: Connection,
        gs: GuildSettings,
        user_id: int,
        today: str,
        now: float,
        job_id: int,
    ) -> None:
        """Claim today's free credits (once per UTC day) and top the balance up to the cap.

        Credits held by the member's unfinished jobs count as theirs: 4 + 1 held against a
        daily 3 tops up nothing.
        """
        if gs.daily_free_credits <= 0:
            return
        who = {"g": gs.guild_id, "u": user_id}
        claimed = execute(conn, self._sql.claim_daily, {**who, "today": today}).first()
        if claimed is None:
            return
        held = execute(conn, self._sql.held_credits, {**who, "job_id": job_id}).scalar_one()
        delta = max(0, gs.daily_free_credits - int(claimed.balance) - int(held))
        if delta == 0:
            return
        balance = execute(conn, self._sql.add_balance, {**who, "delta": delta}).scalar_one()
        self._ledger(
            conn,
            guild_id=gs.guild_id,
            user_id=user_id,
            delta=delta,
            kind=LedgerKind.DAILY,
            balance_after=balance,
            now=now,
            reason=f"daily free credits {today}",
        )

    def _charge(
        self,
        conn: Connection,
        gs: GuildSettings,
        user_id: int,
        cost: int,
        now: float,
        until: float | None,
        check_cooldown: bool,
    ) -> int:
        """The atomic conditional charge; raises the member's error when it cannot happen."""
        params: dict[str, Any] = {
            "g": gs.guild_id,
            "u": user_id,
            "cost": cost,
            "limit": gs.jobs_per_member,
        }
        stmt = self._sql.charge
        if check_cooldown:
            stmt = self._sql.charge_with_cooldown
            params.update(now=now, until=until)
        for _attempt in range(3):
            charged = execute(conn, stmt, params).first()
            if charged is not None:
                return int(charged.balance)
            # Why not? Lock the row (Postgres) so the answer is the current truth.
            row = self._member_row(conn, gs.guild_id, user_id, lock=True)
            assert row is not None  # created earlier in this transaction
            if check_cooldown and row.cooldown_until is not None and row.cooldown_until > now:
                raise OnCooldown(retry_after=float(row.cooldown_until) - now)
            if row.inflight >= gs.jobs_per_member:
                raise TooManyJobs(limit=gs.jobs_per_member)
            if row.balance < cost:
                raise InsufficientCredits(balance=int(row.balance), needed=cost)
            # The row changed between the two statements (Postgres); try again under the lock.
        raise RuntimeError("conditional charge did not settle")  # pragma: no cover

    async def mark_running(self, job_id: int) -> bool:
        """accepted → running (sets ``started_at``); False when the job was not accepted."""
        return await self._job_update(self._sql.mark_running, {"job_id": job_id, "now": self.now()})

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
        return await self._job_update(
            self._sql.set_api_request[fence],
            {
                "job_id": job_id,
                "request_id": request_id,
                "status_url": status_url,
                "response_url": response_url,
                **fence_args,
            },
        )

    async def commit(
        self,
        job_id: int,
        *,
        result_message_id: int | None,
        result_channel_id: int | None,
        duration_s: float | None = None,
        lease: Lease | None = None,
    ) -> bool:
        """Make the charge final after the image was posted. True when this call committed.

        ``lease``: the job's lease (a claimed job is committed only by its lease holder); None
        for a job nobody holds.
        """
        fence, fence_args = fence_params(lease)

        def tx(conn: Connection) -> bool:
            sql = self._sql
            now = self.now()
            params: dict[str, Any] = {
                "job_id": job_id,
                "now": now,
                "result_message": result_message_id,
                "result_channel": result_channel_id,
                **fence_args,
            }
            stmt = sql.commit_job_timed[fence]
            if duration_s is not None:
                stmt = sql.commit_job[fence]
                params["duration"] = duration_s
            job = execute(conn, stmt, params).first()
            if job is None:
                return False
            balance = execute(
                conn, sql.release_inflight, {"g": job.guild_id, "u": job.user_id}
            ).scalar_one()
            self._ledger(
                conn,
                guild_id=job.guild_id,
                user_id=job.user_id,
                delta=0,
                kind=LedgerKind.COMMIT,
                balance_after=balance,
                now=now,
                job_id=job_id,
            )
            return True

        return await self.db.transact(tx)

    async def refund(
        self,
        job_id: int,
        *,
        cause: str,
        clear_cooldown: bool = True,
        api_charged: bool | None = False,
        lease: Lease | None = None,
        waiting_only: bool = False,
    ) -> bool:
        """Give the job's credits back (and its budget share, unless the API billed it).

        ``api_charged``: True when the API billed the call, False when its answer proves nothing
        was generated, None when this caller cannot know (the database's record stands: a job
        counts as billed from its claim on). ``clear_cooldown`` lifts the cooldown only if it is
        still the one this job set. ``lease``: the job's lease (a claimed job is refunded only by
        its lease holder); ``waiting_only``: refund only a job that still waits in the queue.
        True when this call refunded; False when the job is unknown, posted, already ended, or
        not this caller's to end.
        """
        fence, fence_args = fence_params(lease, waiting=waiting_only)

        def tx(conn: Connection) -> bool:
            sql = self._sql
            now = self.now()
            job = execute(
                conn,
                sql.refund_job[fence],
                {
                    "job_id": job_id,
                    "now": now,
                    "cause": cause,
                    "billed": api_charged,
                    **fence_args,
                },
            ).first()
            if job is None:
                return False
            member: dict[str, Any] = {"g": job.guild_id, "u": job.user_id, "cost": job.cost_credits}
            stmt = sql.refund_member
            if clear_cooldown and job.cooldown_until is not None:
                stmt = sql.refund_member_clear_cooldown
                member["job_cooldown"] = job.cooldown_until
            balance = execute(conn, stmt, member).scalar_one()
            self._ledger(
                conn,
                guild_id=job.guild_id,
                user_id=job.user_id,
                delta=int(job.cost_credits),
                kind=LedgerKind.REFUND,
                balance_after=balance,
                now=now,
                job_id=job_id,
                reason=cause,
            )
            if not job.api_charged and job.account == OWNER_ACCOUNT:
                share = {"b_day": utc_day(job.created_at), "usd": job.cost_usd_micros}
                execute(conn, sql.release_budget, share)
                execute(conn, sql.release_guild_budget, {**share, "g": job.guild_id})
            return True

        return await self.db.transact(tx)

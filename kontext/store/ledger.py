"""A job's money: its reservation, its commit or refund (the ledger's job rows), fenced.

Discord-free. Every balance change happens inside one transaction together with its ledger row,
and every check that guards money is part of a conditional ``UPDATE … WHERE … RETURNING``, so
concurrent tasks and processes can never overdraw a member, charge a job twice, or pass the daily
budget. The job id is the Discord interaction id; inserting it is the idempotency key.

Lifecycle of a job: :meth:`Ledger.reserve` (state ``accepted``, credits held, budget reserved) →
a claim (:mod:`kontext.store.queue`) → :meth:`Ledger.commit` (``posted``) or
:meth:`Ledger.refund` (``refunded``, or ``failed`` when it cost nothing). Both ends are
idempotent and exclusive, and fenced by the job's lease (:mod:`kontext.store.leases`).

The transactions are synchronous bodies run by :meth:`kontext.db.Database.transact` (one hop off
the event loop on SQLite, with group commit; ``run_sync`` on Postgres); an exception raised in a
body rolls the whole transaction back. Their statements (:class:`LedgerStatements`) are built
once per dialect in this module, beside the transactions that bind them; the members' rows
(:mod:`kontext.store.credits`) and the budgets (:mod:`kontext.store.budgets`) bring theirs.

Why one file of ~550 lines: :meth:`precheck` must refuse exactly what :meth:`reserve` would, and
:meth:`refund` undoes exactly what :meth:`reserve` booked; they are read side by side.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Double,
    Integer,
    String,
    Text,
    and_,
    case,
    func,
    literal,
    null,
    or_,
    select,
    update,
)

from kontext.db import execute
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
from kontext.schema import (
    budget_days,
    guild_budget_days,
    guild_controls,
    jobs,
    members,
)
from kontext.store.base import StoreContext, bind, db_now, dialect_insert
from kontext.store.budgets import Budgets
from kontext.store.credits import Credits
from kontext.store.guild_settings import GuildSettingsStore
from kontext.store.leases import FENCES, fence_params
from kontext.store.queue import QueueStore
from kontext.store.types import (
    OWNER_ACCOUNT,
    GuildSettings,
    Lease,
    Reservation,
    ReserveRequest,
    until_midnight_utc,
    usd_to_micros,
    utc_day,
)
from kontext.vocab import JobState, LedgerKind

_m = members.c
_j = jobs.c
_b = budget_days.c
_gb = guild_budget_days.c
_gc = guild_controls.c


class LedgerStatements:
    """The statements of the money transactions, built once per dialect.

    Each names its bind parameters where it is built (``bind("g", …)``); the transaction below
    that runs it passes them by the same names.
    """

    def __init__(self, dialect: str) -> None:
        g, u = bind("g", BigInteger), bind("u", BigInteger)
        who = and_(_m.guild_id == g, _m.user_id == u)
        now = bind("now", Double)
        today = bind("today", Text)
        cost = bind("cost", BigInteger)
        inflight_minus_one = case((_m.inflight > 0, _m.inflight - 1), else_=0)

        # --- reserve ---
        # the job's columns; returns ``id`` when inserted, nothing when it existed.
        # ``queued_at`` is the database's clock (the queue's order and wait bound).
        self.insert_job = (
            dialect_insert(dialect, jobs)
            .values(queued_at=db_now(dialect))
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(_j.id)
        )
        # the jobs waiting in the queue, every process's
        self.count_waiting = (
            select(func.count()).select_from(jobs).where(_j.state == JobState.ACCEPTED)
        )
        charge_where = (who, _m.balance >= cost, _m.inflight < bind("limit", Integer))
        charge_values = {"balance": _m.balance - cost, "inflight": _m.inflight + 1}
        # the conditional charge; returns the new balance
        self.charge = (
            update(members).where(*charge_where).values(**charge_values).returning(_m.balance)
        )
        # the charge that also checks the cooldown (against ``now``) and sets it (``until``)
        self.charge_with_cooldown = (
            update(members)
            .where(*charge_where, or_(_m.cooldown_until.is_(None), _m.cooldown_until <= now))
            .values(**charge_values, cooldown_until=bind("until", Double))
            .returning(_m.balance)
        )
        # the owner's controls of the server (blocked, own budget), if any
        self.guild_control = select(_gc.blocked, _gc.daily_budget_usd).where(_gc.guild_id == g)

        def one(column: Any, *where: Any) -> Any:
            return select(column).where(*where).scalar_subquery()

        # everything :meth:`Ledger.precheck` reads, in one statement (one round trip): the
        # owner's controls of the server, the member's row (NULLs when new), both budgets'
        # spend today and the queue's length
        self.precheck = select(
            one(_gc.blocked, _gc.guild_id == g).label("blocked"),
            one(_gc.daily_budget_usd, _gc.guild_id == g).label("guild_cap"),
            one(_m.balance, who).label("balance"),
            one(_m.inflight, who).label("inflight"),
            one(_m.cooldown_until, who).label("cooldown_until"),
            one(_m.last_daily, who).label("last_daily"),
            one(_b.reserved_micros, _b.day == today).label("spent"),
            one(_gb.reserved_micros, _gb.guild_id == g, _gb.day == today).label("guild_spent"),
            select(func.count())
            .select_from(jobs)
            .where(_j.state == JobState.ACCEPTED)
            .scalar_subquery()
            .label("waiting"),
        )

        # --- commit (fenced: one statement per fence of kontext.store.leases.FENCES) ---
        posted = {
            "state": JobState.POSTED,
            "api_charged": True,  # the API made the image that was posted: it billed it
            "interaction_token": None,  # an ended job needs it no more: keep no live secret
            "finished_at": now,
            "result_message_id": bind("result_message", BigInteger),
            "result_channel_id": bind("result_channel", BigInteger),
            "lease_owner": None,
            "lease_expires_at": None,
        }
        # returns guild_id, user_id
        # a leased job is committed only from ``posting`` (its upload began under that lease)
        commit_where = {**FENCES, "leased": and_(FENCES["leased"], _j.state == JobState.POSTING)}
        self.commit_job = {
            name: update(jobs)
            .where(where)
            .values(**posted, duration_s=bind("duration", Double))
            .returning(_j.guild_id, _j.user_id)
            for name, where in commit_where.items()
        }
        # as commit_job without ``duration``: measured from start (or creation)
        self.commit_job_timed = {
            name: update(jobs)
            .where(where)
            .values(**posted, duration_s=now - func.coalesce(_j.started_at, _j.created_at))
            .returning(_j.guild_id, _j.user_id)
            for name, where in commit_where.items()
        }
        # one job fewer in flight; returns the balance
        self.release_inflight = (
            update(members).where(who).values(inflight=inflight_minus_one).returning(_m.balance)
        )

        # --- refund (fenced) ---
        refunded = {
            "state": case(
                (_j.cost_credits == 0, literal(JobState.FAILED, String)),
                else_=literal(JobState.REFUNDED, String),
            ),
            "failure_cause": bind("cause", Text),
            "finished_at": now,
            # ``billed``: true = the API billed it; false = the answer proves nothing was made;
            # NULL = not known here: the database's record stands
            "api_charged": func.coalesce(bind("billed", Boolean), _j.api_charged),
            "interaction_token": None,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        # ends the job; returns what the refund needs
        self.refund_job = {
            name: update(jobs)
            .where(where)
            .values(**refunded)
            .returning(
                _j.guild_id,
                _j.user_id,
                _j.cost_credits,
                _j.cost_usd_micros,
                _j.cooldown_until,
                _j.created_at,
                _j.api_charged,
                _j.account,
            )
            for name, where in FENCES.items()
        }
        credit_back = {"balance": _m.balance + cost, "inflight": inflight_minus_one}
        # credits back, one job fewer in flight; returns the balance
        self.refund_member = update(members).where(who).values(**credit_back).returning(_m.balance)
        # the same, and lifts the cooldown if it is still the one the job set (``job_cooldown``)
        self.refund_member_clear_cooldown = (
            update(members)
            .where(who)
            .values(
                **credit_back,
                cooldown_until=case(
                    (_m.cooldown_until == bind("job_cooldown", Double), null()),
                    else_=_m.cooldown_until,
                ),
            )
            .returning(_m.balance)
        )


@functools.cache
def ledger_statements(dialect: str) -> LedgerStatements:
    """The prebuilt statements for ``dialect`` (``"sqlite"`` or ``"postgresql"``)."""
    return LedgerStatements(dialect)


class Ledger:
    """``store.ledger``: a job's money: reserve / precheck / commit / refund."""

    def __init__(
        self,
        ctx: StoreContext,
        *,
        settings: GuildSettingsStore,
        credits: Credits,
        budgets: Budgets,
        queue: QueueStore,
    ) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.config = ctx.config
        self._settings = settings
        self._credits = credits
        self._budgets = budgets
        self._queue = queue
        self._sql = ledger_statements(ctx.dialect)

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
        gs = await self._settings.get(req.guild_id)
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
        gs = await self._settings.get(g)
        now = self.ctx.now()
        today = utc_day(now)
        allowed = self.config.allowed_guild_ids
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
            usd = usd_to_micros(self.config.cost_per_image_usd)
            hours, minutes = until_midnight_utc(now)
            if int(row.spent or 0) + usd > usd_to_micros(self.config.daily_budget_usd):
                raise BudgetExhausted("daily budget", hours=hours, minutes=minutes)
            guild_cap_usd = self.config.guild_daily_budget_usd
            if row.guild_cap is not None:
                guild_cap_usd = float(row.guild_cap)
            if guild_cap_usd > 0 and int(row.guild_spent or 0) + usd > usd_to_micros(guild_cap_usd):
                raise GuildBudgetExhausted(f"server {g}", hours=hours, minutes=minutes)
        if row.waiting >= self.config.max_queue_size:
            raise QueueFull(f"queue at {self.config.max_queue_size}")

    def _reserve_tx(
        self, conn: Connection, req: ReserveRequest, gs: GuildSettings, params: str
    ) -> Reservation:
        sql = self._sql
        cost = gs.credits_per_image
        usd = usd_to_micros(self.config.cost_per_image_usd)
        check_cooldown = not req.exempt_from_cooldown and gs.cooldown_seconds > 0
        g, u = req.guild_id, req.user_id
        now = self.ctx.now()
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
        allowed = self.config.allowed_guild_ids
        if (allowed and g not in allowed) or (control is not None and control.blocked):
            raise GuildNotEnabled(f"server {g} is not enabled")
        guild_cap_usd = self.config.guild_daily_budget_usd
        if control is not None and control.daily_budget_usd is not None:
            guild_cap_usd = float(control.daily_budget_usd)
        if execute(conn, sql.insert_job, job_values).first() is None:
            raise JobAlreadyExists(f"job {req.job_id} exists", job_id=req.job_id)
        # the whole bot's queue (every process's): this job is one of the waiting ones now
        waiting = execute(conn, sql.count_waiting, {}).scalar_one()
        if waiting > self.config.max_queue_size:
            raise QueueFull(f"queue at {self.config.max_queue_size}")
        self._credits.ensure_member(conn, g, u, gs.starting_credits, now)
        self._credits.daily_topup(conn, gs, u, today, now, req.job_id)
        balance = self._charge(conn, gs, u, cost, now, until, check_cooldown)
        self._credits.append(
            conn,
            guild_id=g,
            user_id=u,
            delta=-cost,
            kind=LedgerKind.RESERVE,
            balance_after=balance,
            now=now,
            job_id=req.job_id,
        )
        if req.account == OWNER_ACCOUNT:  # a server's own key spends none of the owner's money
            self._budgets.book(
                conn, guild_id=g, today=today, usd=usd, guild_cap_usd=guild_cap_usd, now=now
            )
        claim = None
        if req.claim_for is not None and waiting == 1:
            # nothing else waits: claim it in this transaction when the account has room (one
            # commit, one round trip less for every job that does not have to queue)
            worker_id, every, lease_s = req.claim_for
            claim = self._queue.claim_tx(conn, worker_id, every, lease_s)
        return Reservation(
            job_id=req.job_id, cost=cost, balance_after=balance, cooldown_until=until, claim=claim
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
            row = self._credits.member_row(conn, gs.guild_id, user_id, lock=True)
            assert row is not None  # created earlier in this transaction
            if check_cooldown and row.cooldown_until is not None and row.cooldown_until > now:
                raise OnCooldown(retry_after=float(row.cooldown_until) - now)
            if row.inflight >= gs.jobs_per_member:
                raise TooManyJobs(limit=gs.jobs_per_member)
            if row.balance < cost:
                raise InsufficientCredits(balance=int(row.balance), needed=cost)
            # The row changed between the two statements (Postgres); try again under the lock.
        raise RuntimeError("conditional charge did not settle")  # pragma: no cover

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
            now = self.ctx.now()
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
            self._credits.append(
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
            now = self.ctx.now()
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
            self._credits.append(
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
                self._budgets.release(
                    conn,
                    guild_id=job.guild_id,
                    day=utc_day(job.created_at),
                    usd=job.cost_usd_micros,
                )
            return True

        return await self.db.transact(tx)

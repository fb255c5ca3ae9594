"""The persistence API of the bot: credits ledger, jobs, server settings, workers and stats.

Discord-free. Every balance change happens inside one transaction together with its ledger row,
and every check that guards money is part of a conditional ``UPDATE … WHERE … RETURNING``, so
concurrent tasks and processes can never overdraw a member, charge a job twice, or pass the daily
budget. The job id is the Discord interaction id; inserting it is the idempotency key.

Lifecycle of a job: :meth:`Store.reserve` (state ``accepted``, credits held, budget reserved) →
:meth:`Store.mark_running` → :meth:`Store.commit` (``posted``) or :meth:`Store.refund`
(``refunded``, or ``failed`` when it cost nothing). Both ends are idempotent and exclusive.

The parts live in ``store_settings.py`` (server settings), ``store_admin.py`` (workers, stats,
invariants), ``store_base.py`` and ``store_types.py`` (the dataclasses, re-exported here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Self

from sqlalchemy import and_, case, func, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kontext.db import (
    ACTIVE_STATES,
    Database,
    bot_meta,
    budget_days,
    jobs,
    members,
    run_migrations,
)
from kontext.errors import (
    BudgetExhausted,
    InsufficientCredits,
    JobAlreadyExists,
    OnCooldown,
    TooManyJobs,
)
from kontext.settings import Settings
from kontext.store_admin import AdminMixin
from kontext.store_members import MembersMixin
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
    usd_to_micros,
    utc_day,
)

__all__ = [
    "BudgetStatus",
    "GuildSettings",
    "GuildStats",
    "Job",
    "LedgerEntry",
    "MemberStatus",
    "Reservation",
    "ReserveRequest",
    "StatsWindow",
    "Store",
]

_m = members.c
_j = jobs.c


def _inflight_minus_one() -> Any:
    return case((_m.inflight > 0, _m.inflight - 1), else_=0)


class Store(GuildSettingsMixin, MembersMixin, AdminMixin):
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
        cost = gs.credits_per_image
        usd = usd_to_micros(self.settings.cost_per_image_usd)
        cap = usd_to_micros(self.settings.daily_budget_usd)
        check_cooldown = not req.exempt_from_cooldown and gs.cooldown_seconds > 0
        g, u = req.guild_id, req.user_id
        async with self.db.write() as conn:
            now = self.now()
            today = utc_day(now)
            until = now + gs.cooldown_seconds if check_cooldown else None
            job_values = {
                "id": req.job_id,
                "guild_id": g,
                "channel_id": req.channel_id,
                "user_id": u,
                "state": "accepted",
                "params": json.dumps(req.params, sort_keys=True, default=str),
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
            }
            inserted = await conn.execute(
                self._insert(jobs)
                .values(**job_values)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(_j.id)
            )
            if inserted.first() is None:
                raise JobAlreadyExists(f"job {req.job_id} exists", job_id=req.job_id)
            await self._ensure_member(conn, g, u, gs.starting_credits, now)
            await self._daily_topup(conn, gs, u, today, now)
            balance = await self._charge(conn, gs, u, cost, now, until, check_cooldown)
            await self._ledger(
                conn,
                guild_id=g,
                user_id=u,
                delta=-cost,
                kind="reserve",
                balance_after=balance,
                now=now,
                job_id=req.job_id,
            )
            await conn.execute(
                self._insert(budget_days)
                .values(day=today, reserved_micros=0, generations=0)
                .on_conflict_do_nothing(index_elements=["day"])
            )
            booked = await conn.execute(
                update(budget_days)
                .where(budget_days.c.day == today, budget_days.c.reserved_micros + usd <= cap)
                .values(
                    reserved_micros=budget_days.c.reserved_micros + usd,
                    generations=budget_days.c.generations + 1,
                )
                .returning(budget_days.c.day)
            )
            if booked.first() is None:
                raise BudgetExhausted(f"daily budget of {self.settings.daily_budget_usd} USD")
        return Reservation(
            job_id=req.job_id, cost=cost, balance_after=balance, cooldown_until=until
        )

    async def _daily_topup(
        self, conn: AsyncConnection, gs: GuildSettings, user_id: int, today: str, now: float
    ) -> None:
        """Claim today's free credits (once per UTC day) and top the balance up to the cap."""
        if gs.daily_free_credits <= 0:
            return
        who = and_(_m.guild_id == gs.guild_id, _m.user_id == user_id)
        claimed = (
            await conn.execute(
                update(members)
                .where(who, or_(_m.last_daily.is_(None), _m.last_daily != today))
                .values(last_daily=today)
                .returning(_m.balance)
            )
        ).first()
        if claimed is None:
            return
        delta = max(0, gs.daily_free_credits - int(claimed.balance))
        if delta == 0:
            return
        balance = (
            await conn.execute(
                update(members).where(who).values(balance=_m.balance + delta).returning(_m.balance)
            )
        ).scalar_one()
        await self._ledger(
            conn,
            guild_id=gs.guild_id,
            user_id=user_id,
            delta=delta,
            kind="daily",
            balance_after=balance,
            now=now,
            reason=f"daily free credits {today}",
        )

    async def _charge(
        self,
        conn: AsyncConnection,
        gs: GuildSettings,
        user_id: int,
        cost: int,
        now: float,
        until: float | None,
        check_cooldown: bool,
    ) -> int:
        """The atomic conditional charge; raises the member's error when it cannot happen."""
        conditions = [
            _m.guild_id == gs.guild_id,
            _m.user_id == user_id,
            _m.balance >= cost,
            _m.inflight < gs.jobs_per_member,
        ]
        values: dict[str, Any] = {"balance": _m.balance - cost, "inflight": _m.inflight + 1}
        if check_cooldown:
            conditions.append(or_(_m.cooldown_until.is_(None), _m.cooldown_until <= now))
            values["cooldown_until"] = until
        stmt = update(members).where(*conditions).values(**values).returning(_m.balance)
        for _attempt in range(3):
            charged = (await conn.execute(stmt)).first()
            if charged is not None:
                return int(charged.balance)
            # Why not? Lock the row (Postgres) so the answer is the current truth.
            row = await self._member_row(conn, gs.guild_id, user_id, lock=True)
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
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(_j.id == job_id, _j.state == "accepted")
                .values(state="running", started_at=self.now())
                .returning(_j.id)
            )
            return result.first() is not None

    async def set_api_request(
        self,
        job_id: int,
        request_id: str | None,
        status_url: str | None = None,
        response_url: str | None = None,
    ) -> bool:
        """Remember the API's request id and polling URLs (to resume after a restart)."""
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(_j.id == job_id, _j.state.in_(ACTIVE_STATES))
                .values(
                    api_request_id=request_id,
                    api_status_url=status_url,
                    api_response_url=response_url,
                )
                .returning(_j.id)
            )
            return result.first() is not None

    async def mark_api_charged(self, job_id: int) -> bool:
        """Record that the API billed this job (its budget share is then never given back).

        Only for jobs not refunded yet; for a failure the API billed, pass ``api_charged=True``
        to :meth:`refund` instead.
        """
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(_j.id == job_id, _j.state.in_((*ACTIVE_STATES, "posted")))
                .values(api_charged=True)
                .returning(_j.id)
            )
            return result.first() is not None

    async def commit(
        self,
        job_id: int,
        *,
        result_message_id: int | None,
        result_channel_id: int | None,
        duration_s: float | None = None,
    ) -> bool:
        """Make the charge final after the image was posted. True when this call committed."""
        async with self.db.write() as conn:
            now = self.now()
            duration = (
                duration_s
                if duration_s is not None
                else now - func.coalesce(_j.started_at, _j.created_at)
            )
            job = (
                await conn.execute(
                    update(jobs)
                    .where(_j.id == job_id, _j.state.in_(ACTIVE_STATES))
                    .values(
                        state="posted",
                        finished_at=now,
                        result_message_id=result_message_id,
                        result_channel_id=result_channel_id,
                        duration_s=duration,
                    )
                    .returning(_j.guild_id, _j.user_id)
                )
            ).first()
            if job is None:
                return False
            balance = (
                await conn.execute(
                    update(members)
                    .where(_m.guild_id == job.guild_id, _m.user_id == job.user_id)
                    .values(inflight=_inflight_minus_one())
                    .returning(_m.balance)
                )
            ).scalar_one()
            await self._ledger(
                conn,
                guild_id=job.guild_id,
                user_id=job.user_id,
                delta=0,
                kind="commit",
                balance_after=balance,
                now=now,
                job_id=job_id,
            )
            return True

    async def refund(
        self, job_id: int, *, cause: str, clear_cooldown: bool = True, api_charged: bool = False
    ) -> bool:
        """Give the job's credits back (and its budget share, unless the API billed it).

        ``clear_cooldown`` lifts the cooldown only if it is still the one this job set.
        True when this call refunded; False when the job is unknown, posted or already ended.
        """
        async with self.db.write() as conn:
            now = self.now()
            values: dict[str, Any] = {
                "state": case((_j.cost_credits == 0, "failed"), else_="refunded"),
                "failure_cause": cause,
                "finished_at": now,
            }
            if api_charged:
                values["api_charged"] = True
            job = (
                await conn.execute(
                    update(jobs)
                    .where(_j.id == job_id, _j.state.in_(ACTIVE_STATES))
                    .values(**values)
                    .returning(
                        _j.guild_id,
                        _j.user_id,
                        _j.cost_credits,
                        _j.cost_usd_micros,
                        _j.cooldown_until,
                        _j.created_at,
                        _j.api_charged,
                    )
                )
            ).first()
            if job is None:
                return False
            member_values: dict[str, Any] = {
                "balance": _m.balance + job.cost_credits,
                "inflight": _inflight_minus_one(),
            }
            if clear_cooldown and job.cooldown_until is not None:
                member_values["cooldown_until"] = case(
                    (_m.cooldown_until == job.cooldown_until, null()), else_=_m.cooldown_until
                )
            balance = (
                await conn.execute(
                    update(members)
                    .where(_m.guild_id == job.guild_id, _m.user_id == job.user_id)
                    .values(**member_values)
                    .returning(_m.balance)
                )
            ).scalar_one()
            await self._ledger(
                conn,
                guild_id=job.guild_id,
                user_id=job.user_id,
                delta=int(job.cost_credits),
                kind="refund",
                balance_after=balance,
                now=now,
                job_id=job_id,
                reason=cause,
            )
            if not job.api_charged:
                b = budget_days.c
                await conn.execute(
                    update(budget_days)
                    .where(
                        b.day == utc_day(job.created_at),
                        b.reserved_micros >= job.cost_usd_micros,
                        b.generations > 0,
                    )
                    .values(
                        reserved_micros=b.reserved_micros - job.cost_usd_micros,
                        generations=b.generations - 1,
                    )
                )
            return True

"""Shared plumbing of the store: the database, the clock, and helpers used inside transactions.

The money transactions (``reserve``, ``commit``, ``refund``, ``grant``, ``revoke`` and the job
state changes) are synchronous functions of a :class:`sqlalchemy.Connection`, run as one
transaction by :meth:`kontext.db.Database.transact`. Their statements are built once per dialect
(:func:`statements`) with named bind parameters, so a call only binds values: no statement
construction, and SQLAlchemy's compiled-statement cache hits on a memoized key.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Double,
    Integer,
    Row,
    String,
    Text,
    and_,
    bindparam,
    case,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from kontext.db import Database, execute
from kontext.schema import (
    ACTIVE_STATES,
    budget_days,
    guild_budget_days,
    guild_controls,
    jobs,
    ledger,
    members,
)
from kontext.settings import Settings
from kontext.store_types import GuildSettings, Job, utc_day
from kontext.vocab import JobState, LedgerKind

_m = members.c
_j = jobs.c
_b = budget_days.c


def dialect_insert(dialect: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """A dialect-specific INSERT that supports ``on_conflict_do_nothing`` / ``_do_update``."""
    if dialect == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)


def _state_in(states: tuple[str, ...]) -> Any:
    """``jobs.state IN (…)`` spelled as ORed equalities (no expanding IN: see ``execute``)."""
    return or_(*(_j.state == state for state in states))


def _db_now(dialect: str) -> Any:
    """The database's clock as epoch seconds (see :func:`kontext.store_queue.db_now`)."""
    from sqlalchemy import literal_column

    if dialect == "postgresql":
        return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)")


def fence_params(lease: Any, *, waiting: bool = False) -> tuple[str, dict[str, Any]]:
    """The fence (statement variant) and its parameters for ``lease`` (None: nobody's job)."""
    if lease is not None:
        return "leased", {"owner": lease.owner, "epoch": lease.epoch}
    return ("waiting" if waiting else "unleased"), {}


def _p(name: str, type_: Any) -> Any:
    """A named bind parameter of a known type (asyncpg wants the type)."""
    return bindparam(name, type_=type_)


class Statements:
    """The statements of the money transactions, built once per dialect.

    Parameters are bound by name at execution; see each attribute for the names it takes.
    """

    def __init__(self, dialect: str) -> None:
        g, u = _p("g", BigInteger), _p("u", BigInteger)
        who = and_(_m.guild_id == g, _m.user_id == u)
        job_id = _p("job_id", BigInteger)
        now = _p("now", Double)
        active = _state_in(ACTIVE_STATES)
        inflight_minus_one = case((_m.inflight > 0, _m.inflight - 1), else_=0)

        #: params: the job's columns. Returns ``id`` when inserted, nothing when it existed.
        #: ``queued_at`` is the database's clock (the queue's order and wait bound).
        self.insert_job = (
            dialect_insert(dialect, jobs)
            .values(queued_at=_db_now(dialect))
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(_j.id)
        )
        #: params: g, u, job_id. Credits held by the member's other unfinished jobs.
        self.held_credits = select(func.coalesce(func.sum(_j.cost_credits), 0)).where(
            _j.guild_id == g, _j.user_id == u, active, _j.id != job_id
        )
        #: no params. The jobs waiting in the queue, every process's.
        self.count_waiting = select(func.count()).select_from(jobs).where(_j.state == JobState.ACCEPTED)
        #: params: guild_id, user_id, balance, inflight, created_at. Returns a row when created.
        self.insert_member = (
            dialect_insert(dialect, members)
            .on_conflict_do_nothing(index_elements=["guild_id", "user_id"])
            .returning(_m.balance)
        )
        #: params: the ledger's columns (but ``id``).
        self.insert_ledger = ledger.insert()
        #: params: g, u.
        self.member_row = select(members).where(who)
        #: params: g, u. Locks the row on Postgres (SQLite: the write lock is already held).
        self.member_row_locked = self.member_row.with_for_update()
        #: params: g, u, today. Claims today's top-up; returns the balance when it claimed.
        self.claim_daily = (
            update(members)
            .where(who, or_(_m.last_daily.is_(None), _m.last_daily != _p("today", Text)))
            .values(last_daily=_p("today", Text))
            .returning(_m.balance)
        )
        #: params: g, u, delta. Returns the new balance.
        self.add_balance = (
            update(members)
            .where(who)
            .values(balance=_m.balance + _p("delta", BigInteger))
            .returning(_m.balance)
        )
        #: params: g, u, take. Returns the new balance (nothing when the balance is short).
        self.take_balance = (
            update(members)
            .where(who, _m.balance >= _p("take", BigInteger))
            .values(balance=_m.balance - _p("take", BigInteger))
            .returning(_m.balance)
        )
        cost = _p("cost", BigInteger)
        charge_where = (who, _m.balance >= cost, _m.inflight < _p("limit", Integer))
        charge_values = {"balance": _m.balance - cost, "inflight": _m.inflight + 1}
        #: params: g, u, cost, limit. The conditional charge; returns the new balance.
        self.charge = (
            update(members).where(*charge_where).values(**charge_values).returning(_m.balance)
        )
        #: params: g, u, cost, limit, now, until. The charge that also checks and sets the cooldown.
        self.charge_with_cooldown = (
            update(members)
            .where(*charge_where, or_(_m.cooldown_until.is_(None), _m.cooldown_until <= now))
            .values(**charge_values, cooldown_until=_p("until", Double))
            .returning(_m.balance)
        )
        usd = _p("usd", BigInteger)
        #: params: b_day, usd, cap (usd <= cap). Books one generation on the day, creating the
        #: row when needed; returns ``day`` when booked, nothing when the cap would be passed.
        self.book_budget = (
            dialect_insert(dialect, budget_days)
            .values(day=_p("b_day", Text), reserved_micros=usd, generations=1)
            .on_conflict_do_update(
                index_elements=["day"],
                set_={
                    "reserved_micros": _b.reserved_micros + usd,
                    "generations": _b.generations + 1,
                },
                where=_b.reserved_micros + usd <= _p("cap", BigInteger),
            )
            .returning(_b.day)
        )
        _gb = guild_budget_days.c
        #: params: g, b_day, usd, cap. Books one generation on the server's day (as
        #: :attr:`book_budget`, per server); nothing returned when the server's cap would be passed.
        self.book_guild_budget = (
            dialect_insert(dialect, guild_budget_days)
            .values(guild_id=g, day=_p("b_day", Text), reserved_micros=usd, generations=1)
            .on_conflict_do_update(
                index_elements=["guild_id", "day"],
                set_={
                    "reserved_micros": _gb.reserved_micros + usd,
                    "generations": _gb.generations + 1,
                },
                where=_gb.reserved_micros + usd <= _p("cap", BigInteger),
            )
            .returning(_gb.day)
        )
        #: params: g, b_day, usd. Gives one generation's share of the server's day back.
        self.release_guild_budget = (
            update(guild_budget_days)
            .where(
                _gb.guild_id == g,
                _gb.day == _p("b_day", Text),
                _gb.reserved_micros >= usd,
                _gb.generations > 0,
            )
            .values(reserved_micros=_gb.reserved_micros - usd, generations=_gb.generations - 1)
        )
        #: params: g. The owner's controls of the server (blocked, own budget), if any.
        self.guild_control = select(
            guild_controls.c.blocked, guild_controls.c.daily_budget_usd
        ).where(guild_controls.c.guild_id == g)
        gc = guild_controls.c

        def one(column: Any, *where: Any) -> Any:
            return select(column).where(*where).scalar_subquery()

        today = _p("today", Text)
        #: params: g, u, today. Everything :meth:`Store.precheck` reads, in one statement (one
        #: round trip): the owner's controls of the server, the member's row (NULLs when new),
        #: both budgets' spend today and the queue's length.
        self.precheck = select(
            one(gc.blocked, gc.guild_id == g).label("blocked"),
            one(gc.daily_budget_usd, gc.guild_id == g).label("guild_cap"),
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
        #: params: b_day, usd. Gives one generation's share back (never below zero).
        self.release_budget = (
            update(budget_days)
            .where(_b.day == _p("b_day", Text), _b.reserved_micros >= usd, _b.generations > 0)
            .values(reserved_micros=_b.reserved_micros - usd, generations=_b.generations - 1)
        )
        #: params: job_id, now. accepted → running without a lease (tests, tools); returns ``id``.
        self.mark_running = (
            update(jobs)
            .where(_j.id == job_id, _j.state == JobState.ACCEPTED)
            .values(state=JobState.RUNNING, started_at=now)
            .returning(_j.id)
        )
        # Every change of a job after its claim is fenced: it names the lease it holds (owner and
        # epoch, params ``owner``, ``epoch``), so a process that lost the job changes nothing.
        # A job nobody holds (waiting, or let go) is changed with the ``unleased`` condition.
        leased = and_(
            _j.id == job_id,
            _j.state == JobState.RUNNING,
            _j.lease_owner == _p("owner", Text),
            _j.lease_epoch == _p("epoch", BigInteger),
        )
        unleased = and_(_j.id == job_id, _j.lease_owner.is_(None), active)
        waiting = and_(_j.id == job_id, _j.state == JobState.ACCEPTED)
        fences = {"leased": leased, "unleased": unleased, "waiting": waiting}
        #: params: job_id, request_id, status_url, response_url (+ the fence's).
        self.set_api_request = {
            name: update(jobs)
            .where(where)
            .values(
                api_request_id=_p("request_id", Text),
                api_status_url=_p("status_url", Text),
                api_response_url=_p("response_url", Text),
            )
            .returning(_j.id)
            for name, where in fences.items()
        }
        db_clock = _db_now(dialect)
        #: params: job_id, owner, epoch. The API answered: the job leaves its API slot.
        self.api_done = update(jobs).where(leased).values(api_done_at=db_clock).returning(_j.id)
        #: params: job_id, owner, epoch. Back to the queue (no request was sent): it waits again,
        #: its place by arrival kept, and counts neither as started nor as billed.
        self.requeue = (
            update(jobs)
            .where(leased)
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
        #: params: job_id, owner, epoch. Let the lease go (the next process takes it at once).
        self.let_go = (
            update(jobs)
            .where(leased)
            .values(lease_owner=None, lease_expires_at=None)
            .returning(_j.id)
        )
        posted = {
            "state": JobState.POSTED,
            "api_charged": True,  # the API made the image that was posted: it billed it
            "interaction_token": None,  # an ended job needs it no more: keep no live secret
            "finished_at": now,
            "result_message_id": _p("result_message", BigInteger),
            "result_channel_id": _p("result_channel", BigInteger),
            "lease_owner": None,
            "lease_expires_at": None,
        }
        #: params: job_id, now, result_message, result_channel, duration (+ the fence's).
        #: Returns guild_id, user_id.
        self.commit_job = {
            name: update(jobs)
            .where(where)
            .values(**posted, duration_s=_p("duration", Double))
            .returning(_j.guild_id, _j.user_id)
            for name, where in fences.items()
        }
        #: As :attr:`commit_job` without ``duration``: measured from start (or creation).
        self.commit_job_timed = {
            name: update(jobs)
            .where(where)
            .values(**posted, duration_s=now - func.coalesce(_j.started_at, _j.created_at))
            .returning(_j.guild_id, _j.user_id)
            for name, where in fences.items()
        }
        #: params: g, u. One job fewer in flight; returns the balance.
        self.release_inflight = (
            update(members).where(who).values(inflight=inflight_minus_one).returning(_m.balance)
        )
        refunded = {
            "state": case(
                (_j.cost_credits == 0, literal(JobState.FAILED, String)),
                else_=literal(JobState.REFUNDED, String),
            ),
            "failure_cause": _p("cause", Text),
            "finished_at": now,
            # ``billed``: true = the API billed it; false = the answer proves nothing was made;
            # NULL = not known here: the database's record stands
            "api_charged": func.coalesce(_p("billed", Boolean), _j.api_charged),
            "interaction_token": None,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        #: params: job_id, now, cause, billed (+ the fence's). Ends the job; returns what the
        #: refund needs.
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
            for name, where in fences.items()
        }
        credit_back = {"balance": _m.balance + cost, "inflight": inflight_minus_one}
        #: params: g, u, cost. Credits back, one job fewer in flight; returns the balance.
        self.refund_member = update(members).where(who).values(**credit_back).returning(_m.balance)
        #: params: g, u, cost, job_cooldown. As :attr:`refund_member`, and lifts the cooldown
        #: if it is still the one the job set.
        self.refund_member_clear_cooldown = (
            update(members)
            .where(who)
            .values(
                **credit_back,
                cooldown_until=case(
                    (_m.cooldown_until == _p("job_cooldown", Double), null()),
                    else_=_m.cooldown_until,
                ),
            )
            .returning(_m.balance)
        )


@functools.cache
def statements(dialect: str) -> Statements:
    """The prebuilt statements for ``dialect`` (``"sqlite"`` or ``"postgresql"``)."""
    return Statements(dialect)


class StoreBase:
    """State and low-level helpers shared by the store's parts."""

    def __init__(
        self, db: Database, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        self.settings = settings
        self._clock = clock
        self._settings_cache: dict[int, tuple[float, GuildSettings]] = {}
        self._sql = statements(db.dialect)

    def now(self) -> float:
        """The current time (epoch seconds) from the injected clock."""
        return float(self._clock())

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``, from the injected clock."""
        return utc_day(self.now())

    def _insert(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        """A dialect-specific INSERT that supports ``on_conflict_do_nothing``."""
        return dialect_insert(self.db.dialect, table)

    # --- helpers of the sync transaction bodies (run by Database.transact) ------------------

    def _ledger(
        self,
        conn: Connection,
        *,
        guild_id: int,
        user_id: int,
        delta: int,
        kind: str,
        balance_after: int,
        now: float,
        reason: str | None = None,
        job_id: int | None = None,
        actor_id: int | None = None,
    ) -> None:
        """Append one ledger row (the ledger is never updated nor deleted from)."""
        execute(
            conn,
            self._sql.insert_ledger,
            {
                "guild_id": guild_id,
                "user_id": user_id,
                "delta": delta,
                "kind": kind,
                "reason": reason,
                "job_id": job_id,
                "actor_id": actor_id,
                "balance_after": balance_after,
                "created_at": now,
            },
        )

    def _ensure_member(
        self, conn: Connection, guild_id: int, user_id: int, starting: int, now: float
    ) -> bool:
        """Create the member with ``starting`` credits (and a ``start`` row) if new.

        Returns True when the member was created.
        """
        created = (
            execute(
                conn,
                self._sql.insert_member,
                {
                    "guild_id": guild_id,
                    "user_id": user_id,
                    "balance": starting,
                    "inflight": 0,
                    "created_at": now,
                },
            ).first()
            is not None
        )
        if created and starting:
            self._ledger(
                conn,
                guild_id=guild_id,
                user_id=user_id,
                delta=starting,
                kind=LedgerKind.START,
                balance_after=starting,
                now=now,
                reason="starting credits",
            )
        return created

    async def _job_update(self, stmt: Any, params: dict[str, Any]) -> bool:
        """Run one conditional job update as its own transaction; True when it matched."""

        def tx(conn: Connection) -> bool:
            return execute(conn, stmt, params).first() is not None

        return await self.db.transact(tx)

    def _member_row(
        self, conn: Connection, guild_id: int, user_id: int, *, lock: bool = False
    ) -> Row[Any] | None:
        """The member's row; ``lock`` takes the row lock (Postgres; SQLite holds the write lock)."""
        stmt = self._sql.member_row_locked if lock else self._sql.member_row
        row: Row[Any] | None = execute(conn, stmt, {"g": guild_id, "u": user_id}).first()
        return row


def job_from_row(row: Row[Any]) -> Job:
    """A :class:`Job` from a ``jobs`` row."""
    m = row._mapping if hasattr(row, "_mapping") else row._asdict()  # SQLAlchemy / fast path
    values = {c.name: m[c.name] for c in jobs.columns}
    values["params"] = json.loads(values["params"] or "{}")
    values["api_charged"] = bool(values["api_charged"])
    return Job(**values)

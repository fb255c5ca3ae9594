"""The schema and its migrations: one set of tables for SQLite and Postgres.

* :data:`metadata` holds the tables (members' balances, the append-only ledger, jobs, server
  settings and their audit, the daily budget, workers, showcase posts, small process facts).
* :data:`MIGRATIONS` are the ordered schema steps, applied by :func:`run_migrations`: one
  transaction each, safe when several processes start at once (a Postgres advisory lock, or
  SQLite's ``BEGIN IMMEDIATE``), each step run exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Double,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from kontext.db import Database
from kontext.vocab import JobState, LedgerKind

#: Key of the Postgres advisory lock that serializes migrations ("Kontext" in ASCII).
MIGRATION_LOCK_KEY = 0x4B6F6E74657874


# --- the schema -----------------------------------------------------------------------------------

metadata = MetaData()

LEDGER_KINDS: tuple[LedgerKind, ...] = tuple(LedgerKind)
JOB_STATES: tuple[JobState, ...] = tuple(JobState)
#: a job still in the queue or being generated
ACTIVE_STATES: tuple[JobState, ...] = (JobState.ACCEPTED, JobState.RUNNING)
#: a job that ended without a post (refunded; "failed" when there was nothing to refund)
UNPOSTED_STATES: tuple[JobState, ...] = (JobState.FAILED, JobState.REFUNDED)


def _in_check(column: str, values: Sequence[str], name: str) -> CheckConstraint:
    # Constant DDL built from the enums in kontext.vocab, never from input. The text is the one
    # the migrations created (``state IN ('accepted', …)``), so changing an enum needs a migration.
    quoted = ", ".join(f"'{str(v)}'" for v in values)  # str(): a StrEnum member's value
    return CheckConstraint(f"{column} IN ({quoted})", name=name)


schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Double, nullable=False),
)

guild_settings = Table(
    "guild_settings",
    metadata,
    Column("guild_id", BigInteger, primary_key=True, autoincrement=False),
    Column("starting_credits", BigInteger),
    Column("credits_per_image", BigInteger),
    Column("daily_free_credits", BigInteger),
    Column("cooldown_seconds", Integer),
    Column("jobs_per_member", Integer),
    Column("max_safety_tolerance", Integer),
    Column("default_aspect_ratio", Text),
    Column("showcase_channel_id", BigInteger),
    Column("showcase_requires_approval", Boolean),
    Column("allowed_channel_ids", Text),  # JSON list of ids
    Column("exempt_role_ids", Text),  # JSON list of ids
    Column("blocked_words", Text),  # JSON list of words
    Column("confirm_quote", Boolean),
    Column("updated_at", Double),
    Column("updated_by", BigInteger),
)

settings_audit = Table(
    "settings_audit",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("guild_id", BigInteger, nullable=False),
    Column("actor_id", BigInteger),
    Column("key", Text, nullable=False),
    Column("old_value", Text),  # JSON, NULL = the process default
    Column("new_value", Text),
    Column("created_at", Double, nullable=False),
    Index("ix_settings_audit_guild", "guild_id", "created_at"),
)

members = Table(
    "members",
    metadata,
    Column("guild_id", BigInteger, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("inflight", Integer, nullable=False, server_default=text("0")),
    Column("cooldown_until", Double),
    Column("last_daily", Text),  # YYYY-MM-DD (UTC) of the last daily top-up claim
    Column("created_at", Double, nullable=False),
    PrimaryKeyConstraint("guild_id", "user_id", name="pk_members"),
    CheckConstraint("balance >= 0", name="ck_members_balance"),
    CheckConstraint("inflight >= 0", name="ck_members_inflight"),
)

ledger = Table(
    "ledger",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("guild_id", BigInteger, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("delta", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("reason", Text),
    Column("job_id", BigInteger),
    Column("actor_id", BigInteger),
    Column("balance_after", BigInteger, nullable=False),
    Column("created_at", Double, nullable=False),
    _in_check("kind", LEDGER_KINDS, "ck_ledger_kind"),
    ForeignKeyConstraint(
        ["guild_id", "user_id"], ["members.guild_id", "members.user_id"], name="fk_ledger_member"
    ),
    Index("ix_ledger_member", "guild_id", "user_id", "id"),
    Index("ix_ledger_job", "job_id"),
    Index("ix_ledger_guild_created", "guild_id", "created_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),  # the interaction id
    Column("guild_id", BigInteger, nullable=False),
    Column("channel_id", BigInteger, nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("state", Text, nullable=False),
    Column("params", Text, nullable=False),  # JSON
    Column("seed", BigInteger),
    Column("cost_credits", BigInteger, nullable=False),
    Column("cost_usd_micros", BigInteger, nullable=False),
    Column("cooldown_until", Double),  # the cooldown this job set (NULL when none)
    Column("locale", Text),
    Column("application_id", BigInteger),
    Column("interaction_token", Text),
    Column("worker_id", Text),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("duration_s", Double),
    Column("api_request_id", Text),
    Column("api_status_url", Text),
    Column("api_response_url", Text),
    Column("api_charged", Boolean, nullable=False, server_default=text("false")),
    Column("result_message_id", BigInteger),
    Column("result_channel_id", BigInteger),
    Column("failure_cause", Text),
    Column("parent_job_id", BigInteger),
    # the shared queue (migration 4): times by the database's clock, the lease fences every change
    Column("queued_at", Double),  # when it began to wait (the database's clock)
    Column("lease_owner", Text),  # the worker that holds the job's lease (NULL: nobody)
    Column("lease_epoch", BigInteger, nullable=False, server_default=text("0")),  # +1 per claim
    Column("lease_expires_at", Double),  # the database's clock
    Column("api_done_at", Double),  # the API answered: the job no longer takes an API slot
    Column("account", Text, nullable=False, server_default=text("'owner'")),  # whose API key
    _in_check("state", JOB_STATES, "ck_jobs_state"),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_member_state", "guild_id", "user_id", "state"),
    Index("ix_jobs_guild_created", "guild_id", "created_at"),
    Index("ix_jobs_state_queued", "state", "queued_at"),
    Index("ix_jobs_started", "started_at"),
)

budget_days = Table(
    "budget_days",
    metadata,
    Column("day", Text, primary_key=True),  # YYYY-MM-DD (UTC)
    Column("reserved_micros", BigInteger, nullable=False, server_default=text("0")),
    Column("generations", Integer, nullable=False, server_default=text("0")),
)

workers = Table(
    "workers",
    metadata,
    Column("id", Text, primary_key=True),
    Column("started_at", Double, nullable=False),
    Column("heartbeat_at", Double, nullable=False),
    Column("retired_at", Double),
)

#: One row per API account (the owner's key, later a server's own): the state every process
#: shares: paused (the account needs its owner) and a start-nothing-before time after a 429.
api_accounts = Table(
    "api_accounts",
    metadata,
    Column("id", Text, primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("paused_reason", Text),
    Column("blocked_until", Double, nullable=False, server_default=text("0")),
    Column("updated_at", Double, nullable=False),
)

#: The owner's controls per server (never settable by a server's admins): blocked, an own daily
#: budget, and the server's name as last seen (for the owner's listing).
guild_controls = Table(
    "guild_controls",
    metadata,
    Column("guild_id", BigInteger, primary_key=True, autoincrement=False),
    Column("name", Text),
    Column("blocked", Boolean, nullable=False, server_default=text("false")),
    Column("daily_budget_usd", Double),  # NULL: GUILD_DAILY_BUDGET_USD
    Column("updated_at", Double, nullable=False),
)

#: Each server's booked spend per UTC day (the owner's money only: own-key jobs are not booked).
guild_budget_days = Table(
    "guild_budget_days",
    metadata,
    Column("guild_id", BigInteger, nullable=False),
    Column("day", Text, nullable=False),  # YYYY-MM-DD (UTC)
    Column("reserved_micros", BigInteger, nullable=False, server_default=text("0")),
    Column("generations", Integer, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("guild_id", "day", name="pk_guild_budget_days"),
)

#: A server's own Segmind key, encrypted at rest (Fernet, ``ENCRYPTION_KEY``), with its limits.
guild_api_keys = Table(
    "guild_api_keys",
    metadata,
    Column("guild_id", BigInteger, primary_key=True, autoincrement=False),
    Column("key_encrypted", Text, nullable=False),
    Column("max_concurrent", Integer, nullable=False, server_default=text("1")),
    Column("rpm", Integer, nullable=False, server_default=text("5")),
    Column("added_by", BigInteger),
    Column("added_at", Double, nullable=False),
)

bot_meta = Table(
    "bot_meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Double, nullable=False),
)

showcase_posts = Table(
    "showcase_posts",
    metadata,
    Column("job_id", BigInteger, primary_key=True),  # one showcase post per job
    Column("guild_id", BigInteger, nullable=False),
    Column("state", Text, nullable=False),  # pending | posted | rejected | removed
    Column("requested_by", BigInteger, nullable=False),
    Column("decided_by", BigInteger),
    Column("showcase_channel_id", BigInteger),
    Column("showcase_message_id", BigInteger),
    Column("approval_message_id", BigInteger),  # the moderators' Approve / Reject card
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
)
Index("ix_showcase_guild_state", showcase_posts.c.guild_id, showcase_posts.c.state)


# --- migrations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step. ``apply`` runs synchronously (via ``run_sync``) inside a transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_initial(conn: Connection) -> None:
    tables = [guild_settings, settings_audit, members, ledger, jobs, budget_days, workers]
    metadata.create_all(conn, tables=tables, checkfirst=True)


#: The ordered schema steps. Append new steps (never edit applied ones); a step that changes a
#: table must also update the table above, and be written so that it is a no-op on a database
#: that step 1 created with the newer shape (e.g. ``ADD COLUMN IF NOT EXISTS``).
def _v2_bot_meta(conn: Connection) -> None:
    metadata.create_all(conn, tables=[bot_meta], checkfirst=True)


def _v3_showcase(conn: Connection) -> None:
    metadata.create_all(conn, tables=[showcase_posts], checkfirst=True)


#: The columns migration 4 adds to ``jobs`` (constant DDL, one statement per column).
_V4_JOB_COLUMNS: dict[str, tuple[str, str]] = {
    # name: (SQLite, Postgres)
    "queued_at": (
        "ALTER TABLE jobs ADD COLUMN queued_at FLOAT",
        "ALTER TABLE jobs ADD COLUMN queued_at DOUBLE PRECISION",
    ),
    "lease_owner": (
        "ALTER TABLE jobs ADD COLUMN lease_owner TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_owner TEXT",
    ),
    "lease_epoch": (
        "ALTER TABLE jobs ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0",
    ),
    "lease_expires_at": (
        "ALTER TABLE jobs ADD COLUMN lease_expires_at FLOAT",
        "ALTER TABLE jobs ADD COLUMN lease_expires_at DOUBLE PRECISION",
    ),
    "api_done_at": (
        "ALTER TABLE jobs ADD COLUMN api_done_at FLOAT",
        "ALTER TABLE jobs ADD COLUMN api_done_at DOUBLE PRECISION",
    ),
    "account": (
        "ALTER TABLE jobs ADD COLUMN account TEXT NOT NULL DEFAULT 'owner'",
        "ALTER TABLE jobs ADD COLUMN account TEXT NOT NULL DEFAULT 'owner'",
    ),
}


def _v4_shared_queue(conn: Connection) -> None:
    from sqlalchemy import inspect
    from sqlalchemy.schema import CreateIndex

    have = {c["name"] for c in inspect(conn).get_columns("jobs")}
    for name, (on_sqlite, on_postgres) in _V4_JOB_COLUMNS.items():
        if name not in have:
            conn.execute(text(on_sqlite if conn.dialect.name == "sqlite" else on_postgres))
    indexes = {i["name"] for i in inspect(conn).get_indexes("jobs")}
    for index in jobs.indexes:
        if index.name not in indexes:
            conn.execute(CreateIndex(index))
    conn.execute(jobs.update().where(jobs.c.queued_at.is_(None)).values(queued_at=jobs.c.created_at))
    metadata.create_all(conn, tables=[api_accounts], checkfirst=True)


def _v5_owner_controls(conn: Connection) -> None:
    metadata.create_all(
        conn, tables=[guild_controls, guild_budget_days, guild_api_keys], checkfirst=True
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _v1_initial),
    Migration(2, "bot_meta: small process-wide facts (e.g. the last synced command hash)", _v2_bot_meta),
    Migration(3, "showcase_posts: one showcase post per job, with its approval state", _v3_showcase),
    Migration(4, "the shared queue: leases, queue times and API accounts", _v4_shared_queue),
    Migration(
        5, "the owner's controls: server blocks and budgets, servers' own keys", _v5_owner_controls
    ),
)


async def _lock_for_migration(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    # SQLite: the transaction began with BEGIN IMMEDIATE, which is the lock.


async def current_version(db: Database) -> int:
    """The highest applied migration (0 for a fresh database)."""
    async with db.read() as conn:
        exists = await conn.run_sync(lambda c: c.dialect.has_table(c, schema_version.name))
        if not exists:
            return 0
        value = await conn.scalar(select(func.max(schema_version.c.version)))
        return int(value or 0)


async def run_migrations(
    db: Database,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    clock: Callable[[], float] | None = None,
) -> int:
    """Apply the steps not applied yet, in order, one transaction each; returns how many ran.

    Safe when several processes run it at once: each step's transaction first takes the
    migration lock (Postgres advisory transaction lock / SQLite ``BEGIN IMMEDIATE``), then
    re-reads the version, so every step runs exactly once.
    """
    now = clock or time.time
    steps = sorted(migrations, key=lambda m: m.version)
    if [m.version for m in steps] != sorted({m.version for m in steps}):
        raise ValueError("migration versions must be unique")
    await db.prepare()
    if steps and await current_version(db) >= steps[-1].version:
        return 0
    applied = 0
    for step in steps:
        async with db.write() as conn:
            await _lock_for_migration(conn)
            await conn.run_sync(lambda c: schema_version.create(c, checkfirst=True))
            done = await conn.scalar(select(func.max(schema_version.c.version)))
            if (done or 0) >= step.version:
                continue
            await conn.run_sync(step.apply)
            await conn.execute(
                schema_version.insert().values(
                    version=step.version, description=step.description, applied_at=now()
                )
            )
            applied += 1
    return applied

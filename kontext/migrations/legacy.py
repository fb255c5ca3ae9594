"""The home-grown migration runner's five steps, frozen: the bridge from it to Alembic.

Before Alembic, :mod:`kontext.schema` ran its own numbered steps and recorded each in a
``schema_version`` table (version, description, applied_at). A database that runner made is at
some version 1..5; Alembic's revision ``0001`` is exactly the schema of version 5. So
:func:`bridge` (run by :func:`kontext.schema.run_migrations` under the migration lock, inside
the upgrade's one transaction) finishes the old steps the database has not had yet, drops
``schema_version`` and stamps ``0001``; Alembic then applies ``0002`` onwards as on any other
database.

The steps are copies of the old ones, written against their own tables (never today's
metadata, which keeps changing), with one addition: on SQLite, step 4 declared its new time
columns ``FLOAT`` where a fresh ``CREATE TABLE`` says ``DOUBLE``, so :func:`bridge` rebuilds
``jobs`` with ``DOUBLE`` (same REAL affinity, same values) so that a bridged database equals a
fresh one column for column. :func:`create_at` makes a database exactly as the old runner left it
at a given version (tests use it to prove the bridge).
"""

from __future__ import annotations

import time

from alembic.migration import MigrationContext
from alembic.operations import Operations
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
    inspect,
    text,
)

#: the last version of the old runner; Alembic's revision that equals it
LAST_VERSION = 5
BRIDGE_REVISION = "0001"

_legacy = MetaData()

Table(
    "schema_version",
    _legacy,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Double, nullable=False),
)
_V1 = [
    Table(
        "guild_settings",
        _legacy,
        Column("guild_id", BigInteger, primary_key=True, autoincrement=False),
        *(Column(n, BigInteger) for n in ("starting_credits", "credits_per_image", "daily_free_credits")),
        *(Column(n, Integer) for n in ("cooldown_seconds", "jobs_per_member", "max_safety_tolerance")),
        Column("default_aspect_ratio", Text),
        Column("showcase_channel_id", BigInteger),
        Column("showcase_requires_approval", Boolean),
        *(Column(n, Text) for n in ("allowed_channel_ids", "exempt_role_ids", "blocked_words")),
        Column("confirm_quote", Boolean),
        Column("updated_at", Double),
        Column("updated_by", BigInteger),
    ),
    Table(
        "settings_audit",
        _legacy,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("guild_id", BigInteger, nullable=False),
        Column("actor_id", BigInteger),
        Column("key", Text, nullable=False),
        Column("old_value", Text),
        Column("new_value", Text),
        Column("created_at", Double, nullable=False),
        Index("ix_settings_audit_guild", "guild_id", "created_at"),
    ),
    Table(
        "members",
        _legacy,
        Column("guild_id", BigInteger, nullable=False),
        Column("user_id", BigInteger, nullable=False),
        Column("balance", BigInteger, nullable=False),
        Column("inflight", Integer, nullable=False, server_default=text("0")),
        Column("cooldown_until", Double),
        Column("last_daily", Text),
        Column("created_at", Double, nullable=False),
        PrimaryKeyConstraint("guild_id", "user_id", name="pk_members"),
        CheckConstraint("balance >= 0", name="ck_members_balance"),
        CheckConstraint("inflight >= 0", name="ck_members_inflight"),
    ),
    Table(
        "ledger",
        _legacy,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("guild_id", BigInteger, nullable=False),
        Column("user_id", BigInteger, nullable=False),
        Column("delta", BigInteger, nullable=False),
        Column("kind", Text, nullable=False),
        Column("reason", Text),
        Column("job_id", BigInteger),
        Column("actor_id", BigInteger),
        Column("balance_after", BigInteger, nullable=False),
        Column("created_at", Double, nullable=False),
        CheckConstraint(
            "kind IN ('start', 'grant', 'revoke', 'daily', 'reserve', 'commit', 'refund')",
            name="ck_ledger_kind",
        ),
        ForeignKeyConstraint(
            ["guild_id", "user_id"], ["members.guild_id", "members.user_id"], name="fk_ledger_member"
        ),
        Index("ix_ledger_member", "guild_id", "user_id", "id"),
        Index("ix_ledger_job", "job_id"),
        Index("ix_ledger_guild_created", "guild_id", "created_at"),
    ),
    Table(  # as step 1 made it before step 4 (the shared queue's columns came with step 4)
        "jobs",
        _legacy,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        *(Column(n, BigInteger, nullable=False) for n in ("guild_id", "channel_id", "user_id")),
        Column("state", Text, nullable=False),
        Column("params", Text, nullable=False),
        Column("seed", BigInteger),
        Column("cost_credits", BigInteger, nullable=False),
        Column("cost_usd_micros", BigInteger, nullable=False),
        Column("cooldown_until", Double),
        Column("locale", Text),
        Column("application_id", BigInteger),
        Column("interaction_token", Text),
        Column("worker_id", Text),
        Column("created_at", Double, nullable=False),
        *(Column(n, Double) for n in ("started_at", "finished_at", "duration_s")),
        *(Column(n, Text) for n in ("api_request_id", "api_status_url", "api_response_url")),
        Column("api_charged", Boolean, nullable=False, server_default=text("false")),
        Column("result_message_id", BigInteger),
        Column("result_channel_id", BigInteger),
        Column("failure_cause", Text),
        Column("parent_job_id", BigInteger),
        CheckConstraint(
            "state IN ('accepted', 'running', 'posted', 'failed', 'refunded')", name="ck_jobs_state"
        ),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_member_state", "guild_id", "user_id", "state"),
        Index("ix_jobs_guild_created", "guild_id", "created_at"),
    ),
    Table(
        "budget_days",
        _legacy,
        Column("day", Text, primary_key=True),
        Column("reserved_micros", BigInteger, nullable=False, server_default=text("0")),
        Column("generations", Integer, nullable=False, server_default=text("0")),
    ),
    Table(
        "workers",
        _legacy,
        Column("id", Text, primary_key=True),
        Column("started_at", Double, nullable=False),
        Column("heartbeat_at", Double, nullable=False),
        Column("retired_at", Double),
    ),
]
_V2 = Table(
    "bot_meta",
    _legacy,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Double, nullable=False),
)
_V3 = Table(
    "showcase_posts",
    _legacy,
    Column("job_id", BigInteger, primary_key=True),
    Column("guild_id", BigInteger, nullable=False),
    Column("state", Text, nullable=False),
    Column("requested_by", BigInteger, nullable=False),
    *(
        Column(n, BigInteger)
        for n in ("decided_by", "showcase_channel_id", "showcase_message_id", "approval_message_id")
    ),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("ix_showcase_guild_state", "guild_id", "state"),
)
_V4_ACCOUNTS = Table(
    "api_accounts",
    _legacy,
    Column("id", Text, primary_key=True),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("paused_reason", Text),
    Column("blocked_until", Double, nullable=False, server_default=text("0")),
    Column("updated_at", Double, nullable=False),
)
_V5 = [
    Table(
        "guild_controls",
        _legacy,
        Column("guild_id", BigInteger, primary_key=True, autoincrement=False),
        Column("name", Text),
        Column("blocked", Boolean, nullable=False, server_default=text("false")),
        Column("daily_budget_usd", Double),
        Column("updated_at", Double, nullable=False),
    ),
    Table(
        "guild_budget_days",
        _legacy,
        Column("guild_id", BigInteger, nullable=False),
        Column("day", Text, nullable=False),
        Column("reserved_micros", BigInteger, nullable=False, server_default=text("0")),
        Column("generations", Integer, nullable=False, server_default=text("0")),
        PrimaryKeyConstraint("guild_id", "day", name="pk_guild_budget_days"),
    ),
    Table(
        "guild_api_keys",
        _legacy,
        Column("guild_id", BigInteger, primary_key=True, autoincrement=False),
        Column("key_encrypted", Text, nullable=False),
        Column("max_concurrent", Integer, nullable=False, server_default=text("1")),
        Column("rpm", Integer, nullable=False, server_default=text("5")),
        Column("added_by", BigInteger),
        Column("added_at", Double, nullable=False),
    ),
]

#: step 4's columns of ``jobs``: name → (SQLite DDL, Postgres DDL), as the old runner ran them
_V4_JOB_COLUMNS: dict[str, tuple[str, str]] = {
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
_V4_JOB_INDEXES = {
    "ix_jobs_state_queued": "CREATE INDEX ix_jobs_state_queued ON jobs (state, queued_at)",
    "ix_jobs_started": "CREATE INDEX ix_jobs_started ON jobs (started_at)",
}

_DESCRIPTIONS = {
    1: "initial schema",
    2: "bot_meta: small process-wide facts (e.g. the last synced command hash)",
    3: "showcase_posts: one showcase post per job, with its approval state",
    4: "the shared queue: leases, queue times and API accounts",
    5: "the owner's controls: server blocks and budgets, servers' own keys",
}


def _step(conn: Connection, version: int) -> None:
    """The old runner's step ``version`` (each written to be a no-op where already done)."""
    if version == 1:
        _legacy.create_all(conn, tables=_V1, checkfirst=True)
    elif version == 2:
        _V2.create(conn, checkfirst=True)
    elif version == 3:
        _V3.create(conn, checkfirst=True)
    elif version == 4:
        have = {c["name"] for c in inspect(conn).get_columns("jobs")}
        for name, (on_sqlite, on_postgres) in _V4_JOB_COLUMNS.items():
            if name not in have:
                conn.execute(text(on_sqlite if conn.dialect.name == "sqlite" else on_postgres))
        indexes = {i["name"] for i in inspect(conn).get_indexes("jobs")}
        for name, ddl in _V4_JOB_INDEXES.items():
            if name not in indexes:
                conn.execute(text(ddl))
        conn.execute(text("UPDATE jobs SET queued_at = created_at WHERE queued_at IS NULL"))
        _V4_ACCOUNTS.create(conn, checkfirst=True)
    elif version == 5:
        _legacy.create_all(conn, tables=_V5, checkfirst=True)
    else:
        raise ValueError(f"no legacy schema step {version}")


def _record(conn: Connection, version: int) -> None:
    conn.execute(
        text("INSERT INTO schema_version (version, description, applied_at) VALUES (:v, :d, :t)"),
        {"v": version, "d": _DESCRIPTIONS[version], "t": time.time()},
    )


def create_at(conn: Connection, version: int) -> None:
    """Make an empty database what the old runner left at ``version`` (1..5), ``schema_version``
    included."""
    _legacy.tables["schema_version"].create(conn)
    for step in range(1, version + 1):
        _step(conn, step)
        _record(conn, step)


def legacy_version(conn: Connection) -> int | None:
    """The old runner's version of this database, or None when it never ran here."""
    if not inspect(conn).has_table("schema_version"):
        return None
    return int(conn.scalar(text("SELECT max(version) FROM schema_version")) or 0)


def bridge(conn: Connection, version: int) -> None:
    """Bring a database at the old runner's ``version`` to version 5 = revision ``0001``, without
    ``schema_version``; the caller stamps :data:`BRIDGE_REVISION` (same transaction)."""
    if version > LAST_VERSION:
        raise RuntimeError(f"schema_version {version} is newer than this code knows")
    for step in range(version + 1, LAST_VERSION + 1):
        _step(conn, step)
    conn.execute(text("DROP TABLE schema_version"))
    if conn.dialect.name == "sqlite":
        floats = [
            c["name"]
            for c in inspect(conn).get_columns("jobs")
            if str(c["type"]).upper() == "FLOAT"
        ]
        if floats:
            ops = Operations(MigrationContext.configure(conn))
            with ops.batch_alter_table("jobs", recreate="always") as batch:
                for name in floats:
                    batch.alter_column(name, type_=Double())

"""The schema and its migrations: one set of tables for SQLite and Postgres.

* :data:`metadata` holds the tables (members' balances, the append-only ledger, jobs, server
  settings and their audit, the daily budget, workers, showcase posts, small process facts). The
  CHECK constraints on states and kinds are built from the enums of :mod:`kontext.vocab`.
* The migrations are Alembic revisions in ``kontext/migrations/versions/`` (``0001`` = the
  schema as the home-grown runner left it, frozen; ``0002`` onwards = each change since).
  :func:`run_migrations` (called by ``Store.open``) and :func:`upgrade` (an operations command:
  ``upgrade(DATABASE_URL)``) bring a database to the newest revision, in code, with no
  ``alembic.ini``: all pending revisions run in one transaction that first takes the migration
  lock (a Postgres advisory lock; SQLite's ``BEGIN IMMEDIATE``, with foreign keys off for the
  transaction so that batch mode can rebuild tables and a ``foreign_key_check`` before the
  commit), so several processes starting at once on one database are safe: one upgrades, the
  others then find nothing to do.
* A database made by the home-grown runner (a ``schema_version`` table, versions 1..5, before
  Alembic) is bridged in that same transaction: :mod:`kontext.migrations.legacy` runs the old
  steps it has not had (frozen copies), drops ``schema_version`` and stamps ``0001``; then the
  Alembic revisions after ``0001`` apply as everywhere.

Changing the schema: change the tables here, then add a revision to
``kontext/migrations/versions/`` (copy ``script.py.mako``'s shape, or let Alembic draft it:
``alembic.command.revision(alembic_config(conn), "what", autogenerate=True)`` on a connection to
a database at head) and write its operations out explicitly, never importing this module.
``tests/kontext/test_migrations.py`` fails until upgrading from every revision, and from every
legacy version, gives the schema of a fresh install and that schema equals :data:`metadata`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)

from kontext.db import Database
from kontext.vocab import JobState, LedgerKind, ShowcaseState

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

#: Key of the Postgres advisory lock that serializes migrations ("Kontext" in ASCII).
MIGRATION_LOCK_KEY = 0x4B6F6E74657874


# --- the schema -----------------------------------------------------------------------------------

metadata = MetaData()

LEDGER_KINDS: tuple[LedgerKind, ...] = tuple(LedgerKind)
JOB_STATES: tuple[JobState, ...] = tuple(JobState)
#: a job a process holds under a lease (claimed, its request sent, its result being posted)
LEASED_STATES: tuple[JobState, ...] = (JobState.CLAIMED, JobState.SENT, JobState.POSTING)
#: a job not finished yet: waiting in the queue, or leased
ACTIVE_STATES: tuple[JobState, ...] = (JobState.ACCEPTED, *LEASED_STATES)
#: a job that ended without a post (refunded; "failed" when there was nothing to refund)
UNPOSTED_STATES: tuple[JobState, ...] = (JobState.FAILED, JobState.REFUNDED)
SHOWCASE_STATES: tuple[ShowcaseState, ...] = tuple(ShowcaseState)


def _in_check(column: str, values: Sequence[str], name: str) -> CheckConstraint:
    # Constant DDL built from the enums in kontext.vocab, never from input. The text is the one
    # the revisions wrote (``state IN ('accepted', …)``), so changing an enum needs a revision.
    quoted = ", ".join(f"'{str(v)}'" for v in values)  # str(): a StrEnum member's value
    return CheckConstraint(f"{column} IN ({quoted})", name=name)


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
    # the job's life as a state machine (revision 0003), by the database's clock
    Column("sent_at", Double),  # the first request to the API was about to go out (billed)
    Column("posting_at", Double),  # the result's upload began: searched for from here on
    Column("settle_tries", Integer, nullable=False, server_default=text("0")),  # searches failed
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
    Column("state", Text, nullable=False),
    Column("requested_by", BigInteger, nullable=False),
    Column("decided_by", BigInteger),
    Column("showcase_channel_id", BigInteger),
    Column("showcase_message_id", BigInteger),
    Column("approval_message_id", BigInteger),  # the moderators' Approve / Reject card
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    _in_check("state", SHOWCASE_STATES, "ck_showcase_posts_state"),  # revision 0002
)
Index("ix_showcase_guild_state", showcase_posts.c.guild_id, showcase_posts.c.state)


# --- migrations ---------------------------------------------------------------------------------

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
#: the newest revision in ``migrations/versions`` (a test checks it against Alembic's head): a
#: database already there is recognised without importing Alembic, which then never loads (it
#: and what it brings cost a running bot ~10 MiB for nothing)
HEAD_REVISION = "0003"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code; ``connection`` is the one ``env.py`` runs on."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def revisions() -> list[str]:
    """Every revision id, oldest first."""
    return [r.revision for r in reversed(list(_script().walk_revisions()))]


def head_revision() -> str:
    """The newest revision (the schema of :data:`metadata`)."""
    head = _script().get_current_head()
    if head is None:
        raise RuntimeError("no migration revisions found")
    return head


def _current(conn: Connection) -> str | None:
    """The revision in Alembic's ``alembic_version`` table (read without Alembic), or None."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    version = Table("alembic_version", MetaData(), Column("version_num", Text))
    rows = conn.execute(select(version.c.version_num)).scalars().all()
    if len(rows) > 1:
        raise RuntimeError(f"the database has several migration heads: {rows}")
    return rows[0] if rows else None


async def current_revision(db: Database) -> str | None:
    """The database's Alembic revision (None: fresh, or still the home-grown runner's)."""
    async with db.read() as conn:
        return await conn.run_sync(_current)


def _fresh_install(conn: Connection) -> int:
    """An empty database straight to the newest schema: ``create_all`` and stamp it, as
    Alembic's cookbook does ("building an up to date database from scratch"); the tests check
    that this equals every upgrade path. Revisions it stands for: the count of them."""
    metadata.create_all(conn)
    version = Table(
        "alembic_version", MetaData(), Column("version_num", String(32), nullable=False),
        PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
    )
    version.create(conn)
    conn.execute(version.insert().values(version_num=HEAD_REVISION))
    return len(list((MIGRATIONS_DIR / "versions").glob("[0-9]*.py")))


def _upgrade(conn: Connection, revision: str) -> int:
    """Under the migration lock: an empty database is installed fresh (no Alembic needed);
    otherwise bridge a legacy database, then upgrade; revisions applied."""
    if revision in ("head", HEAD_REVISION) and not inspect(conn).get_table_names():
        return _fresh_install(conn)
    from alembic import command
    from alembic.migration import MigrationContext

    from kontext.migrations import legacy

    version = legacy.legacy_version(conn)
    if version is not None and _current(conn) is None:
        legacy.bridge(conn, version)
        MigrationContext.configure(conn).stamp(_script(), legacy.BRIDGE_REVISION)
    applied: list[Any] = []
    config = alembic_config(conn)
    config.attributes["on_version_apply"] = lambda **kw: applied.append(kw["step"])
    command.upgrade(config, revision)
    return len(applied)


async def run_migrations(db: Database, *, revision: str = "head") -> int:
    """Bring ``db`` to ``revision`` (default: the newest); returns how many revisions ran.

    Reads the revision first and returns 0 at once when there is nothing to do. Otherwise one
    transaction under the migration lock (see :meth:`Database.exclusive_write`) re-reads it,
    bridges a database of the home-grown runner and applies the pending revisions: all or
    nothing, each exactly once however many processes run this at the same moment. A database
    at a revision this code does not know (made by newer code) raises.
    """
    await db.prepare()
    target = HEAD_REVISION if revision == "head" else revision
    if await current_revision(db) == target:
        return 0
    async with db.exclusive_write(MIGRATION_LOCK_KEY) as conn:
        return await conn.run_sync(_upgrade, revision)


async def upgrade(database_url: str, revision: str = "head") -> int:
    """The operations command: upgrade the database at ``database_url``; revisions applied."""
    db = Database.from_url(database_url)
    try:
        return await run_migrations(db, revision=revision)
    finally:
        await db.dispose()

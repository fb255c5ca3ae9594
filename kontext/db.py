"""Database access: the engine, the schema and the migration runner.

* :func:`engine_args` turns ``DATABASE_URL`` (SQLAlchemy URL form, as PaaS add-ons hand it out)
  into an async driver URL plus connect arguments: ``sqlite:///rel.db`` / ``sqlite:////abs.db``
  become ``sqlite+aiosqlite``; ``postgres://`` and ``postgresql://`` become ``postgresql+asyncpg``
  with libpq's ``sslmode`` turned into asyncpg's ``ssl`` argument.
* :class:`Database` wraps the async engine and hands out transactions: :meth:`Database.write`
  for every transaction that may write, :meth:`Database.read` for read-only ones.
* :data:`metadata` holds the tables; :data:`MIGRATIONS` the ordered schema steps, applied by
  :func:`run_migrations` (one transaction each, safe when several processes start at once).

SQLite concurrency. SQLite has one writer at a time per file. The sqlite3 driver normally starts
a transaction lazily ("deferred") and upgrades the lock at the first write, which fails at once
with "database is locked" when another connection holds it, whatever the busy timeout. Here the
driver's own transaction handling is switched off (``isolation_level = None``) and every write
transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up front, and a second
writer (another task, another process) waits on ``busy_timeout`` (30 s) instead of failing. In
WAL mode readers never block the writer and vice versa, so read transactions use a plain
(deferred) ``BEGIN``. Inside one process, writers additionally queue on an :class:`asyncio.Lock`
so that they do not all hold pooled connections while spinning in SQLite's busy handler.

Postgres runs at READ COMMITTED: every balance change is a conditional ``UPDATE … WHERE … RETURNING``
that re-checks its condition on the newest row version after waiting for the row lock.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

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
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
#: Key of the Postgres advisory lock that serializes migrations ("Kontext" in ASCII).
MIGRATION_LOCK_KEY = 0x4B6F6E74657874
#: Execution option that marks a read-only transaction (SQLite then uses a deferred BEGIN).
_READ_ONLY = "kontext_read_only"


# --- URLs ---------------------------------------------------------------------------------------


def _ssl_argument(mode: str, query: dict[str, Any]) -> str | ssl.SSLContext:
    """asyncpg's ``ssl`` argument for libpq's ``sslmode`` (plus optional cert files)."""
    mode = {"true": "require", "1": "require", "false": "disable", "0": "disable"}.get(mode, mode)
    if mode not in _SSL_MODES:
        raise ValueError(f"DATABASE_URL: unknown sslmode {mode!r}")
    rootcert, cert, key = (query.get(k) for k in ("sslrootcert", "sslcert", "sslkey"))
    if mode in {"verify-ca", "verify-full"} and (rootcert or cert):
        ctx = ssl.create_default_context(cafile=rootcert or None)
        ctx.check_hostname = mode == "verify-full"
        if cert:
            ctx.load_cert_chain(cert, key or None)
        return ctx
    return mode


def engine_args(database_url: str) -> tuple[URL, dict[str, Any]]:
    """The async driver URL and connect arguments for ``database_url``.

    Raises ValueError for a URL that is not SQLite or Postgres, or an in-memory SQLite URL (each
    pooled connection would see its own empty database).
    """
    url = make_url(database_url.strip())
    backend = url.drivername.split("+", 1)[0]
    if backend == "sqlite":
        path = url.database or ""
        if path in {"", ":memory:"} or path.startswith("file::memory:"):
            raise ValueError("DATABASE_URL: in-memory SQLite is not supported; use a file")
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return url.set(drivername="sqlite+aiosqlite", database=path, query={}), {}
    if backend not in {"postgres", "postgresql"}:
        raise ValueError("DATABASE_URL: must be sqlite:///…, postgres://… or postgresql://…")
    query = dict(url.query)
    connect_args: dict[str, Any] = {}
    mode = query.pop("sslmode", None)
    cert_params = {k: query.pop(k) for k in ("sslrootcert", "sslcert", "sslkey") if k in query}
    if "ssl" in query:  # already asyncpg style
        mode = query.pop("ssl")
    if isinstance(mode, tuple):
        mode = mode[-1]
    host = url.host or ""
    if mode:
        connect_args["ssl"] = _ssl_argument(str(mode).lower(), cert_params)
    elif host not in _LOCAL_HOSTS and not host.startswith("/"):
        # Heroku's URLs carry no sslmode but the server requires SSL.
        connect_args["ssl"] = "prefer"
    if "application_name" in query:
        connect_args["server_settings"] = {"application_name": str(query.pop("application_name"))}
    return url.set(drivername="postgresql+asyncpg", query=query), connect_args


# --- the engine ---------------------------------------------------------------------------------


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    """Pragmas on connect; ``BEGIN IMMEDIATE`` (or ``BEGIN`` when read-only) on begin."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode")
            if str(cursor.fetchone()[0]).lower() != "wal":
                try:
                    cursor.execute("PRAGMA journal_mode = WAL")
                except Exception:  # another connection holds a lock: Database.prepare() retries
                    pass
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def create_engine(database_url: str, **engine_kwargs: Any) -> AsyncEngine:
    """An async engine for ``database_url``; ``engine_kwargs`` override the defaults.

    ``connect_args`` in ``engine_kwargs`` are merged into the ones derived from the URL.
    """
    url, connect_args = engine_args(database_url)
    extra_connect = dict(engine_kwargs.pop("connect_args", None) or {})
    if "server_settings" in extra_connect and "server_settings" in connect_args:
        extra_connect["server_settings"] = {
            **connect_args["server_settings"],
            **extra_connect["server_settings"],
        }
    # hide_parameters: bound values (interaction tokens among them) never reach logs or errors
    kwargs: dict[str, Any] = {
        "pool_size": 5,
        "max_overflow": 10,
        "pool_timeout": 60,
        "hide_parameters": True,
    }
    if url.drivername.startswith("postgresql"):
        kwargs.update(pool_pre_ping=True, pool_recycle=1800)
    kwargs.update(engine_kwargs)
    kwargs["connect_args"] = {**connect_args, **extra_connect}
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _install_sqlite_hooks(engine)
    return engine


class Database:
    """An async engine plus the transaction discipline of the store.

    Use :meth:`write` for any transaction that may write and :meth:`read` for read-only ones.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None

    @classmethod
    def from_url(cls, database_url: str, **engine_kwargs: Any) -> Database:
        """Build the engine for ``database_url`` (see :func:`create_engine`)."""
        return cls(create_engine(database_url, **engine_kwargs))

    async def prepare(self) -> None:
        """SQLite: switch the file to WAL mode (persistent), retrying while others hold locks.

        Switching needs a moment alone with the file and SQLite does not wait for that with the
        busy timeout, so two processes creating one database at once can be refused: retry
        (without blocking the event loop) for up to the busy timeout. No-op on Postgres.
        """
        if not self.is_sqlite:
            return
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        delay = 0.01
        while True:
            try:
                async with self.engine.connect() as conn:
                    # on the driver's connection: outside any transaction, as the pragma needs
                    raw = (await conn.get_raw_connection()).driver_connection
                    assert raw is not None
                    cursor = await raw.execute("PRAGMA journal_mode = WAL")
                    row = await cursor.fetchone()
                    await cursor.close()
                mode = str(row[0] if row else "").lower()
                if mode == "wal":
                    return
                raise RuntimeError(f"SQLite refused WAL mode (journal_mode={mode})")
            except (OperationalError, sqlite3.OperationalError):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 2)

    @property
    def is_sqlite(self) -> bool:
        """True for SQLite, False for Postgres."""
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed on success, rolled back on any exception.

        SQLite: queued on this process's lock, then ``BEGIN IMMEDIATE`` (waits for other
        processes up to the busy timeout).
        """
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (never takes SQLite's write lock)."""
        async with self.engine.connect() as conn:
            await conn.execution_options(**{_READ_ONLY: True})
            async with conn.begin():
                yield conn

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


# --- the schema -----------------------------------------------------------------------------------

metadata = MetaData()

LEDGER_KINDS: tuple[str, ...] = ("start", "grant", "revoke", "daily", "reserve", "commit", "refund")
JOB_STATES: tuple[str, ...] = ("accepted", "running", "posted", "failed", "refunded")
ACTIVE_STATES: tuple[str, ...] = ("accepted", "running")


def _in_check(column: str, values: Sequence[str], name: str) -> CheckConstraint:
    # Constant DDL built from the module's own tuples, never from input.
    quoted = ", ".join(f"'{v}'" for v in values)
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
    _in_check("state", JOB_STATES, "ck_jobs_state"),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_member_state", "guild_id", "user_id", "state"),
    Index("ix_jobs_guild_created", "guild_id", "created_at"),
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


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _v1_initial),
    Migration(2, "bot_meta: small process-wide facts (e.g. the last synced command hash)", _v2_bot_meta),
    Migration(3, "showcase_posts: one showcase post per job, with its approval state", _v3_showcase),
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

"""The engines: ``DATABASE_URL`` to an async engine, and SQLite's connection setup.

* :func:`engine_args` turns ``DATABASE_URL`` (SQLAlchemy URL form, as PaaS add-ons hand it out)
  into an async driver URL plus connect arguments: ``sqlite:///rel.db`` / ``sqlite:////abs.db``
  become ``sqlite+aiosqlite``; ``postgres://`` and ``postgresql://`` become ``postgresql+asyncpg``
  with libpq's ``sslmode`` turned into asyncpg's ``ssl`` argument.
* :func:`create_engine` builds the async engine; :func:`create_sqlite_sync_engine` the sync
  (pysqlite) engine of :meth:`kontext.db.Database.transact` for the same file. Both SQLite
  engines get the same connection setup (:func:`_install_sqlite_hooks`).

SQLite concurrency. SQLite has one writer at a time per file. The sqlite3 driver normally starts
a transaction lazily ("deferred") and upgrades the lock at the first write, which fails at once
with "database is locked" when another connection holds it, whatever the busy timeout. Here the
driver's own transaction handling is switched off (``isolation_level = None``) and every write
transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up front, and a second
writer (another task, another process) waits on ``busy_timeout`` (30 s) instead of failing. In
WAL mode readers never block the writer and vice versa, so read transactions (marked with the
:data:`READ_ONLY` execution option) use a plain (deferred) ``BEGIN``.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

SQLITE_BUSY_TIMEOUT_MS = 30_000
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
#: Execution option that marks a read-only transaction (SQLite then uses a deferred BEGIN).
READ_ONLY = "kontext_read_only"


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
    cert_params: dict[str, Any] = {k: query.pop(k) for k in ("sslrootcert", "sslcert", "sslkey") if k in query}
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


def _install_sqlite_hooks(engine: Engine) -> None:
    """Pragmas on connect; ``BEGIN IMMEDIATE`` (or ``BEGIN`` when read-only) on begin.

    ``engine`` is a sync engine: the async engine's ``sync_engine``, or the pysqlite engine of
    :meth:`Database.transact`. Both get exactly the same connection setup.
    """

    @event.listens_for(engine, "connect")
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

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
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
        _install_sqlite_hooks(engine.sync_engine)
    return engine


def create_sqlite_sync_engine(async_url: URL) -> Engine:
    """The sync (pysqlite) engine of :meth:`Database.transact` for the file of ``async_url``.

    Same pragmas and ``BEGIN IMMEDIATE`` hook as the async engine, parameters hidden from logs.
    Its connections are only used on the database's one transaction thread (one at a time), so
    one pooled connection is enough; ``check_same_thread=False`` lets ``dispose()`` close it
    from another thread.
    """
    engine = sa_create_engine(
        async_url.set(drivername="sqlite+pysqlite"),
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=4,
        pool_timeout=60,
        hide_parameters=True,
        connect_args={"check_same_thread": False},
    )
    _install_sqlite_hooks(engine)
    return engine


"""Database access: the engines and the transaction paths.

* :func:`engine_args` turns ``DATABASE_URL`` (SQLAlchemy URL form, as PaaS add-ons hand it out)
  into an async driver URL plus connect arguments: ``sqlite:///rel.db`` / ``sqlite:////abs.db``
  become ``sqlite+aiosqlite``; ``postgres://`` and ``postgresql://`` become ``postgresql+asyncpg``
  with libpq's ``sslmode`` turned into asyncpg's ``ssl`` argument.
* :class:`Database` wraps the engines and hands out transactions:

  - :meth:`Database.transact` runs a *synchronous* transaction body ``fn(conn)`` as one write
    transaction. The store's money transactions (reserve, commit, refund, grant, revoke, the job
    state changes) go this way. On Postgres the body runs through ``run_sync`` on the async
    engine. On SQLite it runs off the event loop, in one hop, on the database's transaction
    thread and a second, sync (pysqlite) engine for the same file with the same connection
    setup; whatever bodies are queued when the thread is free run as one group: one
    ``BEGIN IMMEDIATE`` … ``COMMIT`` (one fsync) for the group, each body inside its own
    ``SAVEPOINT`` so that a body that raises rolls back alone (group commit).
  - :meth:`Database.write` is an async write transaction for everything else; it shares the
    process's SQLite write lock with :meth:`Database.transact`.
  - :meth:`Database.read` is a read-only transaction.

* :func:`execute` runs a prebuilt statement inside a transaction body: on SQLite straight on the
  driver's cursor (compiled once, through SQLAlchemy's public compiler API), on Postgres through
  SQLAlchemy. Same SQL and the same row type (:class:`Rows` of named tuples) on both engines.
* The tables and their migrations live in :mod:`kontext.schema`.

Why the sync path: through the aiosqlite adapter every statement costs several loop↔thread
hand-offs plus SQLAlchemy's execution overhead, all while the process's write lock is held; a
money transaction of ~6 statements then takes milliseconds. Run as one sync body on one thread,
it costs a hop in and a hop out; group commit then shares each commit's fsync among the
transactions that were waiting for it. Durability is unchanged: ``synchronous`` stays at SQLite's
default (FULL), and no caller hears of its result before the group's ``COMMIT`` returned.

SQLite concurrency. SQLite has one writer at a time per file. The sqlite3 driver normally starts
a transaction lazily ("deferred") and upgrades the lock at the first write, which fails at once
with "database is locked" when another connection holds it, whatever the busy timeout. Here the
driver's own transaction handling is switched off (``isolation_level = None``) and every write
transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up front, and a second
writer (another task, another process) waits on ``busy_timeout`` (30 s) instead of failing. In
WAL mode readers never block the writer and vice versa, so read transactions use a plain
(deferred) ``BEGIN``. Inside one process, writers additionally queue on an :class:`asyncio.Lock`
(held by :meth:`Database.write` and by each group of :meth:`Database.transact`) so that they do
not all hold connections while spinning in SQLite's busy handler.

Postgres runs at READ COMMITTED: every balance change is a conditional ``UPDATE … WHERE … RETURNING``
that re-checks its condition on the newest row version after waiting for the row lock.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import ssl
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    CursorResult,
    event,
    text,
)
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

SQLITE_BUSY_TIMEOUT_MS = 30_000
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", ""})
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
#: Execution option that marks a read-only transaction (SQLite then uses a deferred BEGIN).
_READ_ONLY = "kontext_read_only"
T = TypeVar("T")


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


# --- executing prebuilt statements inside a transaction body ---------------------------------


class _Prepared:
    """A statement compiled once for the SQLite driver, for one set of parameter names.

    Built from SQLAlchemy's public compiler API only: ``Compiled.string``,
    ``SQLCompiler.positiontup`` and ``binds``, and ``construct_expanded_state()`` (the
    processors SQLAlchemy itself applies to each bound value). ``tests/kontext/test_db.py``
    checks, statement by statement, that this sends the driver exactly the SQL and values that
    ``conn.execute`` sends, and returns the same rows.
    """

    __slots__ = ("statement", "sql", "names", "constants", "processors", "row_type")

    def __init__(self, statement: Executable, dialect: Any, keys: tuple[str, ...]) -> None:
        # a prebuilt select / insert / update, compiled by a SQL dialect (both checked once: the
        # compiled statement is cached)
        assert isinstance(statement, ClauseElement), type(statement)
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler), type(compiled)
        sql = compiled.string
        order = compiled.positiontup
        if "POSTCOMPILE" in sql or order is None:
            raise ValueError("execute() takes no expanding IN; write it as OR of equalities")
        given = set(keys)
        for name in order:
            bind = compiled.binds[name]
            if name not in given and (bind.required or bind.callable is not None):
                raise ValueError(f"execute(): no value for the bind parameter {name!r}")
        # SQLAlchemy's own expansion for placeholder values: its processors, its positions
        expanded = compiled.construct_expanded_state({k: None for k in keys})
        if expanded.statement != sql or list(expanded.positiontup or ()) != list(order):
            raise ValueError("execute() takes no statement that SQLAlchemy rewrites per call")
        names: list[str] = []  # the call's parameter (or constant) of each placeholder
        constants: dict[str, Any] = {}  # the statement's own values (literals), processed
        processors: list[tuple[int, Callable[[Any], Any]]] = []  # (placeholder, processor)
        for index, name in enumerate(order):
            names.append(name)
            processor = expanded.processors.get(name)
            if processor is not None and not callable(processor):  # a tuple type's, per element
                raise ValueError(f"execute() takes no tuple-typed bind parameter ({name!r})")
            if name in given:
                if processor is not None:
                    processors.append((index, processor))
                continue
            value = compiled.binds[name].value
            constants[name] = processor(value) if processor else value
        self.statement = statement  # keeps the statement (and so its id) alive
        self.sql = sql
        self.names = tuple(names)
        self.constants = constants
        self.processors = tuple(processors)
        self.row_type: Any = None

    def args(self, params: dict[str, Any]) -> list[Any]:
        """The positional values for ``params``."""
        if self.constants:
            params = {**self.constants, **params}
        args = [params[name] for name in self.names]
        for index, processor in self.processors:
            args[index] = processor(args[index])
        return args


@functools.cache
def _row_type(names: tuple[str, ...]) -> Any:
    """The named tuple of rows with these column names (one class per set of names)."""
    return namedtuple("Row", names, rename=True)


class Rows:
    """The rows a statement returned through :func:`execute`, the same on both engines.

    Offers the few ``Result`` methods transaction bodies use; rows are named tuples (read by
    column name or position) with the driver's values (on SQLite a boolean column reads as
    0 / 1, on Postgres as False / True).
    """

    __slots__ = ("_rows",)

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    @classmethod
    def of(cls, result: CursorResult[Any]) -> Rows:
        """The rows of a SQLAlchemy result (none for a statement that returns no rows)."""
        if not result.returns_rows:
            return cls([])
        make = _row_type(tuple(result.keys()))._make
        return cls([make(r) for r in result])

    def first(self) -> Any:
        """The first row, or None."""
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        """The only row (NoResultFound / MultipleResultsFound otherwise)."""
        if not self._rows:
            raise NoResultFound("No row was found when one was required")
        if len(self._rows) > 1:
            raise MultipleResultsFound("Multiple rows were found when exactly one was required")
        return self._rows[0]

    def scalar_one(self) -> Any:
        """The first column of the only row."""
        return self.one()[0]

    def all(self) -> list[Any]:
        """Every row."""
        return list(self._rows)


_PREPARED: dict[tuple[int, tuple[str, ...]], _Prepared] = {}


def execute(conn: Connection, statement: Executable, params: dict[str, Any]) -> Rows:
    """Execute a prebuilt ``statement`` with named ``params`` inside a transaction body.

    Postgres: ``conn.execute(statement, params)``. SQLite (a pysqlite connection, as on the
    transaction thread): :func:`_execute_on_driver`, the fast path. Either way the result is
    :class:`Rows` (``first()``, ``one()``, ``scalar_one()``, ``all()``; rows read by column
    name).

    For long-lived statements only (each one stays compiled for the life of the process);
    no expanding ``IN``.
    """
    raw = conn.connection.driver_connection
    if not isinstance(raw, sqlite3.Connection):  # Postgres (or aiosqlite under run_sync)
        return Rows.of(conn.execute(statement, params))
    return _execute_on_driver(conn, raw, statement, params)


def _execute_on_driver(
    conn: Connection, raw: sqlite3.Connection, statement: Executable, params: dict[str, Any]
) -> Rows:
    """The SQLite fast path: ``statement`` compiled once (per set of parameter names, see
    :class:`_Prepared`) and executed straight on the driver's cursor, which costs a few
    microseconds instead of SQLAlchemy's tens per statement; same SQL, same values, same rows,
    errors wrapped as SQLAlchemy's."""
    keys = tuple(params)
    prepared = _PREPARED.get((id(statement), keys))
    if prepared is None or prepared.statement is not statement:
        prepared = _Prepared(statement, conn.dialect, keys)
        _PREPARED[(id(statement), keys)] = prepared
    try:
        cursor = raw.execute(prepared.sql, prepared.args(params))
        rows = cursor.fetchall()
        description = cursor.description
        cursor.close()
    except sqlite3.Error as exc:
        raise DBAPIError.instance(
            prepared.sql, None, exc, sqlite3.Error, hide_parameters=True, dialect=conn.dialect
        ) from exc
    if description is None:
        return Rows([])
    if prepared.row_type is None:
        prepared.row_type = _row_type(tuple(d[0] for d in description))
    make = prepared.row_type._make
    return Rows([make(r) for r in rows])


#: The most transactions one SQLite group commit takes (see :meth:`Database.transact`).
MAX_GROUP = 64
#: the savepoint each body of a group runs in (constant SQL: no name is ever built from input)
_SAVEPOINT_SQL = "SAVEPOINT kontext_tx"
_ROLLBACK_TO_SQL = "ROLLBACK TO kontext_tx"
_RELEASE_SQL = "RELEASE kontext_tx"
#: A queued transaction body and the future its caller awaits.
_Queued = tuple[Callable[[Connection], Any], "asyncio.Future[Any]"]


class _GroupBroken(Exception):
    """A group's transaction ended under it (SQLite rolls back by itself on some errors)."""


def _run_alone(conn: Connection, fn: Callable[[Connection], Any]) -> tuple[bool, Any]:
    """``fn`` in a transaction of its own: ``(True, result)`` or ``(False, exception)``."""
    try:
        with conn.begin():
            return True, fn(conn)
    except Exception as exc:
        return False, exc


def _run_together(conn: Connection, group: list[_Queued]) -> list[tuple[bool, Any]]:
    """Every ``fn`` of ``group`` in one transaction, each inside its own savepoint.

    When ``BEGIN`` itself fails (e.g. another process held the lock past the busy timeout),
    nothing ran: every ``fn`` gets that error. Raises when the transaction fails as a whole
    after it began (then nothing of it is committed).
    """
    try:
        transaction = conn.begin()
    except Exception as exc:
        return [(False, exc)] * len(group)
    outcomes: list[tuple[bool, Any]] = []
    with transaction:
        raw = conn.connection.driver_connection
        assert raw is not None
        for fn, future in group:
            if future.done():  # cancelled while queued: skip (the outcome is never read)
                outcomes.append((False, asyncio.CancelledError()))
                continue
            raw.execute(_SAVEPOINT_SQL)
            try:
                value = fn(conn)
            except Exception as exc:
                if not raw.in_transaction:
                    raise _GroupBroken from exc
                raw.execute(_ROLLBACK_TO_SQL)
                raw.execute(_RELEASE_SQL)
                outcomes.append((False, exc))
            else:
                raw.execute(_RELEASE_SQL)
                outcomes.append((True, value))
    return outcomes


class Database:
    """An async engine plus the transaction discipline of the store.

    Use :meth:`transact` for the store's write transactions (a sync function run as one
    transaction), :meth:`write` for a write transaction written against the async API, and
    :meth:`read` for read-only ones.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        #: SQLite: the sync engine and the one thread :meth:`transact` runs transactions on.
        self.sync_engine: Engine | None = None
        self._executor: ThreadPoolExecutor | None = None
        if self.is_sqlite:
            self.sync_engine = create_sqlite_sync_engine(engine.url)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kontext-db")
        self._queue: list[_Queued] = []
        self._flusher: asyncio.Task[None] | None = None
        #: the transaction thread's connection (used on that thread only)
        self._thread_conn: Connection | None = None

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

    async def transact(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` as one write transaction and return its result.

        ``fn`` is synchronous and gets a sync :class:`sqlalchemy.Connection` inside an open
        transaction: its changes are committed when it returns, rolled back when it raises (the
        exception is re-raised here). The same ``fn`` runs on both engines:

        * Postgres: ``fn`` runs through ``AsyncConnection.run_sync`` in its own transaction of
          the async engine.
        * SQLite: ``fn`` is queued for the database's transaction thread, which runs whatever
          is queued in one hop off the event loop, on the sync pysqlite engine, under this
          process's write lock (shared with :meth:`write`): group commit. Each ``fn`` of a
          group runs inside its own ``SAVEPOINT`` (an exception rolls back that ``fn`` alone),
          the group shares one ``BEGIN IMMEDIATE`` … ``COMMIT``, and no caller hears of its
          result before that ``COMMIT`` (with its fsync) is done. Should the group's
          transaction fail as a whole, nothing of it is committed and each ``fn`` is run again
          in a transaction of its own, so every caller gets its own outcome.

        So ``fn`` must only work through ``conn`` (no awaiting, no loop-bound objects, no side
        effects outside the database): it may be run a second time when its first run was
        rolled back. A caller cancelled before its ``fn`` starts skips it; once started, it
        commits or rolls back as if the caller were still waiting.
        """
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                return await conn.run_sync(fn)
        if self._executor is None:
            raise RuntimeError("the database is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, future))
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush(), name="kontext-db-group-commit")
        return await future

    async def _flush(self) -> None:
        """Run the queued transactions, a group at a time, until the queue is empty."""
        assert self._write_lock is not None
        loop = asyncio.get_running_loop()
        while self._queue:
            async with self._write_lock:
                group = [item for item in self._queue[:MAX_GROUP] if not item[1].done()]
                del self._queue[:MAX_GROUP]
                if not group:
                    continue
                try:
                    if self._executor is None:
                        raise RuntimeError("the database is closed")
                    outcomes = await loop.run_in_executor(self._executor, self._run_group, group)
                except asyncio.CancelledError:  # the loop is going away: so are the callers
                    for _, future in [*group, *self._queue]:
                        future.cancel()
                    self._queue.clear()
                    raise
                except Exception as exc:  # the machinery itself failed: tell the callers
                    outcomes = [(False, exc)] * len(group)
            for (_, future), (ok, value) in zip(group, outcomes, strict=True):
                if future.done():  # the caller was cancelled meanwhile
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            # let the callers just answered queue their next transaction: it joins the next group
            await asyncio.sleep(0)

    def _run_group(self, group: list[_Queued]) -> list[tuple[bool, Any]]:
        """On the transaction thread: run ``group`` in one transaction (see :meth:`transact`)."""
        conn = self._connection()
        if len(group) == 1:
            return [_run_alone(conn, group[0][0])]
        try:
            return _run_together(conn, group)
        except Exception:  # nothing of the group was committed: one transaction each
            conn = self._connection()
            return [
                (False, asyncio.CancelledError()) if future.done() else _run_alone(conn, fn)
                for fn, future in group
            ]

    def _connection(self) -> Connection:
        """On the transaction thread: its connection, kept open between groups."""
        conn = self._thread_conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                conn.close()
            assert self.sync_engine is not None
            conn = self._thread_conn = self.sync_engine.connect()
        return conn

    def _close_thread_conn(self) -> None:
        """On the transaction thread: close its connection (kept open between groups)."""
        conn, self._thread_conn = self._thread_conn, None
        if conn is not None:
            conn.close()

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
    async def exclusive_write(self, lock_key: int) -> AsyncIterator[AsyncConnection]:
        """A write transaction that no other process's ``exclusive_write`` overlaps: for
        schema changes (:func:`kontext.schema.run_migrations`).

        Postgres: the transaction first takes the advisory lock ``lock_key`` (held until it
        ends). SQLite: ``BEGIN IMMEDIATE`` is the lock (the file has one writer), under this
        process's write lock; foreign keys are switched off for the transaction, as SQLite's
        procedure for rebuilding a table requires (Alembic's batch mode copies, drops and
        renames tables), and ``PRAGMA foreign_key_check`` must find nothing before the commit.
        """
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
                yield conn
            return
        async with self._write_lock, self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            await (await raw.execute("PRAGMA foreign_keys = OFF")).close()  # outside BEGIN
            try:
                async with conn.begin():
                    yield conn
                    broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise RuntimeError(f"foreign keys broken by a schema change: {broken[:5]}")
            finally:
                if not conn.invalidated:
                    await (await raw.execute("PRAGMA foreign_keys = ON")).close()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (never takes SQLite's write lock)."""
        async with self.engine.connect() as conn:
            await conn.execution_options(**{_READ_ONLY: True})
            async with conn.begin():
                yield conn

    async def dispose(self) -> None:
        """Close every pooled connection (after the queued transactions, if any, have run)."""
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])
        if self._executor is not None:
            executor, self._executor = self._executor, None
            # after a transaction still running there (a cancelled caller's), if any
            await asyncio.get_running_loop().run_in_executor(executor, self._close_thread_conn)
            executor.shutdown(wait=False)
        if self.sync_engine is not None:
            self.sync_engine.dispose()
        await self.engine.dispose()

"""Database access: :class:`Database`, the transaction paths of the store.

* :class:`Database` wraps the engines (built in :mod:`kontext.db_engine`) and hands out
  transactions:

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
  - :meth:`Database.exclusive_write` is a write transaction no other process's overlaps (the
    migrations').
  - :meth:`Database.read` is a read-only transaction.

* :func:`execute` (:mod:`kontext.db_execute`, re-exported here) runs a prebuilt statement
  inside a transaction body, on SQLite straight on the driver's cursor.
* The URL forms and SQLite's connection setup: :mod:`kontext.db_engine` (re-exported here). The
  tables and their migrations: :mod:`kontext.schema`.

Why the sync path: through the aiosqlite adapter every statement costs several loop↔thread
hand-offs plus SQLAlchemy's execution overhead, all while the process's write lock is held; a
money transaction of ~6 statements then takes milliseconds. Run as one sync body on one thread,
it costs a hop in and a hop out; group commit then shares each commit's fsync among the
transactions that were waiting for it. Durability is unchanged: ``synchronous`` stays at SQLite's
default (FULL), and no caller hears of its result before the group's ``COMMIT`` returned.

SQLite has one writer per file (see :mod:`kontext.db_engine` for ``BEGIN IMMEDIATE`` and the
busy timeout); inside one process, writers additionally queue on an :class:`asyncio.Lock` (held
by :meth:`Database.write` and by each group of :meth:`Database.transact`) so that they do not
all hold connections while spinning in SQLite's busy handler.

Postgres runs at READ COMMITTED: every balance change is a conditional ``UPDATE … WHERE … RETURNING``
that re-checks its condition on the newest row version after waiting for the row lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import tenacity
from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kontext.db_engine import (
    READ_ONLY,
    SQLITE_BUSY_TIMEOUT_MS,
    create_engine,
    create_sqlite_sync_engine,
    engine_args,
)
from kontext.db_execute import execute

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "Database",
    "create_engine",
    "create_sqlite_sync_engine",
    "engine_args",
    "execute",
]

T = TypeVar("T")


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
        busy timeout, so two processes creating one database at once can be refused: a locked
        database (``OperationalError``) is tried again, without blocking the event loop, for up
        to the busy timeout (pauses of 0.01 s doubling to 0.5 s), then its error is raised; any
        other error, or a file that will not take WAL mode, is raised at once. No-op on Postgres.
        """
        if not self.is_sqlite:
            return
        async for attempt in tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type((OperationalError, sqlite3.OperationalError)),
            stop=tenacity.stop_after_delay(SQLITE_BUSY_TIMEOUT_MS / 1000),
            wait=tenacity.wait_exponential(multiplier=0.01, max=0.5),  # 0.01 s, doubling, ≤ 0.5 s
            reraise=True,
        ):
            with attempt:
                mode = await self._switch_to_wal()
        if mode != "wal":
            raise RuntimeError(f"SQLite refused WAL mode (journal_mode={mode})")

    async def _switch_to_wal(self) -> str:
        """One try at ``PRAGMA journal_mode = WAL``: the journal mode SQLite answers, lowercase."""
        async with self.engine.connect() as conn:
            # on the driver's connection: outside any transaction, as the pragma needs
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            cursor = await raw.execute("PRAGMA journal_mode = WAL")
            row = await cursor.fetchone()
            await cursor.close()
        return str(row[0] if row else "").lower()

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
            await conn.execution_options(**{READ_ONLY: True})
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

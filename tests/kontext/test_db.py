"""Tests of :mod:`kontext.db`: URLs, SQLite's locking discipline, running the migrations at
open, transactions, and the SQLite fast path of :func:`kontext.db_execute.execute` (checked against
SQLAlchemy's own execution, statement by statement)."""

from __future__ import annotations

import asyncio
import inspect
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BindParameter, Connection, bindparam, create_engine, select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from kontext import db as db_module
from kontext import db_engine, db_execute
from kontext.db import SQLITE_BUSY_TIMEOUT_MS, Database, engine_args, execute
from kontext.errors import JobAlreadyExists
from kontext.schema import current_revision, head_revision, jobs, revisions
from kontext.schema import run_migrations as run
from kontext.store import ReserveRequest, Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits
from tests.dbutil import (
    FakeClock,
    ensure_postgres,
    job_options,
    make_settings,
    postgres_base_url,
    put_job_in_state,
    temp_postgres_schema,
)

# --- URLs -------------------------------------------------------------------------------------


def test_sqlite_relative_url_creates_parent_dir(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    url, connect_args = engine_args("sqlite:///data/kontext.db")
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(tmp_path / "data" / "kontext.db")
    assert (tmp_path / "data").is_dir() and connect_args == {}


def test_sqlite_absolute_url(tmp_path: Path) -> None:
    url, _ = engine_args(f"sqlite:///{tmp_path}/sub/k.db")  # sqlite:////abs/path
    assert url.database == str(tmp_path / "sub" / "k.db")
    assert (tmp_path / "sub").is_dir()


@pytest.mark.parametrize("raw", ["sqlite://", "sqlite:///:memory:", "mysql://x@h/db"])
def test_unsupported_urls(raw: str) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        engine_args(raw)


@pytest.mark.parametrize(
    ("raw", "ssl", "query"),
    [
        ("postgres://u:p@db.example.com:5432/d?sslmode=require", "require", {}),
        ("postgresql://u:p@db.example.com/d", "prefer", {}),  # Heroku: no sslmode, needs SSL
        ("postgres://u@localhost/d", None, {}),
        ("postgresql://u@127.0.0.1:5432/d", None, {}),
        ("postgresql://u@127.0.0.1/d?sslmode=disable", "disable", {}),
        ("postgresql+asyncpg://u@db.example.com/d?sslmode=verify-full", "verify-full", {}),
        ("postgresql://u@h.example/d?ssl=true", "require", {}),
        ("postgresql://u@h.example/d?sslmode=require&prepared_statement_cache_size=0", "require",
         {"prepared_statement_cache_size": "0"}),
    ],
)  # fmt: skip
def test_postgres_urls(raw: str, ssl: str | None, query: dict[str, str]) -> None:
    url, connect_args = engine_args(raw)
    assert url.drivername == "postgresql+asyncpg"
    assert connect_args.get("ssl") == ssl
    assert dict(url.query) == query
    assert url.password == ("p" if ":p@" in raw else None)


def test_postgres_url_bad_sslmode_and_application_name() -> None:
    with pytest.raises(ValueError, match="sslmode"):
        engine_args("postgres://u@h/d?sslmode=sometimes")
    _, args = engine_args("postgres://u@localhost/d?application_name=kontext")
    assert args == {"server_settings": {"application_name": "kontext"}}


async def test_postgres_url_forms_connect() -> None:
    """``postgres://`` and ``?sslmode=disable`` reach the real server."""
    await ensure_postgres()
    base = postgres_base_url().replace("postgresql://", "postgres://", 1)
    sep = "&" if "?" in base else "?"
    async with temp_postgres_schema() as (_, kwargs):
        store = await Store.open(
            f"{base}{sep}sslmode=disable", make_settings(), engine_kwargs=kwargs
        )
        try:
            assert await store.ping()
        finally:
            await store.close()


# --- SQLite locking ---------------------------------------------------------------------------------


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path}/p.db")
    try:
        await db.prepare()
        async with db.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
            assert timeout == SQLITE_BUSY_TIMEOUT_MS >= 30_000
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await db.dispose()


def _hold_read_lock(path: Path) -> sqlite3.Connection:
    """Another connection in a read transaction: the file's journal mode cannot change under it."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t").fetchall()
    return holder


async def test_sqlite_prepare_retries_a_locked_file_until_it_switches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file another process holds is tried again (SQLite answers "database is locked"), and
    the switch succeeds once the other lets go."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT_MS", 20)  # each try gives up quickly
    holder = _hold_read_lock(tmp_path / "w.db")
    db = Database.from_url(f"sqlite:///{tmp_path}/w.db")
    tries: list[str] = []
    switch = db._switch_to_wal

    async def watched() -> str:
        try:
            mode = await switch()
        except sqlite3.OperationalError as error:
            tries.append(str(error))
            holder.execute("COMMIT")  # the other process lets go after the first refusal
            raise
        tries.append(mode)
        return mode

    monkeypatch.setattr(db, "_switch_to_wal", watched)
    try:
        await db.prepare()
        assert tries == ["database is locked", "wal"]
        async with db.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        holder.close()
        await db.dispose()


async def test_sqlite_prepare_gives_up_on_a_file_locked_past_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locked for longer than the busy timeout: the lock's own error surfaces, after retries."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT_MS", 20)
    monkeypatch.setattr(db_module, "SQLITE_BUSY_TIMEOUT_MS", 300)
    holder = _hold_read_lock(tmp_path / "g.db")
    db = Database.from_url(f"sqlite:///{tmp_path}/g.db")
    tries = 0
    switch = db._switch_to_wal

    async def counted() -> str:
        nonlocal tries
        tries += 1
        return await switch()

    monkeypatch.setattr(db, "_switch_to_wal", counted)
    try:
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            await db.prepare()
        assert tries > 2
    finally:
        holder.close()
        await db.dispose()


async def test_sqlite_prepare_raises_at_once_when_wal_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer other than WAL is not a lock: no retry."""
    db = Database.from_url(f"sqlite:///{tmp_path}/r.db")
    tries = 0

    async def refused() -> str:
        nonlocal tries
        tries += 1
        return "delete"

    monkeypatch.setattr(db, "_switch_to_wal", refused)
    try:
        with pytest.raises(RuntimeError, match="journal_mode=delete"):
            await db.prepare()
        assert tries == 1
    finally:
        await db.dispose()


async def test_sqlite_write_takes_the_lock_at_begin(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    db = Database.from_url(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        async with db.read():  # a reader does not block a writer
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        async with db.write() as conn:  # BEGIN IMMEDIATE before any statement
            assert conn.in_transaction()
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
        await db.dispose()


async def test_sqlite_two_engines_write_concurrently(tmp_path: Path) -> None:
    """Two stores (separate pools and locks, like two processes) on one file: no lock errors."""
    url = f"sqlite:///{tmp_path}/two.db"
    a, b = await asyncio.gather(Store.open(url, make_settings()), Store.open(url, make_settings()))
    try:
        await asyncio.gather(*(s.credits.grant(1, 2, 1, actor_id=3) for s in (a, b) for _ in range(40)))
        assert (await a.credits.member_status(1, 2)).balance == 10 + 80
        assert await b.audit.check_invariants() == []
    finally:
        await a.close()
        await b.close()


# --- migrations -----------------------------------------------------------------------------------


async def test_migrations_are_idempotent(fresh_db: tuple[str, dict[str, Any]]) -> None:
    url, kwargs = fresh_db
    db = Database.from_url(url, **kwargs)
    try:
        assert await current_revision(db) is None
        assert await run(db) == len(revisions())
        assert await run(db) == 0
        assert await current_revision(db) == head_revision()
        async with db.read() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert [r[0] for r in rows] == [head_revision()]
    finally:
        await db.dispose()


async def test_concurrent_open_on_fresh_database(fresh_db: tuple[str, dict[str, Any]]) -> None:
    url, kwargs = fresh_db
    stores = await asyncio.gather(
        *(Store.open(url, make_settings(), engine_kwargs=kwargs) for _ in range(4))
    )
    try:
        await asyncio.gather(*(s.credits.grant(1, 2, 1, actor_id=3) for s in stores))
        assert (await stores[0].credits.member_status(1, 2)).balance == 14
        assert await stores[1].audit.check_invariants() == []
    finally:
        for s in stores:
            await s.close()


async def test_migrations_run_once_under_concurrency(
    fresh_db: tuple[str, dict[str, Any]],
) -> None:
    """Three engines (like three processes) upgrade one fresh database at once: each revision
    is applied exactly once. (Upgrades from older schemas, the rollback of a failing upgrade
    and the history itself are tested in test_migrations.py.)"""
    url, kwargs = fresh_db
    dbs = [Database.from_url(url, **kwargs) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(run(db) for db in dbs))
        assert sorted(applied) == [0, 0, len(revisions())]
        async with dbs[0].read() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM alembic_version"))).scalar()
        assert count == 1
        assert await current_revision(dbs[1]) == head_revision()
    finally:
        for db in dbs:
            await db.dispose()


# --- Database.transact: one transaction per sync body; group commit on SQLite ----------------------


async def _probe_db(url: str, kwargs: dict[str, Any]) -> Database:
    db = Database.from_url(url, **kwargs)
    await run(db)
    async with db.write() as conn:
        await conn.execute(text("CREATE TABLE probe (n INTEGER PRIMARY KEY)"))
    return db


def _insert(n: int, *, fail: bool = False) -> Any:
    def body(conn: Connection) -> int:
        conn.execute(text("INSERT INTO probe (n) VALUES (:n)"), {"n": n})
        if fail:
            raise LookupError(f"body {n} failed")
        return n

    return body


async def _probe_rows(db: Database) -> list[int]:
    async with db.read() as conn:
        return list((await conn.execute(text("SELECT n FROM probe ORDER BY n"))).scalars())


async def test_transact_commits_or_rolls_back(fresh_db: tuple[str, dict[str, Any]]) -> None:
    url, kwargs = fresh_db
    db = await _probe_db(url, kwargs)
    try:
        assert await db.transact(_insert(1)) == 1
        with pytest.raises(LookupError, match="body 2"):
            await db.transact(_insert(2, fail=True))
        results = await asyncio.gather(
            *(db.transact(_insert(n, fail=n % 3 == 0)) for n in range(10, 20)),
            return_exceptions=True,
        )
        assert [isinstance(r, LookupError) for r in results] == [n % 3 == 0 for n in range(10, 20)]
        assert await _probe_rows(db) == [1, *(n for n in range(10, 20) if n % 3)]
    finally:
        await db.dispose()


class _Gate:
    """A transaction body that holds the transaction thread until released (forms a group)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: Connection) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "gate"

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


async def test_sqlite_group_commit_isolates_each_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies queued together share one transaction; a failing one rolls back alone."""
    groups: list[int] = []
    real = db_module._run_together

    def spy(conn: Connection, group: list[Any]) -> list[tuple[bool, Any]]:
        groups.append(len(group))
        return real(conn, group)

    monkeypatch.setattr(db_module, "_run_together", spy)
    db = await _probe_db(f"sqlite:///{tmp_path}/g.db", {})
    try:
        gate = _Gate()
        first = asyncio.ensure_future(db.transact(gate))
        await gate.wait_entered()
        queued = [asyncio.ensure_future(db.transact(_insert(n, fail=n == 2))) for n in (1, 2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.release.set()
        assert await first == "gate"
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert results[0] == 1 and results[2:] == [3, 4]
        assert isinstance(results[1], LookupError)
        assert groups == [4]
        assert await _probe_rows(db) == [1, 3, 4]
    finally:
        await db.dispose()


async def test_sqlite_broken_group_reruns_each_body_alone(tmp_path: Path) -> None:
    """A body that ends the group's transaction: nothing of the group is lost or half-done."""
    db = await _probe_db(f"sqlite:///{tmp_path}/b.db", {})
    runs: list[int] = []

    def counted(n: int) -> Any:
        def body(conn: Connection) -> int:
            runs.append(n)
            return _insert(n)(conn)

        return body

    def breaker(conn: Connection) -> None:
        conn.execute(text("INSERT INTO probe (n) VALUES (99)"))
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute("ROLLBACK")  # as SQLite does by itself on e.g. a full disk
        raise OSError("disk full")

    try:
        gate = _Gate()
        first = asyncio.ensure_future(db.transact(gate))
        await gate.wait_entered()
        queued = [
            asyncio.ensure_future(db.transact(body)) for body in (counted(1), breaker, counted(2))
        ]
        await asyncio.sleep(0.05)
        gate.release.set()
        await first
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert results[0] == 1 and results[2] == 2
        assert isinstance(results[1], OSError)
        assert runs == [1, 1, 2]  # 1 ran in the broken group, then each body ran alone
        assert await _probe_rows(db) == [1, 2]
    finally:
        await db.dispose()


async def test_sqlite_cancelled_while_queued_never_runs(tmp_path: Path) -> None:
    db = await _probe_db(f"sqlite:///{tmp_path}/c.db", {})
    try:
        gate = _Gate()
        first = asyncio.ensure_future(db.transact(gate))
        await gate.wait_entered()
        doomed = asyncio.ensure_future(db.transact(_insert(1)))
        kept = asyncio.ensure_future(db.transact(_insert(2)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.release.set()
        await first
        assert await kept == 2
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert await _probe_rows(db) == [2]
    finally:
        await db.dispose()
    with pytest.raises(RuntimeError, match="closed"):
        await db.transact(_insert(3))


async def test_sqlite_transact_connection_setup_and_lock(tmp_path: Path) -> None:
    """The sync engine has the async one's pragmas and takes the write lock at BEGIN."""
    path = tmp_path / "t.db"
    db = Database.from_url(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        await run(db)

        def body(conn: Connection) -> tuple[Any, ...]:
            pragmas = tuple(
                conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            )
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                return (*pragmas, str(exc))
            other.execute("ROLLBACK")
            return (*pragmas, "not locked")

        journal, busy, fks, synchronous, locked = await db.transact(body)
        assert (journal, busy, fks) == ("wal", SQLITE_BUSY_TIMEOUT_MS, 1)
        assert synchronous == 2  # FULL: every commit is on disk before anyone hears of it
        assert "locked" in locked
    finally:
        other.close()
        await db.dispose()


async def test_execute_fast_path(fresh_db: tuple[str, dict[str, Any]]) -> None:
    """``execute`` gives the same rows and errors on both engines."""
    url, kwargs = fresh_db
    db = await _probe_db(url, kwargs)
    insert = text("INSERT INTO probe (n) VALUES (:n) RETURNING n, n * 2 AS twice")
    select_one = text("SELECT n FROM probe WHERE n = :n")
    try:

        def body(conn: Connection) -> tuple[Any, ...]:
            row = execute(conn, insert, {"n": 5}).one()
            missing = execute(conn, select_one, {"n": 6}).first()
            return row.n, row.twice, missing, execute(conn, select_one, {"n": 5}).scalar_one()

        assert await db.transact(body) == (5, 10, None, 5)
        with pytest.raises(IntegrityError):
            await db.transact(lambda conn: execute(conn, insert, {"n": 5}))
        assert await _probe_rows(db) == [5]
    finally:
        await db.dispose()


def test_execute_refuses_expanding_in(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/x.db")
    try:
        with engine.begin() as conn:
            stmt = select(jobs.c.id).where(jobs.c.id.in_([1, 2]))
            with pytest.raises(ValueError, match="expanding IN"):
                execute(conn, stmt, {})
    finally:
        engine.dispose()


# --- the SQLite fast path equals SQLAlchemy's own execution ----------------------------------------


def test_fast_path_reads_only_public_compiler_api() -> None:
    """What :class:`kontext.db_execute._Prepared` reads of a compiled statement exists and means what it
    assumes; and it reads nothing private (a SQLAlchemy upgrade that changes these fails here)."""
    stmt = select(jobs.c.id, jobs.c.state).where(jobs.c.id == bindparam("j"), jobs.c.state == "x")
    compiled = stmt.compile(dialect=sqlite.dialect(), column_keys=["j"])
    assert compiled.string.count("?") == 2
    assert list(compiled.positiontup or ()) == ["j", "state_1"]
    assert isinstance(compiled.binds["j"], BindParameter) and compiled.binds["j"].required
    assert compiled.binds["state_1"].value == "x" and compiled.binds["state_1"].callable is None
    expanded = compiled.construct_expanded_state({"j": 7})
    assert expanded.statement == compiled.string
    assert list(expanded.positiontup or ()) == ["j", "state_1"]
    assert expanded.positional_parameters == (7, "x")
    assert isinstance(expanded.processors, dict)
    prepared = db_execute._Prepared(stmt, sqlite.dialect(), ("j",))
    assert (prepared.sql, prepared.args({"j": 7})) == (compiled.string, [7, "x"])
    source = inspect.getsource(db_execute._Prepared) + inspect.getsource(db_execute._execute_on_driver)
    assert not re.search(r"\b(compiled|expanded|bind|statement)\._[a-z]", source)


def _loose(value: Any) -> Any:
    """A float to the nearest 10 s (for values read from the moving database clock)."""
    return round(value, -1) if isinstance(value, float) else value


async def test_fast_path_matches_sqlalchemy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statement the store runs through the fast path, in a workload of the money and queue
    transactions: SQLite is sent exactly the SQL and values that ``conn.execute`` sends (the
    driver's trace of each, values expanded), and the rows are the same, named the same."""
    real = db_execute._execute_on_driver
    checked: dict[int, str] = {}

    def sqlite_statements(trace: list[str]) -> list[str]:
        return [t for t in trace if not t.startswith(("SAVEPOINT", "ROLLBACK", "RELEASE"))]

    def compare(
        conn: Connection, raw: sqlite3.Connection, statement: Any, params: dict[str, Any]
    ) -> db_execute.Rows:
        trace: list[str] = []
        raw.set_trace_callback(trace.append)
        try:
            expected: Any
            with conn.begin_nested() as savepoint:  # SQLAlchemy's execution, then undone
                try:
                    result = conn.execute(statement, params)
                    keys = tuple(result.keys()) if result.returns_rows else ()
                    expected = [tuple(r) for r in result] if result.returns_rows else []
                except DBAPIError as exc:
                    expected = type(exc)
                savepoint.rollback()
            sent_by_sqlalchemy = sqlite_statements(trace)
            trace.clear()
            try:
                rows = real(conn, raw, statement, params)
            except DBAPIError as exc:
                assert type(exc) is expected
                raise
            assert sqlite_statements(trace) == sent_by_sqlalchemy
        finally:
            raw.set_trace_callback(None)
        got = [tuple(r) for r in rows.all()]
        if "julianday('now')" in sent_by_sqlalchemy[0]:  # the database's clock moved on since
            assert len(got) == len(expected)
            for mine, theirs in zip(got, expected, strict=True):
                assert mine == pytest.approx(theirs, abs=5) if all(
                    isinstance(v, int | float) for v in (*mine, *theirs) if v is not None
                ) else [_loose(v) for v in mine] == [_loose(v) for v in theirs]
        else:
            assert got == expected
        if expected:
            assert rows.first()._fields == keys
        checked[id(statement)] = sent_by_sqlalchemy[0].split(" ", 1)[0]
        return rows

    monkeypatch.setattr(db_execute, "_execute_on_driver", compare)
    settings = make_settings(cooldown_seconds=0, jobs_per_member=5, daily_free_credits=20)
    store = await Store.open(f"sqlite:///{tmp_path}/f.db", settings, clock=FakeClock())
    try:

        def job(job_id: int, user_id: int) -> ReserveRequest:
            return ReserveRequest(
                job_id=job_id, guild_id=1, channel_id=5, user_id=user_id,
                options=job_options(seed=job_id),
            )  # fmt: skip

        for job_id, user_id in ((1, 2), (2, 2), (3, 3), (4, 3)):
            await store.ledger.reserve(job(job_id, user_id))
        limits = AccountLimits(OWNER_ACCOUNT, 4, 100)
        first = await store.queue.claim_next("w", limits, lease_s=30)
        assert first.job is not None and first.lease is not None
        assert await store.leases.mark_sent(first.lease)
        second = await store.queue.claim_next("w", limits, lease_s=30, done=first.lease)
        assert second.job is not None and second.lease is not None and second.done_posting
        assert await store.leases.mark_sent(second.lease)
        assert await store.leases.api_done(second.lease)
        assert not await store.leases.mark_posting(first.lease)  # already posting
        assert await store.ledger.commit(
            first.job.id, result_message_id=9, result_channel_id=5, lease=first.lease
        )
        assert await store.ledger.refund(second.job.id, cause="api_error", lease=second.lease)
        waiting, other = sorted({1, 2, 3, 4} - {first.job.id, second.job.id})
        assert await store.ledger.refund(waiting, cause="shutdown", waiting_only=True)
        assert await put_job_in_state(store, other, "posting")
        assert await store.ledger.commit(other, result_message_id=10, result_channel_id=5, duration_s=1.5)
        await store.credits.grant(1, 2, 5, actor_id=7)
        assert (await store.credits.revoke(1, 2, 1_000, actor_id=7))[1] == 0
        with pytest.raises(JobAlreadyExists):
            await store.ledger.reserve(job(1, 2))
        assert await store.audit.check_invariants() == []
    finally:
        await store.close()
    kinds = sorted(checked.values())
    assert len(checked) >= 25, kinds  # 29 today
    assert {"SELECT", "INSERT", "UPDATE"} <= set(kinds), kinds

"""Alembic migrations (:mod:`kontext.schema`, ``kontext/migrations/``), on SQLite and Postgres.

The schema a database ends up with must not depend on its history: upgrading from every
revision, and from every version of the runner before Alembic, gives exactly the schema of a
fresh install (tables, columns with types, nullability and defaults, primary keys, indexes,
unique and CHECK constraints, foreign keys, as the database reports them), and that schema is
:data:`kontext.schema.metadata` (Alembic's autogenerate finds no difference).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from kontext import schema
from kontext.db import Database
from kontext.migrations import legacy
from kontext.store import Store
from tests.dbutil import backend_url, make_settings

LEGACY_VERSIONS = range(1, legacy.LAST_VERSION + 1)


def snapshot(conn: Connection) -> dict[str, Any]:
    """Everything the database says about its tables (``alembic_version``'s rows aside)."""
    insp = inspect(conn)
    tables: dict[str, Any] = {}
    for name in sorted(insp.get_table_names()):
        pk = insp.get_pk_constraint(name)
        tables[name] = {
            "columns": [
                (
                    c["name"],
                    c["type"].compile(dialect=conn.dialect),
                    c["nullable"],
                    None if c.get("default") is None else str(c["default"]),
                )
                for c in insp.get_columns(name)
            ],
            "primary_key": (pk.get("name"), tuple(pk["constrained_columns"])),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(name)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"])) for u in insp.get_unique_constraints(name)
            ),
            "checks": sorted(
                (c["name"], re.sub(r"\s+", " ", c["sqltext"]))
                for c in insp.get_check_constraints(name)
            ),
            "foreign_keys": sorted(
                (
                    f["name"],
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    tuple(f["referred_columns"]),
                )
                for f in insp.get_foreign_keys(name)
            ),
        }
    return tables


async def _snapshot(db: Database) -> dict[str, Any]:
    async with db.read() as conn:
        return await conn.run_sync(snapshot)


async def _in_transaction(db: Database, fn: Any) -> Any:
    async with db.write() as conn:
        return await conn.run_sync(fn)


_fresh: dict[str, dict[str, Any]] = {}


async def fresh_schema(backend: str, tmp_path: Path) -> dict[str, Any]:
    """The schema of a fresh install on ``backend`` (computed once per backend)."""
    if backend not in _fresh:
        async with backend_url(backend, tmp_path, "fresh.db") as url:
            assert await schema.upgrade(url) == len(schema.revisions())
            db = Database.from_url(url)
            try:
                _fresh[backend] = await _snapshot(db)
                assert await schema.current_revision(db) == schema.head_revision()
            finally:
                await db.dispose()
    return _fresh[backend]


# --- the history ------------------------------------------------------------------------------------


def test_history_is_linear_and_frozen() -> None:
    revisions = schema.revisions()
    assert revisions[0] == legacy.BRIDGE_REVISION == "0001"
    assert revisions[-1] == schema.head_revision()
    assert len(set(revisions)) == len(revisions)
    files = sorted((schema.MIGRATIONS_DIR / "versions").glob("*.py"))
    assert [f.name.split("_", 1)[0] for f in files] == revisions
    for previous, revision, path in zip([None, *revisions], revisions, files, strict=False):
        assert schema._script().get_revision(revision).down_revision == previous
        source = path.read_text()
        # frozen: a revision never reads today's tables
        assert not re.search(r"^\s*(from|import) kontext", source, re.M), path.name


# --- upgrade equals fresh ---------------------------------------------------------------------------


@pytest.mark.parametrize("revision", schema.revisions())
async def test_upgrade_from_each_revision_equals_fresh(
    backend: str, tmp_path: Path, revision: str
) -> None:
    fresh = await fresh_schema(backend, tmp_path)
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:
            revisions = schema.revisions()
            position = revisions.index(revision)
            assert await schema.run_migrations(db, revision=revision) == position + 1
            assert await schema.current_revision(db) == revision
            assert await schema.run_migrations(db) == len(revisions) - position - 1
            assert await _snapshot(db) == fresh
            assert await schema.current_revision(db) == schema.head_revision()
        finally:
            await db.dispose()


@pytest.mark.parametrize("version", LEGACY_VERSIONS)
async def test_upgrade_from_each_legacy_version_equals_fresh(
    backend: str, tmp_path: Path, version: int
) -> None:
    """A database of the runner before Alembic: its missing steps, a stamp, then the rest."""
    fresh = await fresh_schema(backend, tmp_path)
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:
            await _in_transaction(db, lambda c: legacy.create_at(c, version))
            assert await schema.current_revision(db) is None
            assert await schema.run_migrations(db) == len(schema.revisions()) - 1  # 0001: stamped
            assert await _snapshot(db) == fresh  # schema_version is gone too
            assert await schema.current_revision(db) == schema.head_revision()
        finally:
            await db.dispose()


async def test_head_is_the_metadata(backend: str, tmp_path: Path) -> None:
    """Autogenerate finds nothing to change, and ``create_all`` makes the same schema."""
    fresh = await fresh_schema(backend, tmp_path)
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:
            await schema.run_migrations(db)

            def diff(conn: Connection) -> list[Any]:
                opts = {"compare_type": True, "compare_server_default": True}
                return list(compare_metadata(MigrationContext.configure(conn, opts=opts), schema.metadata))

            assert await _in_transaction(db, diff) == []
        finally:
            await db.dispose()
    async with backend_url(backend, tmp_path, "create_all.db") as url:
        db = Database.from_url(url)
        try:
            await _in_transaction(db, schema.metadata.create_all)
            made = await _snapshot(db)
            assert made == {k: v for k, v in fresh.items() if k != "alembic_version"}
        finally:
            await db.dispose()


async def test_upgrading_twice_is_a_no_op(backend: str, tmp_path: Path) -> None:
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:
            assert await schema.run_migrations(db) == len(schema.revisions())
            before = await _snapshot(db)
            assert await schema.run_migrations(db) == 0
            # and Alembic itself, asked again under the lock, applies nothing
            async with db.exclusive_write(schema.MIGRATION_LOCK_KEY) as conn:
                assert await conn.run_sync(schema._upgrade, "head") == 0
            assert await _snapshot(db) == before
        finally:
            await db.dispose()


# --- data, failures, concurrency ------------------------------------------------------------------------


def _legacy_rows(conn: Connection, showcase_state: str = "posted") -> None:
    now = 1_740_830_400.0
    conn.execute(
        text(
            "INSERT INTO members (guild_id, user_id, balance, inflight, created_at)"
            " VALUES (1, 2, 9, 1, :t)"
        ),
        {"t": now},
    )
    conn.execute(
        text(
            "INSERT INTO budget_days (day, reserved_micros, generations)"
            " VALUES ('2025-03-01', 100000, 1)"
        )
    )
    conn.execute(
        text(
            "INSERT INTO ledger (guild_id, user_id, delta, kind, balance_after, created_at, job_id)"
            " VALUES (1, 2, 10, 'start', 10, :t, NULL), (1, 2, -1, 'reserve', 9, :t, 77)"
        ),
        {"t": now},
    )
    conn.execute(
        text(
            "INSERT INTO jobs (id, guild_id, channel_id, user_id, state, params, cost_credits,"
            " cost_usd_micros, created_at) VALUES (77, 1, 3, 2, 'accepted', '{}', 1, 100000, :t)"
        ),
        {"t": now},
    )
    conn.execute(
        text(
            "INSERT INTO showcase_posts (job_id, guild_id, state, requested_by, created_at,"
            " updated_at) VALUES (76, 1, :s, 2, :t, :t)"
        ),
        {"s": showcase_state, "t": now},
    )


async def test_legacy_data_survives_the_upgrade(backend: str, tmp_path: Path) -> None:
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:

            def made(conn: Connection) -> None:
                legacy.create_at(conn, 3)
                _legacy_rows(conn)

            await _in_transaction(db, made)
            await schema.run_migrations(db)
            async with db.read() as conn:  # the rebuilt table (SQLite's batch mode) kept its row
                posts = (await conn.execute(text("SELECT job_id, state FROM showcase_posts"))).all()
            assert [tuple(p) for p in posts] == [(76, "posted")]
        finally:
            await db.dispose()
        store = await Store.open(url, make_settings())
        try:
            assert (await store.credits.member_status(1, 2)).balance == 9
            job = await store.jobs.get(77)
            assert job is not None
            assert (job.queued_at, job.account, job.lease_epoch) == (job.created_at, "owner", 0)
        finally:
            await store.close()


async def test_a_failing_upgrade_changes_nothing(backend: str, tmp_path: Path) -> None:
    """A row the new CHECK refuses: the whole upgrade (bridge included) rolls back."""
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:

            def made(conn: Connection) -> None:
                legacy.create_at(conn, 4)
                _legacy_rows(conn, showcase_state="bogus")

            await _in_transaction(db, made)
            before = await _snapshot(db)
            with pytest.raises(Exception, match="ck_showcase_posts_state|CHECK constraint"):
                await schema.run_migrations(db)
            assert await _snapshot(db) == before
            assert await schema.current_revision(db) is None
            async with db.read() as conn:
                assert (await conn.execute(text("SELECT max(version) FROM schema_version"))).scalar() == 4
                assert (await conn.execute(text("SELECT count(*) FROM showcase_posts"))).scalar() == 1
        finally:
            await db.dispose()


async def test_a_newer_database_is_refused(backend: str, tmp_path: Path) -> None:
    async with backend_url(backend, tmp_path) as url:
        db = Database.from_url(url)
        try:
            await schema.run_migrations(db)
            async with db.write() as conn:
                await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
            with pytest.raises(Exception, match="9999"):
                await schema.run_migrations(db)
        finally:
            await db.dispose()


async def test_concurrent_upgrades_of_a_legacy_database(backend: str, tmp_path: Path) -> None:
    """Three processes' worth of engines upgrade one legacy database at once: it happens once."""
    fresh = await fresh_schema(backend, tmp_path)
    async with backend_url(backend, tmp_path) as url:
        dbs = [Database.from_url(url) for _ in range(3)]
        try:
            await _in_transaction(dbs[0], lambda c: legacy.create_at(c, 2))
            applied = await asyncio.gather(*(schema.run_migrations(db) for db in dbs))
            assert sorted(applied) == [0, 0, len(schema.revisions()) - 1]
            assert await _snapshot(dbs[1]) == fresh
        finally:
            for db in dbs:
                await db.dispose()


async def test_sqlite_foreign_keys_are_back_on_after_an_upgrade(tmp_path: Path) -> None:
    """The upgrade switches foreign keys off for its rebuilds; its connection (here the pool's
    only one) goes back to the pool with them on."""
    db = Database.from_url(f"sqlite:///{tmp_path}/fk.db", pool_size=1, max_overflow=0)
    try:
        await db.prepare()
        await _in_transaction(db, lambda c: legacy.create_at(c, 1))
        assert await schema.run_migrations(db) == len(schema.revisions()) - 1
        async with db.read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await db.dispose()


def test_head_revision_constant_is_alembics_head() -> None:
    """``HEAD_REVISION`` lets a current database skip Alembic: it must name the real head."""
    assert schema.HEAD_REVISION == schema.head_revision() == schema.revisions()[-1]


ROOT = str(Path(__file__).resolve().parents[2])


async def test_a_fresh_or_current_database_never_loads_alembic(backend: str, tmp_path: Path) -> None:
    """Alembic (with Mako and Pygments, ~10 MiB) loads only when a revision must really run:
    not for a fresh install (``create_all`` and a stamp), nor for a database already current."""
    import sys

    code = (
        "import asyncio, sys\n"
        "from kontext.store import Store\n"
        "from tests.dbutil import make_settings\n"
        "async def main():\n"
        "    for _ in range(2):\n"
        "        store = await Store.open(sys.argv[1], make_settings())\n"
        "        await store.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))\n"
    )
    async with backend_url(backend, tmp_path) as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, url, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and stdout.decode().strip() == "[]", (stdout + stderr).decode()
        db = Database.from_url(url)
        try:
            assert await schema.current_revision(db) == schema.HEAD_REVISION
        finally:
            await db.dispose()

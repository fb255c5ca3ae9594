"""Throwaway databases for tests and the benchmark: a SQLite file, a Postgres schema or database.

Postgres comes from ``KONTEXT_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). :mod:`tests.dbutil` re-exports these and adds
the test-only parts (skipping or failing without a server, stores on a fresh database).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

_pg_reason: dict[str, str | None] = {}


def postgres_base_url() -> str:
    """The Postgres server tests use."""
    return os.environ.get("KONTEXT_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def _dsn(url: str) -> str:
    """A libpq/asyncpg DSN for a SQLAlchemy-style Postgres URL."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


async def postgres_unavailable_reason(url: str | None = None) -> str | None:
    """None when the Postgres server answers, else why not (cached per URL)."""
    import asyncpg

    url = url or postgres_base_url()
    if url not in _pg_reason:
        try:
            conn = await asyncpg.connect(_dsn(url), timeout=5)
            await conn.close()
            _pg_reason[url] = None
        except Exception as exc:  # any failure means "not available"
            _pg_reason[url] = f"no Postgres at {url}: {type(exc).__name__}: {exc}"
    return _pg_reason[url]


@asynccontextmanager
async def temp_sqlite_url(directory: str | os.PathLike[str] | None = None) -> AsyncIterator[str]:
    """A ``DATABASE_URL`` for a new SQLite file (deleted afterwards when the dir is ours)."""
    if directory is not None:
        path = Path(directory) / f"kontext-{uuid.uuid4().hex[:12]}.db"
        yield f"sqlite:///{path}"
        return
    with tempfile.TemporaryDirectory(prefix="kontext-test-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'kontext.db'}"


@asynccontextmanager
async def temp_postgres_schema(
    base_url: str | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A fresh schema: yields ``(url, engine_kwargs)`` for :meth:`Store.open`; dropped after."""
    import asyncpg

    url = base_url or postgres_base_url()
    schema = f"kontext_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_dsn(url), timeout=10)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()
    try:
        yield url, {"connect_args": {"server_settings": {"search_path": schema}}}
    finally:
        conn = await asyncpg.connect(_dsn(url), timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@asynccontextmanager
async def temp_postgres_url(base_url: str | None = None) -> AsyncIterator[str]:
    """A throwaway database (``kontext_test_<random>``); yields its ``DATABASE_URL``."""
    import asyncpg
    from sqlalchemy.engine import make_url

    url = base_url or postgres_base_url()
    name = f"kontext_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_dsn(url), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(_dsn(url), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

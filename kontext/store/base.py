"""What every area of the store shares: the database, the clock, and a few SQL helpers.

The money transactions are synchronous functions of a :class:`sqlalchemy.Connection`, run as one
transaction by :meth:`kontext.db.Database.transact`. Each area builds its statements once per
dialect, beside the transactions that run them, with named bind parameters (:func:`bind`), so a
call only binds values: no statement construction, and SQLAlchemy's compiled-statement cache
hits on a memoized key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Row, bindparam, literal_column, or_
from sqlalchemy.dialects import postgresql, sqlite

from kontext.db import Database, execute
from kontext.schema import jobs
from kontext.settings import Settings
from kontext.store.types import Job, utc_day

_j = jobs.c


def dialect_insert(dialect: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """A dialect-specific INSERT that supports ``on_conflict_do_nothing`` / ``_do_update``."""
    if dialect == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)


def state_in(states: tuple[str, ...]) -> Any:
    """``jobs.state IN (…)`` spelled as ORed equalities (no expanding IN: see ``execute``)."""
    return or_(*(_j.state == state for state in states))


def db_now(dialect: str) -> Any:
    """The database's clock as epoch seconds (a SQL expression).

    Postgres: ``clock_timestamp()``; SQLite, which lives on one machine, the machine's clock as
    SQLite reads it. No process's own clock decides an expiry or a rate window.
    """
    if dialect == "postgresql":
        return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)")


def bind(name: str, type_: Any) -> Any:
    """A named bind parameter of a known type (asyncpg wants the type)."""
    return bindparam(name, type_=type_)


def job_from_row(row: Row[Any]) -> Job:
    """A :class:`Job` from a ``jobs`` row."""
    m = row._asdict()  # a SQLAlchemy row or execute()'s named tuple: both have it
    values = {c.name: m[c.name] for c in jobs.columns}
    values["params"] = json.loads(values["params"] or "{}")
    values["api_charged"] = bool(values["api_charged"])
    return Job(**values)


class StoreContext:
    """The database, the process settings and the clock, shared by every area of one store."""

    def __init__(
        self, db: Database, config: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = db
        #: the process-wide settings (the environment's); a server's own are ``store.settings``
        self.config = config
        self.clock = clock

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def now(self) -> float:
        """The current time (epoch seconds) from the injected clock."""
        return float(self.clock())

    def today(self) -> str:
        """Today's UTC day, ``YYYY-MM-DD``, from the injected clock."""
        return utc_day(self.now())

    def insert(self, table: Any) -> postgresql.Insert | sqlite.Insert:
        """A dialect-specific INSERT that supports ``on_conflict_do_nothing``."""
        return dialect_insert(self.db.dialect, table)

    async def update_one(self, stmt: Any, params: dict[str, Any]) -> bool:
        """Run one conditional update as its own transaction; True when it matched a row."""

        def tx(conn: Connection) -> bool:
            return execute(conn, stmt, params).first() is not None

        return await self.db.transact(tx)

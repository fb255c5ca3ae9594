"""Prebuilt statements inside a transaction body: :func:`execute`, the same on both engines.

Postgres: ``conn.execute(statement, params)``. SQLite (a pysqlite connection, as on the
transaction thread of :meth:`kontext.db.Database.transact`): :func:`_execute_on_driver`, the fast
path, compiles each statement once (per set of parameter names) and runs it straight on the
driver's cursor: a few microseconds per statement instead of SQLAlchemy's execution's tens to
a hundred-odd, while the process's write lock is held, which is what keeps the SQLite ledger
above 1,000 reserve+commit pairs a second. It reads only SQLAlchemy's public compiler API
(:class:`_Prepared`), and ``tests/kontext/test_db.py`` replays every statement of a
money-and-queue workload through ``conn.execute`` to check that SQLite receives the same SQL and
values and the rows are the same. Either way the result is :class:`Rows` (named tuples).
"""

from __future__ import annotations

import functools
import sqlite3
from collections import namedtuple
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, CursorResult
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement


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


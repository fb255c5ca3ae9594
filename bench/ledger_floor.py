"""The floor of the ledger figure: the same statements, run by the bare driver.

:mod:`bench.ledger` counts reserve + commit pairs per second through the bot's
:class:`~kontext.store.Store`. On a shared machine that figure swings 2× from one run to the
next, so it is printed beside a floor measured in the same run: the very statements one pair
sends, with the same transactions and durability, run by plain :mod:`sqlite3` (SQLite) or
:mod:`asyncpg` (Postgres) with no SQLAlchemy, no asyncio hop and no checks around them.

* **capture** — a store reserves and commits two jobs on the database; the second pair's
  statements are recorded (SQLite: the driver's trace of what it ran, the literals turned back
  into ``?`` parameters; Postgres: SQLAlchemy's ``before_cursor_execute``, already ``$n``), one
  list per transaction.
* **replay** — ``concurrency`` members per process, each pair the captured statements with the
  job id and the member replaced. SQLite: one thread and one connection, the members' pairs
  group committed as the store does (``BEGIN IMMEDIATE``, each body in a savepoint, one
  ``COMMIT`` per group; WAL and the same ``synchronous``); Postgres: one connection per member,
  each transaction committed on its own (asyncpg's prepared-statement cache on).

``python -m bench.ledger_floor capture URL`` and ``python -m bench.ledger_floor run URL CONFIG``
are the subprocess entry points (each prints one JSON line).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import sys
import time
from typing import Any

from .ledger import ROOT, LedgerResult, _settings, area, reserve_request, use_bot_root

#: statements of the transaction frame (the replay makes its own)
_FRAME = re.compile(r"^\s*(BEGIN|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA)\b", re.IGNORECASE)
#: a literal in SQLite's expanded SQL: a string, a blob, or a number not inside a name
_LITERAL = re.compile(
    r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|[xX]'[0-9a-fA-F]*'|(?<![\w.$])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])"""
)
CAPTURE_JOBS = (10**12 + 1, 10**12 + 2)
CAPTURE_USER = 1


def parameterize(sql: str) -> tuple[str, list[Any]]:
    """SQLite's expanded SQL back to ``?`` placeholders and their values."""
    args: list[Any] = []

    def repl(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok.startswith('"'):  # a quoted name, not a value
            return tok
        if tok.startswith("'"):
            args.append(tok[1:-1].replace("''", "'"))
        elif tok[:2] in ("x'", "X'"):
            args.append(bytes.fromhex(tok[2:-1]))
        elif re.fullmatch(r"-?\d+", tok):
            args.append(int(tok))
        else:
            args.append(float(tok))
        return "?"

    return _LITERAL.sub(repl, sql), args


async def capture(url: str) -> dict[str, Any]:
    """Two reserve + commit pairs through the store; the second pair's statements, per
    transaction: ``{"phases": [[[sql, args], …], …], "job_id": …, "user_id": …}``."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from kontext.store import Store

    got: list[tuple[str, list[Any]]] = []
    sqlite = url.startswith("sqlite")

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.set_trace_callback(lambda sql: got.append((sql, [])))

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not sqlite:
            got.append((statement, [_plain(v) for v in parameters or ()]))

    event.listen(Engine, "connect", on_connect)
    event.listen(Engine, "before_cursor_execute", before)
    store = await Store.open(url, _settings())
    phases: list[list[tuple[str, list[Any]]]] = []
    try:
        for n, job_id in enumerate(CAPTURE_JOBS):
            req = reserve_request(job_id, CAPTURE_USER, n)
            got.clear()
            await area(store, "ledger").reserve(req)
            reserve = list(got)
            got.clear()
            await area(store, "ledger").commit(job_id, result_message_id=job_id, result_channel_id=1)
            phases = [reserve, list(got)]
    finally:
        await store.close()
        event.remove(Engine, "connect", on_connect)
        event.remove(Engine, "before_cursor_execute", before)
    out = []
    for phase in phases:
        stmts = []
        for sql, args in phase:
            if _FRAME.match(sql):
                continue
            stmts.append(list(parameterize(sql)) if sqlite else [sql, args])
        out.append(stmts)
    return {"phases": out, "job_id": CAPTURE_JOBS[-1], "user_id": CAPTURE_USER}


def _plain(v: Any) -> Any:
    """A parameter as JSON carries it (an enum member as its plain value)."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str.__str__(v)
    return v


def _for(phase: list[list[Any]], job: int, user: int, cap: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """The captured statements with the captured job id and member replaced."""
    old_job, old_user = cap["job_id"], cap["user_id"]

    def sub(v: Any) -> Any:
        if type(v) is int:
            return job if v == old_job else user if v == old_user else v
        return v

    return [(sql, [sub(v) for v in args]) for sql, args in phase]


def _sqlite_path(url: str) -> str:
    return url.split(":///", 1)[1].split("?", 1)[0]


def replay_sqlite(url: str, cap: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Plain sqlite3: groups of ``concurrency`` pairs, each phase one group commit."""
    conn = sqlite3.connect(_sqlite_path(url), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    index, k = int(config["worker"]), int(config.get("concurrency", 4))
    reserve, commit = cap["phases"]
    pairs, errors, n = 0, {}, 0
    time.sleep(max(0.0, float(config.get("start_at", 0.0)) - time.time()))
    started = time.monotonic()
    deadline = started + float(config["duration"])
    while time.monotonic() < deadline:
        n += 1
        jobs = [((index + 1) * 10**12 + m * 10**8 + n, 20_000 + index * 1_000 + m) for m in range(k)]
        try:
            for phase in (reserve, commit):
                conn.execute("BEGIN IMMEDIATE")
                for job, user in jobs:
                    conn.execute("SAVEPOINT floor_tx")
                    for sql, args in _for(phase, job, user, cap):
                        conn.execute(sql, args).fetchall()
                    conn.execute("RELEASE floor_tx")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        pairs += k
    elapsed = time.monotonic() - started
    conn.close()
    return {"pairs": pairs, "elapsed": elapsed, "errors": errors}


async def replay_postgres(url: str, cap: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Plain asyncpg: ``concurrency`` connections, each pair two transactions of its own."""
    import asyncpg

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    index, k = int(config["worker"]), int(config.get("concurrency", 4))
    reserve, commit = cap["phases"]
    conns = [await asyncpg.connect(dsn) for _ in range(k)]
    pairs, errors = 0, {}
    try:
        await asyncio.sleep(max(0.0, float(config.get("start_at", 0.0)) - time.time()))
        started = time.monotonic()
        deadline = started + float(config["duration"])

        async def member(m: int) -> None:
            nonlocal pairs
            conn, user, n = conns[m], 20_000 + index * 1_000 + m, 0
            while time.monotonic() < deadline:
                n += 1
                job = (index + 1) * 10**12 + m * 10**8 + n
                try:
                    for phase in (reserve, commit):
                        async with conn.transaction():
                            for sql, args in _for(phase, job, user, cap):
                                await conn.fetch(sql, *args)
                except asyncpg.PostgresError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                pairs += 1

        await asyncio.gather(*(member(m) for m in range(k)))
        elapsed = time.monotonic() - started
    finally:
        for conn in conns:
            await conn.close()
    return {"pairs": pairs, "elapsed": elapsed, "errors": errors}


async def _subprocess(*args: str) -> list[Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.ledger_floor", *args, cwd=str(ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ledger floor {args[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return [json.loads(line) for line in out.decode().strip().splitlines()[-1:]]


async def run(url: str, backend: str, processes: int, *, duration: float, concurrency: int = 4) -> LedgerResult:
    """Capture one pair's statements on ``url``, then ``processes`` replaying processes at once."""
    (cap,) = await _subprocess("capture", url)
    start_at = time.time() + 1.5
    cfgs = [{"worker": i, "duration": duration, "concurrency": concurrency, "start_at": start_at,
             "capture": cap} for i in range(processes)]
    results = await asyncio.gather(*(_subprocess("run", url, json.dumps(c)) for c in cfgs))
    errors: dict[str, int] = {}
    for (r,) in results:
        for key, v in r["errors"].items():
            errors[key] = errors.get(key, 0) + v
    statements = sum(len(p) for p in cap["phases"])
    return LedgerResult(
        backend=backend, processes=processes, concurrency=concurrency,
        pairs=sum(r["pairs"] for (r,) in results), seconds=max(r["elapsed"] for (r,) in results),
        errors=errors, invariants=[], note=f"{statements} statements a pair",
    )


def main(argv: list[str]) -> int:
    use_bot_root()
    if len(argv) == 2 and argv[0] == "capture":
        print(json.dumps(asyncio.run(capture(argv[1]))))
        return 0
    if len(argv) == 3 and argv[0] == "run":
        config = json.loads(argv[2])
        cap = config["capture"]
        if argv[1].startswith("sqlite"):
            print(json.dumps(replay_sqlite(argv[1], cap, config)))
        else:
            print(json.dumps(asyncio.run(replay_postgres(argv[1], cap, config))))
        return 0
    print("usage: python -m bench.ledger_floor {capture URL | run URL CONFIG_JSON}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

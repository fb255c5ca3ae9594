"""The database transactions one job costs, counted by Postgres from outside the bot.

The bot runs on a throwaway Postgres database and jobs are sent one at a time (each once the
previous one was committed). Postgres counts every transaction of that database in
``pg_stat_database`` (``xact_commit``, ``xact_rollback``) and every row written per table in
``pg_stat_user_tables`` (``n_tup_ins``, ``n_tup_upd``, ``n_tup_del``): the figures need nothing
inside the bot, so ``python -m bench --bot REV`` counts any revision's.

* The database-wide counters are read over a connection to *another* database (the server's
  base one), so that reading them adds nothing. The per-table counters need a connection inside
  the bot's database: each of its reads is one commit there, counted and taken off.
* A backend reports its counters when it goes idle, at most once a second; one that went idle
  within a second of its last report reports 10 s later (Postgres 15's ``PGSTAT_IDLE_INTERVAL``;
  the bot's pool hands its connections round, so a job's last counts can lag that long). The
  snapshot that ends the jobs' window is taken ``transactions_flush`` (11 s) after the last job,
  and the first one as long after the warm-up, so that each window holds its own transactions.
* The idle bot commits too (the dispatcher's polls, the recovery sweep, …): its rate is
  measured over ``transactions_idle`` before the jobs and again after them, and the mean rate × the jobs'
  window is taken off before dividing by the number of jobs. Both figures are reported.
* Snapshots are taken one after the other, each window's end the next one's start: idle
  (``transactions_idle``), then the jobs (``transactions_jobs``, from the first sent to
  ``transactions_flush`` after the last one's final status edit), then idle again.
* Every job, the warm-up's too, is one member's: the figures are a returning member's job,
  without the rows a member's first job adds.
* Every transaction the bot's store runs ends in a commit, reads too (``Database.read`` commits
  its read-only transaction): commits are the figure. Rollbacks are told beside it: with
  ``pool_pre_ping`` SQLAlchemy's asyncpg dialect pings each connection it hands out inside a
  transaction it rolls back, so they count the pool's checkouts. Reads and writes are told apart
  by the rows written (per table, from ``pg_stat_user_tables``).
* Autovacuum is switched off on the bot's tables after the warm-up, so that a vacuum's or an
  analyze's own transactions never fall into a window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .common import sized_jpeg
from .world import bot_process, world

#: the counters of pg_stat_database read per snapshot
DB_COUNTERS = ("xact_commit", "xact_rollback")
#: the counters of pg_stat_user_tables read per table and snapshot
TABLE_COUNTERS = ("n_tup_ins", "n_tup_upd", "n_tup_del")
DB_SQL = "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1"
TABLE_SQL = "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"


@dataclass(frozen=True)
class Snapshot:
    """The counters at one moment (``at``: monotonic seconds)."""

    at: float
    db: dict[str, int]
    tables: dict[str, dict[str, int]]

    def minus(self, earlier: Snapshot) -> Delta:
        tables = {
            name: {k: v - earlier.tables.get(name, {}).get(k, 0) for k, v in row.items()}
            for name, row in self.tables.items()
        }
        return Delta(
            seconds=self.at - earlier.at,
            db={k: v - earlier.db[k] for k, v in self.db.items()},
            tables={name: row for name, row in tables.items() if any(row.values())},
        )


@dataclass(frozen=True)
class Delta:
    """What the counters grew by over ``seconds``."""

    seconds: float
    db: dict[str, int]
    tables: dict[str, dict[str, int]] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Every counter by one name: the database's, each table's (``jobs.n_tup_upd``) and the
        sums over the tables (``rows_inserted``, ``rows_updated``, ``rows_deleted``)."""
        out: dict[str, float] = {k: float(v) for k, v in self.db.items()}
        for name, row in self.tables.items():
            out.update({f"{name}.{k}": float(v) for k, v in row.items()})
        for counter, total in zip(TABLE_COUNTERS, ("rows_inserted", "rows_updated", "rows_deleted"),
                                  strict=True):
            out[total] = float(sum(row.get(counter, 0) for row in self.tables.values()))
        return out


def per_job(jobs: Delta, idle: list[Delta], n: int) -> dict[str, float]:
    """Each counter's growth per job: the jobs' window less the idle rate (the mean over the
    ``idle`` windows) × its length, divided by ``n``."""
    idle_seconds = sum(d.seconds for d in idle)
    idle_total: dict[str, float] = {}
    for d in idle:
        for k, v in d.flat().items():
            idle_total[k] = idle_total.get(k, 0.0) + v
    out = {}
    for k, v in jobs.flat().items():
        rate = idle_total.get(k, 0.0) / idle_seconds if idle_seconds > 0 else 0.0
        out[k] = (v - rate * jobs.seconds) / n
    return out


def idle_rates(idle: list[Delta]) -> dict[str, float]:
    """Each counter's growth per second over the ``idle`` windows together."""
    seconds = sum(d.seconds for d in idle)
    out: dict[str, float] = {}
    for d in idle:
        for k, v in d.flat().items():
            out[k] = out.get(k, 0.0) + v / seconds
    return out


class Counters:
    """Snapshots of one Postgres database's counters, read from outside the bot (see the module's
    docstring); ``async with Counters(url) as c: await c.snapshot()``."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = url
        self.name = make_url(url).database
        self._outside: Any = None
        self._inside: Any = None
        self._own = 0  # this object's reads inside the database: one commit each

    async def __aenter__(self) -> Counters:
        import asyncpg

        from devtools.databases import _dsn, postgres_base_url

        self._outside = await asyncpg.connect(_dsn(postgres_base_url()), timeout=10)
        self._inside = await asyncpg.connect(_dsn(self.url), timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in (self._inside, self._outside):
            if conn is not None:
                await conn.close()

    async def no_autovacuum(self) -> list[str]:
        """Autovacuum off on every table of the database (its transactions would count)."""
        names = [r[0] for r in await self._inside.fetch(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(relname) FROM pg_stat_user_tables")]
        for name in names:
            await self._inside.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = false)")
        self._own += 1 + len(names)
        return names

    async def snapshot(self) -> Snapshot:
        """The counters now. The database's are read first (from outside), then the tables'
        (inside): every earlier read inside was reported by then and is taken off."""
        row = await self._outside.fetchrow(DB_SQL, self.name)
        if row is None:
            raise RuntimeError(f"database {self.name!r} is not in pg_stat_database")
        at = time.monotonic()
        db = {k: int(row[k]) for k in DB_COUNTERS}
        db["xact_commit"] -= self._own
        rows = await self._inside.fetch(TABLE_SQL)
        self._own += 1
        tables = {str(r["relname"]): {k: int(r[k]) for k in TABLE_COUNTERS} for r in rows}
        return Snapshot(at, db, tables)



async def measure(sizes: Any, url: str) -> dict[str, Any]:
    """The bot (this checkout's, or ``--bot REV``'s) on the database ``url``: warm-up jobs, then
    idle, ``transactions_jobs`` sequential jobs, idle; the counters per job and per idle second."""
    n, idle_s, flush_s = sizes.transactions_jobs, sizes.transactions_idle, sizes.transactions_flush
    async with world(segmind_latency=sizes.transactions_latency, result=sized_jpeg(sizes.small_result)) as w:
        async with bot_process("kontext", w, "transactions", database_url=url) as bot:
            member = w.members[0]  # one returning member: no first-job rows in the figures
            for i in range(sizes.warmup_jobs):  # first connections, first writes, lazy imports
                rec = await w.send(10_000 + i, member)
                await w.wait_results([rec], 60)
            async with Counters(url) as counters:
                await counters.no_autovacuum()
                await asyncio.sleep(flush_s)
                marks = [await counters.snapshot()]
                await asyncio.sleep(idle_s)
                marks.append(await counters.snapshot())
                for i in range(n):
                    rec = await w.send(i, member)
                    await w.wait_results([rec], 60)
                await asyncio.sleep(flush_s)
                marks.append(await counters.snapshot())
                await asyncio.sleep(idle_s)
                marks.append(await counters.snapshot())
        bot_file = bot.bot_file
    idle = [marks[1].minus(marks[0]), marks[3].minus(marks[2])]
    jobs = marks[2].minus(marks[1])
    return {
        "jobs": n, "window": jobs.seconds, "idle_windows": [d.seconds for d in idle],
        "per_job": per_job(jobs, idle, n), "idle_per_second": idle_rates(idle),
        "idle_commits_per_second": [d.db["xact_commit"] / d.seconds for d in idle],
        "raw_jobs": jobs.flat(), "bot_file": bot_file,
    }


async def rows(report: Any, sizes: Any) -> None:
    """The section's rows: transactions per job, and the idle bot's per second."""
    from .ledger import postgres_url

    section = f"database transactions (Postgres, 1 job at a time, {sizes.transactions_jobs} jobs)"
    report.log(f"[transactions] {sizes.transactions_jobs} sequential jobs on Postgres between two "
               f"idle windows of {sizes.transactions_idle:g} s; counted by pg_stat_database")
    async with postgres_url() as url:
        if url is None:
            reason = getattr(postgres_url, "reason", "unreachable")
            report.add(section, "transactions (commits) per job", "—", "skipped", None, reason)
            return
        st = await measure(sizes, url)
    report.details["transactions"] = st
    job, idle = st["per_job"], st["idle_per_second"]
    tables = sorted({k.split(".")[0] for k in job if "." in k and abs(job[k]) >= 0.05})
    written = "; ".join(
        f"{t} " + "/".join(f"{job.get(f'{t}.{c}', 0.0):.1f}" for c in TABLE_COUNTERS) for t in tables)
    report.add(section, "transactions per job (commits)", "—", f"{job['xact_commit']:.1f}", None,
               f"{st['raw_jobs']['xact_commit']:.0f} commits in {st['window']:.1f} s less the idle "
               f"bot's {idle['xact_commit']:.2f}/s × {st['window']:.1f} s, over {st['jobs']} jobs; "
               f"rows written per job: inserted {job['rows_inserted']:.1f}, updated "
               f"{job['rows_updated']:.1f}, deleted {job['rows_deleted']:.1f} (by table, ins/upd/del: "
               f"{written or 'none'}); rollbacks per job {job['xact_rollback']:.1f} (the pool's "
               "pre-ping of each connection handed out)")
    report.add(section, "idle bot: commits per second", "—", f"{idle['xact_commit']:.2f}/s", None,
               "two idle windows, before and after the jobs ("
               + " s, ".join(f"{s:.1f}" for s in st["idle_windows"]) + " s): "
               + ", ".join(f"{r:.2f}/s" for r in st["idle_commits_per_second"])
               + f"; rollbacks {idle['xact_rollback']:.2f}/s; rows written "
               f"{idle['rows_inserted'] + idle['rows_updated'] + idle['rows_deleted']:.2f}/s")

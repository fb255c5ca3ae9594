"""Throwaway databases for tests: a SQLite file, a Postgres schema, or a whole Postgres database.

Throwaway databases live in :mod:`devtools.databases` (the bench uses them too) and are
re-exported here:

* :func:`temp_sqlite_url` — ``sqlite:////tmp/…/kontext.db``.
* :func:`temp_postgres_schema` — a fresh schema in the test database; yields ``(url, engine_kwargs)``
  (the schema is selected with ``server_settings={"search_path": …}``, so it only works for a
  :class:`~kontext.store.Store` opened in this process with those ``engine_kwargs``).
* :func:`temp_postgres_url` — ``CREATE DATABASE kontext_test_<random>``; yields a plain
  ``DATABASE_URL`` a separate bot process can use.
* :func:`open_test_store` — a :class:`~kontext.store.Store` on a fresh database of either backend.
* :func:`ensure_postgres` — skip (or fail, when ``KONTEXT_REQUIRE_POSTGRES=1``) without a server.

Postgres comes from ``KONTEXT_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``).

Run as a script (``python -m tests.dbutil reserve-worker URL CONFIG_JSON``) it is the helper
process of the multi-process tests: it reserves a list of job ids concurrently and prints a JSON
summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devtools.databases import (  # the throwaway databases, shared with the bench
    DEFAULT_POSTGRES_URL as DEFAULT_POSTGRES_URL,
)
from devtools.databases import (
    _dsn as _dsn,
)
from devtools.databases import (
    postgres_base_url as postgres_base_url,
)
from devtools.databases import (
    postgres_unavailable_reason as postgres_unavailable_reason,
)
from devtools.databases import (
    temp_postgres_schema as temp_postgres_schema,
)
from devtools.databases import (
    temp_postgres_url as temp_postgres_url,
)
from devtools.databases import (
    temp_sqlite_url as temp_sqlite_url,
)

if TYPE_CHECKING:
    from kontext.job_options import JobOptions

BACKENDS: tuple[str, ...] = ("sqlite", "postgres")
#: 2025-03-01 12:00:00 UTC — tests start at noon so a day boundary is 12 h away.
CLOCK_START = 1_740_830_400.0


class FakeClock:
    """An injectable clock: ``clock()`` returns the time, ``advance(s)`` moves it on."""

    def __init__(self, start: float = CLOCK_START) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.t += seconds


def job_options(prompt: str = "p", seed: int = 1, **chosen: Any) -> JobOptions:
    """What a test job makes (the store keeps it as the job's ``params``)."""
    from kontext.job_options import InputImage, JobOptions

    image = InputImage("https://cdn.discordapp.com/attachments/1/2/a.png")
    return JobOptions(prompt, image, image, seed=seed, **chosen)


def make_settings(**overrides: Any) -> Any:
    """Settings for tests (a dummy token, cooldown 60 s, starting credits 10, overrides)."""
    from kontext.settings import Settings

    return Settings(discord_token="test-token", **overrides)


def postgres_required() -> bool:
    """True when a missing Postgres must fail the tests instead of skipping them."""
    return os.environ.get("KONTEXT_REQUIRE_POSTGRES", "").strip().lower() in {"1", "true", "yes"}


async def ensure_postgres(url: str | None = None) -> None:
    """Skip the calling test when Postgres is down — or fail when it is required."""
    import pytest

    reason = await postgres_unavailable_reason(url)
    if reason is None:
        return
    if postgres_required():
        pytest.fail(f"KONTEXT_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(f"{reason} (set KONTEXT_TEST_POSTGRES_URL, or KONTEXT_REQUIRE_POSTGRES=1 to fail)")


@asynccontextmanager
async def backend_url(backend: str, tmp_path: Path, name: str = "kontext.db") -> AsyncIterator[str]:
    """A fresh database for ``backend``: a SQLite file in ``tmp_path``, or a throwaway Postgres
    database (skipped without a server, failed when ``KONTEXT_REQUIRE_POSTGRES=1``)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / name}"
        return
    await ensure_postgres()
    async with temp_postgres_url() as url:
        yield url


@asynccontextmanager
async def temp_database(
    backend: str, tmp_dir: str | os.PathLike[str] | None = None
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """A fresh database of ``backend``: yields ``(url, engine_kwargs)``."""
    if backend == "sqlite":
        async with temp_sqlite_url(tmp_dir) as url:
            yield url, {}
    elif backend == "postgres":
        await ensure_postgres()
        async with temp_postgres_schema() as (url, kwargs):
            yield url, kwargs
    else:
        raise ValueError(f"unknown backend {backend!r}")


@asynccontextmanager
async def open_test_store(
    backend: str,
    settings: Any = None,
    *,
    clock: Any = None,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Any]:
    """A :class:`~kontext.store.Store` on a fresh database; closed and dropped afterwards."""
    from kontext.store import Store

    async with temp_database(backend, tmp_dir) as (url, kwargs):
        store = await Store.open(
            url, settings or make_settings(), engine_kwargs=kwargs, clock=clock or time.time
        )
        try:
            yield store
        finally:
            await store.close()


# --- the helper process of the multi-process tests ------------------------------------------------


async def _reserve_worker(url: str, config: dict[str, Any]) -> dict[str, Any]:
    """Reserve (and commit) ``config["job_ids"]`` concurrently; summarize what happened."""
    from kontext.errors import KontextError
    from kontext.store import ReserveRequest, Store

    store = await Store.open(url, make_settings(**config.get("settings", {})))
    try:
        start_at = float(config.get("start_at", 0))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        ok: list[int] = []
        errors: dict[str, int] = {}

        async def one(job_id: int) -> None:
            req = ReserveRequest(
                job_id=job_id,
                guild_id=int(config["guild_id"]),
                channel_id=1,
                user_id=int(config["user_id"]),
                options=job_options("x", seed=job_id),
                worker_id=config.get("worker_id"),
            )
            try:
                await store.ledger.reserve(req)
            except KontextError as err:
                errors[err.cause] = errors.get(err.cause, 0) + 1
                return
            ok.append(job_id)
            if config.get("commit", True):
                await store.ledger.commit(job_id, result_message_id=job_id, result_channel_id=1)

        await asyncio.gather(*(one(j) for j in config["job_ids"]))
        return {"ok": sorted(ok), "errors": errors}
    finally:
        await store.close()


def main(argv: list[str]) -> int:
    """``reserve-worker URL CONFIG_JSON``: run :func:`_reserve_worker`, print its JSON."""
    if len(argv) != 3 or argv[0] != "reserve-worker":
        print("usage: python -m tests.dbutil reserve-worker URL CONFIG_JSON", file=sys.stderr)
        return 2
    result = asyncio.run(_reserve_worker(argv[1], json.loads(argv[2])))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


async def put_job_in_state(store: Any, job_id: int, state: str, **values: Any) -> bool:
    """Test only: move a job straight to ``state`` with nobody's lease (as a process that died
    there leaves it once its lease lapsed): ``claimed``, ``sent`` (billed, ``sent_at`` set) or
    ``posting`` (``posting_at`` set too). ``values``: other columns. False when the job is not
    waiting or leased."""
    from sqlalchemy import update

    from kontext.schema import ACTIVE_STATES, jobs

    now = store.ctx.now()
    cols: dict[str, Any] = {"state": state, "started_at": now, "lease_owner": None,
                            "lease_expires_at": None}
    if state in ("sent", "posting"):
        cols.update(sent_at=now, api_charged=True)
    if state == "posting":
        cols.update(posting_at=now, api_done_at=now)
    cols.update(values)
    async with store.db.write() as conn:
        result = await conn.execute(
            update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(list(ACTIVE_STATES))).values(**cols)
        )
        return bool(result.rowcount)

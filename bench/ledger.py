"""Ledger throughput: reserve + commit pairs per second through :class:`kontext.store.Store`.

Each worker process opens the store on the same database, starts ``concurrency`` tasks at an
agreed wall-clock moment, and each task reserves and commits jobs back to back (every task is
its own member, so no member limit interferes) until the time is up. The parent sums the pairs.

``python -m bench.ledger URL CONFIG_JSON`` is the worker (prints a JSON summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def area(store: Any, name: str) -> Any:
    """``store.<name>`` (the store by data area), or the store itself for a bot from before it
    was split (``python -m bench --bot REV``)."""
    return getattr(store, name, store)


def reserve_request(job_id: int, user_id: int, seed: int) -> Any:
    """A bench job's ``ReserveRequest``, for this bot or one from before a job's options were
    one value (``params`` and ``seed`` then)."""
    from kontext.store import ReserveRequest

    who: dict[str, Any] = {"job_id": job_id, "guild_id": GUILD_ID, "channel_id": 1, "user_id": user_id}
    if "options" not in ReserveRequest.__dataclass_fields__:
        return ReserveRequest(**who, params={"prompt": "bench"}, seed=seed)
    from kontext.job_options import InputImage, JobOptions

    image = InputImage("https://cdn.discordapp.com/attachments/1/2/bench.png")
    return ReserveRequest(**who, options=JobOptions("bench", image, image, seed=seed))


def use_bot_root() -> None:
    """In a worker process: import the bot (``kontext``) from ``BENCH_BOT_ROOT`` when set."""
    root = os.environ.get("BENCH_BOT_ROOT")
    if root:
        sys.path.insert(0, root)
GUILD_ID = 900_000_000_000_000_001


def _settings() -> Any:
    from kontext.settings import Settings

    return Settings(
        discord_token="bench-token",
        cooldown_seconds=0,
        jobs_per_member=10,
        starting_credits=1_000_000,
        daily_budget_usd=1_000_000_000.0,
        guild_daily_budget_usd=0.0,  # one server sends every pair: no per-server cap here
    )


async def worker(url: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run reserve + commit pairs from ``config["start_at"]`` for ``config["duration"]`` s."""
    from kontext.store import Store

    store = await Store.open(url, _settings())
    index = int(config["worker"])
    concurrency = int(config.get("concurrency", 4))
    duration = float(config["duration"])
    pairs = 0
    errors: dict[str, int] = {}
    try:
        start_at = float(config.get("start_at", 0.0))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.monotonic()
        deadline = started + duration

        async def one_member(k: int) -> None:
            nonlocal pairs
            user = 10_000 + index * 1_000 + k
            n = 0
            while time.monotonic() < deadline:
                n += 1
                job_id = (index + 1) * 10**12 + k * 10**8 + n
                try:
                    await area(store, "ledger").reserve(reserve_request(job_id, user, n))
                    await area(store, "ledger").commit(job_id, result_message_id=job_id, result_channel_id=1)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    cause = getattr(exc, "cause", type(exc).__name__)
                    errors[cause] = errors.get(cause, 0) + 1
                    continue
                pairs += 1

        await asyncio.gather(*(one_member(k) for k in range(concurrency)))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    return {"pairs": pairs, "elapsed": elapsed, "errors": errors}


@dataclass
class LedgerResult:
    backend: str
    processes: int
    concurrency: int
    pairs: int
    seconds: float
    errors: dict[str, int]
    invariants: list[str]
    note: str = ""

    @property
    def per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


async def _migrate(url: str) -> None:
    from kontext.store import Store

    store = await Store.open(url, _settings())
    await store.close()


async def _invariants(url: str) -> list[str]:
    """The money rules, checked once every worker has stopped."""
    from kontext.store import Store

    store = await Store.open(url, _settings())
    try:
        return await area(store, "audit").check_invariants()
    finally:
        await store.close()


async def run(url: str, backend: str, processes: int, *, duration: float, concurrency: int = 4) -> LedgerResult:
    """``processes`` worker processes on ``url`` at once; the summed pairs per second."""
    await _migrate(url)  # once, before the workers race
    start_at = time.time() + 2.5  # leaves time for the workers' imports and connections
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    for i in range(processes):
        cfg = {"worker": i, "duration": duration, "concurrency": concurrency, "start_at": start_at}
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.ledger", url, json.dumps(cfg), cwd=str(ROOT), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        )
    outs = [await p.communicate() for p in procs]
    results = []
    for (out, err), p in zip(outs, procs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"ledger worker failed ({p.returncode}): {err.decode()[-2000:]}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return LedgerResult(
        backend=backend,
        processes=processes,
        concurrency=concurrency,
        pairs=sum(r["pairs"] for r in results),
        seconds=max(r["elapsed"] for r in results),
        errors=errors,
        invariants=await _invariants(url),
    )


@contextlib.asynccontextmanager
async def sqlite_url() -> AsyncIterator[str]:
    from devtools.databases import temp_sqlite_url

    async with temp_sqlite_url() as url:
        yield url


@contextlib.asynccontextmanager
async def postgres_url() -> AsyncIterator[str | None]:
    """A throwaway Postgres database, or None (with the reason printed) when none answers."""
    from devtools.databases import postgres_unavailable_reason, temp_postgres_url

    reason = await postgres_unavailable_reason()
    if reason is not None:
        postgres_url.reason = reason  # type: ignore[attr-defined]
        yield None
        return
    async with temp_postgres_url() as url:
        yield url


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.ledger URL CONFIG_JSON", file=sys.stderr)
        return 2
    use_bot_root()
    print(json.dumps(asyncio.run(worker(argv[0], json.loads(argv[1])))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""``python -m tests.chaos --seeds N``: run N seeds on each backend and print, per seed, the jobs,
the faults injected and the violations (with the schedule when a seed fails). Exit status 0 when
no seed found a violation, 1 otherwise.

    python -m tests.chaos --seeds 20 --jobs 40            # seeds 1..20, Postgres and SQLite
    python -m tests.chaos --seed 7 --backend sqlite       # replay one seed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from tests.chaos.runner import DEFAULT_BOUND_S, RunResult, run_plan
from tests.chaos.schedule import plan
from tests.dbutil import postgres_unavailable_reason, temp_postgres_url


@contextlib.asynccontextmanager
async def fresh_database(backend: str, tmp: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'kontext.db'}"
        return
    async with temp_postgres_url() as url:
        yield url


async def run_seed(seed: int, backend: str, jobs: int, bound_s: float) -> RunResult:
    with tempfile.TemporaryDirectory(prefix=f"kontext-chaos-{seed}-",
                                     ignore_cleanup_errors=True) as tmp:
        async with fresh_database(backend, Path(tmp)) as url:
            return await run_plan(plan(seed, backend, jobs), url, Path(tmp), bound_s=bound_s)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="run seeds first..first+N-1")
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--seed", type=int, action="append", help="run just these seeds")
    parser.add_argument("--backend", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--jobs", type=int, default=30, help="jobs per seed")
    parser.add_argument("--bound", type=float, default=DEFAULT_BOUND_S,
                        help="seconds after the faults end by which every job must be finished")
    args = parser.parse_args(argv)
    seeds = args.seed or list(range(args.first, args.first + args.seeds))
    backends = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and (why := await postgres_unavailable_reason()) is not None:
        print(f"Postgres not available ({why}): SQLite only", flush=True)
        backends.remove("postgres")
    results: list[RunResult] = []
    for seed in seeds:
        for backend in backends:
            result = await run_seed(seed, backend, args.jobs, args.bound)
            results.append(result)
            print(result.report(), flush=True)
    failed = [r for r in results if not r.ok]
    print(
        f"\n{len(results)} runs: {sum(r.jobs_made for r in results)} jobs, "
        f"{sum(sum(r.faults.values()) for r in results)} faults injected, "
        f"{sum(len(r.violations) for r in results)} violations"
        + (f"; failing: {', '.join(f'{r.plan.seed}/{r.plan.backend}' for r in failed)}"
           if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

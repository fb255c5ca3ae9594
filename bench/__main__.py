"""``python -m bench`` (``make bench``): run the benchmark, print the table, write it to a file.

Options: ``--smoke`` (tiny sizes, seconds: proves the code paths), ``--only SECTION[,SECTION]``
(overhead, concurrent, memory, throughput, baseline, speedups, dbqueue, transactions, shared,
ledger), ``--out PATH`` (default ``bench/results/latest.md``), ``--profile DIR`` (bots under py-spy, see
:mod:`bench.profiling`), ``--before REV`` (the revision whose bot the ``dbqueue`` section
compares with, checked out in a temporary git worktree; default 2c73ae8, the last commit with the
queue in memory; ``--before ''`` skips the comparison), ``--after REV`` (the other side of that
comparison; default: this checkout, as it is on disk), ``--bot REV`` (measure the bot of
revision ``REV`` with this checkout's harness and floors: ``make bench`` with and without it is
a before/after pair).

Targets are ratios to a floor measured in the same run, printed beside the absolute figure (on
these shared machines absolute figures swing 2× between runs): ``overhead`` and ``concurrent``
divide the bot's overhead and CPU per job by :mod:`bench.floor`'s (a bare aiohttp client making
the same HTTP exchanges against the same emulators); ``ledger`` divides the store's pairs per
second by :mod:`bench.ledger_floor`'s (the same statements, transactions and durability run by
plain sqlite3 / asyncpg). ``speedups`` (:mod:`bench.speedups`) measures orjson and uvloop on the
bot's CPU per job (it needs both installed).

Sections ``memory``: 50 jobs in flight with 9 MiB results (peak RSS); ``dbqueue``: the
single-job overhead (SQLite) of the bot at ``--before`` and of this checkout, and their
difference; ``transactions``: the database transactions (commits) one job costs and the idle
bot's per second, counted by Postgres from outside the bot (:mod:`bench.transactions`);
``shared``: two bot processes on one Postgres database (``MAX_CONCURRENT_JOBS`` = 4 for both,
API latency 1 s, 32 jobs half to each): throughput and the API's peak concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

from .common import machine_facts
from .scenarios import Report, Sizes, head_description, run_all

HERE = Path(__file__).resolve().parent
#: the last commit before the database queue (the queue was in memory)
DEFAULT_BEFORE = "2c73ae8"


def render(report: Report, facts: dict[str, str], *, seconds: float, smoke: bool) -> str:
    lines = [
        "# Kontext Bot benchmark" + (" (smoke sizes: not a measurement)" if smoke else ""),
        "",
        f"Run {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} in {seconds:.0f} s, "
        "on loopback against the project's emulators (emulators/), the real bot in its own "
        "process. Reproduce: `make bench`.",
        "",
        "| Section | Metric | Target | Measured | Result | Notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        verdict = "—" if r.passed is None else ("PASS" if r.passed else "**FAIL**")
        lines.append(f"| {r.section} | {r.metric} | {r.target} | {r.measured} | {verdict} | {r.note} |")
    passed = sum(1 for r in report.rows if r.passed)
    failed = sum(1 for r in report.rows if r.passed is False)
    lines += ["", f"Targets: {passed} met, {failed} missed.", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", "## Raw figures", "", "```json", json.dumps(report.details, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a few seconds)")
    parser.add_argument("--only", default="", help="comma-separated sections")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.md"))
    parser.add_argument("--profile", metavar="DIR", help="record the bots with py-spy into DIR")
    parser.add_argument("--before", metavar="REV", default=DEFAULT_BEFORE,
                        help=f"revision of the 'before' bot for the dbqueue section (default {DEFAULT_BEFORE})")
    parser.add_argument("--after", metavar="REV", default="",
                        help="revision of the 'after' bot for the dbqueue section (default: this checkout)")
    parser.add_argument("--bot", metavar="REV", default="",
                        help="measure the bot of revision REV (a temporary git worktree) instead of this "
                             "checkout's, with this checkout's harness and floors: a before/after pair "
                             "is `make bench` with and without --bot")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.bot:
            from .scenarios import git_worktree
            from .world import BotProcess

            root, short = stack.enter_context(git_worktree(args.bot))
            BotProcess.default_root = root
            os.environ["BENCH_BOT_ROOT"] = str(root)  # the ledger's worker processes too
            print(f"measuring the bot of {short} ({root})", file=sys.stderr)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.profile:
        from .world import BotProcess

        BotProcess.profile_dir = Path(args.profile).resolve()
        BotProcess.profile_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.ERROR)
    sizes = Sizes.smoke() if args.smoke else Sizes()
    sections = {s.strip() for s in args.only.split(",") if s.strip()} or None
    load_before = os.getloadavg()
    if load_before[0] > 0.5 and not args.smoke:
        print(f"note: the machine is busy (load average {load_before[0]:.2f}); figures will be "
              "worse than on an idle machine", file=sys.stderr)
    started = time.monotonic()
    report = asyncio.run(run_all(sizes, Report(), sections=sections, before=args.before or None,
                                 after=args.after or None))
    facts = machine_facts()
    facts["bot measured"] = args.bot or head_description()
    load_after = os.getloadavg()
    facts["load average (1, 5, 15 min) before / after the run"] = (
        f"{' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)}"
    )
    text = render(report, facts, seconds=time.monotonic() - started, smoke=args.smoke)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print()
    print(text.split("\n## Raw figures")[0])
    print(f"written to {out}")
    return 1 if any(r.passed is False for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())

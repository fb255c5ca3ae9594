"""Where the queue's time goes: the bot's own timestamps (``BENCH_TRACE=1``, see
:mod:`bench.botproc`) beside the emulators'. Diagnosis only; no targets.

``python -m bench.diagnose sequential [--before REV] [--jobs N]`` — one job at a time on SQLite,
the bot at ``REV`` (default 2c73ae8) and this checkout's, alternating (before, after, after,
before): median milliseconds of each step from the interaction to the API request (precheck,
image check, reserve, claim) and from the API's answer to the result posted (commit).

``python -m bench.diagnose shared`` — the ``shared`` scenario (2 processes, one Postgres
database, C = 4, L = 1 s, N = 32): the first jobs' way to the API in the burst, and each freed
API slot's handoff (the API's answer → ``api_done`` → the next claim → the next request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Any

from . import ledger
from .common import MB, sized_jpeg
from .scenarios import Sizes, _job_number, _warm_up, api_calls, git_worktree
from .world import ROOT, BotProcess, bot_process, world

DEFAULT_BEFORE = "2c73ae8"
_STEPS = (
    "interaction → precheck", "precheck (read)", "interaction → image check", "image check",
    "reserve (write)", "reserve end → claim", "claim_next (write)", "reserve end → API request",
    "before the API, total", "API answer → commit starts", "commit (write)",
    "after the API, total (result seen)",
)


def _index(bots: list[BotProcess]) -> dict[tuple[str, Any], tuple[Any, ...]]:
    """The first trace record of each (method, job id), with its process number appended."""
    out: dict[tuple[str, Any], tuple[Any, ...]] = {}
    for p, bot in enumerate(bots):
        for name, job, start, end in bot.trace:
            out.setdefault((name, job), (name, job, start, end, p))
    return out


async def _sequential_run(root: Path, label: str, jobs: int) -> dict[str, float]:
    async with world(segmind_latency=0.2, result=sized_jpeg(MB)) as w:
        async with bot_process("kontext", w, label, root=root, BENCH_TRACE="1") as bot:
            await _warm_up(w, 2)
            recs = []
            for n in range(jobs):
                rec = await w.send(n)
                await w.wait_results([rec], 60)
                recs.append(rec)
    calls, tr = api_calls(w), _index([bot])
    gens = sorted(t[2] for t in bot.trace if t[0] == "generate")
    seg: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        seg.setdefault(key, []).append(value)

    for r in recs:
        call, j = calls[_job_number(r)], r.id
        _, _, rs, re_, _ = tr[("reserve", j)]
        _, _, ks, ke, _ = tr[("check_inputs", j)]
        if ("precheck", j) in tr:
            _, _, ps, pe, _ = tr[("precheck", j)]
            add("interaction → precheck", ps - r.created_at)
            add("precheck (read)", pe - ps)
        else:
            add("interaction → image check", ks - r.created_at)
        add("image check", ke - ks)
        add("reserve (write)", re_ - rs)
        gen = min(t for t in gens if t >= re_)
        if ("claim_next", j) in tr:
            _, _, cs, ce, _ = tr[("claim_next", j)]
            add("reserve end → claim", cs - re_)
            add("claim_next (write)", ce - cs)
        add("reserve end → API request", gen - re_)
        add("before the API, total", call.time - r.created_at)
        if ("commit", j) in tr:
            _, _, cs, ce, _ = tr[("commit", j)]
            add("API answer → commit starts", cs - call.finished)
            add("commit (write)", ce - cs)
        add("after the API, total (result seen)", w.discord.result_seen[r.id] - call.finished)
    return {k: statistics.median(v) * 1000 for k, v in seg.items()}


async def sequential(before: str, jobs: int) -> None:
    with git_worktree(before) as (root, short):
        res: dict[str, dict[str, float]] = {}
        for which, where in (("before", root), ("after", ROOT), ("after'", ROOT), ("before'", root)):
            res[which] = await _sequential_run(where, f"diag-{which.strip(chr(39))}", jobs)
    keys = [k for k in _STEPS if any(k in r for r in res.values())]
    print(f"median ms, {jobs} jobs a run; before = {short}, after = this checkout")
    print(f"{'':38s}" + "".join(f"{k:>9s}" for k in res))
    for k in keys:
        print(f"{k:38s}" + "".join(f"{res[w].get(k, float('nan')):9.2f}" for w in res))


async def shared() -> None:
    sizes = Sizes()
    c, n_jobs, latency, procs = sizes.shared_c, sizes.shared_jobs, sizes.shared_latency, sizes.shared_processes
    async with ledger.postgres_url() as url:
        if url is None:
            print("no Postgres:", getattr(ledger.postgres_url, "reason", "unreachable"))
            return
        async with world(segmind_latency=latency, result=sized_jpeg(sizes.small_result)) as w:
            async with contextlib.AsyncExitStack() as stack:
                bots = [
                    await stack.enter_async_context(bot_process(
                        "kontext", w, f"diag-P{i}", database_url=url, connections=i + 1,
                        MAX_CONCURRENT_JOBS=c, BENCH_TRACE="1",
                    ))
                    for i in range(procs)
                ]
                for i in range(procs):
                    rec = await w.send(10_000 + i, to=i)
                    await w.wait_results([rec], 60)
                await asyncio.sleep(0.2)
                w.segmind.reset_stats()
                recs = list(await asyncio.gather(*(w.send(n, to=n % procs) for n in range(n_jobs))))
                await w.wait_results(recs, 60 + n_jobs * latency * 2, settled=False)
    end = max(w.discord.result_seen[r.id] for r in recs)
    by_n = {_job_number(r): r for r in recs}
    call_of = {by_n[n].id: call for n, call in api_calls(w).items() if n in by_n}
    tr = _index(bots)
    order = sorted(call_of, key=lambda j: call_of[j].time)
    ends = sorted(call_of, key=lambda j: call_of[j].finished)
    first, sent0 = call_of[order[0]].time, min(r.created_at for r in recs)
    print(f"first API call → last result {end - first:.3f} s; the first {c} calls started at +"
          + ", ".join(f"{(call_of[j].time - first) * 1000:.0f}" for j in order[:c]) + " ms")
    print("the first jobs' way to the API (ms after the first interaction was sent):")
    rec_of = {r.id: r for r in recs}
    for j in order[: 2 * c]:
        row = [f"P{tr[('reserve', j)][4]} sent {1000 * (rec_of[j].created_at - sent0):5.1f}"]
        for name in ("precheck", "check_inputs", "reserve", "claim_next"):
            t = tr.get((name, j))
            if t:
                row.append(f"{name} {1000 * (t[2] - sent0):6.1f}–{1000 * (t[3] - sent0):6.1f}")
        row.append(f"API {1000 * (call_of[j].time - sent0):6.1f}")
        print("  " + " | ".join(row))
    for name in ("precheck", "check_inputs", "reserve", "claim_next", "api_done"):
        spans = [t[3] - t[2] for t in (tr.get((name, j)) for j in call_of) if t]
        if spans:
            print(f"  {name} in this run: median {statistics.median(spans) * 1000:.1f} ms, "
                  f"max {max(spans) * 1000:.1f} ms ({len(spans)} jobs)")
    gens = [t for bot_no, b in enumerate(bots) for t in ((*x, bot_no) for x in b.trace) if t[0] == "generate"]
    seg: dict[str, list[float]] = {}
    for i, freed in enumerate(ends[: len(order) - c]):
        nxt = order[i + c]
        done, claim, ex = tr.get(("api_done", freed)), tr.get(("claim_next", nxt)), tr.get(("execute", nxt)) or tr.get(("_execute", nxt))
        if not (done and claim and ex):
            continue
        gen = min((t for t in gens if t[4] == ex[4] and t[2] >= ex[2]), key=lambda t: t[2])
        for key, value in (
            ("API answer → api_done starts", done[2] - call_of[freed].finished),
            ("api_done (write)", done[3] - done[2]),
            ("api_done end → claim starts", claim[2] - done[3]),
            ("claim_next (write)", claim[3] - claim[2]),
            ("claim end → API request sent", gen[2] - claim[3]),
            ("request sent → the API sees it", call_of[nxt].time - gen[2]),
            ("handoff, total", call_of[nxt].time - call_of[freed].finished),
        ):
            seg.setdefault(key, []).append(value)
    print("a freed API slot's handoff (the i-th answer → the (i + C)-th request):")
    for key, values in seg.items():
        print(f"  {key:34s} median {statistics.median(values) * 1000:6.1f} ms, max {max(values) * 1000:6.1f} ms")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.diagnose", description=__doc__)
    parser.add_argument("what", choices=("sequential", "shared"))
    parser.add_argument("--before", default=DEFAULT_BEFORE)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args(argv)
    if args.what == "sequential":
        asyncio.run(sequential(args.before, args.jobs))
    else:
        asyncio.run(shared())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The measured scenarios and the result table."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from emulators.discord import InteractionRecord

from . import ledger, ledger_floor, speedups, transactions
from .common import MB, lag_in_window, median, noisy_png, percentile, sized_jpeg
from .world import ROOT, BotProcess, World, bot_process, world

_JOB_RE = re.compile(r"^bench job (\d+):")


@dataclass
class Sizes:
    """How much work each scenario does (the full run, or a tiny smoke run)."""

    sequential_jobs: int = 20
    sequential_latency: float = 0.2
    concurrent_jobs: int = 50
    concurrent_latency: float = 1.0
    throughput_latency: float = 18.0  # the API's real latency (the seed: about 18 s a call)
    throughput_c: tuple[int, ...] = (1, 4, 16)
    rounds: int = 2  # N = rounds × C
    stress_latency: float = 1.0  # 18× shorter calls: the bot's own CPU becomes the limit
    stress_rounds: int = 4
    baseline_c: int = 4
    ledger_seconds: float = 3.0
    small_result: int = 1 * MB
    large_result: int = 9 * MB
    warmup_jobs: int = 2
    shared_processes: int = 2  # bot processes on one Postgres database
    shared_c: int = 4  # MAX_CONCURRENT_JOBS, global to the processes
    shared_jobs: int = 32  # N, delivered half to each process
    shared_latency: float = 1.0
    dbqueue_runs: int = 2  # before/after runs of sequential_jobs / dbqueue_runs jobs each, ABBA
    transactions_jobs: int = 30  # sequential jobs on Postgres whose transactions are counted
    transactions_idle: float = 10.0  # seconds of each idle window (before and after the jobs)
    transactions_latency: float = 0.05  # short jobs: few of the idle bot's commits to take off
    transactions_flush: float = 11.0  # quiet before a snapshot (Postgres reports counters late)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            sequential_jobs=2, sequential_latency=0.0, concurrent_jobs=3, concurrent_latency=0.05,
            throughput_latency=0.1, throughput_c=(2,), rounds=2, stress_latency=0.1,
            stress_rounds=2, baseline_c=2,
            ledger_seconds=0.3, small_result=64 * 1024, large_result=256 * 1024, warmup_jobs=1,
            shared_c=2, shared_jobs=4, shared_latency=0.1, dbqueue_runs=2,
            transactions_jobs=2, transactions_idle=1.0, transactions_latency=0.0,
            transactions_flush=1.5,
        )


@dataclass
class JobTiming:
    n: int
    pre: float  # API request seen − interaction sent
    post: float  # result message seen − API answered
    api: float
    sent: float
    seen: float

    @property
    def overhead(self) -> float:
        return self.pre + self.post


@dataclass
class Row:
    section: str
    metric: str
    target: str
    measured: str
    passed: bool | None  # None: no target (information)
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def add(self, *args: Any, **kw: Any) -> None:
        row = Row(*args, **kw)
        self.rows.append(row)
        verdict = "info" if row.passed is None else ("PASS" if row.passed else "FAIL")
        self.log(f"  {row.metric}: {row.measured} (target {row.target}) {verdict}")


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def mib(nbytes: float) -> str:
    return f"{nbytes / MB:.1f} MiB"


def api_calls(w: World) -> dict[int, Any]:
    """The API calls that answered, by bench job number."""
    calls: dict[int, Any] = {}
    for call in w.segmind.calls:
        match = _JOB_RE.match(str((call.payload or {}).get("prompt", "")))
        if match and call.status == 200 and call.finished is not None:
            calls[int(match.group(1))] = call
    return calls


def timings(w: World, recs: list[InteractionRecord]) -> list[JobTiming]:
    """Per-job timings from the emulators' records (all ``time.monotonic()``)."""
    calls = api_calls(w)
    out = []
    for rec in recs:
        n = _job_number(rec)
        call = calls.get(n)
        seen = w.discord.result_seen.get(rec.id)
        if call is None or seen is None:
            continue
        out.append(
            JobTiming(
                n=n, pre=call.time - rec.created_at, post=seen - call.finished,
                api=call.finished - call.time, sent=rec.created_at, seen=seen,
            )
        )
    return out


def _job_number(rec: InteractionRecord) -> int:
    for opt in rec.data.get("options", []):
        if opt.get("name") == "prompt":
            match = _JOB_RE.match(str(opt.get("value")))
            if match:
                return int(match.group(1))
    raise LookupError(f"interaction {rec.id} is not a bench job")


async def _warm_up(w: World, count: int, first: int = 10_000) -> None:
    """A few jobs before measuring: first connections, first writes, lazy imports."""
    for i in range(count):
        rec = await w.send(first + i)
        await w.wait_results([rec], 60)


# --- scenarios ---------------------------------------------------------------------------------


async def sequential(
    size: int, sizes: Sizes, *, root: Path | None = None, jobs: int | None = None, label: str = "",
    kind: str = "kontext",
) -> tuple[list[JobTiming], dict[str, Any]]:
    """Jobs one at a time: each is sent once the previous one was committed (the bot of
    checkout ``root``, on a fresh SQLite database; ``kind="floor"``: :mod:`bench.floor`)."""
    async with world(segmind_latency=sizes.sequential_latency, result=sized_jpeg(size)) as w:
        async with bot_process(kind, w, label or f"sequential-{kind}-{size}", root=root) as bot:
            await _warm_up(w, sizes.warmup_jobs)
            recs = []
            for n in range(sizes.sequential_jobs if jobs is None else jobs):
                rec = await w.send(n)
                await w.wait_results([rec], 60)
                recs.append(rec)
            t = timings(w, recs)
        stats: dict[str, Any] = dict(_lag_rss(bot, t))
        stats["bot_file"] = bot.bot_file
        stats["kontext_file"] = bot.kontext_file
        return t, stats


async def concurrent(
    size: int, sizes: Sizes, result: bytes | None = None, label: str = "", kind: str = "kontext",
    env: dict[str, str] | None = None, root: Path | None = None,
) -> tuple[list[JobTiming], dict[str, float]]:
    """``concurrent_jobs`` members send ``/kontext`` at the same moment; every result is
    ``result`` (default: a JPEG of ``size`` bytes). ``kind="floor"``: :mod:`bench.floor`."""
    body = result if result is not None else sized_jpeg(size)
    async with world(segmind_latency=sizes.concurrent_latency, result=body) as w:
        async with bot_process(kind, w, label or f"concurrent-{kind}-{size}", root=root, **(env or {})) as bot:
            await _warm_up(w, 1)
            await asyncio.sleep(0.2)
            idle_rss = bot.rss.at(time.monotonic()) if bot.rss else 0
            cpu = CpuMeter(bot.bot_pid)
            recs = await asyncio.gather(*(w.send(n) for n in range(sizes.concurrent_jobs)))
            await w.wait_results(list(recs), 120)
            bot_cpu, emu_cpu = cpu.used()
            t = timings(w, list(recs))
        stats = _lag_rss(bot, t)
        stats["idle_rss"] = idle_rss
        stats["bot_cpu_per_job"] = bot_cpu / max(1, len(recs))
        stats["emulator_cpu_per_job"] = emu_cpu / max(1, len(recs))
        stats["api_peak"] = w.segmind.peak_concurrency
        return t, stats


class CpuMeter:
    """CPU seconds (user + system, all threads) used by the bot and by this process (the
    emulators) since creation."""

    def __init__(self, bot_pid: int) -> None:
        self.bot = psutil.Process(bot_pid)
        self.me = psutil.Process()
        self.start = (self._cpu(self.bot), self._cpu(self.me))

    @staticmethod
    def _cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    def used(self) -> tuple[float, float]:
        return self._cpu(self.bot) - self.start[0], self._cpu(self.me) - self.start[1]


def _lag_rss(bot: BotProcess, t: list[JobTiming]) -> dict[str, float]:
    if not t:
        return {}
    start, end = min(j.sent for j in t), max(j.seen for j in t)
    lags = lag_in_window(bot.lag_samples, start, end)
    return {
        "lag_max": max(lags, default=math.nan),
        "lag_p99": percentile(lags, 99),
        "lag_samples": len(lags),
        "rss_peak": bot.rss.peak(start, end) if bot.rss else 0,
        "window": end - start,
    }


async def throughput(
    kind: str, c: int, *, latency: float, rounds: int, result_size: int
) -> dict[str, float]:
    """N = rounds × C jobs at once, C API calls at a time, API latency L: ideal ceil(N/C)·L.

    ``ratio`` is the ideal over the time from the first API call to the last result posted (how
    well the bot keeps the API busy); ``ratio_end_to_end`` also counts the burst's intake, from
    the first interaction sent.
    """
    n_jobs = rounds * c
    async with world(segmind_latency=latency, result=sized_jpeg(result_size)) as w:
        env = {"MAX_CONCURRENT_JOBS": str(c)} if kind == "kontext" else {}
        async with bot_process(kind, w, f"throughput-C{c}", **env) as bot:
            if kind == "kontext":
                await _warm_up(w, 1)
            recs = list(await asyncio.gather(*(w.send(n) for n in range(n_jobs))))
            await w.wait_results(recs, 60 + n_jobs * latency * 2, settled=False)
            t = timings(w, recs)
        start, end = min(r.created_at for r in recs), max(w.discord.result_seen[r.id] for r in recs)
        calls = api_calls(w)
        ours = [calls[n] for n in range(n_jobs) if n in calls]
        first_call = min(call.time for call in ours)
        # the API's latency as the bot meets it: the emulator's nominal L plus its own time to
        # fetch both inputs and answer (not the bot's doing)
        api_latency = median([call.finished - call.time for call in ours])
        elapsed = end - start
        busy = end - first_call  # the API's part: first call started → last result posted
        ideal = math.ceil(n_jobs / c) * api_latency
        lags = lag_in_window(bot.lag_samples, start, end)
        return {
            "jobs": n_jobs, "c": c, "latency": latency, "api_latency": api_latency,
            "elapsed": elapsed, "ideal": ideal,
            "ratio": ideal / busy, "ratio_end_to_end": ideal / elapsed, "busy": busy,
            "ingest": first_call - start, "lag_max": max(lags, default=math.nan),
            "lag_p99": percentile(lags, 99), "api_peak": w.segmind.peak_concurrency,
            "overhead_median": median([j.overhead for j in t]),
        }


async def shared_queue(sizes: Sizes, database_url: str) -> dict[str, float]:
    """``shared_processes`` bot processes on one Postgres database (one queue), the API account's
    limit ``MAX_CONCURRENT_JOBS = shared_c`` global to them, ``shared_jobs`` jobs sent at once and
    delivered round-robin (job n to process n mod P, each interaction to one process only).

    Throughput is N over the time from the first API call's start to the last result posted
    (as ``busy`` in :func:`throughput`); ``api_peak`` is the most calls the API saw at once
    during the burst (the warm-up is forgotten first).
    """
    c, n_jobs, latency, procs = sizes.shared_c, sizes.shared_jobs, sizes.shared_latency, sizes.shared_processes
    async with world(segmind_latency=latency, result=sized_jpeg(sizes.small_result)) as w:
        async with contextlib.AsyncExitStack() as stack:
            bots: list[BotProcess] = []
            for i in range(procs):
                bots.append(await stack.enter_async_context(bot_process(
                    "kontext", w, f"shared-P{i}", database_url=database_url, connections=i + 1,
                    MAX_CONCURRENT_JOBS=c,
                )))
            for i in range(procs):  # first connections, first writes, lazy imports: each process
                rec = await w.send(10_000 + i, to=i)
                await w.wait_results([rec], 60)
            await asyncio.sleep(0.2)
            w.segmind.reset_stats()  # calls, peak: the burst's alone
            recs = list(await asyncio.gather(*(w.send(n, to=n % procs) for n in range(n_jobs))))
            await w.wait_results(recs, 60 + n_jobs * latency * 2, settled=False)
            t = timings(w, recs)
            api_peak = w.segmind.peak_concurrency
        # every bot stopped here: its lag samples are read
    start, end = min(r.created_at for r in recs), max(w.discord.result_seen[r.id] for r in recs)
    calls = api_calls(w)
    ours = [calls[n] for n in range(n_jobs) if n in calls]
    first_call = min(call.time for call in ours)
    last_api_end = max(call.finished for call in ours)
    api_latency = median([call.finished - call.time for call in ours])
    busy = end - first_call
    # a freed slot's handoff: the (i + C)-th API call's start after the i-th call's end
    starts, ends = sorted(call.time for call in ours), sorted(call.finished for call in ours)
    handoffs = [starts[i + c] - ends[i] for i in range(len(ends) - c) if i + c < len(starts)]
    lags = [max(lag_in_window(b.lag_samples, start, end), default=math.nan) for b in bots]
    delivered = [sum(1 for r in recs if r.delivered_to and r.delivered_to[0] == b) for b in
                 sorted({r.delivered_to[0] for r in recs if r.delivered_to})]
    return {
        "jobs": n_jobs, "c": c, "latency": latency, "processes": procs, "api_latency": api_latency,
        "busy": busy, "per_second": n_jobs / busy, "target_per_second": 0.95 * c / latency,
        "ideal": math.ceil(n_jobs / c) * latency, "ideal_measured": math.ceil(n_jobs / c) * api_latency,
        "api_window": last_api_end - first_call, "elapsed": end - start, "ingest": first_call - start,
        "handoff_median": median(handoffs), "handoff_max": max(handoffs, default=math.nan),
        "last_post": end - last_api_end,
        "stagger": starts[min(c, len(starts)) - 1] - starts[0],  # the C-th call's start after the first's
        "api_peak": api_peak, "api_calls": len(ours), "delivered": delivered,
        "lag_max_per_process": lags, "overhead_median": median([j.overhead for j in t]),
    }


@contextlib.contextmanager
def git_worktree(rev: str) -> Iterator[tuple[Path, str]]:
    """A detached worktree of this repository at ``rev`` in a temporary directory; yields
    ``(path, short hash)``; removed afterwards. Raises ``RuntimeError`` when git cannot."""
    tmp = Path(tempfile.mkdtemp(prefix="kontext-before-"))
    path = tmp / "tree"

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout.strip()

    try:
        short = git("rev-parse", "--short", f"{rev}^{{commit}}")
        git("worktree", "add", "--detach", str(path), rev)
        try:
            yield path, short
        finally:
            with contextlib.suppress(RuntimeError):  # its own entry only (no prune: others' are theirs)
                git("worktree", "remove", "--force", str(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _git_out(*args: str) -> str:
    """``git args…`` in this checkout: its output, or "" when it fails."""
    res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def head_description() -> str:
    """This checkout's HEAD (short hash), marked when the bot's code has uncommitted changes."""
    short = _git_out("rev-parse", "--short", "HEAD") or "?"
    dirty = _git_out("status", "--porcelain", "--untracked-files=no", "--", "bot.py", "kontext")
    return short + (" + uncommitted changes" if dirty else "")


async def dbqueue_overhead(
    sizes: Sizes, before_root: Path, after_root: Path = ROOT
) -> tuple[list[JobTiming], list[JobTiming], dict[str, Any]]:
    """The single-job overhead (the ``sequential`` scenario, SQLite, small result) of the bot
    at ``before_root`` and at ``after_root`` (default: this checkout), ``sequential_jobs`` jobs
    each, in ``dbqueue_runs`` alternating runs (before, after, after, before, …) so that drift
    hits both alike."""
    runs = max(1, sizes.dbqueue_runs)
    per_run = [sizes.sequential_jobs // runs + (1 if i < sizes.sequential_jobs % runs else 0)
               for i in range(runs)]
    before: list[JobTiming] = []
    after: list[JobTiming] = []
    files: dict[str, Any] = {}
    for i, jobs in enumerate(per_run):
        order = (("before", before_root), ("after", after_root))
        for which, root in (order if i % 2 == 0 else order[::-1]):
            t, st = await sequential(sizes.small_result, sizes, root=root, jobs=jobs,
                                     label=f"dbqueue-{which}-{i}")
            ran = (st.get("bot_file"), st.get("kontext_file"))
            if ran != (str(root / "bot.py"), str(root / "kontext" / "__init__.py")):
                raise RuntimeError(f"{which}: ran {ran}, expected the bot of {root}")
            files[which] = ran
            (before if which == "before" else after).extend(t)
    return before, after, files


# --- the whole run -------------------------------------------------------------------------------


async def run_all(
    sizes: Sizes,
    report: Report,
    *,
    sections: set[str] | None = None,
    before: str | None = "2c73ae8",
    after: str | None = None,
) -> Report:
    want = (lambda s: True) if not sections else (lambda s: s in sections)
    small, large = mib(sizes.small_result), mib(sizes.large_result)

    if want("overhead"):
        report.log(f"[overhead] {sizes.sequential_jobs} sequential jobs, {small} and {large} results; "
                   "the floor (bench.floor) first")
        for size, label in ((sizes.small_result, small), (sizes.large_result, large)):
            floor_t, _ = await sequential(size, sizes, kind="floor")
            t, _ = await sequential(size, sizes)
            floor = _split(floor_t)
            _overhead_rows(report, f"1 job at a time, {label} result", t, size == sizes.small_result,
                           floor=floor)
            report.details[f"sequential_{label}"] = _split(t)
            report.details[f"floor_sequential_{label}"] = floor

    if want("concurrent"):
        report.log(f"[concurrent] {sizes.concurrent_jobs} jobs at once, API latency {sizes.concurrent_latency:g} s")
        for size, label in ((sizes.small_result, small), (sizes.large_result, large)):
            floor_t, floor_st = await concurrent(size, sizes, kind="floor")
            t, st = await concurrent(size, sizes)
            is_small = size == sizes.small_result
            floor = _split(floor_t)
            _overhead_rows(report, f"{sizes.concurrent_jobs} jobs at once, {label} result", t, is_small,
                           extra=f"; CPU per job: bot {ms(st['bot_cpu_per_job'])}, emulators {ms(st['emulator_cpu_per_job'])}",
                           floor=floor)
            report.details[f"concurrent_{label}"] = {**_split(t), **st}
            report.details[f"floor_concurrent_{label}"] = {**floor, **floor_st}
            sect = f"{sizes.concurrent_jobs} jobs in flight, {label} result"
            _cpu_row(report, sect, st, floor_st, is_small)
            report.add(sect, "event-loop lag, max", "≤ 50 ms" if is_small else "—",
                       ms(st["lag_max"]), st["lag_max"] <= 0.050 if is_small else None,
                       f"p99 {ms(st['lag_p99'])}, {int(st['lag_samples'])} samples of sleep(10 ms)")
            report.add(sect, "peak RSS of the bot process", "≤ 150 MiB" if is_small else "—",
                       mib(st["rss_peak"]), st["rss_peak"] <= 150 * MB if is_small else None,
                       f"idle before the burst {mib(st['idle_rss'])}; API saw {int(st['api_peak'])} at once")

    if want("memory"):
        # real image content (noise: a PNG of ~9 MiB barely compresses), under Discord's default
        # 10 MiB upload limit so that it is posted as it is
        png = noisy_png(sizes.large_result)
        report.log(f"[memory] {sizes.concurrent_jobs} jobs at once, {mib(len(png))} PNG results, "
                   f"API latency {sizes.concurrent_latency:g} s")
        t, st = await concurrent(len(png), sizes, result=png, label="memory")
        report.details[f"memory_{large}"] = {**_split(t), **st, "result_bytes": len(png)}
        sect = f"{sizes.concurrent_jobs} in flight, {large} results (noisy PNG)"
        limit = 300 * MB if sizes.large_result >= MB else 150 * MB
        report.add(sect, f"peak RSS, {sizes.concurrent_jobs} in flight, {large} results",
                   f"≤ {mib(limit)}", mib(st["rss_peak"]), st["rss_peak"] <= limit,
                   f"{len(t)} jobs; idle before the burst {mib(st['idle_rss'])}; "
                   f"API saw {int(st['api_peak'])} at once; loop lag max {ms(st['lag_max'])}")

    stress = {"latency": sizes.stress_latency, "rounds": sizes.stress_rounds,
              "result_size": sizes.small_result}
    ours_c: dict[int, dict[str, float]] = {}
    if want("throughput"):
        cs = ", ".join(map(str, sizes.throughput_c))
        report.log(f"[throughput] C = {cs}, L = {sizes.throughput_latency:g} s, N = {sizes.rounds}×C")
        for c in sizes.throughput_c:
            st = await throughput("kontext", c, latency=sizes.throughput_latency,
                                  rounds=sizes.rounds, result_size=sizes.small_result)
            report.details[f"throughput_C{c}"] = st
            _throughput_row(report, "throughput vs ideal C/L", st)
        report.log(f"[throughput, stress] C = {cs}, L = {sizes.stress_latency:g} s, N = {sizes.stress_rounds}×C")
        for c in sizes.throughput_c:
            st = await throughput("kontext", c, **stress)
            ours_c[c] = st
            report.details[f"throughput_stress_C{c}"] = st
            _throughput_row(report, "stress: API 18× faster than real", st)

    if want("baseline"):
        c = sizes.baseline_c
        report.log(f"[baseline] the seed's blocking call, N = {sizes.stress_rounds * c} jobs at once, L = {sizes.stress_latency:g} s")
        base = await throughput("baseline", c, **stress)
        ours = ours_c.get(c) or await throughput("kontext", c, **stress)
        report.details["baseline"] = base
        report.details.setdefault(f"throughput_stress_C{c}", ours)
        sect = f"vs blocking baseline (N = {int(base['jobs'])}, C = {c}, L = {base['latency']:g} s)"
        ours_r, base_r = ours["ratio_end_to_end"], base["ratio_end_to_end"]
        report.add(sect, "throughput vs ideal, end to end: ours / baseline", "—",
                   f"{ours_r:.3f} / {base_r:.3f} = {ours_r / base_r:.1f}×",
                   None, f"{ours['elapsed']:.2f} s vs {base['elapsed']:.2f} s for the same jobs, "
                   "first interaction → last result")
        report.add(sect, "event-loop lag max: baseline / ours", "—",
                   f"{ms(base['lag_max'])} / {ms(ours['lag_max'])} = {base['lag_max'] / max(ours['lag_max'], 1e-4):.0f}×",
                   None, f"p99 {ms(base['lag_p99'])} vs {ms(ours['lag_p99'])}")

    if want("speedups"):
        await speedups.rows(report, sizes, concurrent)

    if want("dbqueue"):
        await _dbqueue_rows(report, sizes, before, after)

    if want("transactions"):
        await transactions.rows(report, sizes)

    if want("shared"):
        await _shared_rows(report, sizes)

    if want("ledger"):
        report.log(f"[ledger] reserve + commit pairs, {sizes.ledger_seconds:g} s per row, 4 tasks per process")
        for backend in ("sqlite", "postgres"):
            for procs in (1, 2):
                await _ledger_row(report, backend, procs, sizes)
    return report


#: the store's reserve + commit pairs per second ≥ this share of the floor's (bench.ledger_floor)
LEDGER_RATIO = 0.5


async def _ledger_row(report: Report, backend: str, procs: int, sizes: Sizes) -> None:
    metric = f"{backend}, {procs} process{'es' if procs > 1 else ''}"
    # Postgres has no target (as before the floors): SQLAlchemy's statement cost weighs more
    # against a network round trip than against SQLite's in-process call; its ratio is told
    target = f"≥ {LEDGER_RATIO:g}× floor" if backend == "sqlite" else "—"
    section = "ledger ops (reserve+commit pairs)"
    results = []
    for run in (ledger_floor.run, ledger.run):  # the floor first, each on a fresh database
        cm = ledger.sqlite_url() if backend == "sqlite" else ledger.postgres_url()
        async with cm as url:
            if url is None:
                reason = getattr(ledger.postgres_url, "reason", "unreachable")
                report.add(section, metric, target, "skipped", None, reason)
                return
            results.append(await run(url, backend, procs, duration=sizes.ledger_seconds))
    floor, res = results
    report.details[f"ledger_{backend}_{procs}"] = res.__dict__ | {"per_second": res.per_second}
    report.details[f"ledger_floor_{backend}_{procs}"] = floor.__dict__ | {"per_second": floor.per_second}
    ratio = _ratio(res.per_second, floor.per_second)
    note = (f"{res.pairs} pairs in {res.seconds:.2f} s; the floor ({'sqlite3' if backend == 'sqlite' else 'asyncpg'}, "
            f"the same {floor.note}, same transactions and durability): {floor.per_second:,.0f}/s")
    if res.errors or floor.errors:
        note += f"; errors {res.errors} (floor {floor.errors})"
    if res.invariants:
        note += f"; INVARIANTS BROKEN: {res.invariants[:3]}"
    ok: bool | None = ratio >= LEDGER_RATIO and not res.invariants
    if backend != "sqlite":
        ok = None if not res.invariants else False
    if backend == "sqlite":  # issue 11's absolute figure, met on an idle machine, told beside
        note += f"; absolute ≥ 1000/s: {'met' if res.per_second >= 1000 else 'not met in this run'}"
    report.add(section, metric, target, f"{ratio:.2f}× floor ({res.per_second:,.0f}/s)", ok, note)


async def _dbqueue_rows(report: Report, sizes: Sizes, before: str | None, after: str | None) -> None:
    small = mib(sizes.small_result)
    section = f"database queue vs in-memory queue (SQLite, 1 job at a time, {small} result)"
    metric = "overhead added by the database queue (median after − median before)"
    if not before:
        report.add(section, metric, "≤ 5 ms", "skipped", None, "no --before revision")
        return
    report.log(f"[dbqueue] {sizes.sequential_jobs} sequential jobs each: the bot at {before} "
               f"(in-memory queue) and {after or 'this checkout'}'s, {sizes.dbqueue_runs} alternating runs")
    try:
        with contextlib.ExitStack() as stack:
            root, short = stack.enter_context(git_worktree(before))
            after_root, after_name = ROOT, head_description()
            if after:
                after_root, after_name = stack.enter_context(git_worktree(after))
            b, a, files = await dbqueue_overhead(sizes, root, after_root)
    except RuntimeError as exc:
        report.add(section, metric, "≤ 5 ms", "skipped", None, f"a bot is unavailable: {exc}")
        return
    sb, sa = _split(b), _split(a)
    report.details["dbqueue"] = {"before_rev": short, "after": after_name, "before": sb, "after_stats": sa,
                                 "bot_files": files}
    for name, st in ((f"before ({short}, queue in memory)", sb),
                     (f"after ({after_name}, queue in the database)", sa)):
        report.add(section, f"bot overhead per job, median: {name}", "—", ms(st["overhead_median"]), None,
                   f"{int(st['jobs'])} jobs; before the API {ms(st['pre_median'])}, "
                   f"after it {ms(st['post_median'])}; p99 {ms(st['overhead_p99'])}")
    added = sa["overhead_median"] - sb["overhead_median"]
    commits = _git_out("rev-list", "--count", f"{before}..{after or 'HEAD'}")
    report.add(section, metric, "≤ 5 ms", ms(added), added <= 0.005,
               f"{ms(sa['overhead_median'])} − {ms(sb['overhead_median'])}; before the API "
               f"{ms(sa['pre_median'] - sb['pre_median'])}, after it {ms(sa['post_median'] - sb['post_median'])} "
               f"(differences of medians); 'after' is {commits or '?'} commit(s) past {short}, "
               "so every change since then counts, not only the queue's")


async def _shared_rows(report: Report, sizes: Sizes) -> None:
    c, n, lat, procs = sizes.shared_c, sizes.shared_jobs, sizes.shared_latency, sizes.shared_processes
    section = f"{procs} processes, one Postgres queue (C = {c}, N = {n}, L = {lat:g} s)"
    target = 0.95 * c / lat
    report.log(f"[shared] {procs} bot processes on one Postgres database, C = {c}, L = {lat:g} s, "
               f"N = {n} delivered round-robin")
    async with ledger.postgres_url() as url:
        if url is None:
            reason = getattr(ledger.postgres_url, "reason", "unreachable")
            report.add(section, "throughput", f"≥ {target:.2f} jobs/s", "skipped", None, reason)
            return
        st = await shared_queue(sizes, url)
    report.details["shared_queue"] = st
    report.add(section, "throughput, first API call → last result posted",
               f"≥ {target:.2f} jobs/s (0.95 × C/L)", f"{st['per_second']:.2f} jobs/s",
               st["per_second"] >= target,
               f"{n} jobs in {st['busy']:.2f} s (ideal ⌈N/C⌉·L = {st['ideal']:.2f} s; with the API calls' "
               f"measured {st['api_latency']:.3f} s, {st['ideal_measured']:.2f} s: ratio "
               f"{st['ideal_measured'] / st['busy']:.3f}); delivered {'/'.join(map(str, st['delivered']))} "
               f"to the processes; a freed slot's next call started after {ms(st['handoff_median'])} "
               f"(median; max {ms(st['handoff_max'])}), the C-th first call {ms(st['stagger'])} after the first, "
               f"last API end → last post {ms(st['last_post'])}; "
               f"first interaction → last result {st['elapsed']:.2f} s; loop lag max "
               + " / ".join(ms(x) for x in st["lag_max_per_process"]))
    report.add(section, "peak API calls in flight (all processes)", f"= {c}", str(int(st["api_peak"])),
               int(st["api_peak"]) == c, f"{int(st['api_calls'])} API calls answered for {n} jobs")


def _throughput_row(report: Report, section: str, st: dict[str, float]) -> None:
    report.add(
        section, f"C = {int(st['c'])}, N = {int(st['jobs'])}, L = {st['latency']:g} s",
        "≥ 0.97", f"{st['ratio']:.3f}", st["ratio"] >= 0.97,
        f"first API call → last result {st['busy']:.2f} s vs ideal {st['ideal']:.2f} s "
        f"(API calls took {st['api_latency']:.3f} s); "
        f"API saw ≤ {int(st['api_peak'])} at once; counting the burst's intake too "
        f"({st['ingest'] * 1000:.0f} ms to the first call): {st['ratio_end_to_end']:.3f}",
    )


def _split(t: list[JobTiming]) -> dict[str, float]:
    return {
        "jobs": len(t),
        "overhead_median": median([j.overhead for j in t]),
        "overhead_p99": percentile([j.overhead for j in t], 99),
        "pre_median": median([j.pre for j in t]),
        "post_median": median([j.post for j in t]),
        "pre_p99": percentile([j.pre for j in t], 99),
        "post_p99": percentile([j.post for j in t], 99),
    }


#: targets as ratios to the floor measured in the same run (bench.floor: the same HTTP exchanges
#: made by a bare aiohttp client); the absolute figure is printed beside, for reference
OVERHEAD_RATIO = 4.0  # one job at a time, small result: the bot's overhead ≤ 4× the floor's
CPU_RATIO = 4.0  # 50 at once, small result: the bot's CPU per job ≤ 4× the floor's
CPU_GOAL_S = 0.008  # issue 11's absolute goal for the CPU per job in the 50-at-once burst


def _ratio(value: float, floor: float) -> float:
    return value / floor if floor > 0 and not math.isnan(floor) else math.nan


def _overhead_rows(
    report: Report, section: str, t: list[JobTiming], small: bool, extra: str = "",
    floor: dict[str, float] | None = None,
) -> None:
    s = _split(t)
    note = (f"{len(t)} jobs; before the API {ms(s['pre_median'])} (p99 {ms(s['pre_p99'])}), "
            f"after it {ms(s['post_median'])} (p99 {ms(s['post_p99'])}){extra}")
    measured = ms(s["overhead_median"])
    target, passed = "—", None
    if floor is not None:
        r = _ratio(s["overhead_median"], floor["overhead_median"])
        measured = f"{r:.2f}× floor ({measured} / {ms(floor['overhead_median'])})"
        note += (f"; the floor (bare aiohttp, same exchanges): before the API {ms(floor['pre_median'])}, "
                 f"after it {ms(floor['post_median'])}, p99 {ms(floor['overhead_p99'])}")
        if small:
            target, passed = f"≤ {OVERHEAD_RATIO:g}× floor", r <= OVERHEAD_RATIO
    report.add(section, "bot overhead per job, median", target, measured, passed, note)
    report.add(section, "bot overhead per job, p99", "—", ms(s["overhead_p99"]), None)


def _cpu_row(
    report: Report, section: str, st: dict[str, float], floor: dict[str, float], small: bool
) -> None:
    """The bot process's CPU per job in the burst (user + system, all threads), as a ratio to
    the floor's in the same run, beside the absolute figure and issue 11's goal."""
    ours, base = st["bot_cpu_per_job"], floor["bot_cpu_per_job"]
    r = _ratio(ours, base)
    report.add(section, "CPU per job of the bot process", f"≤ {CPU_RATIO:g}× floor" if small else "—",
               f"{r:.2f}× floor ({ms(ours)} / {ms(base)})", r <= CPU_RATIO if small else None,
               f"absolute goal ≤ {ms(CPU_GOAL_S)}: {'met' if ours <= CPU_GOAL_S else 'not met'}; "
               f"emulators {ms(st['emulator_cpu_per_job'])} per job (the floor's run: "
               f"{ms(floor['emulator_cpu_per_job'])})")

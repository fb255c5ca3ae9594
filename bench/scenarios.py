"""The measured scenarios and the result table."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from tests.emulators.discord import InteractionRecord

from . import ledger
from .common import MB, lag_in_window, median, noisy_png, percentile, sized_jpeg
from .world import BotProcess, World, bot_process, world

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

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            sequential_jobs=2, sequential_latency=0.0, concurrent_jobs=3, concurrent_latency=0.05,
            throughput_latency=0.1, throughput_c=(2,), rounds=2, stress_latency=0.1,
            stress_rounds=2, baseline_c=2,
            ledger_seconds=0.3, small_result=64 * 1024, large_result=256 * 1024, warmup_jobs=1,
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


async def sequential(size: int, sizes: Sizes) -> tuple[list[JobTiming], dict[str, float]]:
    """Jobs one at a time: each is sent once the previous one was committed."""
    async with world(segmind_latency=sizes.sequential_latency, result=sized_jpeg(size)) as w:
        async with bot_process("kontext", w, f"sequential-{size}") as bot:
            await _warm_up(w, sizes.warmup_jobs)
            recs = []
            for n in range(sizes.sequential_jobs):
                rec = await w.send(n)
                await w.wait_results([rec], 60)
                recs.append(rec)
            t = timings(w, recs)
        return t, _lag_rss(bot, t)


async def concurrent(
    size: int, sizes: Sizes, result: bytes | None = None, label: str = ""
) -> tuple[list[JobTiming], dict[str, float]]:
    """``concurrent_jobs`` members send ``/kontext`` at the same moment; every result is
    ``result`` (default: a JPEG of ``size`` bytes)."""
    body = result if result is not None else sized_jpeg(size)
    async with world(segmind_latency=sizes.concurrent_latency, result=body) as w:
        async with bot_process("kontext", w, label or f"concurrent-{size}") as bot:
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


# --- the whole run -------------------------------------------------------------------------------


async def run_all(sizes: Sizes, report: Report, *, sections: set[str] | None = None) -> Report:
    want = (lambda s: True) if not sections else (lambda s: s in sections)
    small, large = mib(sizes.small_result), mib(sizes.large_result)

    if want("overhead"):
        report.log(f"[overhead] {sizes.sequential_jobs} sequential jobs, {small} and {large} results")
        for size, label in ((sizes.small_result, small), (sizes.large_result, large)):
            t, _ = await sequential(size, sizes)
            _overhead_rows(report, f"1 job at a time, {label} result", t, size == sizes.small_result)
            report.details[f"sequential_{label}"] = _split(t)

    if want("concurrent"):
        report.log(f"[concurrent] {sizes.concurrent_jobs} jobs at once, API latency {sizes.concurrent_latency:g} s")
        for size, label in ((sizes.small_result, small), (sizes.large_result, large)):
            t, st = await concurrent(size, sizes)
            is_small = size == sizes.small_result
            _overhead_rows(report, f"{sizes.concurrent_jobs} jobs at once, {label} result", t, is_small,
                           extra=f"; CPU per job: bot {ms(st['bot_cpu_per_job'])}, emulators {ms(st['emulator_cpu_per_job'])}")
            report.details[f"concurrent_{label}"] = {**_split(t), **st}
            sect = f"{sizes.concurrent_jobs} jobs in flight, {label} result"
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

    if want("ledger"):
        report.log(f"[ledger] reserve + commit pairs, {sizes.ledger_seconds:g} s per row, 4 tasks per process")
        for backend in ("sqlite", "postgres"):
            for procs in (1, 2):
                await _ledger_row(report, backend, procs, sizes)
    return report


async def _ledger_row(report: Report, backend: str, procs: int, sizes: Sizes) -> None:
    metric = f"{backend}, {procs} process{'es' if procs > 1 else ''}"
    target = "≥ 1000/s" if backend == "sqlite" else "—"
    cm = ledger.sqlite_url() if backend == "sqlite" else ledger.postgres_url()
    async with cm as url:
        if url is None:
            reason = getattr(ledger.postgres_url, "reason", "unreachable")
            report.add("ledger ops (reserve+commit pairs)", metric, target, "skipped", None, reason)
            return
        res = await ledger.run(url, backend, procs, duration=sizes.ledger_seconds)
    report.details[f"ledger_{backend}_{procs}"] = res.__dict__ | {"per_second": res.per_second}
    note = f"{res.pairs} pairs in {res.seconds:.2f} s"
    if res.errors:
        note += f"; errors {res.errors}"
    if res.invariants:
        note += f"; INVARIANTS BROKEN: {res.invariants[:3]}"
    ok = res.per_second >= 1000 and not res.invariants if backend == "sqlite" else None
    report.add("ledger ops (reserve+commit pairs)", metric, target, f"{res.per_second:,.0f}/s", ok, note)


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


def _overhead_rows(
    report: Report, section: str, t: list[JobTiming], small: bool, extra: str = ""
) -> None:
    s = _split(t)
    note = (f"{len(t)} jobs; before the API {ms(s['pre_median'])} (p99 {ms(s['pre_p99'])}), "
            f"after it {ms(s['post_median'])} (p99 {ms(s['post_p99'])}){extra}")
    report.add(section, "bot overhead per job, median", "≤ 30 ms" if small else "—",
               ms(s["overhead_median"]), s["overhead_median"] <= 0.030 if small else None, note)
    report.add(section, "bot overhead per job, p99", "—", ms(s["overhead_p99"]), None)

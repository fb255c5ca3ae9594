"""Section ``speedups``: the ecosystem's own speed-ups, measured on the bot's CPU per job.

discord.py's ``speed`` extra (orjson, aiodns, Brotli, zstandard) and uvloop are kept only where
this section shows that they cut the bot process's CPU per job in the 50-at-once burst. Measured
(2026-12-01, medians of 3–6 alternating rounds, three runs): uvloop 0.90–0.96× the CPU of
asyncio's loop, uvloop + orjson 0.86–0.95×, orjson alone 0.99–1.05×: uvloop and orjson are
kept (``requirements.txt``; the bot runs on uvloop through :func:`kontext.cli.event_loop_runner`). Each
variant runs that burst (small result) in a fresh bot process, in rounds that alternate the
order so that drift hits every variant alike; the figure is the median over the rounds.

Only two of them can change anything the benchmark (or a real deployment) measures here:

* **orjson** — discord.py parses every gateway frame and REST answer and encodes every request
  with it when it is installed (``discord.utils._from_json`` / ``_to_json``);
* **uvloop** — the event loop itself.

aiodns resolves host names (the bot talks to IP literals here, and to a handful of hosts in
production, cached), Brotli decodes ``br`` answers and zstandard the gateway's ``zstd-stream``
(the emulators send neither, and Discord's compression trades CPU for bandwidth): the bench
cannot show them cutting CPU, so they are not kept.

A bot process picks its variant from ``BENCH_JSON`` (``stdlib`` / ``orjson``) and ``BENCH_LOOP``
(``asyncio`` / ``uvloop``); without them it runs as ``python bot.py`` does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import statistics
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

VARIANTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("asyncio + json", {"BENCH_LOOP": "asyncio", "BENCH_JSON": "stdlib"}),
    ("asyncio + orjson", {"BENCH_LOOP": "asyncio", "BENCH_JSON": "orjson"}),
    ("uvloop + json", {"BENCH_LOOP": "uvloop", "BENCH_JSON": "stdlib"}),
    ("uvloop + orjson", {"BENCH_LOOP": "uvloop", "BENCH_JSON": "orjson"}),
)
ROUNDS = 3


def apply_variant(env: Mapping[str, str]) -> Callable[[Coroutine[Any, Any, int]], int]:
    """Set this (bot) process's JSON codec as ``env`` asks; return the runner of its loop."""
    codec = env.get("BENCH_JSON")
    if codec == "stdlib":
        import discord.utils

        def to_json(obj: Any) -> str:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)

        discord.utils.HAS_ORJSON = False
        discord.utils._to_json = to_json
        discord.utils._from_json = json.loads
    loop = env.get("BENCH_LOOP")
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    if loop == "asyncio":
        return asyncio.run
    try:  # as the bot runs itself
        from kontext.cli import event_loop_runner
    except ImportError:  # an older bot: plain asyncio
        return asyncio.run
    return event_loop_runner()


def missing() -> list[str]:
    """The speed-ups this environment lacks (the section needs both)."""
    return [m for m in ("orjson", "uvloop") if importlib.util.find_spec(m) is None]


async def rows(report: Any, sizes: Any, concurrent: Any) -> None:
    """Run every variant ``ROUNDS`` times (alternating order) and add one row each."""
    section = f"speed-ups: bot CPU per job, {sizes.concurrent_jobs} at once"
    lacking = missing()
    if lacking:
        report.add(section, "CPU per job by variant", "—", "skipped", None,
                   f"not installed: {', '.join(lacking)}")
        return
    report.log(f"[speedups] {len(VARIANTS)} variants × {ROUNDS} rounds of {sizes.concurrent_jobs} jobs at once")
    cpu: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    for r in range(ROUNDS):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for name, env in order:
            _, st = await concurrent(sizes.small_result, sizes, label=f"speedups-{r}-{name.replace(' + ', '-')}",
                                     env=env)
            cpu[name].append(st["bot_cpu_per_job"])
    base = statistics.median(cpu[VARIANTS[0][0]])
    report.details["speedups"] = cpu
    for name, _ in VARIANTS:
        med = statistics.median(cpu[name])
        report.add(section, name, "—", f"{med * 1000:.1f} ms ({med / base:.2f}× asyncio + json)", None,
                   "rounds: " + ", ".join(f"{x * 1000:.1f}" for x in cpu[name]) + " ms")

"""The benchmark's code paths at tiny sizes: it still runs, and its numbers make sense.

Not a measurement (sizes are minimal and nothing is compared with a target); ``make bench`` is.
"""

from __future__ import annotations

import math

import pytest

from bench import ledger
from bench.__main__ import render
from bench.common import LagSampler, lag_in_window, percentile, sized_jpeg
from bench.scenarios import Report, Sizes, concurrent, sequential, throughput

pytestmark = pytest.mark.timeout(60)


def test_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    for size in (4096, 70_001, 300_000):
        data = sized_jpeg(size)
        assert len(data) == size and data[:3] == b"\xff\xd8\xff"
    assert lag_in_window([(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)], 1.5, 3.0) == [0.2, 0.3]
    assert LagSampler().interval == 0.01


async def test_bot_scenarios_and_baseline() -> None:
    sizes = Sizes.smoke()
    t, _ = await sequential(sizes.small_result, sizes)
    assert len(t) == sizes.sequential_jobs
    assert all(0 < j.pre < 5 and 0 < j.post < 5 for j in t)

    t, stats = await concurrent(sizes.small_result, sizes)
    assert len(t) == sizes.concurrent_jobs
    assert stats["api_peak"] == sizes.concurrent_jobs  # all in flight at once
    assert stats["lag_samples"] > 0 and stats["rss_peak"] > stats["idle_rss"] * 0.5
    assert stats["bot_cpu_per_job"] > 0

    load = {"latency": sizes.stress_latency, "rounds": sizes.stress_rounds,
            "result_size": sizes.small_result}
    ours = await throughput("kontext", 2, **load)
    assert ours["api_peak"] <= 2 and 0 < ours["ratio_end_to_end"] <= ours["ratio"] <= 1.01
    base = await throughput("baseline", 2, **load)
    assert base["api_peak"] == 1  # the blocking call serializes everything
    # each blocking call freezes the loop for at least the API latency
    assert base["lag_max"] >= 0.8 * sizes.stress_latency > ours["lag_max"]

    report = Report(log=lambda _: None)
    report.add("s", "m", "≤ 1", "0.5", True)
    text = render(report, {"CPU": "x"}, seconds=1.0, smoke=True)
    assert "| s | m | ≤ 1 | 0.5 | PASS |" in text


async def test_ledger_worker_on_sqlite() -> None:
    async with ledger.sqlite_url() as url:
        await ledger._migrate(url)
        out = await ledger.worker(url, {"worker": 0, "duration": 0.3, "concurrency": 2})
        assert out["pairs"] > 0 and not out["errors"]
        assert await ledger._invariants(url) == []


async def test_floor_bot_makes_the_same_exchanges_as_the_bot() -> None:
    """The floor (bench.floor) answers a job with the real bot's HTTP exchanges, in its order."""
    from bench.common import MB
    from bench.world import bot_process, world

    routes: dict[str, list[str]] = {}
    for kind in ("kontext", "floor"):
        async with world(segmind_latency=0.0, result=sized_jpeg(MB // 4)) as w:
            async with bot_process(kind, w, f"exchanges-{kind}"):
                warm = await w.send(10_000)
                await w.wait_results([warm], 30)
                start = len(w.discord.requests)
                rec = await w.send(1)
                await w.wait_results([rec], 30)
                seen = [r for r in w.discord.requests[start:] if r.route.startswith(("/interactions", "/webhooks"))]
                routes[kind] = [f"{r.method} {r.route.split('/')[1]} {r.status}" for r in seen]
    assert routes["floor"] == routes["kontext"], routes


async def test_ledger_floor_replays_the_captured_pair() -> None:
    from bench import ledger_floor

    assert ledger_floor.parameterize("UPDATE t SET a='x''y', b=-3 WHERE c1 = 2.5 AND d IS NULL") == (
        "UPDATE t SET a=?, b=? WHERE c1 = ? AND d IS NULL", ["x'y", -3, 2.5])
    async with ledger.sqlite_url() as url:
        res = await ledger_floor.run(url, "sqlite", 1, duration=0.3, concurrency=2)
    assert res.pairs > 0 and not res.errors, res
    assert "statements a pair" in res.note


async def test_speedups_variant_switches_the_json_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import json

    import discord.utils

    from bench.speedups import apply_variant

    for name in ("HAS_ORJSON", "_to_json", "_from_json"):
        monkeypatch.setattr(discord.utils, name, getattr(discord.utils, name))
    assert apply_variant({"BENCH_JSON": "stdlib", "BENCH_LOOP": "asyncio"}) is asyncio.run
    assert discord.utils._from_json is json.loads and discord.utils.HAS_ORJSON is False

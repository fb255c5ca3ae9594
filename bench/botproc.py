"""Subprocess entry point: ``python -m bench.botproc {kontext|baseline|floor} OUT.json``.

Runs a bot with settings from the environment and a :class:`~bench.common.LagSampler` in the
same event loop; on SIGTERM the bot stops and the lag samples are written to ``OUT.json``.

* ``kontext`` — the real bot, exactly as ``python bot.py`` runs it (:func:`bot.run_bot`, which
  installs the SIGTERM handler that drains jobs and closes everything);
* ``baseline`` — :mod:`bench.baseline_blocking`, the seed's blocking approach;
* ``floor`` — :mod:`bench.floor`, a bare aiohttp client making the same HTTP exchanges (the
  floor each figure of the real bot is divided by).

``BENCH_BOT_ROOT`` (set by :class:`bench.world.BotProcess`) is the checkout whose ``bot`` and
``kontext`` are imported: it goes first on ``sys.path``, so an older worktree's bot runs under
this harness. ``OUT.json`` names the ``bot.py`` really imported (``bot_file``).

``BENCH_TRACE=1`` (diagnosis only) also records, with ``time.monotonic()``, when each precheck,
image check, reserve, queue claim, ``api_done`` write, commit, job start and API request began
and ended (``trace`` in ``OUT.json``, ``[name, job id or None, start, end]``), by wrapping those
methods of the bot's classes (what an older bot lacks is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any

from .common import LagSampler

#: the lag samples of this process's event loop, written out at exit
SAMPLER = LagSampler()


async def _run(kind: str) -> int:
    sampler = SAMPLER
    slow_ms = os.environ.get("BENCH_SLOW_CALLBACK_MS")
    if slow_ms:  # profiling runs: log every callback that holds the loop longer than this
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = float(slow_ms) / 1000
        logging.getLogger("asyncio").setLevel(logging.WARNING)
    task = asyncio.create_task(sampler.run(), name="bench-lag-sampler")
    try:
        if kind == "kontext":
            from bot import run_bot
            from kontext.settings import load_settings

            code = await run_bot(load_settings(env_file=None))
        elif kind == "baseline":
            from .baseline_blocking import run_baseline

            code = await run_baseline()
        elif kind == "floor":
            from .floor import run_floor

            code = await run_floor()
        else:
            raise SystemExit(f"unknown bot kind {kind!r}")
    finally:
        task.cancel()
    return code


TRACE: list[tuple[str, int | None, float, float]] = []


def _install_trace() -> None:
    """Wrap the store's reserve, claim, ``api_done`` and commit, the pipeline's job start and
    the API client's ``generate`` so that their start and end times are recorded
    (``BENCH_TRACE=1``; what an older bot lacks is skipped)."""
    import functools
    import importlib
    import time

    def wrap(where: str, name: str, job_of: Any) -> None:
        module, _, cls_name = where.rpartition(".")
        try:  # an older bot may lack it (the queue in memory had no claim_next)
            cls = getattr(importlib.import_module(module), cls_name)
            original = getattr(cls, name)
        except (ImportError, AttributeError):
            return

        @functools.wraps(original)
        async def traced(*args: Any, **kw: Any) -> Any:
            start = time.monotonic()
            result: Any = None
            try:
                result = await original(*args, **kw)
                return result
            finally:
                job = None
                with contextlib.suppress(Exception):
                    job = job_of(args, result)
                TRACE.append((name, job, start, time.monotonic()))

        setattr(cls, name, traced)

    wrap("kontext.store.queue.QueueStore", "claim_next", lambda a, r: r.job.id if r.job else None)
    wrap("kontext.store.queue.QueueStore", "api_done", lambda a, r: a[1].job_id)
    wrap("kontext.store.ledger.Ledger", "reserve", lambda a, r: a[1].job_id)
    wrap("kontext.store.ledger.Ledger", "commit", lambda a, r: a[1])
    wrap("kontext.store.ledger.Ledger", "precheck", lambda a, r: a[1].job_id)
    wrap("kontext.pipeline.JobPipeline", "check_inputs", lambda a, r: a[1].job_id)  # older bots
    wrap("kontext.pipeline.JobPipeline", "_execute", lambda a, r: a[1].spec.job_id)  # older bots
    wrap("kontext.intake.Intake", "check_inputs", lambda a, r: a[1].job_id)
    wrap("kontext.execution.Executor", "execute", lambda a, r: a[1].spec.job_id)
    wrap("kontext.segmind.SegmindClient", "generate", lambda a, r: None)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.botproc {kontext|baseline|floor} OUT.json", file=sys.stderr)
        return 2
    kind, out = argv
    root = os.environ.get("BENCH_BOT_ROOT")
    if root:
        sys.path.insert(0, root)
    if kind == "kontext":
        from bot import setup_logging
        from kontext.settings import load_settings

        setup_logging(load_settings(env_file=None))
        if os.environ.get("BENCH_TRACE") == "1":
            _install_trace()
    from .speedups import apply_variant

    runner = apply_variant(os.environ)  # the bench's A/B of speed-ups (see bench.speedups)
    code = runner(_run(kind))
    with open(out, "w", encoding="utf-8") as fh:
        bot = sys.modules.get("bot")
        json.dump({"exit": code, "samples": SAMPLER.samples,
                   "bot_file": getattr(bot, "__file__", None),
                   "kontext_file": getattr(sys.modules.get("kontext"), "__file__", None),
                   "trace": TRACE}, fh)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

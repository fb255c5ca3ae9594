"""Subprocess entry point: ``python -m bench.botproc {kontext|baseline} OUT.json``.

Runs a bot with settings from the environment and a :class:`~bench.common.LagSampler` in the
same event loop; on SIGTERM the bot stops and the lag samples are written to ``OUT.json``.

* ``kontext`` — the real bot, exactly as ``python bot.py`` runs it (:func:`bot.run_bot`, which
  installs the SIGTERM handler that drains jobs and closes everything);
* ``baseline`` — :mod:`bench.baseline_blocking`, the seed's blocking approach.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

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
        else:
            raise SystemExit(f"unknown bot kind {kind!r}")
    finally:
        task.cancel()
    return code


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.botproc {kontext|baseline} OUT.json", file=sys.stderr)
        return 2
    kind, out = argv
    if kind == "kontext":
        from bot import setup_logging
        from kontext.settings import load_settings

        setup_logging(load_settings(env_file=None))
    code = asyncio.run(_run(kind))
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"exit": code, "samples": SAMPLER.samples}, fh)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

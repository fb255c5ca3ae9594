"""Profiling helpers: run the bot under py-spy, and summarize py-spy's raw (collapsed) output.

``python -m bench --profile DIR`` records every bot process with
``py-spy record --threads --format raw`` into ``DIR`` (py-spy must be installed:
``.venv/bin/pip install py-spy``); the bots' logs go there too. ``BENCH_SLOW_CALLBACK_MS=20``
in the environment also turns on asyncio's debug mode with its slow-callback log (costly: it
distorts timings, use it only to name the callbacks that hold the loop).
``python -m bench.profiling FILE.raw`` prints where the event-loop thread spent its time.
"""

from __future__ import annotations

import collections
import re
import shutil
import sys
from pathlib import Path

_LOC = re.compile(r" \((?:[^()]*/)?(?:site-packages/|python3\.\d+/)?([^()]*?):\d+\)")


def pyspy_prefix(out: Path) -> list[str]:
    """The command prefix that records a process into ``out`` (empty when py-spy is missing)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return []
    return [exe, "record", "--threads", "--format", "raw", "-r", "200", "-o", str(out), "--"]


def summarize(raw: Path, *, top: int = 25, thread: str = "MainThread") -> str:
    """Self and inclusive time of the frames of ``thread`` (the event loop), busiest first."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if thread not in frames[0]:
            continue
        n = int(count)
        total += n
        names = [_LOC.sub(r" (\1)", f) for f in frames[1:]]
        if names and ("select (selectors.py" in names[-1] or "EpollSelector.select" in names[-1]):
            idle += n
            continue
        if names:
            self_t[names[-1]] += n
        for name in set(names):
            incl[name] += n
    busy = max(1, total - idle)
    lines = [f"{raw.name}: {total} samples of {thread}, {idle} idle in select, {busy} busy", "",
             "self (busy samples):"]
    lines += [f"  {100 * n / busy:5.1f}%  {name}" for name, n in self_t.most_common(top)]
    lines += ["", "inclusive, project code and libraries (busy samples):"]
    shown = [(k, v) for k, v in incl.most_common(400)
             if not k.startswith(("<module>", "run (", "Runner.", "BaseEventLoop.run", "Handle._run",
                                  "_run_module", "_run_code", "main (", "BaseEventLoop._run_once"))]
    lines += [f"  {100 * n / busy:5.1f}%  {name}" for name, n in shown[: top * 2]]
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
        print()

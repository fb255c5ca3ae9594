"""Shared pieces of the benchmark: statistics, sized images, the loop-lag sampler, machine facts."""

from __future__ import annotations

import asyncio
import io
import math
import os
import platform
import random
import sqlite3
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

MB = 1024 * 1024


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# --- images of an exact size ---------------------------------------------------------------------


def _noise_jpeg(side: int, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def sized_jpeg(target_bytes: int, seed: int = 1) -> bytes:
    """A valid JPEG of exactly ``target_bytes``: noise a bit under the size, padded with COM
    segments (comments, which every decoder skips). Stands in for a generated result."""
    side = max(16, int(math.sqrt(target_bytes / 2.0)))
    data = _noise_jpeg(side, seed)
    for _ in range(12):
        if 0.85 * target_bytes <= len(data) <= target_bytes - 4 or len(data) == target_bytes:
            break
        side = max(16, int(side * math.sqrt(0.93 * target_bytes / len(data))))
        if 0.85 * target_bytes <= len(data) <= target_bytes:  # 1..3 bytes short: shrink a bit
            side -= 1
        data = _noise_jpeg(side, seed)
    else:
        raise ValueError(f"cannot make a {target_bytes}-byte JPEG")
    remaining = target_bytes - len(data)
    segments = []
    while remaining:
        take = remaining if remaining <= 65537 else min(65537, remaining - 4)
        segments.append(b"\xff\xfe" + struct.pack(">H", take - 2) + b"\0" * (take - 4))
        remaining -= take
    out = data[:2] + b"".join(segments) + data[2:]
    assert len(out) == target_bytes, (len(out), target_bytes)
    return out


def noisy_png(target_bytes: int) -> bytes:
    """A real PNG of a little over ``target_bytes`` (random noise: it barely compresses), made by
    the Segmind emulator's ``oversize`` fault machinery. Stands in for a big generated result."""
    from emulators.segmind import noisy_image

    return noisy_image(target_bytes, "png")


def input_jpeg(side: int = 1024, colour: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    """A member's input photo: a smooth gradient JPEG (a few dozen KB at 1024 px)."""
    img = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    img = Image.blend(img, Image.new("RGB", (side, side), colour), 0.5)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


# --- event-loop lag ------------------------------------------------------------------------------


@dataclass
class LagSampler:
    """Sleeps ``interval`` over and over inside a loop and records the overshoot.

    ``samples`` holds ``(monotonic time at wake-up, overshoot in seconds)``. A loop that is never
    blocked overshoots by well under a millisecond; a blocking call shows up as a large sample.
    """

    interval: float = 0.01
    samples: list[tuple[float, float]] = field(default_factory=list)

    async def run(self) -> None:
        clock = time.monotonic
        while True:
            before = clock()
            await asyncio.sleep(self.interval)
            now = clock()
            self.samples.append((now, max(0.0, now - before - self.interval)))


def lag_in_window(samples: Sequence[Sequence[float]], start: float, end: float) -> list[float]:
    """The lag samples that woke up between ``start`` and ``end`` (monotonic seconds)."""
    return [lag for t, lag in samples if start <= t <= end]


# --- the machine -----------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    """CPU, cores, memory, OS and the versions that matter, for the results file."""
    facts: dict[str, str] = {}
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    facts["CPU"] = cpu
    facts["cores (os.cpu_count)"] = str(os.cpu_count())
    try:
        import psutil

        facts["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except Exception:  # noqa: BLE001 - facts are best effort
        pass
    facts["OS"] = f"{platform.system()} {platform.release()}"
    facts["Python"] = sys.version.split()[0]
    for mod in ("discord", "aiohttp", "sqlalchemy", "aiosqlite", "asyncpg", "PIL"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            facts[mod] = "?"
    facts["SQLite"] = sqlite3.sqlite_version
    return facts

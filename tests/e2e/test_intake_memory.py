"""What a burst of huge images costs the real ``python bot.py`` process, in RSS (issue 10).

The bot runs as its own OS process against the emulators; a thread samples its RSS (psutil)
every ~10 ms during the burst. The baseline is taken after start-up and one warm-up job.

* Five members without credits each send two 6,300×6,300 PNGs at once: everyone is refused for
  credits in plain words, no attachment is downloaded from the CDN (so nothing is decoded), and
  the RSS grows by at most 100 MiB.
* Five members with credits each send two ~40 MP noisy PNGs at once: the images are checked
  (the jobs reach the image service, which is made to hang so no result has to be rendered from
  them) and the RSS grows by at most 200 MiB.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import struct
import threading
import time
import zlib
from typing import Any

import psutil

from tests.e2e.proc import World, bot_process, until, world

MIB = 1024 * 1024
SOLID_SIDE = 6_300  # 39.7 MP
NOISY_SIDE = 6_324  # 39,992,976 pixels: just under MAX_IMAGE_PIXELS (40,000,000)
MEMBERS = 5


# --- images -----------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _rgb_png(side: int, row_of: Any, level: int) -> bytes:
    """A valid 8-bit RGB PNG of ``side``×``side`` whose row ``i`` is ``row_of(i)`` (filter 0),
    deflated row by row (never the whole pixel buffer in memory)."""
    deflate = zlib.compressobj(level)
    idat = [deflate.compress(b"\x00" + row_of(i)) for i in range(side)]
    idat.append(deflate.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(idat))
        + _chunk(b"IEND", b"")
    )


@functools.cache
def solid_png(rgb: tuple[int, int, int]) -> bytes:
    """A single-colour 6,300×6,300 PNG (~130 KiB)."""
    row = bytes(rgb) * SOLID_SIDE
    return _rgb_png(SOLID_SIDE, lambda _i: row, 9)


@functools.cache
def noisy_png(seed: int) -> bytes:
    """A 6,324×6,324 PNG of 100 bands of random rows (each row repeated ~63 times): a few MiB."""
    rng = random.Random(seed)
    bands = [rng.randbytes(NOISY_SIDE * 3) for _ in range(100)]
    return _rgb_png(NOISY_SIDE, lambda i: bands[i * len(bands) // NOISY_SIDE], 1)


# --- measuring --------------------------------------------------------------------------------


class RssSampler:
    """Samples a process's RSS every ``interval`` s in a thread; ``baseline`` is the RSS when
    sampling started, ``peak`` the highest sample."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.baseline = self.peak = self.proc.memory_info().rss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    async def settle(self, samples: int = 25) -> None:
        """Go on sampling for ``samples`` more samples (~250 ms): memory freed late counts too."""
        target = self.samples + samples
        await until(lambda: self.samples >= target or not self._thread.is_alive(), 10, "samples")

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self, what: str, seconds: float) -> str:
        return (
            f"{what}: RSS baseline {self.baseline / MIB:.1f} MiB, peak {self.peak / MIB:.1f} MiB, "
            f"growth {self.growth / MIB:+.1f} MiB ({self.samples} samples over {seconds:.2f} s)"
        )


# --- helpers ----------------------------------------------------------------------------------


def status(rec: Any) -> str:
    return (rec.original or {}).get("content") or ""


def refused(rec: Any) -> bool:
    """The command ended without a job: its status is neither empty nor a progress line."""
    text = status(rec)
    return bool(text) and not text.startswith(("✅", "⏳", "🎨", "📤", "🔄"))


async def warm_up(w: World) -> None:
    """One ordinary job, start to finish (aiohttp session, Pillow, the check pool all warm)."""
    rec = await w.kontext()
    await w.discord.wait_until(
        lambda: "Done" in status(rec) and w.result_messages(), 20,
        description="the warm-up job to be posted",
    )


_CDN_PATH = re.compile(r"/attachments/(\d+)/")


def cdn_gets(w: World, ids: set[int]) -> list[str]:
    """The emulator's logged CDN requests (``/attachments/…`` or ``/proxy/attachments/…``) of
    attachments ``ids``."""
    out = []
    for r in w.discord.find_requests("GET", _CDN_PATH):
        m = _CDN_PATH.search(r.path)
        if m and int(m.group(1)) in ids:
            out.append(r.path)
    return out


async def burst(w: World, members: list[int], images: list[tuple[bytes, bytes]]) -> list[Any]:
    """Every member sends ``/kontext`` with their two images, all at once."""
    return list(
        await asyncio.gather(
            *(
                w.kontext(
                    user_id=m,
                    image_1=(one, f"big-{i}-1.png", "image/png"),
                    image_2=(two, f"big-{i}-2.png", "image/png"),
                )
                for i, (m, (one, two)) in enumerate(zip(members, images, strict=True))
            )
        )
    )


# --- tests ------------------------------------------------------------------------------------


async def test_members_without_credits_cost_no_download_and_no_memory() -> None:
    pair = (solid_png((200, 30, 30)), solid_png((30, 30, 200)))
    assert max(map(len, pair)) < 256 * 1024, [len(p) for p in pair]
    async with world() as w:
        async with bot_process(w, STARTING_CREDITS="0", MAX_CONCURRENT_JOBS="8") as bot:
            async with w.store() as store:  # only the warm-up member has credits
                await store.credits.grant(w.guild_id, w.member_id, 5, actor_id=None, reason="warm-up")
            await warm_up(w)
            members = [w.add_member(f"broke-{i}") for i in range(MEMBERS)]
            known = set(w.discord.attachments)
            t0 = time.monotonic()
            with RssSampler(bot.proc.pid) as rss:
                recs = await burst(w, members, [pair] * MEMBERS)
                await w.discord.wait_until(
                    lambda: all("credits" in status(r) for r in recs), 20,
                    description="every member refused for credits",
                )
                await until(lambda: bot.output().count("refused: insufficient_credits") >= MEMBERS,
                            10, "the refusals in the log")
                await rss.settle()
            took = time.monotonic() - t0
            print(rss.report(f"{MEMBERS}×2 PNGs of {SOLID_SIDE}×{SOLID_SIDE}, no credits", took))
            log = bot.output()

        new = set(w.discord.attachments) - known
        assert len(new) == 2 * MEMBERS
        for r in recs:
            text = status(r)
            assert "You have 0 credits" in text, text
        # nothing downloaded (hence nothing decoded): no CDN request for any of them
        assert cdn_gets(w, new) == []
        assert not any(
            w.discord.attachment_fetches[a] or w.discord.attachment_fetch_failures[a] for a in new
        )
        assert log.count("refused: insufficient_credits") == MEMBERS, log[-3000:]
        assert rss.growth <= 100 * MIB, rss.report("growth over 100 MiB", took)
        async with w.store() as store:
            for r, m in zip(recs, members, strict=True):
                assert await store.jobs.get(r.id) is None
                # never written: nothing reserved (the store here reads with its own defaults)
                assert not (await store.credits.member_status(w.guild_id, m)).exists


async def test_forty_megapixel_pngs_are_checked_in_bounded_memory() -> None:
    pairs = [(noisy_png(2 * i), noisy_png(2 * i + 1)) for i in range(MEMBERS)]
    sizes = [len(p) for pair in pairs for p in pair]
    assert all(MIB < s < 8 * MIB for s in sizes), sizes
    async with world() as w:
        async with bot_process(w, MAX_CONCURRENT_JOBS="8") as bot:
            await warm_up(w)
            members = [w.add_member(f"rich-{i}") for i in range(MEMBERS)]
            # the jobs' calls are read and never answered: the bot's memory is measured through
            # the checks and the reservations, and the emulator renders nothing from 40 MP inputs
            w.segmind.hang_next(MEMBERS)
            calls_before = len(w.segmind.calls)
            known = set(w.discord.attachments)
            t0 = time.monotonic()
            with RssSampler(bot.proc.pid) as rss:
                recs = await burst(w, members, pairs)
                await until(
                    lambda: len(w.segmind.calls) >= calls_before + MEMBERS
                    or any(refused(r) for r in recs),
                    45, "the five jobs to reach the image service",
                )
                await rss.settle()
            took = time.monotonic() - t0
            print(rss.report(f"{MEMBERS}×2 noisy PNGs of {NOISY_SIDE}×{NOISY_SIDE} "
                             f"({min(sizes) / MIB:.1f}-{max(sizes) / MIB:.1f} MiB)", took))
            new = set(w.discord.attachments) - known
            assert len(w.segmind.calls) == calls_before + MEMBERS, (
                [status(r) for r in recs], bot.output()[-3000:]
            )
            # every image was downloaded exactly once by the bot (the emulator fetched none)
            assert len(new) == 2 * MEMBERS
            assert all(w.discord.attachment_fetches[a] == 1 for a in new), dict(
                (a, w.discord.attachment_fetches[a]) for a in new
            )
            assert len(cdn_gets(w, new)) == 2 * MEMBERS
            async with w.store() as store:
                for r, m in zip(recs, members, strict=True):
                    job = await store.jobs.get(r.id)
                    assert job is not None and job.state == "sent", job
                    assert (await store.credits.member_status(w.guild_id, m)).balance == 9
        assert rss.growth <= 200 * MIB, rss.report("growth over 200 MiB", took)

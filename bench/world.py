"""The benchmark's world: both emulators in this process, the bot under test in a subprocess.

The bot runs in its own process (``python -m bench.botproc``) so that

* its event loop is its own: the emulators' work (serving downloads, parsing uploads, making
  images) does not show up as the bot's loop lag, just as Discord and Segmind are other machines;
* its memory is its own: the RSS sampled with psutil is the bot's alone;
* a bot that blocks its loop (the baseline) cannot freeze the emulators it is waiting for.

Times on both sides are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by all processes of the
machine), so the emulators' records and the bot's lag samples line up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from emulators.discord import DiscordEmulator, InteractionRecord
from emulators.segmind import SegmindEmulator

from .common import input_jpeg

ROOT = Path(__file__).resolve().parent.parent
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.bench.discord-token-value"
SEGMIND_KEY = "SG_bench_segmind_key_value"
PROMPT = "bench job {n}: put the hat from image 2 on the cat in image 1"


class BenchDiscord(DiscordEmulator):
    """The Discord emulator, plus the moment each interaction's result (a follow-up with a file)
    had been fully received: ``result_seen[interaction id] = monotonic time``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.result_seen: dict[int, float] = {}

    def followup_created(self, rec: InteractionRecord, message: dict[str, Any]) -> None:
        if message.get("attachments"):
            self.result_seen.setdefault(rec.id, time.monotonic())
            self.notify()


class BenchSegmind(SegmindEmulator):
    """The Segmind emulator answering ``fixed_output`` (when set) as every generated image.

    It still downloads both inputs from the Discord emulator's CDN but does not decode them:
    the real API does that on its own machines, and here every CPU millisecond the emulators
    spend is taken from the bot under test (both share this machine's cores).
    """

    fixed_output: bytes | None = None

    async def _fetch_input(self, which: str, url: str) -> bytes:
        assert self._client is not None
        async with self._client.get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"{which}: could not download the image (HTTP {resp.status})")
            return await resp.read()

    async def _render(self, payload: dict[str, Any], img1: bytes, img2: bytes) -> bytes:
        if self.fixed_output is not None:
            return self.fixed_output
        return await super()._render(payload, img1, img2)


@dataclass
class World:
    """Emulators with one server: a channel and ``members`` members."""

    discord: BenchDiscord
    segmind: BenchSegmind
    guild_id: int
    channel_id: int
    members: list[int]
    tmp: Path
    inputs: tuple[bytes, bytes] = field(default_factory=lambda: (input_jpeg(), input_jpeg(colour=(40, 80, 200))))

    def bot_env(self, database_url: str | None = None, **overrides: Any) -> dict[str, str]:
        """The environment of a bot process talking to this world (bench-friendly limits)."""
        env = {
            "DISCORD_TOKEN": DISCORD_TOKEN,
            "SEGMIND_API_KEY": SEGMIND_KEY,
            "SEGMIND_BASE_URL": self.segmind.base_url,
            "DISCORD_API_BASE_URL": self.discord.api_base,
            "DISCORD_GATEWAY_URL": self.discord.gateway_url,
            "DATABASE_URL": database_url or f"sqlite:///{self.tmp / 'kontext.db'}",
            "COOLDOWN_SECONDS": "0",
            "JOBS_PER_MEMBER": "10",
            "STARTING_CREDITS": "100000",
            "MAX_CONCURRENT_JOBS": "64",
            "MAX_QUEUE_SIZE": "1000",
            "SEGMIND_RPM": "10000",
            "DAILY_BUDGET_USD": "1000000",
            "GUILD_DAILY_BUDGET_USD": "0",
            "LOG_LEVEL": "WARNING",
        }
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    async def send(self, n: int, member: int | None = None, *, to: Any = "all") -> InteractionRecord:
        """Send ``/kontext`` number ``n`` (the number is in the prompt) as a member, to the
        gateway client(s) ``to`` (``"all"``, or an index when several bot processes run)."""
        user = member if member is not None else self.members[n % len(self.members)]
        one, two = self.inputs
        return await self.discord.invoke_slash(
            "kontext",
            {
                "image_1": (one, "one.jpg", "image/jpeg"),
                "image_2": (two, "two.jpg", "image/jpeg"),
                "prompt": PROMPT.format(n=n),
            },
            user_id=user,
            guild_id=self.guild_id,
            channel_id=self.channel_id,
            to=to,
            timeout=30,
        )

    async def wait_results(
        self, recs: list[InteractionRecord], timeout: float, *, settled: bool = True
    ) -> None:
        """Wait until every interaction's result was posted (and, with ``settled``, the bot's
        final status edit arrived, i.e. the job was committed); raise on a failed job."""

        def failed() -> list[str]:
            out = []
            for r in recs:
                text = (r.original or {}).get("content") or ""
                if text and not text.startswith(("✅", "⏳", "🎨", "📤")) and r.id not in self.discord.result_seen:
                    out.append(text)
            return out

        def check() -> bool:
            if failed():
                return True
            if any(r.id not in self.discord.result_seen for r in recs):
                return False
            return not settled or all(
                ((r.original or {}).get("content") or "").startswith("✅ Done") for r in recs
            )

        await self.discord.wait_until(check, timeout, description=f"{len(recs)} result(s)")
        bad = failed()
        if bad:
            raise RuntimeError(f"{len(bad)} job(s) failed, e.g.: {bad[0]!r}")


@contextlib.asynccontextmanager
async def world(
    *, members: int = 64, segmind_latency: float = 0.0, result: bytes | None = None
) -> AsyncIterator[World]:
    """Start both emulators with one server; stop them afterwards."""
    with tempfile.TemporaryDirectory(prefix="kontext-bench-", ignore_cleanup_errors=True) as tmp:
        async with (
            BenchDiscord(token=DISCORD_TOKEN) as demu,
            BenchSegmind(api_key=SEGMIND_KEY, latency=segmind_latency, credits=1e9) as semu,
        ):
            semu.fixed_output = result
            guild = demu.add_guild(name="Bench Server")
            channel = demu.add_channel(guild.id, name="general")
            ids = [int(demu.add_member(guild.id, name=f"m{i}")["user"]["id"]) for i in range(members)]
            yield World(demu, semu, guild.id, int(channel["id"]), ids, Path(tmp))


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def at(self, t: float) -> int:
        """The last sample taken at or before ``t``."""
        before = [rss for ts, rss in self.samples if ts <= t]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)


class BotProcess:
    """A bot (``kontext`` = the real KontextBot, ``baseline`` = the blocking anti-pattern) in a
    subprocess, with an event-loop lag sampler inside it and an RSS sampler outside.

    ``root`` is the checkout whose ``bot.py`` and ``kontext`` run (default: this one; another
    worktree for a before/after comparison). The process runs in ``root`` with this checkout's
    ``bench`` harness (``python -P``: the working directory is not put on ``sys.path``) and
    :mod:`bench.botproc` puts ``root`` first on ``sys.path``; ``bot_file`` is the ``bot.py`` it
    really imported.
    """

    #: the checkout whose bot runs when a scenario names none (``python -m bench --bot REV``)
    default_root: Path = ROOT
    #: when set (``--profile DIR``), bot processes run under py-spy and log slow callbacks here
    profile_dir: Path | None = None

    def __init__(
        self, kind: str, env: dict[str, str], tmp: Path, label: str = "", *, root: Path | None = None
    ) -> None:
        self.kind = kind
        self.env = env
        self.root = Path(root or self.default_root).resolve()
        self.bot_file: str | None = None
        self.kontext_file: str | None = None
        self.trace: list[tuple[Any, ...]] = []  # BENCH_TRACE=1: see bench.botproc
        stamp = f"{kind}-{label or time.monotonic_ns()}"
        self.out = tmp / f"{stamp}.json"
        self.log = (self.profile_dir or tmp) / f"{stamp}.log"
        self.raw = self.profile_dir / f"{stamp}.raw" if self.profile_dir else None
        self.proc: asyncio.subprocess.Process | None = None
        self.rss: RssSampler | None = None
        self.lag_samples: list[tuple[float, float]] = []
        self.exit_code: int | None = None

    async def start(
        self, discord_emu: DiscordEmulator, timeout: float = 60.0, *, connections: int = 1
    ) -> None:
        """Start the process; return once the emulator has ``connections`` gateway clients
        (this one is the ``connections``-th bot process of the world)."""
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), "BENCH_BOT_ROOT": str(self.root)}
        prefix: list[str] = []
        if self.raw is not None:
            from .profiling import pyspy_prefix

            prefix = pyspy_prefix(self.raw)
        with self._open_log() as log:
            self.proc = await asyncio.create_subprocess_exec(
                *prefix, sys.executable, "-P", "-m", "bench.botproc", self.kind, str(self.out),
                cwd=str(self.root), env=env, stdout=log, stderr=log,
            )
        self.bot_pid = self.proc.pid
        self.rss = RssSampler(self.proc.pid).start()
        if prefix:  # the bot is py-spy's child: sample the bot, not py-spy
            for _ in range(200):
                children = psutil.Process(self.proc.pid).children()
                if children:
                    self.bot_pid = children[0].pid
                    self.rss.stop()
                    self.rss = RssSampler(children[0].pid).start()
                    break
                await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(discord_emu.wait_connected(connections, timeout))
        died = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
        if died in done:
            waiter.cancel()
            raise RuntimeError(f"{self.kind} bot exited at start:\n{self.log_tail()}")
        died.cancel()
        waiter.result()
        await asyncio.sleep(0.3)  # let on_ready's first recovery sweep finish

    def _open_log(self) -> Any:
        return open(self.log, "wb")  # noqa: SIM115 - closed by the caller's with

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM (the bot drains and exits 0), then read its lag samples."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.bot_pid, signal.SIGTERM)  # the bot (py-spy's child when profiling)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.exit_code = self.proc.returncode
        if self.rss is not None:
            self.rss.stop()
        try:
            data = json.loads(self.out.read_text())
            self.lag_samples = [tuple(s) for s in data["samples"]]  # type: ignore[misc]
            self.bot_file = data.get("bot_file")
            self.kontext_file = data.get("kontext_file")
            self.trace = [tuple(t) for t in data.get("trace") or []]
        except (OSError, ValueError, KeyError) as exc:
            raise RuntimeError(f"{self.kind} bot left no samples ({exc}):\n{self.log_tail()}") from None


@contextlib.asynccontextmanager
async def bot_process(
    kind: str,
    w: World,
    label: str = "",
    *,
    root: Path | None = None,
    database_url: str | None = None,
    connections: int = 1,
    **env: Any,
) -> AsyncIterator[BotProcess]:
    """A started bot process for ``w`` (the ``connections``-th gateway client of its world, the
    bot of checkout ``root``); stopped (and its samples read) afterwards."""
    bp = BotProcess(kind, w.bot_env(database_url, **env), w.tmp, label, root=root)
    try:
        await bp.start(w.discord, connections=connections)
        yield bp
    finally:
        await bp.stop()

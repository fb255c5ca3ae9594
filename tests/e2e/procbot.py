"""The real bot as its own OS process (``python bot.py``), pointed at the emulators.

Like ``devtools/demo.py`` and a PaaS: the settings come only from the environment, the working
directory is a scratch directory (no ``.env``), and the process is stopped with SIGTERM (or
killed with SIGKILL to emulate a crash). Its log goes to a file, shown when a test fails.

    async with bot_process(demu, semu, database_url, COOLDOWN_SECONDS="0") as bot:
        await demu.wait_connected(1)
        ...
        bot.kill()  # SIGKILL
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulators.discord import EPHEMERAL, DiscordEmulator
from emulators.segmind import SegmindEmulator
from kontext.settings import ENV_NAMES
from tests.e2e.harness import DISCORD_TOKEN, SEGMIND_KEY

ROOT = Path(__file__).resolve().parents[2]
BOT = ROOT / "bot.py"
#: Settings every test bot process starts with (tests override them per call).
BASE_ENV = {
    "COOLDOWN_SECONDS": "0",
    "JOBS_PER_MEMBER": "1",
    "STARTING_CREDITS": "10",
    "LOG_LEVEL": "INFO",
    "PORT": "",
}


#: a result's file name: ``kontext-<job id>.<ext>``
RESULT_NAME = re.compile(r"^kontext-(\d+)\.")


def result_ids(msg: dict[str, Any]) -> list[int]:
    """The jobs whose result ``msg`` (an emulator's message) carries."""
    ids = []
    for att in msg.get("attachments") or []:
        m = RESULT_NAME.match(att.get("filename") or "")
        if m:
            ids.append(int(m.group(1)))
    return ids


def result_posts(demu: DiscordEmulator, channel: int | None = None) -> Counter[int]:
    """How many public messages (of ``channel``, or every channel) carry each job's result."""
    seen: Counter[int] = Counter()
    for msg in demu.all_messages():
        if msg["flags"] & EPHEMERAL or (channel and int(msg["channel_id"]) != channel):
            continue
        for job_id in result_ids(msg):
            seen[job_id] += 1
    return seen

@dataclass
class BotProcess:
    """One running ``python bot.py``."""

    proc: asyncio.subprocess.Process
    log_path: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def log(self) -> str:
        """Everything the process logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.kill()
            return await self.proc.wait()


def bot_env(
    demu: DiscordEmulator, semu: SegmindEmulator, database_url: str, **overrides: str
) -> dict[str, str]:
    """The environment of a bot process: the parent's, minus any bot setting, plus ours."""
    keep = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and not k.startswith("KONTEXT_")}
    return {
        **keep,
        **BASE_ENV,
        "DISCORD_TOKEN": DISCORD_TOKEN,
        "SEGMIND_API_KEY": SEGMIND_KEY,
        "SEGMIND_BASE_URL": semu.base_url,
        "DISCORD_API_BASE_URL": demu.api_base,
        "DISCORD_GATEWAY_URL": demu.gateway_url,
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


async def start_bot(
    demu: DiscordEmulator,
    semu: SegmindEmulator,
    database_url: str,
    *,
    workdir: str | os.PathLike[str],
    name: str = "bot",
    **env: str,
) -> BotProcess:
    """Start ``python bot.py`` (not waiting for it to connect)."""
    log_path = Path(workdir) / f"{name}-{os.urandom(3).hex()}.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BOT),
            cwd=str(workdir),
            env=bot_env(demu, semu, database_url, **env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    return BotProcess(proc=proc, log_path=log_path, name=name)


@contextlib.asynccontextmanager
async def bot_processes(
    demu: DiscordEmulator,
    semu: SegmindEmulator,
    database_url: str,
    count: int = 1,
    *,
    workdir: str | os.PathLike[str] | None = None,
    connect_timeout: float = 30.0,
    **env: str,
) -> AsyncIterator[list[BotProcess]]:
    """``count`` bot processes on one database, connected to ``demu``; stopped afterwards.

    Waits until all of them are connected to the gateway and the commands are synced.
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="kontext-proc-", ignore_cleanup_errors=True)
            )
        before = len(demu.connections)
        bots: list[BotProcess] = []
        try:
            for i in range(count):
                bots.append(
                    await start_bot(demu, semu, database_url, workdir=workdir, name=f"bot{i}", **env)
                )
            await wait_connected(demu, bots, before + count, connect_timeout)
            yield bots
        finally:
            await asyncio.gather(*(b.stop() for b in bots), return_exceptions=True)


async def wait_connected(
    demu: DiscordEmulator, bots: list[BotProcess], count: int, timeout: float = 30.0
) -> None:
    """Wait until ``count`` gateway clients are connected and ``/kontext`` is synced.

    Fails early, with the logs, when a bot process exits.
    """

    def ready() -> bool:
        dead = [b for b in bots if not b.running]
        if dead:
            raise AssertionError(describe_exit(dead[0]))
        return len(demu.connections) >= count and demu.find_command("kontext") is not None

    try:
        await demu.wait_until(ready, timeout, description=f"{count} bot process(es)")
    except TimeoutError:
        logs = "\n\n".join(f"--- {b.name} ---\n{b.log_tail()}" for b in bots)
        raise AssertionError(f"bot processes did not connect in {timeout} s\n{logs}") from None


def describe_exit(bot: BotProcess) -> str:
    return f"{bot.name} exited with {bot.proc.returncode}:\n{bot.log_tail()}"


def logs(*bots: BotProcess) -> str:
    """The logs of ``bots``, for assertion messages."""
    return "\n\n".join(f"--- {b.name} (pid {b.pid}) ---\n{b.log_tail(80)}" for b in bots)


async def wait_job(
    database_url: str, job_id: int, predicate: Any, timeout: float = 15.0
) -> Any:
    """Poll the bots' database (from the test process) until job ``job_id`` satisfies
    ``predicate`` (e.g. it was committed, which no Discord message marks); returns the job."""
    from kontext.store import Store
    from tests.dbutil import make_settings

    store = await Store.open(database_url, make_settings())
    try:
        async with asyncio.timeout(timeout):
            while True:
                job = await store.jobs.get(job_id)
                if job is not None and predicate(job):
                    return job
                await asyncio.sleep(0.02)
    finally:
        await store.close()


async def wait_for(predicate: Any, timeout: float, demu: DiscordEmulator, *bots: BotProcess) -> None:
    """``demu.wait_until(predicate)`` that shows the bots' logs when it times out."""
    try:
        await demu.wait_until(predicate, timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s\n{logs(*bots)}") from None


async def wait_logged(bot: BotProcess, text: str, timeout: float = 15.0) -> None:
    """Wait until ``bot`` logged ``text`` (its log file is polled every 20 ms); fails with the
    log when it does not come in ``timeout`` s, or when the process exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in bot.log():
        if not bot.running:
            raise AssertionError(f"waiting for {text!r}: {describe_exit(bot)}")
        if loop.time() > deadline:
            raise AssertionError(f"{bot.name} did not log {text!r} in {timeout} s\n{logs(bot)}")
        await asyncio.sleep(0.02)

"""Everything a running bot uses besides Discord, built once and complete before any cog loads.

``bot.py``'s ``run_bot`` opens the :class:`Services` with :func:`build_services` (tests use
``async with open_services(settings) as services``) and hands them to the bot, which only wires Discord: the cogs reach the store, the
pipeline, the job launcher, the Segmind client, the metrics and the server gate through
``bot.services``, never ``None``. Closing them (after the bot has closed) retires this process's
worker row, closes the database and then the HTTP session.

Hidden knobs for development and tests only (not settings, not in ``.env.example``):

* ``KONTEXT_LEASE_SECONDS`` — a job's lease life; a killed process's jobs move after it (60)
* ``KONTEXT_QUEUE_POLL_SECONDS`` — how often an idle process looks at the shared queue (0.5)
* ``KONTEXT_PROGRESS_SECONDS`` — least time between two progress edits of a job (3)
* ``KONTEXT_ACCOUNT_PROBE_SECONDS`` — how often a paused API account is probed (60)
* ``KONTEXT_SETTLE_SECONDS`` — the bound on settling a post whose channel cannot be read (600)
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp

from kontext.accounts import Accounts, KeyVault
from kontext.gate import GuildGate
from kontext.launcher import JobLauncher
from kontext.logging_setup import describe
from kontext.metrics import Metrics
from kontext.pipeline import JobPipeline
from kontext.queue import SharedQueue
from kontext.segmind import SegmindClient
from kontext.settings import Settings
from kontext.store import Store
from kontext.store.types import OWNER_ACCOUNT, AccountLimits

log = logging.getLogger("kontext.services")

#: a job's lease lives this long without a renewal (renewed every sixth of it); a killed
#: process's running jobs are taken over after it, by the database's clock
LEASE_S = 60.0


def hidden_knob(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    """A positive number from the environment, or ``default`` (a bad value is ignored, logged)."""
    raw = (env if env is not None else os.environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400:
        log.warning("ignoring %s=%r (a number of seconds above 0 is expected)", name, raw)
        return default
    return value


@dataclass(frozen=True, slots=True)
class Knobs:
    """The hidden knobs' values (see the module)."""

    lease_s: float = LEASE_S
    poll_s: float = 0.5
    progress_interval_s: float = 3.0
    probe_interval_s: float = 60.0
    settle_s: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Knobs:
        return cls(
            lease_s=hidden_knob("KONTEXT_LEASE_SECONDS", LEASE_S, env),
            poll_s=hidden_knob("KONTEXT_QUEUE_POLL_SECONDS", 0.5, env),
            progress_interval_s=hidden_knob("KONTEXT_PROGRESS_SECONDS", 3.0, env),
            probe_interval_s=hidden_knob("KONTEXT_ACCOUNT_PROBE_SECONDS", 60.0, env),
            settle_s=hidden_knob("KONTEXT_SETTLE_SECONDS", 600.0, env),
        )


class StartupError(Exception):
    """A setting that parsed but does not work (the database cannot be opened). One line."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")


@dataclass(frozen=True, slots=True)
class Services:
    """The bot's services, all open (see the module)."""

    settings: Settings
    worker_id: str
    knobs: Knobs
    http: aiohttp.ClientSession
    store: Store
    segmind: SegmindClient
    queue: SharedQueue
    pipeline: JobPipeline
    launcher: JobLauncher
    vault: KeyVault
    accounts: Accounts
    gate: GuildGate
    metrics: Metrics

    async def aclose(self) -> None:
        """Stop the queue's loops, retire this process's worker row, close the database, then
        the HTTP session."""
        await self.queue.aclose()
        with contextlib.suppress(Exception):
            await self.store.audit.retire_worker(self.worker_id)
        try:
            await self.store.close()
        finally:
            await self.http.close()


def new_worker_id() -> str:
    """This process's name in the shared queue: the dyno's name (on a PaaS) and a random part."""
    return f"{os.environ.get('DYNO', 'worker')}-{uuid.uuid4().hex[:12]}"


async def build_services(settings: Settings, *, knobs: Knobs | None = None) -> Services:
    """Open the database and build every service; :class:`StartupError` when the database
    cannot be opened (one line, no secrets). Close them with :meth:`Services.aclose`."""
    s = settings
    knobs = knobs or Knobs.from_env()
    worker_id = new_worker_id()
    if not s.segmind_api_key:
        log.warning(
            "SEGMIND_API_KEY is empty: every /kontext will fail at the image service (and "
            "pause new jobs) until you set it"
        )
    http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=50, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )
    try:
        store = await Store.open(s.database_url, s)
    except Exception as exc:  # unreachable server, corrupt file, wrong credentials
        await http.close()
        why = describe(exc, s.secrets)
        raise StartupError("DATABASE_URL", f"the database cannot be opened ({why})") from None
    except BaseException:
        await http.close()
        raise
    try:
        await store.audit.register_worker(worker_id)
        return _assemble(s, knobs, worker_id, http, store)
    except BaseException:
        await store.close()
        await http.close()
        raise


def _assemble(
    s: Settings, knobs: Knobs, worker_id: str, http: aiohttp.ClientSession, store: Store
) -> Services:
    metrics = Metrics()

    def segmind_with(key: str) -> SegmindClient:  # the owner's key, or a server's own
        return SegmindClient(
            http,
            api_key=key,
            base_url=s.segmind_base_url,
            model=s.segmind_model,
            mode=s.segmind_api_mode,
            timeout_s=s.segmind_timeout_seconds,
        )

    segmind = segmind_with(s.segmind_api_key)
    limits = AccountLimits(OWNER_ACCOUNT, s.max_concurrent_jobs, s.segmind_rpm)
    vault = KeyVault(s.encryption_key)
    accounts = Accounts(store, vault, segmind, limits, segmind_with)
    queue = SharedQueue(
        store,
        worker_id=worker_id,
        limits=limits,
        accounts=accounts,
        lease_s=knobs.lease_s,
        poll_s=knobs.poll_s,
        max_wait_s=s.max_queue_wait_seconds,
    )
    pipeline = JobPipeline(
        settings=s,
        store=store,
        client=segmind,
        queue=queue,
        http=http,
        worker_id=worker_id,
        metrics=metrics,
        progress_interval_s=knobs.progress_interval_s,
        probe_interval_s=knobs.probe_interval_s,
        settle_s=knobs.settle_s,
        accounts=accounts,
    )
    metrics.bind_queue(
        lambda: queue.estimates.waiting_count, lambda: queue.estimates.running_count, lambda: queue.paused
    )
    return Services(
        settings=s,
        worker_id=worker_id,
        knobs=knobs,
        http=http,
        store=store,
        segmind=segmind,
        queue=queue,
        pipeline=pipeline,
        launcher=JobLauncher(store, pipeline, queue),
        vault=vault,
        accounts=accounts,
        gate=GuildGate(s, store),
        metrics=metrics,
    )


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, *, knobs: Knobs | None = None
) -> AsyncIterator[Services]:
    """:func:`build_services`, closed on the way out."""
    services = await build_services(settings, knobs=knobs)
    try:
        yield services
    finally:
        await services.aclose()

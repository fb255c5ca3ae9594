"""``/healthz`` and ``/metrics`` over aiohttp, for PaaS health checks and dashboards.

Started by ``bot.py`` only when ``PORT`` is set. The server reads a :class:`HealthSource` (the
bot) so this module stays discord-free.

The database part of ``/healthz`` goes through a :class:`DatabaseCheck`: its answer is kept for
a few seconds, at most one ping runs at a time (concurrent requests wait for the same one), and
a ping that does not answer within its timeout counts as "unreachable". So a burst of health
checks costs the database at most one ping per cache period, and a hanging database makes
``/healthz`` answer 503 quickly instead of piling up requests that each hold a pooled connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from kontext.metrics import Metrics

log = logging.getLogger("kontext.health")

#: how long one database answer is reused, seconds
DB_CACHE_S = 5.0
#: how long a database ping may take before the database counts as unreachable, seconds
DB_TIMEOUT_S = 2.0


class HealthSource(Protocol):
    """What the health endpoint asks the running bot."""

    metrics: Metrics

    def gateway_connected(self) -> bool: ...

    async def database_ok(self) -> bool: ...

    def queue_snapshot(self) -> dict[str, int | bool]: ...


class DatabaseCheck:
    """``ping`` behind a cache of ``ttl`` seconds, one call at a time, each within ``timeout``.

    :meth:`ok` answers from the cache while it is fresh; otherwise it starts one check (or joins
    the one already running). A ping that raises, answers falsy or takes longer than ``timeout``
    makes the answer False; a timed-out ping is cancelled, and no second ping starts while it
    is still winding down. ``pings`` counts the calls of ``ping``.
    """

    def __init__(
        self,
        ping: Callable[[], Awaitable[bool]],
        *,
        ttl: float = DB_CACHE_S,
        timeout: float = DB_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ping = ping
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self.pings = 0
        self._answer: bool | None = None
        self._fresh_until = 0.0
        self._check: asyncio.Task[bool] | None = None
        self._probe: asyncio.Task[bool] | None = None

    async def ok(self) -> bool:
        """True when the database answered its latest ping (at most ``ttl`` seconds ago)."""
        if self._answer is not None and self.clock() < self._fresh_until:
            return self._answer
        if self._check is None or self._check.done():
            self._check = asyncio.create_task(self._run(), name="kontext-health-database")
        # a request that goes away must not cancel the check the others are waiting for
        return await asyncio.shield(self._check)

    async def _run(self) -> bool:
        probe = self._probe
        if probe is None or probe.done():
            self.pings += 1
            probe = self._probe = asyncio.create_task(self._call(), name="kontext-health-ping")
        done, _ = await asyncio.wait({probe}, timeout=self.timeout)
        if done:
            answer = not probe.cancelled() and probe.result()
        else:
            probe.cancel()
            log.warning("health: the database did not answer a ping within %.1f s", self.timeout)
            answer = False
        if answer != self._answer and self._answer is not None:
            log.warning("health: database %s", "reachable again" if answer else "unreachable")
        self._answer = answer
        self._fresh_until = self.clock() + self.ttl
        return answer

    async def _call(self) -> bool:
        try:
            return bool(await self._ping())
        except Exception as exc:  # noqa: BLE001 - unreachable, not an error page
            log.warning("health: database ping failed: %s", type(exc).__name__)
            return False

    async def aclose(self) -> None:
        """Cancel a check still running (the server is stopping)."""
        for task in (self._check, self._probe):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class HealthServer:
    """A tiny aiohttp app bound to ``0.0.0.0:PORT``."""

    def __init__(
        self,
        source: HealthSource,
        *,
        port: int,
        host: str = "0.0.0.0",  # noqa: S104
        db_cache_s: float = DB_CACHE_S,
        db_timeout_s: float = DB_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.port = port
        self.host = host
        self.database = DatabaseCheck(
            lambda: self.source.database_ok(), ttl=db_cache_s, timeout=db_timeout_s, clock=clock
        )
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        log.info("health endpoint on port %d (/healthz, /metrics)", self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.database.aclose()

    async def healthz(self, request: web.Request) -> web.Response:
        gateway = self.source.gateway_connected()
        try:
            database = await self.database.ok()
        except Exception:  # noqa: BLE001 - unhealthy, not an error page
            database = False
        body = {
            "status": "ok" if gateway and database else "unhealthy",
            "gateway_connected": gateway,
            "database_reachable": database,
            "queue": self.source.queue_snapshot(),
        }
        return web.Response(
            body=json.dumps(body).encode(),
            status=200 if gateway and database else 503,
            content_type="application/json",
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.source.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

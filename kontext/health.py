"""``/healthz`` and ``/metrics`` over aiohttp, for PaaS health checks and dashboards.

Started by ``bot.py`` only when ``PORT`` is set. The server reads a :class:`HealthSource` (the
bot) so this module stays discord-free.
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from aiohttp import web

from kontext.metrics import Metrics

log = logging.getLogger("kontext.health")


class HealthSource(Protocol):
    """What the health endpoint asks the running bot."""

    metrics: Metrics

    def gateway_connected(self) -> bool: ...

    async def database_ok(self) -> bool: ...

    def queue_snapshot(self) -> dict[str, int | bool]: ...


class HealthServer:
    """A tiny aiohttp app bound to ``0.0.0.0:PORT``."""

    def __init__(self, source: HealthSource, *, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104
        self.source = source
        self.port = port
        self.host = host
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

    async def healthz(self, request: web.Request) -> web.Response:
        gateway = self.source.gateway_connected()
        try:
            database = await self.source.database_ok()
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

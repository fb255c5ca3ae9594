"""``PORT`` set: ``/healthz`` (JSON; 503 when unhealthy) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import socket

import aiohttp
from aiohttp import web

from kontext.health import HealthServer
from kontext.metrics import Metrics
from tests.e2e.harness import harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_healthz_and_metrics_of_the_running_bot() -> None:
    port = free_port()
    async with harness(PORT=str(port)) as h:
        base = f"http://127.0.0.1:{port}"
        status, ctype, _ = await get(f"{base}/healthz")
        assert status == 200 and ctype.startswith("application/json")
        async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as resp:
            body = await resp.json()
        assert body["status"] == "ok"
        assert body["gateway_connected"] is True and body["database_reachable"] is True
        assert body["queue"] == {"waiting": 0, "running": 0, "paused": False, "accepting": True}

        rec = await h.kontext()
        assert h.outcomes[rec.id].status == "posted"
        h.segmind.fail_next(500, times=5)
        rec2 = await h.kontext(user_id=h.admin_id)
        assert h.outcomes[rec2.id].status == "refunded"

        status, ctype, text = await get(f"{base}/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert 'kontext_jobs_total{cause="none",outcome="posted"} 1.0' in text
        assert 'kontext_jobs_total{cause="api_server_error",outcome="refunded"} 1.0' in text
        assert "kontext_queue_depth 0.0" in text
        assert "kontext_credits_spent_total 1.0" in text
        assert 'kontext_api_latency_seconds_bucket{le="1.0"} 1.0' in text
        assert "kontext_api_latency_seconds_count 1.0" in text

        # the database stops answering: unhealthy, 503
        async def down() -> bool:
            return False

        h.bot.store.ping = down  # type: ignore[method-assign]
        status, _, text = await get(f"{base}/healthz")
        assert status == 503 and '"database_reachable": false' in text


class FakeSource:
    def __init__(self, gateway: bool, database: bool | Exception) -> None:
        self.metrics = Metrics()
        self.gateway = gateway
        self.database = database

    def gateway_connected(self) -> bool:
        return self.gateway

    async def database_ok(self) -> bool:
        if isinstance(self.database, Exception):
            raise self.database
        return self.database

    def queue_snapshot(self) -> dict[str, int | bool]:
        return {"waiting": 3, "running": 2, "paused": False}


async def test_health_server_reports_each_failure() -> None:
    for gateway, database, code in (
        (True, True, 200),
        (False, True, 503),
        (True, False, 503),
        (True, OSError("db gone"), 503),
    ):
        port = free_port()
        server = HealthServer(FakeSource(gateway, database), port=port, host="127.0.0.1")
        await server.start()
        try:
            status, _, text = await get(f"http://127.0.0.1:{port}/healthz")
        finally:
            await server.stop()
        assert status == code, (gateway, database, text)
        assert '"waiting": 3' in text


async def test_health_app_routes() -> None:
    app = HealthServer(FakeSource(True, True), port=0).app()
    assert {r.resource.canonical for r in app.router.routes() if isinstance(r.resource, web.Resource)} >= {
        "/healthz",
        "/metrics",
    }

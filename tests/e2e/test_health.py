"""``PORT`` set: ``/healthz`` (JSON; 503 when unhealthy) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
from aiohttp import web

from kontext.health import DB_CACHE_S, DB_TIMEOUT_S, HealthServer
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
        later = time.monotonic() + 60  # the cached "reachable" expires
        h.bot.health.database.clock = lambda: later
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


async def burst(url: str, n: int) -> list[int]:
    """``n`` concurrent GETs of ``url``; their statuses."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def one() -> int:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_a_burst_of_healthz_pings_the_running_bots_database_once_per_period() -> None:
    port = free_port()
    async with harness(PORT=str(port)) as h:
        store = h.bot.store
        real_ping = store.ping
        pings = 0

        async def counted() -> bool:
            nonlocal pings
            pings += 1
            return await real_ping()

        store.ping = counted  # type: ignore[method-assign]
        started = time.monotonic()
        statuses = await burst(f"http://127.0.0.1:{port}/healthz", 200)
        periods = 1 + int((time.monotonic() - started) // DB_CACHE_S)
        assert statuses == [200] * 200
        assert 1 <= pings <= periods, (pings, periods)


class GatedSource(FakeSource):
    """Counts requests (each asks the gateway first) and pings; a ping waits for ``release``."""

    def __init__(self, expected: int) -> None:
        super().__init__(True, True)
        self.expected = expected
        self.requests = 0
        self.pings = 0
        self.all_arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0

    def gateway_connected(self) -> bool:
        self.requests += 1
        if self.requests >= self.expected:
            self.all_arrived.set()
        return True

    async def database_ok(self) -> bool:
        self.pings += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return bool(self.database)


async def test_concurrent_healthz_requests_share_one_ping_and_its_answer_is_cached() -> None:
    now = [1000.0]
    source = GatedSource(expected=200)
    port = free_port()
    server = HealthServer(
        source, port=port, host="127.0.0.1", db_timeout_s=60, clock=lambda: now[0]
    )
    await server.start()
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        requests = asyncio.create_task(burst(url, 200))
        async with asyncio.timeout(20):
            await source.all_arrived.wait()  # all 200 are waiting on the database
        assert source.pings == 1
        source.release.set()
        assert await requests == [200] * 200
        assert source.pings == 1
        # within the cache period: the cached answer, no ping
        source.database = False
        assert (await get(url))[0] == 200 and source.pings == 1
        now[0] += DB_CACHE_S + 0.1  # expired: one new ping, and its (bad) answer is cached too
        assert (await get(url))[0] == 503 and source.pings == 2
        source.database = True
        assert (await get(url))[0] == 503 and source.pings == 2
    finally:
        await server.stop()


async def test_a_hanging_database_answers_unhealthy_within_the_ping_timeout() -> None:
    source = GatedSource(expected=20)  # never released: the database hangs
    port = free_port()
    server = HealthServer(source, port=port, host="127.0.0.1")
    await server.start()
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        started = time.monotonic()
        statuses = await burst(url, 20)
        took = time.monotonic() - started
        assert statuses == [503] * 20
        assert took < DB_TIMEOUT_S + 1.5, took
        assert source.pings == 1 and source.cancelled == 1  # the hung ping was given up
        started = time.monotonic()
        status, _, text = await get(url)  # cached: answered at once, no second ping
        assert status == 503 and '"database_reachable": false' in text
        assert time.monotonic() - started < 1.0 and source.pings == 1
    finally:
        await server.stop()

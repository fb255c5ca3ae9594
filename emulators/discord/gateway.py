"""The emulated Gateway: the websocket endpoint, IDENTIFY/RESUME sessions and the ``/gateway``
routes.

A client gets HELLO, heartbeats are ACKed, IDENTIFY answers READY plus one GUILD_CREATE per
guild of its shard (``(guild_id >> 22) % shard_count``), RESUME replays what the session missed,
and op 8 (request guild members) answers one chunk. The open connections themselves, and the
routing of events to them, are :mod:`.connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import time
from typing import Any

from aiohttp import WSMsgType, web

from .changes import Changes
from .config import Address, Settings
from .connections import Connections, GatewayConnection, Session
from .models import json_response
from .world import World


class Gateway:
    """The websocket endpoint and its sessions, and the ``/gateway`` routes."""

    def __init__(
        self,
        settings: Settings,
        address: Address,
        world: World,
        connections: Connections,
        changes: Changes,
    ) -> None:
        self._settings = settings
        self._address = address
        self._world = world
        self._connections = connections
        self._changes = changes
        self._sessions: dict[str, Session] = {}
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeats = 0

    def add_routes(self, app: web.Application, api: str) -> None:
        """The websocket (``/gateway``) and ``GET /gateway``, ``GET /gateway/bot``."""
        app.router.add_get("/gateway", self.serve)
        app.router.add_get(api + "/gateway", self.get_gateway)
        app.router.add_get(api + "/gateway/bot", self.get_gateway_bot)

    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self._address.gateway_url})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self._address.gateway_url,
                "shards": self._settings.recommended_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        conn = self._connections.open(ws)
        writer = asyncio.create_task(conn.write_frames())
        conn.send_op(
            10,
            {"heartbeat_interval": self._settings.heartbeat_interval_ms, "_trace": ["discord-emulator"]},
        )
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        frame = json.loads(msg.data)
                    except ValueError:
                        await ws.close(code=4002, message=b"Error while decoding payload.")
                        break
                    conn.received.append(frame)
                    await self._frame(conn, frame)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            conn.closed = True
            conn.ready = False
            conn.close_code = ws.close_code
            self._connections.remove(conn)
            conn.stop_writing()
            with contextlib.suppress(Exception):
                await writer
            self._changes.notify()
        return ws

    async def _frame(self, conn: GatewayConnection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        data = frame.get("d")
        if op == 1:
            self.heartbeats += 1
            conn.send_op(11, None)
        elif op == 2:
            await self._identify(conn, data or {})
        elif op == 6:
            await self._resume(conn, data or {})
        elif op == 8 and isinstance(data, dict):
            guild = self._world.guilds.get(int(data.get("guild_id") or 0))
            if guild is not None and conn.session is not None:
                members = list(guild.members.values())
                if data.get("user_ids"):
                    wanted = {int(u) for u in data["user_ids"]}
                    members = [m for m in members if int(m["user"]["id"]) in wanted]
                chunk: dict[str, Any] = {
                    "guild_id": str(guild.id),
                    "members": copy.deepcopy(members),
                    "chunk_index": 0,
                    "chunk_count": 1,
                }
                if data.get("nonce") is not None:
                    chunk["nonce"] = data["nonce"]
                conn.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    async def _identify(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        if self._settings.token is not None and data.get("token") != self._settings.token:
            await conn.close(4004, "Authentication failed.")
            return
        if conn.session is not None:
            await conn.close(4005, "Already authenticated.")
            return
        shard: tuple[int, int] | None = None
        if data.get("shard"):
            shard = (int(data["shard"][0]), int(data["shard"][1]))
            if shard[0] >= shard[1]:
                await conn.close(4010, "Invalid shard.")
                return
        self.identify_count += 1
        conn.identify = data
        session = Session(
            id=hashlib.md5(
                f"{conn.number}:{time.time()}".encode(), usedforsecurity=False
            ).hexdigest(),
            shard=shard,
        )
        self._sessions[session.id] = session
        conn.session = session
        guilds = [g for g in self._world.guilds.values() if conn.handles_guild(g.id)]
        ready: dict[str, Any] = {
            "v": 10,
            "user": copy.deepcopy(self._world.bot_user),
            "user_settings": {},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self._address.gateway_url,
            "application": {
                "id": str(self._settings.application_id),
                "flags": self._settings.application_flags,
            },
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
            "guild_join_requests": [],
            "_trace": ["discord-emulator"],
        }
        if shard is not None:
            ready["shard"] = list(shard)
        conn.dispatch("READY", ready)
        for guild in guilds:
            conn.dispatch("GUILD_CREATE", guild.to_gateway())
        conn.call_soon(lambda: self._mark_ready(conn))

    def _mark_ready(self, conn: GatewayConnection) -> None:
        if not conn.closed:
            conn.ready = True
            self._changes.notify()

    async def _resume(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        token_ok = self._settings.token is None or data.get("token") == self._settings.token
        if session is None or not self._settings.allow_resume or not token_ok:
            conn.send_op(9, False)
            return
        self.resume_count += 1
        conn.session = session
        last = int(data.get("seq") or 0)
        for frame in list(session.log):
            if frame["s"] > last:
                conn.replay(frame)
        conn.dispatch("RESUMED", {"_trace": ["discord-emulator"]})
        conn.call_soon(lambda: self._mark_ready(conn))

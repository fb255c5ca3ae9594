"""The emulated Gateway: websocket connections, IDENTIFY/RESUME sessions and dispatch.

A client gets HELLO, heartbeats are ACKed, IDENTIFY answers READY plus one GUILD_CREATE per
guild of its shard (``(guild_id >> 22) % shard_count``), RESUME replays what the session missed,
and op 8 (request guild members) answers one chunk. Every dispatch goes through one writer task
per connection, so frames keep their order and :meth:`GatewayConnection.flush` can wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from .models import ToSpec, json_response

if TYPE_CHECKING:
    from .emulator import DiscordEmulator


@dataclass
class Session:
    id: str
    shard: tuple[int, int] | None
    seq: int = 0
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))


class GatewayConnection:
    """One websocket client of the emulated Gateway."""

    def __init__(self, emulator: DiscordEmulator, ws: web.WebSocketResponse, number: int) -> None:
        self.emulator = emulator
        self.ws = ws
        self.number = number
        self.session: Session | None = None
        self.ready = False
        self.closed = False
        self.close_code: int | None = None
        self.identify: dict[str, Any] | None = None
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def __repr__(self) -> str:
        return f"<GatewayConnection #{self.number} ready={self.ready} closed={self.closed}>"

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(shard_id, shard_count)`` if the client identified with a shard."""
        return self.session.shard if self.session else None

    @property
    def seq(self) -> int:
        """The last dispatch sequence number sent."""
        return self.session.seq if self.session else 0

    def handles_guild(self, guild_id: int | None) -> bool:
        """Whether events of this guild go to this connection (shard routing)."""
        shard = self.shard
        if shard is None or shard[1] <= 1:
            return True
        if guild_id is None:
            return shard[0] == 0
        return (guild_id >> 22) % shard[1] == shard[0]

    def send_op(self, op: int, data: Any) -> None:
        """Queue a non-dispatch frame."""
        self._queue.put_nowait({"op": op, "d": data, "s": None, "t": None})

    def dispatch(self, event: str, data: Any) -> int:
        """Queue a dispatch (op 0) frame; returns its sequence number."""
        if self.session is None:
            raise RuntimeError("connection has no session yet")
        self.session.seq += 1
        frame = {"op": 0, "t": event, "s": self.session.seq, "d": data}
        self.session.log.append(frame)
        self._queue.put_nowait(frame)
        return self.session.seq

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every frame queued before it was written."""
        self._queue.put_nowait(callback)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every frame queued so far was written to the socket."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(fut)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(fut, timeout)

    async def close(self, code: int = 4000, message: str = "") -> None:
        """Close the websocket with ``code``."""
        await self.ws.close(code=code, message=message.encode())

    async def _writer(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                break
            if isinstance(item, asyncio.Future):
                if not item.done():
                    item.set_result(None)
                continue
            if callable(item):
                item()
                continue
            if self.ws.closed:
                continue
            try:
                await self.ws.send_str(json.dumps(item))
                self.sent.append(item)
            except (ConnectionError, RuntimeError):
                self.closed = True
        # Release anyone waiting on a flush.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, asyncio.Future) and not item.done():
                item.set_result(None)


class Gateway:
    """Every gateway connection and session, and the ``/gateway`` routes."""

    def __init__(self, emu: DiscordEmulator) -> None:
        self.emu = emu
        #: every open websocket (identified or not), in connection order
        self.all: list[GatewayConnection] = []
        self._sessions: dict[str, Session] = {}
        self._numbers = itertools.count()

    def add_routes(self, app: web.Application, api: str) -> None:
        """The websocket (``/gateway``) and ``GET /gateway``, ``GET /gateway/bot``."""
        app.router.add_get("/gateway", self.serve)
        app.router.add_get(api + "/gateway", self.get_gateway)
        app.router.add_get(api + "/gateway/bot", self.get_gateway_bot)

    @property
    def connections(self) -> list[GatewayConnection]:
        """Identified (READY sent), open gateway connections in connection order."""
        return [c for c in self.all if c.ready and not c.closed]

    def connections_for(self, guild_id: int | None) -> list[GatewayConnection]:
        """The identified connections that get this guild's events (shard routing)."""
        return [c for c in self.connections if c.handles_guild(guild_id)]

    def select(
        self, to: ToSpec | GatewayConnection, guild_id: int | None
    ) -> list[GatewayConnection]:
        """The connections ``to`` names among those handling ``guild_id``."""
        if isinstance(to, GatewayConnection):
            return [to]
        conns = self.connections_for(guild_id)
        if to == "all":
            return conns
        if to == "first":
            return conns[:1]
        if to == "last":
            return conns[-1:]
        if isinstance(to, int):
            return [conns[to]]
        raise ValueError(f"bad 'to': {to!r}")

    async def close_all(self, code: int, reason: str) -> int:
        """Close every connection with ``code``; returns how many there were."""
        conns = list(self.all)
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close(code, reason)
        return len(conns)

    async def wait_connected(self, count: int, timeout: float) -> list[GatewayConnection]:
        """Wait until ``count`` clients got READY and their GUILD_CREATEs."""
        await self.emu.wait_until(
            lambda: len(self.connections) >= count,
            timeout,
            description=f"{count} gateway client(s)",
        )
        return self.connections

    async def dispatch(
        self, event: str, data: Any, *, guild_id: int | None, to: ToSpec | GatewayConnection
    ) -> None:
        """Send a dispatch event to the selected clients and wait until it was written."""
        conns = self.select(to, guild_id)
        for conn in conns:
            conn.dispatch(event, copy.deepcopy(data))
        await asyncio.gather(*(c.flush() for c in conns))

    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.emu.gateway_url})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.emu.gateway_url,
                "shards": self.emu.recommended_shards,
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
        conn = GatewayConnection(self.emu, ws, next(self._numbers))
        self.all.append(conn)
        writer = asyncio.create_task(conn._writer())
        conn.send_op(
            10,
            {"heartbeat_interval": self.emu.heartbeat_interval_ms, "_trace": ["discord-emulator"]},
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
            with contextlib.suppress(ValueError):
                self.all.remove(conn)
            conn._queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await writer
            self.emu.notify()
        return ws

    async def _frame(self, conn: GatewayConnection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        data = frame.get("d")
        if op == 1:
            self.emu.heartbeats += 1
            conn.send_op(11, None)
        elif op == 2:
            await self._identify(conn, data or {})
        elif op == 6:
            await self._resume(conn, data or {})
        elif op == 8 and isinstance(data, dict):
            guild = self.emu.guilds.get(int(data.get("guild_id") or 0))
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
        if self.emu.token is not None and data.get("token") != self.emu.token:
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
        self.emu.identify_count += 1
        conn.identify = data
        session = Session(
            id=hashlib.md5(
                f"{conn.number}:{time.time()}".encode(), usedforsecurity=False
            ).hexdigest(),
            shard=shard,
        )
        self._sessions[session.id] = session
        conn.session = session
        guilds = [g for g in self.emu.guilds.values() if conn.handles_guild(g.id)]
        ready: dict[str, Any] = {
            "v": 10,
            "user": copy.deepcopy(self.emu.bot_user),
            "user_settings": {},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.emu.gateway_url,
            "application": {
                "id": str(self.emu.application_id),
                "flags": self.emu.application_flags,
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
            self.emu.notify()

    async def _resume(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        token_ok = self.emu.token is None or data.get("token") == self.emu.token
        if session is None or not self.emu.allow_resume or not token_ok:
            conn.send_op(9, False)
            return
        self.emu.resume_count += 1
        conn.session = session
        last = int(data.get("seq") or 0)
        for frame in list(session.log):
            if frame["s"] > last:
                conn._queue.put_nowait(frame)
        conn.dispatch("RESUMED", {"_trace": ["discord-emulator"]})
        conn.call_soon(lambda: self._mark_ready(conn))

"""The Gateway's open websockets: each client (:class:`GatewayConnection`, its session and its
ordered writer) and the registry of them all (:class:`Connections`), which routes an event to
the clients that handle its guild (``(guild_id >> 22) % shard_count``).

The world, the message store and the test driver hold the registry to send events; the Gateway
(:mod:`.gateway`) adds and removes the connections it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .changes import Changes
from .models import ToSpec


@dataclass
class Session:
    id: str
    shard: tuple[int, int] | None
    seq: int = 0
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=1000))


class GatewayConnection:
    """One websocket client of the emulated Gateway."""

    def __init__(self, ws: web.WebSocketResponse, number: int) -> None:
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

    def replay(self, frame: dict[str, Any]) -> None:
        """Queue a frame the session already numbered (RESUME sends what was missed)."""
        self._queue.put_nowait(frame)

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

    def stop_writing(self) -> None:
        """End :meth:`write_frames` once what is queued was handled."""
        self._queue.put_nowait(None)

    async def write_frames(self) -> None:
        """The connection's writer: frames in order, until :meth:`stop_writing`."""
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


class Connections:
    """Every open gateway connection, in connection order, and who gets which event."""

    def __init__(self, changes: Changes) -> None:
        self._changes = changes
        #: every open websocket (identified or not), in connection order
        self.all: list[GatewayConnection] = []
        self._numbers = itertools.count()

    def open(self, ws: web.WebSocketResponse) -> GatewayConnection:
        """A new connection on ``ws`` (numbered in connection order)."""
        conn = GatewayConnection(ws, next(self._numbers))
        self.all.append(conn)
        return conn

    def remove(self, conn: GatewayConnection) -> None:
        """Forget a closed connection."""
        with contextlib.suppress(ValueError):
            self.all.remove(conn)

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
        await self._changes.wait_until(
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

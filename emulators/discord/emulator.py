"""The Discord emulator's facade: :class:`DiscordEmulator`, composed from its parts.

An unmodified discord.py 2.7 client talks to it once ``discord.http.Route.BASE`` is
``emu.api_base`` and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` is
``yarl.URL(emu.gateway_url)`` (:meth:`DiscordEmulator.patch_discord_py` sets both).
One aiohttp server on 127.0.0.1 (random free port) serves the REST routes a bot needs
(:mod:`.rest_channels`, :mod:`.rest_interactions`, :mod:`.commands`), signed attachment URLs
(:mod:`.cdn`) and the Gateway (:mod:`.gateway`), through one middleware (:mod:`.http`) that
records requests and applies planned faults (:mod:`.faults`).

The world (:mod:`.world`), the message store (:mod:`.messages`), the synced commands
(:mod:`.commands`) and the test driver (:mod:`.driver`) are mixins, because their methods are the
API tests call (``emu.add_guild``, ``emu.invoke_slash``, ...); the protocol parts are objects the
emulator holds (``emu.gateway``, ``emu.cdn``, ``emu.faults``, ``emu.http`` and the route
objects), and the few of their methods tests call are forwarded here. Every piece of state tests
read (``guilds``, ``messages``, ``interactions``, ``requests``, counters) is a plain attribute of
the emulator, shaped like Discord's payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import re
import socket
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from .cdn import Cdn, StoredAttachment
from .commands import CommandRoutes, CommandsMixin
from .driver import DriverMixin
from .faults import DelayRule, FaultRule, Faults
from .gateway import Gateway, GatewayConnection
from .http import Http
from .messages import MessagesMixin
from .models import EPHEMERAL, LOADING, APIError, Guild, InteractionRecord, RequestRecord, ToSpec
from .rest_channels import ChannelRoutes
from .rest_interactions import InteractionRoutes
from .world import WorldMixin

T = TypeVar("T")


class DiscordEmulator(WorldMixin, MessagesMixin, CommandsMixin, DriverMixin):
    """Discord REST + CDN + Gateway on 127.0.0.1 for an unmodified discord.py client.

    World state (guilds, channels, members, messages, attachments, commands, interactions) is
    plain dicts shaped like Discord payloads; tests can read them directly.
    """

    def __init__(
        self,
        *,
        application_id: int | None = None,
        bot_user_id: int | None = None,
        bot_name: str = "Kontext Bot",
        token: str | None = None,
        upload_limit: int = 10 * 1024 * 1024,
        heartbeat_interval_ms: int = 41250,
        token_ttl: float | None = 15 * 60,
        response_deadline: float | None = None,
        attachment_ttl: float = 24 * 3600,
        strict_commands: bool = True,
        recommended_shards: int = 1,
    ) -> None:
        """Create the emulator (the port is reserved at once; :meth:`start` serves it).

        ``token``: when set, REST and IDENTIFY must use it (else any token is accepted).
        ``token_ttl``: seconds an interaction token works for webhook calls (``None``: forever).
        ``response_deadline``: seconds for the first callback (Discord: 3) or ``None`` (no limit).
        ``strict_commands``: invoking a command that was not synced raises ``LookupError``
        (when ``False`` option types are inferred from the Python values).
        """
        self._snowflake_last = 0
        # the parts: each holds this emulator and reads the shared state below from it
        self.faults = Faults()
        self.cdn = Cdn(self)
        self.gateway = Gateway(self)
        self.http = Http(self)
        self._routes = (ChannelRoutes(self), InteractionRoutes(self), CommandRoutes(self))
        self.application_id = application_id or self.snowflake()
        self.bot_user_id = bot_user_id or self.snowflake()
        self.token = token
        self.upload_limit = upload_limit
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.token_ttl = token_ttl
        self.response_deadline = response_deadline
        self.attachment_ttl = attachment_ttl
        self.strict_commands = strict_commands
        self.recommended_shards = recommended_shards
        self.allow_resume = True
        self.application_flags = 0
        self.application_name = bot_name

        self.users: dict[int, dict[str, Any]] = {}
        self.bot_user = self._make_user(self.bot_user_id, bot_name, bot=True)
        self.bot_user.update({"verified": True, "mfa_enabled": False, "email": None, "flags": 0})
        self.owner_user = self.add_user(name="app-owner")
        self.default_user_id = int(self.add_user(name="tester")["id"])

        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self._dm_by_user: dict[int, int] = {}
        self.messages: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        self._message_index: dict[int, dict[str, Any]] = {}
        self.deleted_messages: list[dict[str, Any]] = []
        self.attachments: dict[int, StoredAttachment] = {}
        self.attachment_fetches: Counter[int] = Counter()
        self.attachment_fetch_failures: Counter[int] = Counter()

        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.sync_count = 0
        self.rejected_syncs: list[tuple[int | None, Any, dict[str, Any]]] = []

        self.interactions: dict[int, InteractionRecord] = {}
        self._by_token: dict[str, InteractionRecord] = {}
        self.requests: list[RequestRecord] = []

        self.identify_count = 0
        self.resume_count = 0
        self.heartbeats = 0

        self._change_event = asyncio.Event()
        self.secret = hashlib.sha256(str(self.application_id).encode()).hexdigest()[:16]
        self._token_counter = itertools.count(1)

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._runner: web.AppRunner | None = None
        self._undo_patch: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """The value for ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        """Start serving."""
        app = web.Application(middlewares=[self.http.middleware], client_max_size=256 * 1024 * 1024)
        api = "/api/v{version:\\d+}"
        self.cdn.add_routes(app)
        self.gateway.add_routes(app, api)
        for routes in self._routes:
            routes.add_routes(app, api)
        app.router.add_route("*", "/api/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock)
        await site.start()

    async def stop(self) -> None:
        """Close gateway connections, stop serving and undo :meth:`patch_discord_py`."""
        await self.gateway.close_all(1001, "emulator stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._undo_patch is not None:
            self._undo_patch()
            self._undo_patch = None

    @staticmethod
    async def _not_found(request: web.Request) -> web.Response:
        """Every other ``/api`` route: Discord's plain 404."""
        raise APIError(404, 0, "404: Not Found")

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def patch_discord_py(self) -> Callable[[], None]:
        """Point discord.py's ``Route.BASE`` and ``DEFAULT_GATEWAY`` here; returns an undo."""
        import discord.gateway
        import discord.http
        import yarl

        old_base = discord.http.Route.BASE
        old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        done = False

        def undo() -> None:
            nonlocal done
            if not done:
                done = True
                discord.http.Route.BASE = old_base
                discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

        self._undo_patch = undo
        return undo

    # ------------------------------------------------------------------ waiting

    def notify(self) -> None:
        """Wake every waiter: something in the world changed."""
        self._change_event.set()
        self._change_event = asyncio.Event()

    async def wait_until(
        self,
        check: Callable[[], T | None],
        timeout: float = 10.0,
        *,
        description: str = "condition",
    ) -> T:
        """Wait until ``check()`` returns something truthy (re-checked on every change)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = check()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {description}")
            event = self._change_event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def wait_for_message(
        self,
        channel_id: int | None = None,
        predicate: Callable[[dict[str, Any]], Any] | None = None,
        timeout: float = 10.0,
        *,
        include_ephemeral: bool = True,
    ) -> dict[str, Any]:
        """Return the first stored message (existing or future) matching ``predicate``.

        Without a predicate, "thinking" placeholders of deferred interactions are skipped.
        """

        def check() -> dict[str, Any] | None:
            channels = [channel_id] if channel_id is not None else list(self.messages)
            for cid in channels:
                for msg in self.messages.get(cid, []):
                    if not include_ephemeral and msg["flags"] & EPHEMERAL:
                        continue
                    if predicate is None:
                        if not msg["flags"] & LOADING:
                            return msg
                    elif predicate(msg):
                        return msg
            return None

        return await self.wait_until(check, timeout, description=f"a message in {channel_id}")

    async def wait_for_request(
        self, method: str, path_regex: str, timeout: float = 10.0, *, count: int = 1
    ) -> RequestRecord:
        """Wait until ``count`` requests matched and return the ``count``-th."""
        pattern = re.compile(path_regex)

        def check() -> RequestRecord | None:
            found = self.find_requests(method, pattern)
            return found[count - 1] if len(found) >= count else None

        return await self.wait_until(check, timeout, description=f"{method} {path_regex}")

    def find_requests(
        self, method: str = "*", path_regex: str | re.Pattern[str] = ""
    ) -> list[RequestRecord]:
        """Recorded requests matching method (``*`` = any) and a regex searched in the route."""
        pattern = re.compile(path_regex) if isinstance(path_regex, str) else path_regex
        return [
            r
            for r in self.requests
            if method in ("*", r.method) and (pattern.search(r.route) or pattern.search(r.path))
        ]

    # ------------------------------------------------------------------ extension point

    def followup_created(self, rec: InteractionRecord, message: dict[str, Any]) -> None:
        """Called once a follow-up message of ``rec`` was stored, before the bot gets its answer.

        Nothing happens here; a subclass extends it (the benchmark notes when each result
        arrived).
        """

    # ------------------------------------------------------------------ attachments (the CDN)

    def add_attachment(
        self, data: bytes, filename: str = "image.png", content_type: str | None = "auto"
    ) -> dict[str, Any]:
        """Store bytes as an uploaded attachment and return its Discord attachment object.

        ``content_type="auto"`` sniffs it (Pillow, then the file extension); ``None`` leaves
        the field out (Discord may omit it); any other string is used as given.
        """
        return self.cdn.add(data, filename, content_type)

    def attachment_bytes(self, ref: Mapping[str, Any] | str | int) -> bytes:
        """The bytes of an attachment (dict, URL or id)."""
        return self.cdn.data(ref)

    def expire_attachment(self, ref: Mapping[str, Any] | str | int) -> None:
        """Make every URL issued so far for this attachment answer 404 (CDN expiry)."""
        self.cdn.expire(ref)

    def fresh_attachment(self, ref: Mapping[str, Any] | str | int) -> dict[str, Any]:
        """A new attachment object (fresh signed URLs), like a fresh fetch of the message."""
        return self.cdn.fresh(ref)

    # ------------------------------------------------------------------ faults

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        *,
        code: int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        is_global: bool = False,
        times: int | None = 1,
        process: bool = False,
    ) -> FaultRule:
        """Answer the next ``times`` matching requests with ``status`` (``times=None``: always).

        ``path_regex`` is searched in the path without ``/api/v10`` (e.g. ``r"/webhooks/"``).
        A 429 carries ``retry_after``/``global`` in the body and Discord's rate-limit headers
        (``Via`` included, so discord.py sleeps and retries). With ``process=True`` the request
        is carried out first and the error answered afterwards (a lost response).
        """
        return self.faults.fail_next(
            method,
            path_regex,
            status,
            code=code,
            message=message,
            retry_after=retry_after,
            is_global=is_global,
            times=times,
            process=process,
        )

    def delay(
        self, method: str, path_regex: str, seconds: float, *, times: int | None = None
    ) -> DelayRule:
        """Delay matching requests by ``seconds`` before handling them; the rule returned
        counts the requests it delayed (``hits``, counted as each one arrives)."""
        return self.faults.delay(method, path_regex, seconds, times=times)

    def clear_faults(self) -> None:
        """Drop every fault and delay rule."""
        self.faults.clear()

    # ------------------------------------------------------------------ gateway control

    @property
    def connections(self) -> list[GatewayConnection]:
        """Identified (READY sent), open gateway connections in connection order."""
        return self.gateway.connections

    @property
    def _gateway_connections(self) -> list[GatewayConnection]:
        """Every open websocket, identified or not (tests tell a new connection by it)."""
        return self.gateway.all

    async def wait_connected(
        self, count: int = 1, timeout: float = 10.0
    ) -> list[GatewayConnection]:
        """Wait until ``count`` clients got READY and their GUILD_CREATEs."""
        return await self.gateway.wait_connected(count, timeout)

    async def disconnect_all(self, code: int = 4000, reason: str = "emulated disconnect") -> int:
        """Close every gateway connection with ``code``; returns how many were closed."""
        return await self.gateway.close_all(code, reason)

    def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to every client (they resume)."""
        for conn in self.connections:
            conn.send_op(7, None)

    async def dispatch(
        self,
        event: str,
        data: Any,
        *,
        guild_id: int | None = None,
        to: ToSpec | GatewayConnection = "all",
    ) -> None:
        """Send any dispatch event to gateway clients."""
        await self.gateway.dispatch(event, data, guild_id=guild_id, to=to)

"""A local emulator of Discord's REST API, CDN and Gateway for end-to-end tests.

An unmodified discord.py 2.7 client talks to it once ``discord.http.Route.BASE`` is
``emu.api_base`` and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` is
``yarl.URL(emu.gateway_url)`` (:meth:`DiscordEmulator.patch_discord_py` sets both).
One aiohttp server on 127.0.0.1 (random free port) serves:

* the REST routes a bot needs (users, application, command sync with Discord's
  validation rules, interaction callbacks, interaction webhooks, channel messages, DMs,
  guild look-ups),
* signed, expiring attachment URLs (the CDN),
* the Gateway (HELLO, heartbeats, IDENTIFY -> READY + GUILD_CREATE, RESUME, INTERACTION_CREATE).

Tests drive it through :meth:`DiscordEmulator.invoke_slash`, :meth:`~DiscordEmulator.click_button`,
:meth:`~DiscordEmulator.submit_modal` and friends, and wait for outcomes with
:meth:`InteractionRecord.wait_for` / :meth:`DiscordEmulator.wait_for_message` (event driven,
never fixed sleeps). Faults are injected with :meth:`DiscordEmulator.fail_next` and
:meth:`DiscordEmulator.delay`.

This module does not import discord.py at import time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import io
import itertools
import json
import math
import mimetypes
import re
import socket
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from aiohttp import WSMsgType, web

__all__ = [
    "ALL_PERMISSIONS",
    "EPHEMERAL",
    "LOADING",
    "VALID_LOCALES",
    "APIError",
    "DiscordEmulator",
    "FaultRule",
    "GatewayConnection",
    "Guild",
    "Interaction",
    "InteractionRecord",
    "RequestRecord",
    "UploadedFile",
    "snowflake_time",
    "validate_commands",
]

T = TypeVar("T")

DISCORD_EPOCH_MS = 1_420_070_400_000
EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_EMBEDS = 1 << 2
SUPPRESS_NOTIFICATIONS = 1 << 12
IS_COMPONENTS_V2 = 1 << 15

ADMINISTRATOR = 1 << 3
ALL_PERMISSIONS = (1 << 51) - 1
_ADD_REACTIONS = 1 << 6
_VIEW_CHANNEL = 1 << 10
_SEND_MESSAGES = 1 << 11
_MANAGE_MESSAGES = 1 << 13
_EMBED_LINKS = 1 << 14
_ATTACH_FILES = 1 << 15
_READ_MESSAGE_HISTORY = 1 << 16
_USE_EXTERNAL_EMOJIS = 1 << 18
_USE_APPLICATION_COMMANDS = 1 << 31
_SEND_MESSAGES_IN_THREADS = 1 << 38
EVERYONE_PERMISSIONS = (
    _ADD_REACTIONS
    | _VIEW_CHANNEL
    | _SEND_MESSAGES
    | _EMBED_LINKS
    | _ATTACH_FILES
    | _READ_MESSAGE_HISTORY
    | _USE_EXTERNAL_EMOJIS
    | _USE_APPLICATION_COMMANDS
    | _SEND_MESSAGES_IN_THREADS
)
BOT_PERMISSIONS = EVERYONE_PERMISSIONS | _MANAGE_MESSAGES
DM_APP_PERMISSIONS = EVERYONE_PERMISSIONS

VALID_LOCALES = frozenset(
    {
        "id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu",
        "nl", "no", "pl", "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru",
        "uk", "hi", "th", "zh-CN", "ja", "zh-TW", "ko",
    }
)  # fmt: skip

# Discord: ^[-_\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$ ; Python's \w is Unicode letters/digits/_.
_NAME_RE = re.compile(r"^[-_\w\u0900-\u097F\u0E00-\u0E7F]{1,32}$")
_ATTACHMENT_PATH_RE = re.compile(r"/attachments/(\d+)/")
_API_PREFIX_RE = re.compile(r"^/api(?:/v\d+)?")
_FILES_FIELD_RE = re.compile(r"^files\[(\d+)\]$")
_COMMAND_LIMITS = {1: 100, 2: 15, 3: 15, 4: 1}
_COMMAND_MAX_SIZE = 8000
_CHOICE_TYPES = (3, 4, 10)
_SUBCOMMAND_TYPES = (1, 2)

ToSpec = Literal["all", "first", "last"] | int


def snowflake_time(snowflake: int) -> float:
    """Return the epoch seconds encoded in a Discord snowflake."""
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000.0


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _err(code: str, message: str) -> dict[str, Any]:
    return {"_errors": [{"code": code, "message": message}]}


def _add_error(errors: dict[str, Any], path: Sequence[str], code: str, message: str) -> None:
    node = errors
    for key in path:
        node = node.setdefault(key, {})
    node.setdefault("_errors", []).append({"code": code, "message": message})


class APIError(Exception):
    """An error answer of the emulated API: status, Discord JSON error code and message."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        *,
        errors: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = dict(errors) if errors else None
        self.extra = dict(extra) if extra else {}
        self.headers = dict(headers) if headers else {}

    def body(self) -> dict[str, Any]:
        """The JSON body Discord would send."""
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


def _json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    # discord.py parses JSON only when Content-Type is exactly "application/json".
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        content_type="application/json",
        headers=dict(headers or {}),
    )


@dataclass
class UploadedFile:
    """A file part of a multipart request."""

    field: str
    index: int
    filename: str
    data: bytes
    content_type: str | None

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.data)


@dataclass
class RequestRecord:
    """One HTTP request the emulator answered."""

    method: str
    path: str
    query: dict[str, str]
    time: float
    json: Any = None
    files: list[dict[str, Any]] = field(default_factory=list)
    status: int = 0

    @property
    def route(self) -> str:
        """The path without the ``/api/vN`` prefix."""
        return _API_PREFIX_RE.sub("", self.path) or "/"


_RECORD_KEY: web.RequestKey[RequestRecord] = web.RequestKey("emu_record", RequestRecord)
_BODY_KEY: web.RequestKey[tuple[Any, list[UploadedFile]]] = web.RequestKey("emu_body", tuple)


@dataclass
class FaultRule:
    """A planned error answer; see :meth:`DiscordEmulator.fail_next`."""

    method: str
    pattern: re.Pattern[str]
    status: int
    code: int | None = None
    message: str | None = None
    retry_after: float | None = None
    is_global: bool = False
    times: int | None = 1
    process: bool = False
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether the rule applies to this request (and still has uses left)."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in ("*", method.upper()):
            return False
        route = _API_PREFIX_RE.sub("", path)
        return bool(self.pattern.search(route) or self.pattern.search(path))

    def to_error(self) -> APIError:
        """The APIError this rule answers with."""
        if self.status == 429:
            retry_after = 0.05 if self.retry_after is None else self.retry_after
            headers = {
                "Retry-After": str(max(1, math.ceil(retry_after))),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                "X-RateLimit-Bucket": "emulated-fault",
                "X-RateLimit-Scope": "shared" if not self.is_global else "global",
            }
            if self.is_global:
                headers["X-RateLimit-Global"] = "true"
            return APIError(
                429,
                self.code if self.code is not None else 0,
                self.message or "You are being rate limited.",
                extra={"retry_after": retry_after, "global": self.is_global},
                headers=headers,
            )
        default_messages = {
            400: "Invalid Form Body",
            401: "401: Unauthorized",
            403: "Missing Permissions",
            404: "404: Not Found",
            413: "Request entity too large",
            500: "500: Internal Server Error",
            502: "502: Bad Gateway",
            503: "503: Service Unavailable",
        }
        default_codes = {403: 50013, 413: 40005}
        return APIError(
            self.status,
            self.code if self.code is not None else default_codes.get(self.status, 0),
            self.message or default_messages.get(self.status, f"{self.status}: Error"),
        )


@dataclass
class _DelayRule:
    method: str
    pattern: re.Pattern[str]
    seconds: float
    times: int | None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in ("*", method.upper()):
            return False
        return bool(self.pattern.search(_API_PREFIX_RE.sub("", path)) or self.pattern.search(path))


@dataclass
class _StoredAttachment:
    id: int
    data: bytes
    filename: str
    content_type: str | None
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False
    generation: int = 0


@dataclass
class Guild:
    """A guild of the emulated world. Channels, roles and members are Discord payload dicts."""

    id: int
    name: str
    owner_id: int
    preferred_locale: str = "en-US"
    premium_tier: int = 0
    upload_limit: int | None = None
    features: list[str] = field(default_factory=list)
    roles: dict[int, dict[str, Any]] = field(default_factory=dict)
    channels: dict[int, dict[str, Any]] = field(default_factory=dict)
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    member_permissions: dict[int, int] = field(default_factory=dict)
    joined_at: str = field(default_factory=_now_iso)

    def to_rest(self) -> dict[str, Any]:
        """The guild object of ``GET /guilds/{id}``."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [copy.deepcopy(r) for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "features": list(self.features),
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "vanity_url_code": None,
            "premium_tier": self.premium_tier,
            "premium_subscription_count": 0,
            "preferred_locale": self.preferred_locale,
            "public_updates_channel_id": None,
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "max_members": 500000,
            "max_video_channel_users": 25,
        }

    def to_gateway(self) -> dict[str, Any]:
        """The GUILD_CREATE payload."""
        data = self.to_rest()
        data.update(
            {
                "joined_at": self.joined_at,
                "large": False,
                "unavailable": False,
                "member_count": len(self.members),
                "voice_states": [],
                "members": [copy.deepcopy(m) for m in self.members.values()],
                "channels": [copy.deepcopy(c) for c in self.channels.values()],
                "threads": [],
                "presences": [],
                "stage_instances": [],
                "guild_scheduled_events": [],
                "soundboard_sounds": [],
            }
        )
        return data


class InteractionRecord:
    """What happened to one interaction the emulator sent.

    ``responses`` are the callback bodies received (without file bytes), ``followups`` the
    message dicts created through the interaction webhook, ``original`` the live
    ``@original`` message dict (after a type 4/5 callback, or the component's message after a
    type 6/7 callback), ``edits`` the PATCH bodies sent to ``@original`` and ``rejected`` every
    request of this interaction the emulator refused (``{"route", "status", "code"}``).
    """

    def __init__(self, emulator: DiscordEmulator, payload: dict[str, Any]) -> None:
        self._emu = emulator
        self.payload = payload
        self.id: int = int(payload["id"])
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        self.guild_id: int | None = int(payload["guild_id"]) if payload.get("guild_id") else None
        self.channel_id: int = int(payload["channel_id"])
        user = payload["member"]["user"] if "member" in payload else payload["user"]
        self.user_id: int = int(user["id"])
        self.attachment_size_limit: int = payload["attachment_size_limit"]
        self.message_id: int | None = (
            int(payload["message"]["id"]) if "message" in payload else None
        )
        self.created_at = time.monotonic()
        self.responses: list[dict[str, Any]] = []
        self.followups: list[dict[str, Any]] = []
        self.original: dict[str, Any] | None = None
        self.original_deleted = False
        self.edits: list[dict[str, Any]] = []
        self.message_edits: list[tuple[int, dict[str, Any]]] = []
        self.rejected: list[dict[str, Any]] = []
        self.modal: dict[str, Any] | None = None
        self.autocomplete_choices: list[dict[str, Any]] | None = None
        self.delivered_to: list[int] = []
        self.token_revoked = False

    def __repr__(self) -> str:
        return (
            f"<InteractionRecord id={self.id} type={self.type} responses={len(self.responses)} "
            f"followups={len(self.followups)} rejected={len(self.rejected)}>"
        )

    @property
    def data(self) -> dict[str, Any]:
        """The interaction's ``data`` object."""
        return self.payload["data"]

    @property
    def acknowledged(self) -> bool:
        """Whether a callback was accepted."""
        return bool(self.responses)

    @property
    def response_type(self) -> int | None:
        """The type of the accepted callback (4, 5, 6, 7, 8 or 9), if any."""
        return self.responses[0]["type"] if self.responses else None

    @property
    def deferred(self) -> bool:
        """Whether the interaction was acknowledged with a defer (type 5 or 6)."""
        return self.response_type in (5, 6)

    @property
    def ephemeral(self) -> bool:
        """Whether the first response carried the ephemeral flag (1 << 6)."""
        if not self.responses:
            return False
        data = self.responses[0].get("data") or {}
        return bool(int(data.get("flags") or 0) & EPHEMERAL)

    def token_expired(self) -> bool:
        """Whether the interaction token no longer works for webhook calls."""
        if self.token_revoked:
            return True
        ttl = self._emu.token_ttl
        return ttl is not None and time.monotonic() - self.created_at > ttl

    def messages(self) -> list[dict[str, Any]]:
        """The original response (if a message) followed by the followups, without duplicates."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for msg in ([self.original] if self.original is not None else []) + self.followups:
            if msg["id"] not in seen:
                seen.add(msg["id"])
                out.append(msg)
        return out

    async def wait_for(
        self, predicate: Callable[[InteractionRecord], Any], timeout: float = 5.0
    ) -> InteractionRecord:
        """Wait until ``predicate(self)`` is true; re-checked on every emulator change."""
        await self._emu.wait_until(lambda: predicate(self), timeout, description=f"{self!r}")
        return self

    async def wait_response(self, timeout: float = 5.0) -> dict[str, Any]:
        """Wait for the first accepted callback body and return it."""
        await self.wait_for(lambda r: r.responses, timeout)
        return self.responses[0]

    async def wait_followup(self, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until ``count`` followups exist and return the ``count``-th."""
        await self.wait_for(lambda r: len(r.followups) >= count, timeout)
        return self.followups[count - 1]

    async def wait_rejected(self, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until a request of this interaction was refused and return the first refusal."""
        await self.wait_for(lambda r: r.rejected, timeout)
        return self.rejected[0]


Interaction = InteractionRecord


@dataclass
class _Session:
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
        self.session: _Session | None = None
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


class DiscordEmulator:
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
        self.attachments: dict[int, _StoredAttachment] = {}
        self.attachment_fetches: Counter[int] = Counter()
        self.attachment_fetch_failures: Counter[int] = Counter()

        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.sync_count = 0
        self.rejected_syncs: list[tuple[int | None, Any, dict[str, Any]]] = []

        self.interactions: dict[int, InteractionRecord] = {}
        self._by_token: dict[str, InteractionRecord] = {}
        self.requests: list[RequestRecord] = []
        self._faults: list[FaultRule] = []
        self._delays: list[_DelayRule] = []

        self._gateway_connections: list[GatewayConnection] = []
        self._sessions: dict[str, _Session] = {}
        self._conn_numbers = itertools.count()
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeats = 0

        self._change_event = asyncio.Event()
        self._secret = hashlib.sha256(str(self.application_id).encode()).hexdigest()[:16]
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
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock)
        await site.start()

    async def stop(self) -> None:
        """Close gateway connections, stop serving and undo :meth:`patch_discord_py`."""
        for conn in list(self._gateway_connections):
            with contextlib.suppress(Exception):
                await conn.close(1001, "emulator stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._undo_patch is not None:
            self._undo_patch()
            self._undo_patch = None

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

    def _notify(self) -> None:
        self._change_event.set()
        self._change_event = asyncio.Event()

    async def wait_until(
        self, check: Callable[[], T], timeout: float = 10.0, *, description: str = "condition"
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

    # ------------------------------------------------------------------ ids and users

    def snowflake(self) -> int:
        """A new, strictly increasing, timestamp-based snowflake."""
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        candidate = (ms << 22) | (1 << 17)
        if candidate <= self._snowflake_last:
            candidate = self._snowflake_last + 1
        self._snowflake_last = candidate
        return candidate

    def _make_user(self, user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
        user = {
            "id": str(user_id),
            "username": name,
            "global_name": None if bot else name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
            "system": False,
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
        }
        self.users[user_id] = user
        return user

    def add_user(
        self, user_id: int | None = None, *, name: str | None = None, bot: bool = False
    ) -> dict[str, Any]:
        """Create (or return) a user payload."""
        uid = user_id or self.snowflake()
        if uid in self.users:
            return self.users[uid]
        return self._make_user(uid, name or f"user{uid % 10000}", bot=bot)

    # ------------------------------------------------------------------ world model

    def _connections_for(self, guild_id: int | None) -> list[GatewayConnection]:
        return [c for c in self.connections if c.handles_guild(guild_id)]

    def add_guild(
        self,
        guild_id: int | None = None,
        *,
        name: str = "Test Guild",
        owner_id: int | None = None,
        preferred_locale: str = "en-US",
        bot_permissions: int = BOT_PERMISSIONS,
        everyone_permissions: int = EVERYONE_PERMISSIONS,
        premium_tier: int = 0,
        upload_limit: int | None = None,
    ) -> Guild:
        """Add a guild the bot is in (dispatches GUILD_CREATE to connected clients)."""
        gid = guild_id or self.snowflake()
        owner = int(self.add_user(owner_id, name="guild-owner")["id"])
        guild = Guild(
            id=gid,
            name=name,
            owner_id=owner,
            preferred_locale=preferred_locale,
            premium_tier=premium_tier,
            upload_limit=upload_limit,
        )
        self.guilds[gid] = guild
        guild.roles[gid] = self._role_payload(gid, "@everyone", everyone_permissions, position=0)
        bot_role = self._role_payload(
            self.snowflake(), self.bot_user["username"], bot_permissions, position=1
        )
        bot_role["managed"] = True
        bot_role["tags"] = {"bot_id": str(self.bot_user_id)}
        guild.roles[int(bot_role["id"])] = bot_role
        guild.members[self.bot_user_id] = self._member_payload(self.bot_user, [int(bot_role["id"])])
        guild.members[owner] = self._member_payload(self.users[owner], [])
        for conn in self._connections_for(gid):
            conn.dispatch("GUILD_CREATE", guild.to_gateway())
        self._notify()
        return guild

    @staticmethod
    def _role_payload(
        role_id: int, name: str, permissions: int, *, position: int
    ) -> dict[str, Any]:
        return {
            "id": str(role_id),
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": position,
            "permissions": str(permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    @staticmethod
    def _member_payload(
        user: dict[str, Any], roles: Iterable[int], nick: str | None = None
    ) -> dict[str, Any]:
        return {
            "user": copy.deepcopy(user),
            "nick": nick,
            "avatar": None,
            "banner": None,
            "roles": [str(r) for r in roles],
            "joined_at": _now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }

    def _guild(self, guild_id: int) -> Guild:
        try:
            return self.guilds[int(guild_id)]
        except KeyError:
            raise LookupError(f"unknown guild {guild_id}") from None

    def add_role(
        self, guild_id: int, name: str, permissions: int = 0, *, role_id: int | None = None
    ) -> dict[str, Any]:
        """Add a role (dispatches GUILD_ROLE_CREATE)."""
        guild = self._guild(guild_id)
        role = self._role_payload(
            role_id or self.snowflake(), name, permissions, position=len(guild.roles)
        )
        guild.roles[int(role["id"])] = role
        for conn in self._connections_for(guild.id):
            conn.dispatch(
                "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": copy.deepcopy(role)}
            )
        self._notify()
        return role

    def add_channel(
        self,
        guild_id: int,
        *,
        name: str = "general",
        nsfw: bool = False,
        channel_id: int | None = None,
        channel_type: int = 0,
        topic: str | None = None,
    ) -> dict[str, Any]:
        """Add a text channel (dispatches CHANNEL_CREATE); returns the channel dict."""
        guild = self._guild(guild_id)
        cid = channel_id or self.snowflake()
        channel = {
            "id": str(cid),
            "type": channel_type,
            "guild_id": str(guild.id),
            "name": name,
            "position": len(guild.channels),
            "permission_overwrites": [],
            "nsfw": nsfw,
            "topic": topic,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }
        guild.channels[cid] = channel
        self.channels[cid] = channel
        for conn in self._connections_for(guild.id):
            conn.dispatch("CHANNEL_CREATE", copy.deepcopy(channel))
        self._notify()
        return channel

    def add_member(
        self,
        guild_id: int,
        user_id: int | None = None,
        *,
        name: str | None = None,
        permissions: int = 0,
        roles: Iterable[int | str] = (),
        nick: str | None = None,
        bot: bool = False,
    ) -> dict[str, Any]:
        """Add a member. ``permissions`` are extra bits on top of @everyone and ``roles``.

        ``roles`` are role ids or role names (unknown names are created with no permissions).
        Dispatches GUILD_MEMBER_ADD. Returns the member dict (with ``user``).
        """
        guild = self._guild(guild_id)
        user = self.add_user(user_id, name=name, bot=bot)
        uid = int(user["id"])
        role_ids: list[int] = []
        for role in roles:
            if isinstance(role, int):
                if role not in guild.roles:
                    raise LookupError(f"unknown role id {role}")
                role_ids.append(role)
            else:
                found = next((r for r in guild.roles.values() if r["name"] == role), None)
                found = found or self.add_role(guild.id, role, 0)
                role_ids.append(int(found["id"]))
        member = self._member_payload(user, role_ids, nick)
        guild.members[uid] = member
        if permissions:
            guild.member_permissions[uid] = permissions
        for conn in self._connections_for(guild.id):
            conn.dispatch("GUILD_MEMBER_ADD", {**copy.deepcopy(member), "guild_id": str(guild.id)})
        self._notify()
        return member

    def _ensure_member(self, guild: Guild, user_id: int) -> dict[str, Any]:
        if user_id not in guild.members:
            user = self.add_user(user_id)
            guild.members[user_id] = self._member_payload(user, [])
        return guild.members[user_id]

    def member_permissions(self, guild_id: int, user_id: int) -> int:
        """Guild-level permissions of a member (owner and ADMINISTRATOR get everything)."""
        guild = self._guild(guild_id)
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        perms = int(guild.roles[guild.id]["permissions"])
        member = guild.members.get(user_id)
        if member is not None:
            for rid in member["roles"]:
                role = guild.roles.get(int(rid))
                if role is not None:
                    perms |= int(role["permissions"])
        perms |= guild.member_permissions.get(user_id, 0)
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def dm_channel(self, user_id: int) -> dict[str, Any]:
        """The DM channel between the bot and a user (created on first use)."""
        if user_id in self._dm_by_user:
            return self.channels[self._dm_by_user[user_id]]
        user = self.add_user(user_id)
        cid = self.snowflake()
        channel = {
            "id": str(cid),
            "type": 1,
            "recipients": [copy.deepcopy(user)],
            "last_message_id": None,
            "flags": 0,
        }
        self.channels[cid] = channel
        self._dm_by_user[user_id] = cid
        return channel

    def _channel(self, channel_id: int) -> dict[str, Any]:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise APIError(404, 10003, "Unknown Channel")
        return channel

    def _guild_of_channel(self, channel_id: int) -> Guild | None:
        channel = self.channels.get(int(channel_id))
        if channel is None or not channel.get("guild_id"):
            return None
        return self.guilds.get(int(channel["guild_id"]))

    def guild_upload_limit(self, guild_id: int | None) -> int:
        """Upload limit for a guild (its own, or by boost tier, or ``emu.upload_limit``)."""
        if guild_id is None:
            return self.upload_limit
        guild = self.guilds.get(guild_id)
        if guild is None:
            return self.upload_limit
        if guild.upload_limit is not None:
            return guild.upload_limit
        tiers = {2: 50 * 1024 * 1024, 3: 100 * 1024 * 1024}
        return max(self.upload_limit, tiers.get(guild.premium_tier, 0))

    # ------------------------------------------------------------------ attachments

    def _sign(self, att: _StoredAttachment) -> str:
        issued = int(time.time())
        expires = issued + max(1, int(math.ceil(self.attachment_ttl)))
        digest = hashlib.sha256(
            f"{self._secret}:{att.id}:{att.generation}:{expires:x}:{issued:x}".encode()
        ).hexdigest()
        return f"ex={expires:x}&is={issued:x}&hm={digest}&"

    def _url_valid(self, att: _StoredAttachment, query: Mapping[str, str]) -> bool:
        try:
            expires = int(query["ex"], 16)
            issued = int(query["is"], 16)
            digest = query["hm"]
        except (KeyError, ValueError):
            return False
        expected = hashlib.sha256(
            f"{self._secret}:{att.id}:{att.generation}:{expires:x}:{issued:x}".encode()
        ).hexdigest()
        return digest == expected and time.time() <= expires

    def _attachment_payload(self, att: _StoredAttachment) -> dict[str, Any]:
        query = self._sign(att)
        name = quote(att.filename)
        payload: dict[str, Any] = {
            "id": str(att.id),
            "filename": att.filename,
            "size": len(att.data),
            "url": f"{self.base_url}/attachments/{att.id}/{name}?{query}",
            "proxy_url": f"{self.base_url}/proxy/attachments/{att.id}/{name}?{query}",
            "flags": 0,
        }
        if att.content_type is not None:
            payload["content_type"] = att.content_type
        if att.width is not None:
            payload["width"] = att.width
            payload["height"] = att.height
        if att.description is not None:
            payload["description"] = att.description
        if att.ephemeral:
            payload["ephemeral"] = True
        return payload

    def _store_attachment(
        self,
        data: bytes,
        filename: str,
        content_type: str | None,
        *,
        sniff: bool,
        description: str | None = None,
        ephemeral: bool = False,
    ) -> _StoredAttachment:
        info = _image_info(data)
        if sniff:
            if info is not None and info[2]:
                content_type = info[2]
            elif content_type in (None, "", "application/octet-stream"):
                content_type = mimetypes.guess_type(filename)[0] or content_type or None
        att = _StoredAttachment(
            id=self.snowflake(),
            data=bytes(data),
            filename=filename.replace(" ", "_") or "unknown",
            content_type=content_type,
            width=info[0] if info else None,
            height=info[1] if info else None,
            description=description,
            ephemeral=ephemeral,
        )
        self.attachments[att.id] = att
        return att

    def add_attachment(
        self, data: bytes, filename: str = "image.png", content_type: str | None = "auto"
    ) -> dict[str, Any]:
        """Store bytes as an uploaded attachment and return its Discord attachment object.

        ``content_type="auto"`` sniffs it (Pillow, then the file extension); ``None`` leaves
        the field out (Discord may omit it); any other string is used as given.
        """
        sniff = content_type == "auto"
        att = self._store_attachment(data, filename, None if sniff else content_type, sniff=sniff)
        return self._attachment_payload(att)

    def _attachment_id(self, ref: Any) -> int:
        if isinstance(ref, Mapping):
            return int(ref["id"])
        if isinstance(ref, str):
            match = _ATTACHMENT_PATH_RE.search(ref)
            if match is None:
                raise LookupError(f"not an emulator attachment URL: {ref}")
            return int(match.group(1))
        return int(ref)

    def attachment_bytes(self, ref: Mapping[str, Any] | str | int) -> bytes:
        """The bytes of an attachment (dict, URL or id)."""
        return self.attachments[self._attachment_id(ref)].data

    def expire_attachment(self, ref: Mapping[str, Any] | str | int) -> None:
        """Make every URL issued so far for this attachment answer 404 (CDN expiry)."""
        self.attachments[self._attachment_id(ref)].generation += 1

    def fresh_attachment(self, ref: Mapping[str, Any] | str | int) -> dict[str, Any]:
        """A new attachment object (fresh signed URLs), like a fresh fetch of the message."""
        return self._attachment_payload(self.attachments[self._attachment_id(ref)])

    def _refresh_message_urls(self, message: dict[str, Any]) -> None:
        for i, att in enumerate(message.get("attachments", [])):
            stored = self.attachments.get(int(att["id"]))
            if stored is not None:
                message["attachments"][i] = self._attachment_payload(stored)

    # ------------------------------------------------------------------ messages

    def _message_dict(self, ref: Mapping[str, Any] | int | str) -> dict[str, Any]:
        mid = int(ref["id"]) if isinstance(ref, Mapping) else int(ref)
        msg = self._message_index.get(mid)
        if msg is None:
            raise LookupError(f"unknown message {mid}")
        return msg

    def public_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """Messages everyone in the channel can see (no ephemeral ones), oldest first."""
        return [m for m in self.messages.get(int(channel_id), []) if not m["flags"] & EPHEMERAL]

    def all_messages(self) -> list[dict[str, Any]]:
        """Every stored message of every channel."""
        return [m for msgs in self.messages.values() for m in msgs]

    def _make_message(
        self,
        channel_id: int,
        *,
        author: dict[str, Any],
        content: str = "",
        embeds: Sequence[dict[str, Any]] = (),
        components: Sequence[dict[str, Any]] = (),
        attachments: Sequence[dict[str, Any]] = (),
        flags: int = 0,
        msg_type: int = 0,
        interaction: InteractionRecord | None = None,
        message_reference: dict[str, Any] | None = None,
        tts: bool = False,
    ) -> dict[str, Any]:
        channel = self._channel(channel_id)
        mid = self.snowflake()
        msg: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "author": copy.deepcopy(author),
            "content": content,
            "timestamp": _now_iso(),
            "edited_timestamp": None,
            "tts": tts,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": list(attachments),
            "embeds": _resolve_embeds(embeds, attachments),
            "reactions": [],
            "pinned": False,
            "type": msg_type,
            "flags": flags,
            "components": copy.deepcopy(list(components)),
        }
        if channel.get("guild_id"):
            msg["guild_id"] = channel["guild_id"]
        if interaction is not None:
            msg["webhook_id"] = str(self.application_id)
            msg["application_id"] = str(self.application_id)
            user = copy.deepcopy(self.users[interaction.user_id])
            msg["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": user,
                "authorizing_integration_owners": interaction.payload.get(
                    "authorizing_integration_owners", {}
                ),
            }
            if interaction.type == 2:
                msg["interaction"] = {
                    "id": str(interaction.id),
                    "type": 2,
                    "name": interaction.data.get("name", ""),
                    "user": user,
                }
        if message_reference is not None:
            msg["message_reference"] = message_reference
            ref = self._message_index.get(int(message_reference.get("message_id", 0) or 0))
            msg["referenced_message"] = copy.deepcopy(ref) if ref else None
        self.messages[int(channel_id)].append(msg)
        self._message_index[mid] = msg
        if not flags & EPHEMERAL:
            channel["last_message_id"] = str(mid)
        self._notify()
        return msg

    def add_message(
        self,
        channel_id: int,
        content: str = "",
        *,
        author_id: int | None = None,
        attachments: Sequence[Mapping[str, Any] | bytes | tuple[Any, ...]] = (),
        embeds: Sequence[dict[str, Any]] = (),
        dispatch: bool = False,
    ) -> dict[str, Any]:
        """Store a message posted by a user (default: the default test user).

        ``attachments`` are attachment dicts (:meth:`add_attachment`), bytes, or
        ``(bytes, filename[, content_type])`` tuples. ``dispatch`` sends MESSAGE_CREATE.
        """
        author = self.add_user(author_id or self.default_user_id)
        atts = [self._coerce_attachment(a, "file") for a in attachments]
        msg = self._make_message(
            channel_id, author=author, content=content, embeds=embeds, attachments=atts
        )
        if dispatch:
            guild = self._guild_of_channel(channel_id)
            for conn in self._connections_for(guild.id if guild else None):
                conn.dispatch("MESSAGE_CREATE", copy.deepcopy(msg))
        return msg

    def _coerce_attachment(self, value: Any, default_name: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            info = _image_info(data)
            ext = mimetypes.guess_extension(info[2]) if info and info[2] else None
            return self.add_attachment(data, f"{default_name}{ext or '.bin'}", "auto")
        if isinstance(value, tuple) and value and isinstance(value[0], bytes | bytearray):
            data, filename, *rest = value
            return self.add_attachment(bytes(data), filename, rest[0] if rest else "auto")
        raise TypeError(f"cannot use {type(value).__name__} as an attachment")

    def _delete_message(self, msg: dict[str, Any]) -> None:
        cid = int(msg["channel_id"])
        with contextlib.suppress(ValueError):
            self.messages[cid].remove(msg)
        self._message_index.pop(int(msg["id"]), None)
        self.deleted_messages.append(msg)
        self._notify()

    def _uploaded_attachments(
        self,
        body: Mapping[str, Any],
        files: Sequence[UploadedFile],
        *,
        ephemeral: bool,
        existing: Sequence[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        listed = body.get("attachments")
        keep: list[dict[str, Any]] = []
        meta: dict[str, Mapping[str, Any]] = {}
        if listed is not None:
            existing_by_id = {str(a["id"]): a for a in existing or []}
            for entry in listed:
                key = str(entry.get("id"))
                if key in existing_by_id:
                    keep.append(existing_by_id[key])
                else:
                    meta[key] = entry
        else:
            keep = list(existing or [])
        new: list[dict[str, Any]] = []
        for up in files:
            entry = meta.get(str(up.index), {})
            att = self._store_attachment(
                up.data,
                str(entry.get("filename") or up.filename),
                up.content_type,
                sniff=True,
                description=entry.get("description"),
                ephemeral=ephemeral,
            )
            new.append(self._attachment_payload(att))
        return keep + new

    def _create_from_body(
        self,
        channel_id: int,
        body: Mapping[str, Any],
        files: Sequence[UploadedFile],
        *,
        flags: int,
        msg_type: int = 0,
        interaction: InteractionRecord | None = None,
        message_reference: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        attachments = self._uploaded_attachments(body, files, ephemeral=bool(flags & EPHEMERAL))
        return self._make_message(
            channel_id,
            author=self.bot_user,
            content=str(body.get("content") or ""),
            embeds=body.get("embeds") or [],
            components=body.get("components") or [],
            attachments=attachments,
            flags=flags,
            msg_type=msg_type,
            interaction=interaction,
            message_reference=message_reference,
            tts=bool(body.get("tts")),
        )

    def _edit_from_body(
        self, msg: dict[str, Any], body: Mapping[str, Any], files: Sequence[UploadedFile]
    ) -> None:
        if "content" in body:
            msg["content"] = str(body["content"] or "")
        if "components" in body:
            msg["components"] = copy.deepcopy(body["components"] or [])
        if "attachments" in body or files:
            msg["attachments"] = self._uploaded_attachments(
                body, files, ephemeral=bool(msg["flags"] & EPHEMERAL), existing=msg["attachments"]
            )
        if "embeds" in body:
            msg["embeds"] = _resolve_embeds(body["embeds"] or [], msg["attachments"])
        if body.get("flags") is not None:
            keep = msg["flags"] & ~(SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
            msg["flags"] = keep | (int(body["flags"]) & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2))
        msg["flags"] &= ~LOADING
        msg["edited_timestamp"] = _now_iso()
        self._notify()

    def _check_upload(self, files: Sequence[UploadedFile], limit: int) -> None:
        for up in files:
            if up.size > limit:
                raise APIError(413, 40005, "Request entity too large")

    # ------------------------------------------------------------------ commands

    @property
    def synced_commands(self) -> dict[int | None, list[dict[str, Any]]]:
        """Synced commands: key ``None`` for global, a guild id for guild commands."""
        out: dict[int | None, list[dict[str, Any]]] = {None: self.global_commands}
        out.update(self.guild_commands)
        return out

    def register_commands(
        self, commands: list[dict[str, Any]], guild_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Install a command payload as a bulk PUT would (validated; raises APIError)."""
        errors = validate_commands(commands)
        if errors:
            self.rejected_syncs.append((guild_id, copy.deepcopy(commands), errors))
            raise APIError(400, 50035, "Invalid Form Body", errors=errors)
        return self._store_commands(commands, guild_id)

    def _store_commands(
        self, commands: list[dict[str, Any]], guild_id: int | None
    ) -> list[dict[str, Any]]:
        existing = (
            self.global_commands if guild_id is None else self.guild_commands.get(guild_id, [])
        )
        ids = {(c["type"], c["name"]): c["id"] for c in existing}
        stored: list[dict[str, Any]] = []
        for raw in commands:
            stored.append(
                self._normalize_command(raw, guild_id, ids.get((raw.get("type", 1), raw["name"])))
            )
        if guild_id is None:
            self.global_commands = stored
        else:
            self.guild_commands[guild_id] = stored
        self.sync_count += 1
        self._notify()
        return copy.deepcopy(stored)

    def _normalize_command(
        self, raw: Mapping[str, Any], guild_id: int | None, cid: str | None
    ) -> dict[str, Any]:
        cmd = copy.deepcopy(dict(raw))
        cmd["id"] = cid or str(self.snowflake())
        cmd["application_id"] = str(self.application_id)
        cmd["version"] = str(self.snowflake())
        cmd.setdefault("type", 1)
        cmd.setdefault("description", "")
        cmd.setdefault("default_member_permissions", None)
        if isinstance(cmd["default_member_permissions"], int):  # Discord answers with a string
            cmd["default_member_permissions"] = str(cmd["default_member_permissions"])
        cmd.setdefault("nsfw", False)
        if cmd["type"] == 1:
            cmd.setdefault("options", [])
        if guild_id is not None:
            cmd["guild_id"] = str(guild_id)
        else:
            cmd.setdefault("contexts", None)
            cmd.setdefault("integration_types", [0])
        return cmd

    def find_command(
        self, name: str, command_type: int = 1, guild_id: int | None = None
    ) -> dict[str, Any] | None:
        """A synced command by name and type, guild commands first."""
        scopes = ([self.guild_commands.get(guild_id, [])] if guild_id is not None else []) + [
            self.global_commands
        ]
        for scope in scopes:
            for cmd in scope:
                if cmd["name"] == name and cmd.get("type", 1) == command_type:
                    return cmd
        return None

    def _require_command(
        self, name: str, command_type: int, guild_id: int | None
    ) -> dict[str, Any] | None:
        cmd = self.find_command(name, command_type, guild_id)
        if cmd is None and self.strict_commands:
            known = sorted({c["name"] for scope in self.synced_commands.values() for c in scope})
            raise LookupError(
                f"command {name!r} (type {command_type}) was not synced; synced: {known}. "
                "Sync the tree, call emu.register_commands(), or set emu.strict_commands = False."
            )
        return cmd

    # ------------------------------------------------------------------ interactions

    def _resolve_location(
        self, guild_id: int | None, channel_id: int | None, dm: bool
    ) -> tuple[int | None, int | None]:
        if dm:
            return None, channel_id
        if channel_id is not None:
            channel = self._channel_or_lookup(channel_id)
            return (int(channel["guild_id"]) if channel.get("guild_id") else None), int(channel_id)
        if guild_id is None:
            if len(self.guilds) == 1:
                guild_id = next(iter(self.guilds))
            elif not self.guilds:
                return None, None
            else:
                raise ValueError("several guilds exist: pass guild_id or channel_id")
        guild = self._guild(guild_id)
        text = [cid for cid, c in guild.channels.items() if c["type"] == 0]
        if not text:
            raise ValueError(f"guild {guild_id} has no text channel: add_channel() first")
        return guild_id, text[0]

    def _channel_or_lookup(self, channel_id: int) -> dict[str, Any]:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise LookupError(f"unknown channel {channel_id}")
        return channel

    def channel_permissions(
        self, guild_id: int, user_id: int, channel_id: int | None = None
    ) -> int:
        """Permissions of a member in a channel: guild permissions, then the channel's
        overwrites in Discord's order (@everyone, the member's roles together, the member)."""
        perms = self.member_permissions(guild_id, user_id)
        if perms & ADMINISTRATOR or channel_id is None:
            return perms
        guild = self._guild(guild_id)
        channel = guild.channels.get(int(channel_id))
        if channel is None:
            return perms
        overwrites = {int(o["id"]): o for o in channel.get("permission_overwrites") or []}
        everyone = overwrites.get(guild.id)
        if everyone is not None:
            perms = (perms & ~int(everyone["deny"])) | int(everyone["allow"])
        member = guild.members.get(user_id)
        role_ids = {int(r) for r in (member or {}).get("roles", [])}
        allow = deny = 0
        for oid, o in overwrites.items():
            if o["type"] == 0 and oid in role_ids:
                allow |= int(o["allow"])
                deny |= int(o["deny"])
        perms = (perms & ~deny) | allow
        own = overwrites.get(user_id)
        if own is not None and own["type"] == 1:
            perms = (perms & ~int(own["deny"])) | int(own["allow"])
        return perms

    def set_overwrite(
        self, channel_id: int, target_id: int, *, allow: int = 0, deny: int = 0,
        member: bool = False,
    ) -> dict[str, Any]:
        """Set a channel's permission overwrite for a role (or, with ``member``, a member);
        dispatches CHANNEL_UPDATE. Returns the channel dict."""
        channel = self._channel(channel_id)
        guild = self._guild_of_channel(channel_id)
        if guild is None:
            raise LookupError(f"channel {channel_id} is not in a guild")
        overwrite = {
            "id": str(target_id), "type": 1 if member else 0, "allow": str(allow), "deny": str(deny),
        }
        channel["permission_overwrites"] = [
            o for o in channel.get("permission_overwrites") or [] if int(o["id"]) != target_id
        ] + [overwrite]
        for conn in self._connections_for(guild.id):
            conn.dispatch("CHANNEL_UPDATE", copy.deepcopy(channel))
        self._notify()
        return channel

    def _interaction_payload(
        self,
        itype: int,
        data: dict[str, Any],
        *,
        user_id: int | None,
        guild_id: int | None,
        channel_id: int | None,
        locale: str,
        attachment_size_limit: int | None,
        app_permissions: int | None,
        message: dict[str, Any] | None = None,
    ) -> InteractionRecord:
        uid = user_id or self.default_user_id
        user = self.add_user(uid)
        iid = self.snowflake()
        raw_token = f"interaction:{iid}:emulated-{next(self._token_counter)}"
        token = base64.urlsafe_b64encode(raw_token.encode()).decode().rstrip("=")
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": itype,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": attachment_size_limit or self.guild_upload_limit(guild_id),
        }
        if guild_id is not None:
            guild = self._guild(guild_id)
            if channel_id is None:
                raise ValueError("channel_id is required")
            member = self._ensure_member(guild, uid)
            perms = self.channel_permissions(guild.id, uid, channel_id)
            bot_perms = self.channel_permissions(guild.id, self.bot_user_id, channel_id)
            channel = copy.deepcopy(self._channel_or_lookup(channel_id))
            channel["permissions"] = str(perms)
            payload.update(
                {
                    "guild_id": str(guild.id),
                    "guild": {
                        "id": str(guild.id),
                        "locale": guild.preferred_locale,
                        "features": list(guild.features),
                    },
                    "guild_locale": guild.preferred_locale,
                    "channel_id": str(channel_id),
                    "channel": channel,
                    "member": {**copy.deepcopy(member), "permissions": str(perms)},
                    "app_permissions": str(
                        app_permissions if app_permissions is not None else bot_perms
                    ),
                    "authorizing_integration_owners": {"0": str(guild.id)},
                    "context": 0,
                }
            )
        else:
            dm = self.dm_channel(uid)
            if channel_id is not None and int(channel_id) != int(dm["id"]):
                dm = self._channel_or_lookup(channel_id)
            payload.update(
                {
                    "channel_id": dm["id"],
                    "channel": copy.deepcopy(dm),
                    "user": copy.deepcopy(user),
                    "app_permissions": str(
                        app_permissions if app_permissions is not None else DM_APP_PERMISSIONS
                    ),
                    "authorizing_integration_owners": {"0": "0"},
                    "context": 1,
                }
            )
        if message is not None:
            payload["message"] = copy.deepcopy(message)
        rec = InteractionRecord(self, payload)
        self.interactions[iid] = rec
        self._by_token[token] = rec
        return rec

    async def _deliver(
        self, rec: InteractionRecord, to: ToSpec | GatewayConnection, timeout: float
    ) -> InteractionRecord:
        if not self.connections:
            await self.wait_connected(1, timeout)
        conns = self._select(to, rec.guild_id)
        if not conns:
            raise RuntimeError(f"no connected gateway client handles guild {rec.guild_id}")
        for conn in conns:
            conn.dispatch("INTERACTION_CREATE", copy.deepcopy(rec.payload))
            rec.delivered_to.append(conn.number)
        await asyncio.gather(*(c.flush(timeout) for c in conns))
        self._notify()
        return rec

    def _select(
        self, to: ToSpec | GatewayConnection, guild_id: int | None
    ) -> list[GatewayConnection]:
        if isinstance(to, GatewayConnection):
            return [to]
        conns = self._connections_for(guild_id)
        if to == "all":
            return conns
        if to == "first":
            return conns[:1]
        if to == "last":
            return conns[-1:]
        if isinstance(to, int):
            return [conns[to]]
        raise ValueError(f"bad 'to': {to!r}")

    async def invoke_slash(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user_id: int | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        attachments: Mapping[str, Any] | None = None,
        subcommand: Sequence[str] = (),
        locale: str = "en-US",
        attachment_size_limit: int | None = None,
        app_permissions: int | None = None,
        dm: bool = False,
        to: ToSpec | GatewayConnection = "all",
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """Send a CHAT_INPUT INTERACTION_CREATE as a user running ``/name``.

        ``name`` may hold the subcommand path (``"kontext-admin grant"``) or pass it as
        ``subcommand=("grant",)``. ``options`` map option names to values; attachment options
        take bytes, ``(bytes, filename[, content_type])`` or an :meth:`add_attachment` dict
        (also accepted in ``attachments``). Option types and the command id come from the
        synced commands. Without ``guild_id``/``channel_id`` the only guild and its first text
        channel are used; ``dm=True`` sends it from the user's DM. ``to`` picks the gateway
        clients: ``"all"`` (every connected client, as Discord does for overlapping sessions),
        ``"first"``, ``"last"``, an index or a :class:`GatewayConnection`.
        """
        parts = name.split()
        root, path = parts[0], [*parts[1:], *subcommand]
        guild_id, channel_id = self._resolve_location(guild_id, channel_id, dm)
        command = self._require_command(root, 1, guild_id)
        values: dict[str, Any] = dict(options or {})
        values.update(attachments or {})
        resolved: dict[str, Any] = {}
        defs: list[dict[str, Any]] | None = command.get("options", []) if command else None
        wrappers: list[tuple[str, int]] = []
        for i, segment in enumerate(path):
            if defs is None:
                wrappers.append((segment, 1 if i == len(path) - 1 else 2))
                continue
            opt = next(
                (o for o in defs if o["name"] == segment and o["type"] in _SUBCOMMAND_TYPES), None
            )
            if opt is None:
                raise LookupError(f"/{root}: no subcommand or group {segment!r}")
            wrappers.append((segment, opt["type"]))
            defs = opt.get("options", [])
        if defs and any(o["type"] in _SUBCOMMAND_TYPES for o in defs):
            raise ValueError(f"/{name}: a subcommand must be chosen")
        opts = self._build_options(defs, values, resolved, guild_id)
        for segment, seg_type in reversed(wrappers):
            opts = [{"name": segment, "type": seg_type, "options": opts}]
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self.snowflake()),
            "name": root,
            "type": 1,
            "options": opts,
        }
        if resolved:
            data["resolved"] = resolved
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        rec = self._interaction_payload(
            2,
            data,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            locale=locale,
            attachment_size_limit=attachment_size_limit,
            app_permissions=app_permissions,
        )
        return await self._deliver(rec, to, timeout)

    def _build_options(
        self,
        defs: list[dict[str, Any]] | None,
        values: Mapping[str, Any],
        resolved: dict[str, Any],
        guild_id: int | None,
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        by_name = {o["name"]: o for o in defs} if defs is not None else None
        if by_name is not None:
            unknown = [n for n in values if n not in by_name]
            if unknown:
                raise LookupError(f"unknown option(s) {unknown}; the command has {list(by_name)}")
            missing = [n for n, o in by_name.items() if o.get("required") and n not in values]
            if missing:
                raise ValueError(f"required option(s) missing: {missing}")
            order = [n for n in by_name if n in values]
        else:
            order = list(values)
        for oname in order:
            value = values[oname]
            od = by_name[oname] if by_name is not None else {"type": _infer_option_type(value)}
            out.append(
                {
                    "name": oname,
                    "type": od["type"],
                    "value": self._option_value(oname, od, value, resolved, guild_id),
                }
            )
        return out

    def _option_value(
        self,
        oname: str,
        od: Mapping[str, Any],
        value: Any,
        resolved: dict[str, Any],
        guild_id: int | None,
    ) -> Any:
        otype = od["type"]
        choices = od.get("choices")
        if choices and value not in [c["value"] for c in choices]:
            raise ValueError(f"option {oname!r}: {value!r} is not one of the choices")
        if otype == 3:
            text = str(value)
            if len(text) < od.get("min_length", 0) or len(text) > od.get("max_length", 6000):
                raise ValueError(f"option {oname!r}: length out of range")
            return text
        if otype in (4, 10):
            number = int(value) if otype == 4 else float(value)
            if ("min_value" in od and number < od["min_value"]) or (
                "max_value" in od and number > od["max_value"]
            ):
                raise ValueError(f"option {oname!r}: {number} out of range")
            return number
        if otype == 5:
            return bool(value)
        if otype == 11:
            att = self._coerce_attachment(value, oname)
            att["ephemeral"] = True
            resolved.setdefault("attachments", {})[att["id"]] = att
            return att["id"]
        if otype in (6, 9) and (
            not isinstance(value, Mapping) or "user" in value or "username" in value
        ):
            ident = value
            if isinstance(value, Mapping):
                ident = value["user"]["id"] if "user" in value else value["id"]
            uid = int(ident)
            if otype == 6 or uid in self.users:
                user = self.add_user(uid)
                resolved.setdefault("users", {})[str(uid)] = copy.deepcopy(user)
                guild = self.guilds.get(guild_id) if guild_id is not None else None
                if guild is not None and uid in guild.members:
                    member = {k: v for k, v in guild.members[uid].items() if k != "user"}
                    member["permissions"] = str(self.member_permissions(guild.id, uid))
                    resolved.setdefault("members", {})[str(uid)] = member
                return str(uid)
        if otype in (8, 9):
            rid = int(value["id"]) if isinstance(value, Mapping) else int(value)
            guild = self._guild(guild_id) if guild_id is not None else None
            role = guild.roles.get(rid) if guild else None
            if role is None:
                raise LookupError(f"option {oname!r}: unknown role {rid}")
            resolved.setdefault("roles", {})[str(rid)] = copy.deepcopy(role)
            return str(rid)
        if otype == 7:
            cid = int(value["id"]) if isinstance(value, Mapping) else int(value)
            channel = self._channel_or_lookup(cid)
            entry = {
                k: channel[k]
                for k in ("id", "name", "type", "guild_id", "nsfw", "parent_id")
                if k in channel
            }
            entry["permissions"] = str(ALL_PERMISSIONS)
            resolved.setdefault("channels", {})[str(cid)] = entry
            return str(cid)
        return value

    async def invoke_message_command(
        self,
        name: str,
        target_message: Mapping[str, Any] | int,
        *,
        user_id: int | None = None,
        locale: str = "en-US",
        attachment_size_limit: int | None = None,
        app_permissions: int | None = None,
        to: ToSpec | GatewayConnection = "all",
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """Run a message context-menu command on a stored message (or a message dict)."""
        msg = self._message_index.get(
            int(target_message if isinstance(target_message, int) else target_message["id"])
        )
        if msg is None:
            if isinstance(target_message, int):
                raise LookupError(f"unknown message {target_message}")
            msg = dict(target_message)
        channel_id = int(msg["channel_id"])
        guild_id, _ = self._resolve_location(None, channel_id, False)
        command = self._require_command(name, 3, guild_id)
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self.snowflake()),
            "name": name,
            "type": 3,
            "target_id": msg["id"],
            "resolved": {"messages": {msg["id"]: copy.deepcopy(msg)}},
        }
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        rec = self._interaction_payload(
            2,
            data,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            locale=locale,
            attachment_size_limit=attachment_size_limit,
            app_permissions=app_permissions,
        )
        return await self._deliver(rec, to, timeout)

    async def invoke_user_command(
        self,
        name: str,
        target_user_id: int,
        *,
        user_id: int | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        locale: str = "en-US",
        to: ToSpec | GatewayConnection = "all",
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """Run a user context-menu command on ``target_user_id``."""
        guild_id, channel_id = self._resolve_location(guild_id, channel_id, False)
        command = self._require_command(name, 2, guild_id)
        resolved: dict[str, Any] = {}
        self._option_value("target", {"type": 6}, target_user_id, resolved, guild_id)
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self.snowflake()),
            "name": name,
            "type": 2,
            "target_id": str(target_user_id),
            "resolved": resolved,
        }
        if command and command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        rec = self._interaction_payload(
            2,
            data,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            locale=locale,
            attachment_size_limit=None,
            app_permissions=None,
        )
        return await self._deliver(rec, to, timeout)

    async def click_button(
        self,
        message: Mapping[str, Any] | int,
        custom_id: str,
        *,
        user_id: int | None = None,
        values: Sequence[str] | None = None,
        component_type: int | None = None,
        locale: str = "en-US",
        check: bool = True,
        to: ToSpec | GatewayConnection = "all",
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """Click a button (or pick ``values`` of a select menu) on a stored message.

        With ``check`` the component must exist on the message and not be disabled.
        """
        msg = self._message_dict(message)
        comp = _find_component(msg.get("components", []), custom_id)
        if check:
            if comp is None:
                raise LookupError(f"message {msg['id']} has no component {custom_id!r}")
            if comp.get("disabled"):
                raise ValueError(f"component {custom_id!r} is disabled")
        ctype = component_type or (comp["type"] if comp else (2 if values is None else 3))
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": ctype}
        if values is not None:
            data["values"] = list(values)
        channel_id = int(msg["channel_id"])
        guild_id, _ = self._resolve_location(None, channel_id, False)
        rec = self._interaction_payload(
            3,
            data,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            locale=locale,
            attachment_size_limit=None,
            app_permissions=None,
            message=msg,
        )
        return await self._deliver(rec, to, timeout)

    async def select(
        self,
        message: Mapping[str, Any] | int,
        custom_id: str,
        values: Sequence[str],
        *,
        user_id: int | None = None,
        to: ToSpec | GatewayConnection = "all",
    ) -> InteractionRecord:
        """Pick ``values`` in a select menu."""
        return await self.click_button(message, custom_id, user_id=user_id, values=values, to=to)

    async def submit_modal(
        self,
        modal: InteractionRecord | str,
        values: Mapping[str, str | Sequence[str]],
        *,
        user_id: int | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        message: Mapping[str, Any] | int | None = None,
        locale: str = "en-US",
        to: ToSpec | GatewayConnection = "all",
        timeout: float = 5.0,
    ) -> InteractionRecord:
        """Submit a modal the bot showed (type 9 callback).

        ``modal`` is the interaction record that received the modal (its user, channel and,
        for component interactions, message are reused) or the modal's ``custom_id``.
        ``values`` are keyed by text-input ``custom_id`` or label. The submitted components
        mirror the modal: action rows (type 1) or labels (type 18).
        """
        source: InteractionRecord | None = None
        if isinstance(modal, InteractionRecord):
            source = modal
            if modal.modal is None:
                raise LookupError(f"{modal!r} received no modal")
            definition: dict[str, Any] | None = modal.modal
        else:
            definition = next(
                (
                    r.modal
                    for r in reversed(self.interactions.values())
                    if r.modal and r.modal.get("custom_id") == modal
                ),
                None,
            )
        custom_id = definition["custom_id"] if definition else str(modal)
        if source is not None:
            user_id = user_id or source.user_id
            channel_id = channel_id or source.channel_id
            if message is None and source.message_id is not None:
                message = source.message_id
        components = _modal_submission(definition, values)
        msg = self._message_dict(message) if message is not None else None
        if msg is not None:
            channel_id = channel_id or int(msg["channel_id"])
        guild_id, channel_id = self._resolve_location(guild_id, channel_id, False)
        rec = self._interaction_payload(
            5,
            {"custom_id": custom_id, "components": components},
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            locale=locale,
            attachment_size_limit=None,
            app_permissions=None,
            message=msg,
        )
        return await self._deliver(rec, to, timeout)

    def expire_token(self, interaction: InteractionRecord | int) -> None:
        """Make webhook calls with this interaction's token answer 401/50027."""
        rec = (
            interaction
            if isinstance(interaction, InteractionRecord)
            else self.interactions[int(interaction)]
        )
        rec.token_revoked = True

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
        rule = FaultRule(
            method=method.upper(),
            pattern=re.compile(path_regex),
            status=status,
            code=code,
            message=message,
            retry_after=retry_after,
            is_global=is_global,
            times=times,
            process=process,
        )
        self._faults.append(rule)
        return rule

    def delay(
        self, method: str, path_regex: str, seconds: float, *, times: int | None = None
    ) -> None:
        """Delay matching requests by ``seconds`` before handling them."""
        self._delays.append(_DelayRule(method.upper(), re.compile(path_regex), seconds, times))

    def clear_faults(self) -> None:
        """Drop every fault and delay rule."""
        self._faults.clear()
        self._delays.clear()

    # ------------------------------------------------------------------ gateway control

    @property
    def connections(self) -> list[GatewayConnection]:
        """Identified (READY sent), open gateway connections in connection order."""
        return [c for c in self._gateway_connections if c.ready and not c.closed]

    async def wait_connected(
        self, count: int = 1, timeout: float = 10.0
    ) -> list[GatewayConnection]:
        """Wait until ``count`` clients got READY and their GUILD_CREATEs."""
        await self.wait_until(
            lambda: len(self.connections) >= count,
            timeout,
            description=f"{count} gateway client(s)",
        )
        return self.connections

    async def disconnect_all(self, code: int = 4000, reason: str = "emulated disconnect") -> int:
        """Close every gateway connection with ``code``; returns how many were closed."""
        conns = list(self._gateway_connections)
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close(code, reason)
        return len(conns)

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
        conns = self._select(to, guild_id)
        for conn in conns:
            conn.dispatch(event, copy.deepcopy(data))
        await asyncio.gather(*(c.flush() for c in conns))

    # ------------------------------------------------------------------ HTTP plumbing

    def _add_routes(self, app: web.Application) -> None:
        api = "/api/v{version:\\d+}"
        r = app.router
        r.add_get("/gateway", self._h_gateway)
        r.add_get("/attachments/{attachment_id:\\d+}/{filename}", self._h_cdn)
        r.add_get("/proxy/attachments/{attachment_id:\\d+}/{filename}", self._h_cdn)
        r.add_get(api + "/gateway", self._h_get_gateway)
        r.add_get(api + "/gateway/bot", self._h_get_gateway_bot)
        r.add_get(api + "/users/@me", self._h_me)
        r.add_post(api + "/users/@me/channels", self._h_create_dm)
        r.add_get(api + "/users/{user_id:\\d+}", self._h_user)
        r.add_get(api + "/oauth2/applications/@me", self._h_application)
        r.add_get(api + "/applications/@me", self._h_application)
        for prefix in (
            "/applications/{app_id:\\d+}",
            "/applications/{app_id:\\d+}/guilds/{guild_id:\\d+}",
        ):
            r.add_get(api + prefix + "/commands", self._h_get_commands)
            r.add_put(api + prefix + "/commands", self._h_put_commands)
            r.add_post(api + prefix + "/commands", self._h_post_command)
            r.add_get(api + prefix + "/commands/{command_id:\\d+}", self._h_get_command)
            r.add_patch(api + prefix + "/commands/{command_id:\\d+}", self._h_patch_command)
            r.add_delete(api + prefix + "/commands/{command_id:\\d+}", self._h_delete_command)
        r.add_post(api + "/interactions/{interaction_id:\\d+}/{token}/callback", self._h_callback)
        r.add_post(api + "/webhooks/{app_id:\\d+}/{token}", self._h_followup)
        r.add_get(
            api + "/webhooks/{app_id:\\d+}/{token}/messages/{message_id}", self._h_webhook_get
        )
        r.add_patch(
            api + "/webhooks/{app_id:\\d+}/{token}/messages/{message_id}", self._h_webhook_patch
        )
        r.add_delete(
            api + "/webhooks/{app_id:\\d+}/{token}/messages/{message_id}", self._h_webhook_delete
        )
        r.add_get(api + "/channels/{channel_id:\\d+}", self._h_get_channel)
        r.add_get(api + "/channels/{channel_id:\\d+}/messages", self._h_list_messages)
        r.add_post(api + "/channels/{channel_id:\\d+}/messages", self._h_post_message)
        r.add_post(api + "/channels/{channel_id:\\d+}/typing", self._h_typing)
        r.add_get(
            api + "/channels/{channel_id:\\d+}/messages/{message_id:\\d+}", self._h_get_message
        )
        r.add_patch(
            api + "/channels/{channel_id:\\d+}/messages/{message_id:\\d+}", self._h_patch_message
        )
        r.add_delete(
            api + "/channels/{channel_id:\\d+}/messages/{message_id:\\d+}", self._h_delete_message
        )
        r.add_get(api + "/guilds/{guild_id:\\d+}", self._h_get_guild)
        r.add_get(api + "/guilds/{guild_id:\\d+}/channels", self._h_guild_channels)
        r.add_get(api + "/guilds/{guild_id:\\d+}/roles", self._h_guild_roles)
        r.add_get(api + "/guilds/{guild_id:\\d+}/members/{user_id:\\d+}", self._h_guild_member)
        r.add_route("*", "/api/{tail:.*}", self._h_not_found)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        record = RequestRecord(
            method=request.method, path=request.path, query=dict(request.query), time=time.time()
        )
        request[_RECORD_KEY] = record
        is_ws = request.path == "/gateway"
        for rule in self._delays:
            if not is_ws and rule.matches(request.method, request.path):
                rule.hits += 1
                await asyncio.sleep(rule.seconds)
        fault = None
        if not is_ws:
            fault = next((f for f in self._faults if f.matches(request.method, request.path)), None)
            if fault is not None:
                fault.hits += 1
        response: web.StreamResponse
        try:
            if fault is not None and not fault.process:
                with contextlib.suppress(Exception):
                    await self._read_body(request)
                raise fault.to_error()
            self._check_auth(request)
            response = await handler(request)
            if fault is not None:
                raise fault.to_error()
        except APIError as exc:
            headers = {"Via": "1.1 google", **exc.headers}
            response = _json_response(exc.body(), exc.status, headers)
        if not is_ws and request.path.startswith("/api") and not response.prepared:
            response.headers.setdefault("Via", "1.1 google")
            if "X-RateLimit-Bucket" not in response.headers:
                response.headers.update(
                    {
                        "X-RateLimit-Limit": "1000",
                        "X-RateLimit-Remaining": "999",
                        "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
                        "X-RateLimit-Reset-After": "1.000",
                        "X-RateLimit-Bucket": hashlib.md5(
                            f"{request.method} {request.path}".encode(), usedforsecurity=False
                        ).hexdigest(),
                    }
                )
        record.status = response.status
        if not is_ws:
            self.requests.append(record)
            self._notify()
        return response

    def _check_auth(self, request: web.Request) -> None:
        path = _API_PREFIX_RE.sub("", request.path)
        if not request.path.startswith("/api") or path.startswith(("/webhooks/", "/interactions/")):
            return
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bot ") or (self.token is not None and header[4:] != self.token):
            raise APIError(401, 0, "401: Unauthorized")

    async def _read_body(self, request: web.Request) -> tuple[Any, list[UploadedFile]]:
        if _BODY_KEY in request:
            return request[_BODY_KEY]
        record = request[_RECORD_KEY]
        files: list[UploadedFile] = []
        payload: Any = None
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            position = 0
            while True:
                part = await reader.next()
                if part is None:
                    break
                raw = await part.read(decode=False)  # type: ignore[union-attr]
                name = part.name or ""
                if part.filename is None and name == "payload_json":  # type: ignore[union-attr]
                    payload = _loads(bytes(raw))
                elif part.filename is not None:  # type: ignore[union-attr]
                    match = _FILES_FIELD_RE.match(name)
                    index = int(match.group(1)) if match else position
                    ctype = part.headers.get("Content-Type")
                    files.append(UploadedFile(name, index, part.filename, bytes(raw), ctype))  # type: ignore[union-attr]
                    position += 1
        else:
            raw = await request.read()
            if raw:
                payload = _loads(raw)
        record.json = payload
        record.files = [
            {
                "field": f.field,
                "filename": f.filename,
                "size": f.size,
                "content_type": f.content_type,
            }
            for f in files
        ]
        request[_BODY_KEY] = (payload, files)
        return payload, files

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        payload, _ = await self._read_body(request)
        if payload is None:
            return {}
        if not isinstance(payload, dict):
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors=_err("MODEL_TYPE_CONVERT", "Expected an object."),
            )
        return payload

    # ------------------------------------------------------------------ REST: basics

    async def _h_not_found(self, request: web.Request) -> web.Response:
        raise APIError(404, 0, "404: Not Found")

    async def _h_get_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url})

    async def _h_get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "url": self.gateway_url,
                "shards": self.recommended_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def _h_me(self, request: web.Request) -> web.Response:
        return _json_response(self.bot_user)

    async def _h_user(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise APIError(404, 10013, "Unknown User")
        return _json_response(user)

    async def _h_create_dm(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        try:
            uid = int(body["recipient_id"])
        except (KeyError, TypeError, ValueError):
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors={"recipient_id": _err("BASE_TYPE_REQUIRED", "This field is required")},
            ) from None
        return _json_response(self.dm_channel(uid))

    async def _h_application(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "id": str(self.application_id),
                "name": self.application_name,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "hook": True,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": hashlib.sha256(self._secret.encode()).hexdigest(),
                "owner": copy.deepcopy(self.owner_user),
                "team": None,
                "flags": self.application_flags,
                "rpc_origins": [],
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "role_connections_verification_url": None,
                "approximate_guild_count": len(self.guilds),
                "approximate_user_install_count": 0,
                "bot": copy.deepcopy(self.bot_user),
                "integration_types_config": {"0": {}},
                "install_params": None,
                "custom_install_url": None,
                "terms_of_service_url": None,
                "privacy_policy_url": None,
                "cover_image": None,
                "guild_id": None,
                "primary_sku_id": None,
                "slug": None,
                "event_webhooks_url": None,
                "event_webhooks_status": 1,
                "event_webhooks_types": [],
            }
        )

    # ------------------------------------------------------------------ REST: commands

    def _command_scope(self, request: web.Request) -> tuple[int | None, list[dict[str, Any]]]:
        if int(request.match_info["app_id"]) != self.application_id:
            raise APIError(403, 50001, "Missing Access")
        gid = request.match_info.get("guild_id")
        if gid is None:
            return None, self.global_commands
        guild_id = int(gid)
        if guild_id not in self.guilds:
            raise APIError(403, 50001, "Missing Access")
        return guild_id, self.guild_commands.get(guild_id, [])

    async def _h_get_commands(self, request: web.Request) -> web.Response:
        _, commands = self._command_scope(request)
        return _json_response(commands)

    async def _h_put_commands(self, request: web.Request) -> web.Response:
        guild_id, _ = self._command_scope(request)
        payload, _ = await self._read_body(request)
        if not isinstance(payload, list):
            raise APIError(
                400, 50035, "Invalid Form Body", errors=_err("BASE_TYPE_ARRAY", "Must be an array.")
            )
        return _json_response(self.register_commands(payload, guild_id))

    def _find_command_by_id(
        self, commands: list[dict[str, Any]], command_id: str
    ) -> dict[str, Any]:
        for cmd in commands:
            if cmd["id"] == command_id:
                return cmd
        raise APIError(404, 10063, "Unknown application command")

    async def _h_get_command(self, request: web.Request) -> web.Response:
        _, commands = self._command_scope(request)
        return _json_response(self._find_command_by_id(commands, request.match_info["command_id"]))

    async def _h_post_command(self, request: web.Request) -> web.Response:
        guild_id, commands = self._command_scope(request)
        body = await self._json_body(request)
        key = (body.get("type", 1), body.get("name"))
        others = [c for c in commands if (c.get("type", 1), c["name"]) != key]
        raws = [_command_input(c) for c in others] + [body]
        stored = self.register_commands(raws, guild_id)
        return _json_response(stored[-1], 201 if len(others) == len(commands) else 200)

    async def _h_patch_command(self, request: web.Request) -> web.Response:
        guild_id, commands = self._command_scope(request)
        target = self._find_command_by_id(commands, request.match_info["command_id"])
        body = await self._json_body(request)
        raws = [
            _command_input(c) if c is not target else {**_command_input(c), **body}
            for c in commands
        ]
        stored = self.register_commands(raws, guild_id)
        return _json_response(next(c for c in stored if c["id"] == target["id"]))

    async def _h_delete_command(self, request: web.Request) -> web.Response:
        guild_id, commands = self._command_scope(request)
        target = self._find_command_by_id(commands, request.match_info["command_id"])
        remaining = [c for c in commands if c is not target]
        if guild_id is None:
            self.global_commands = remaining
        else:
            self.guild_commands[guild_id] = remaining
        self._notify()
        return web.Response(status=204)

    # ------------------------------------------------------------------ REST: interactions

    def _reject(self, rec: InteractionRecord | None, route: str, exc: APIError) -> APIError:
        if rec is not None:
            rec.rejected.append(
                {"route": route, "status": exc.status, "code": exc.code, "message": exc.message}
            )
            self._notify()
        return exc

    async def _h_callback(self, request: web.Request) -> web.Response:
        rec = self.interactions.get(int(request.match_info["interaction_id"]))
        if rec is not None and rec.token != request.match_info["token"]:
            rec = None
        payload, files = await self._read_body(request)
        try:
            return self._callback(request, rec, payload, files)
        except APIError as exc:
            raise self._reject(rec, "callback", exc) from None

    def _callback(
        self,
        request: web.Request,
        rec: InteractionRecord | None,
        payload: Any,
        files: list[UploadedFile],
    ) -> web.Response:
        # No awaits in here: check-and-acknowledge is atomic for concurrent clients.
        if rec is None or rec.token_expired():
            raise APIError(404, 10062, "Unknown interaction")
        if (
            self.response_deadline is not None
            and time.monotonic() - rec.created_at > self.response_deadline
        ):
            raise APIError(404, 10062, "Unknown interaction")
        if rec.acknowledged:
            raise APIError(400, 40060, "Interaction has already been acknowledged.")
        if not isinstance(payload, dict):
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors={"type": _err("BASE_TYPE_REQUIRED", "This field is required")},
            )
        cb_type = payload.get("type")
        data = payload.get("data") or {}
        self._check_upload(files, rec.attachment_size_limit)
        allowed = {
            2: {4, 5, 9},
            3: {4, 5, 6, 7, 9},
            4: {8},
            5: {4, 5, 6, 7},
        }[rec.type]
        if rec.type in (3, 5) and rec.message_id is None:
            allowed -= {6, 7}
        if cb_type not in allowed:
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors={
                    "type": _err(
                        "INTERACTION_CALLBACK_TYPE_INVALID",
                        f"Callback type {cb_type} is not valid for this interaction",
                    )
                },
            )
        msg: dict[str, Any] | None = None
        flags = int(data.get("flags") or 0)
        if cb_type == 4:
            _validate_message(data, files, require_content=True)
            msg_type = 0 if rec.type != 2 else (23 if rec.data.get("type", 1) != 1 else 20)
            msg = self._create_from_body(
                rec.channel_id,
                data,
                files,
                flags=flags
                & (EPHEMERAL | SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2),
                msg_type=msg_type,
                interaction=rec,
            )
            rec.original = msg
        elif cb_type == 5:
            msg_type = 0 if rec.type != 2 else (23 if rec.data.get("type", 1) != 1 else 20)
            msg = self._make_message(
                rec.channel_id,
                author=self.bot_user,
                flags=(flags & EPHEMERAL) | LOADING,
                msg_type=msg_type,
                interaction=rec,
            )
            rec.original = msg
        elif cb_type == 6:
            rec.original = self._message_index.get(rec.message_id or 0)
        elif cb_type == 7:
            target = self._message_index.get(rec.message_id or 0)
            if target is None:
                raise APIError(404, 10008, "Unknown Message")
            _validate_message(data, files, require_content=False)
            self._edit_from_body(target, data, files)
            rec.original = msg = target
        elif cb_type == 8:
            rec.autocomplete_choices = list(data.get("choices") or [])
        elif cb_type == 9:
            _validate_modal(data)
            rec.modal = copy.deepcopy(data)
        rec.responses.append(payload)
        self._notify()
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        answer: dict[str, Any] = {
            "interaction": {
                "id": str(rec.id),
                "type": rec.type,
                "response_message_loading": cb_type == 5,
                "response_message_ephemeral": bool(msg and msg["flags"] & EPHEMERAL),
            }
        }
        if msg is not None:
            answer["interaction"]["response_message_id"] = msg["id"]
        if cb_type in (4, 5, 7) and msg is not None:
            answer["resource"] = {"type": cb_type, "message": msg}
        elif cb_type == 6:
            answer["resource"] = {"type": 6}
        return _json_response(answer)

    def _webhook_rec(self, request: web.Request) -> InteractionRecord:
        rec = self._by_token.get(request.match_info["token"])
        if rec is None or int(request.match_info["app_id"]) != self.application_id:
            raise APIError(404, 10015, "Unknown Webhook")
        if rec.token_expired():
            raise self._reject(rec, "webhook", APIError(401, 50027, "Invalid Webhook Token"))
        return rec

    def _webhook_message(self, rec: InteractionRecord, message_id: str) -> dict[str, Any]:
        if message_id == "@original":
            if rec.original is None or rec.original_deleted:
                raise APIError(404, 10008, "Unknown Message")
            return rec.original
        for msg in rec.messages():
            if msg["id"] == message_id and int(message_id) in self._message_index:
                return msg
        raise APIError(404, 10008, "Unknown Message")

    async def _h_followup(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        body, files = await self._read_body(request)
        try:
            if not rec.acknowledged:
                raise APIError(404, 10015, "Unknown Webhook")
            if not isinstance(body, dict):
                raise APIError(400, 50006, "Cannot send an empty message")
            self._check_upload(files, rec.attachment_size_limit)
            _validate_message(body, files, require_content=True)
        except APIError as exc:
            raise self._reject(rec, "followup", exc) from None
        flags = int(body.get("flags") or 0)
        original = rec.original
        if (
            rec.response_type == 5
            and original is not None
            and original["flags"] & LOADING
            and not rec.original_deleted
        ):
            # The first followup after a "thinking" defer replaces the placeholder; its
            # ephemeral state is the one chosen at defer time.
            original["content"] = str(body.get("content") or "")
            original["components"] = copy.deepcopy(body.get("components") or [])
            original["attachments"] = self._uploaded_attachments(
                body, files, ephemeral=bool(original["flags"] & EPHEMERAL)
            )
            original["embeds"] = _resolve_embeds(body.get("embeds") or [], original["attachments"])
            original["flags"] = (original["flags"] & EPHEMERAL) | (
                flags & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
            )
            original["timestamp"] = _now_iso()
            msg = original
        else:
            msg = self._create_from_body(
                rec.channel_id,
                body,
                files,
                flags=flags
                & (EPHEMERAL | SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2),
                interaction=rec,
            )
        rec.followups.append(msg)
        self._notify()
        if request.query.get("wait") in ("1", "true", "True"):
            return _json_response(msg)
        return web.Response(status=204)

    async def _h_webhook_get(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        msg = self._webhook_message(rec, request.match_info["message_id"])
        self._refresh_message_urls(msg)
        return _json_response(msg)

    async def _h_webhook_patch(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        message_id = request.match_info["message_id"]
        body, files = await self._read_body(request)
        try:
            msg = self._webhook_message(rec, message_id)
            if not isinstance(body, dict):
                body = {}
            self._check_upload(files, rec.attachment_size_limit)
            _validate_message(body, files, require_content=False)
        except APIError as exc:
            raise self._reject(rec, "edit", exc) from None
        self._edit_from_body(msg, body, files)
        if message_id == "@original":
            rec.edits.append(body)
        rec.message_edits.append((int(msg["id"]), body))
        self._notify()
        return _json_response(msg)

    async def _h_webhook_delete(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        message_id = request.match_info["message_id"]
        try:
            msg = self._webhook_message(rec, message_id)
        except APIError as exc:
            raise self._reject(rec, "delete", exc) from None
        if msg is rec.original:
            rec.original_deleted = True
        self._delete_message(msg)
        return web.Response(status=204)

    # ------------------------------------------------------------------ REST: channels

    async def _h_get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._channel(int(request.match_info["channel_id"])))

    async def _h_typing(self, request: web.Request) -> web.Response:
        self._channel(int(request.match_info["channel_id"]))
        return web.Response(status=204)

    async def _h_list_messages(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["channel_id"])
        self._channel(cid)
        try:
            limit = min(100, max(1, int(request.query.get("limit", "50"))))
            before = int(request.query["before"]) if "before" in request.query else None
            after = int(request.query["after"]) if "after" in request.query else None
        except ValueError:
            raise APIError(400, 50035, "Invalid Form Body") from None
        msgs = self.public_messages(cid)
        if before is not None:
            msgs = [m for m in msgs if int(m["id"]) < before]
        if after is not None:
            msgs = [m for m in msgs if int(m["id"]) > after]
            picked = msgs[:limit]
        else:
            picked = msgs[-limit:]
        for m in picked:
            self._refresh_message_urls(m)
        return _json_response(list(reversed(picked)))

    def _channel_message(self, request: web.Request) -> dict[str, Any]:
        cid = int(request.match_info["channel_id"])
        self._channel(cid)
        msg = self._message_index.get(int(request.match_info["message_id"]))
        if msg is None or int(msg["channel_id"]) != cid or msg["flags"] & EPHEMERAL:
            raise APIError(404, 10008, "Unknown Message")
        return msg

    async def _h_get_message(self, request: web.Request) -> web.Response:
        msg = self._channel_message(request)
        self._refresh_message_urls(msg)
        return _json_response(msg)

    async def _h_post_message(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["channel_id"])
        self._channel(cid)
        body, files = await self._read_body(request)
        if not isinstance(body, dict):
            body = {}
        guild = self._guild_of_channel(cid)
        self._check_upload(files, self.guild_upload_limit(guild.id if guild else None))
        _validate_message(body, files, require_content=True)
        reference = body.get("message_reference")
        msg_type = 0
        if reference:
            ref_id = int(reference.get("message_id") or 0)
            if ref_id not in self._message_index and reference.get("fail_if_not_exists", True):
                raise APIError(
                    400,
                    50035,
                    "Invalid Form Body",
                    errors={
                        "message_reference": _err("REPLIES_UNKNOWN_MESSAGE", "Unknown message")
                    },
                )
            reference = {
                "type": reference.get("type", 0),
                "message_id": str(ref_id),
                "channel_id": str(reference.get("channel_id") or cid),
                **({"guild_id": str(guild.id)} if guild else {}),
            }
            msg_type = 19
        flags = int(body.get("flags") or 0) & (
            SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2
        )
        msg = self._create_from_body(
            cid, body, files, flags=flags, msg_type=msg_type, message_reference=reference or None
        )
        return _json_response(msg)

    async def _h_patch_message(self, request: web.Request) -> web.Response:
        msg = self._channel_message(request)
        body, files = await self._read_body(request)
        if not isinstance(body, dict):
            body = {}
        if int(msg["author"]["id"]) != self.bot_user_id:
            raise APIError(403, 50005, "Cannot edit a message authored by another user")
        guild = self._guild_of_channel(int(msg["channel_id"]))
        self._check_upload(files, self.guild_upload_limit(guild.id if guild else None))
        _validate_message(body, files, require_content=False)
        self._edit_from_body(msg, body, files)
        return _json_response(msg)

    async def _h_delete_message(self, request: web.Request) -> web.Response:
        msg = self._channel_message(request)
        self._delete_message(msg)
        return web.Response(status=204)

    # ------------------------------------------------------------------ REST: guilds

    async def _h_get_guild(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        return _json_response(guild.to_rest())

    async def _h_guild_channels(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        return _json_response(list(guild.channels.values()))

    async def _h_guild_roles(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        return _json_response(list(guild.roles.values()))

    async def _h_guild_member(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        member = guild.members.get(int(request.match_info["user_id"]))
        if member is None:
            raise APIError(404, 10007, "Unknown Member")
        return _json_response(member)

    # ------------------------------------------------------------------ CDN

    async def _h_cdn(self, request: web.Request) -> web.Response:
        aid = int(request.match_info["attachment_id"])
        att = self.attachments.get(aid)
        if att is None or not self._url_valid(att, request.query):
            self.attachment_fetch_failures[aid] += 1
            self._notify()
            return web.Response(status=404, text="This content is no longer available.")
        self.attachment_fetches[aid] += 1
        self._notify()
        return web.Response(
            body=att.data, headers={"Content-Type": att.content_type or "application/octet-stream"}
        )

    # ------------------------------------------------------------------ Gateway

    async def _h_gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        conn = GatewayConnection(self, ws, next(self._conn_numbers))
        self._gateway_connections.append(conn)
        writer = asyncio.create_task(conn._writer())
        conn.send_op(
            10, {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["discord-emulator"]}
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
                    await self._gateway_frame(conn, frame)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            conn.closed = True
            conn.ready = False
            conn.close_code = ws.close_code
            with contextlib.suppress(ValueError):
                self._gateway_connections.remove(conn)
            conn._queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await writer
            self._notify()
        return ws

    async def _gateway_frame(self, conn: GatewayConnection, frame: dict[str, Any]) -> None:
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
            guild = self.guilds.get(int(data.get("guild_id") or 0))
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
        if self.token is not None and data.get("token") != self.token:
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
        session = _Session(
            id=hashlib.md5(
                f"{conn.number}:{time.time()}".encode(), usedforsecurity=False
            ).hexdigest(),
            shard=shard,
        )
        self._sessions[session.id] = session
        conn.session = session
        guilds = [g for g in self.guilds.values() if conn.handles_guild(g.id)]
        ready: dict[str, Any] = {
            "v": 10,
            "user": copy.deepcopy(self.bot_user),
            "user_settings": {},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": self.application_flags},
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
            self._notify()

    async def _resume(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        token_ok = self.token is None or data.get("token") == self.token
        if session is None or not self.allow_resume or not token_ok:
            conn.send_op(9, False)
            return
        self.resume_count += 1
        conn.session = session
        last = int(data.get("seq") or 0)
        for frame in list(session.log):
            if frame["s"] > last:
                conn._queue.put_nowait(frame)
        conn.dispatch("RESUMED", {"_trace": ["discord-emulator"]})
        conn.call_soon(lambda: self._mark_ready(conn))


# ---------------------------------------------------------------------- helpers


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise APIError(400, 50109, "The request body contains invalid JSON.") from None


def _image_info(data: bytes) -> tuple[int, int, str | None] | None:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, Image.MIME.get(img.format or "")
    except Exception:
        return None


def _infer_option_type(value: Any) -> int:
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    if isinstance(value, bytes | bytearray | memoryview | tuple) or (
        isinstance(value, Mapping) and "filename" in value
    ):
        return 11
    return 3


def _resolve_embeds(
    embeds: Sequence[Mapping[str, Any]], attachments: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    by_name = {a["filename"]: a for a in attachments}
    out: list[dict[str, Any]] = []
    for embed in embeds:
        e = copy.deepcopy(dict(embed))
        e.setdefault("type", "rich")
        e.setdefault("content_scan_version", 0)
        for key in ("image", "thumbnail"):
            media = e.get(key)
            if isinstance(media, dict) and str(media.get("url", "")).startswith("attachment://"):
                att = by_name.get(media["url"][len("attachment://") :])
                if att is not None:
                    media.update({"url": att["url"], "proxy_url": att["proxy_url"], "flags": 0})
                    if "width" in att:
                        media.update({"width": att["width"], "height": att["height"]})
        out.append(e)
    return out


def _find_component(
    components: Sequence[Mapping[str, Any]], custom_id: str
) -> dict[str, Any] | None:
    for comp in components:
        if comp.get("custom_id") == custom_id:
            return dict(comp)
        for key in ("components",):
            found = _find_component(comp.get(key) or [], custom_id)
            if found is not None:
                return found
        for key in ("accessory", "component"):
            child = comp.get(key)
            if isinstance(child, Mapping):
                found = _find_component([child], custom_id)
                if found is not None:
                    return found
    return None


def _modal_submission(
    definition: Mapping[str, Any] | None, values: Mapping[str, str | Sequence[str]]
) -> list[dict[str, Any]]:
    """Build MODAL_SUBMIT ``data.components`` mirroring the modal's layout."""
    used: set[str] = set()

    def value_for(comp: Mapping[str, Any], label: str | None) -> Any:
        for key in (comp.get("custom_id"), label, comp.get("label")):
            if key is not None and key in values:
                used.add(key)
                return values[key]
        return None

    def submit(comp: Mapping[str, Any], label: str | None) -> dict[str, Any] | None:
        ctype = comp.get("type")
        value = value_for(comp, label)
        out: dict[str, Any] = {"type": ctype, "custom_id": comp.get("custom_id")}
        if "id" in comp:
            out["id"] = comp["id"]
        if ctype == 4:
            text = (comp.get("value") or "") if value is None else str(value)
            if comp.get("required", True) and not text:
                raise ValueError(f"text input {label or comp.get('custom_id')!r} is required")
            if len(text) > comp.get("max_length", 4000) or (
                text and len(text) < comp.get("min_length", 0)
            ):
                raise ValueError(
                    f"text input {label or comp.get('custom_id')!r}: length out of range"
                )
            out["value"] = text
            return out
        if ctype in (3, 5, 6, 7, 8):
            picked = [] if value is None else ([value] if isinstance(value, str) else list(value))
            out["values"] = picked
            return out
        return None

    if definition is None:
        return [
            {"type": 1, "components": [{"type": 4, "custom_id": k, "value": str(v)}]}
            for k, v in values.items()
        ]
    result: list[dict[str, Any]] = []
    for comp in definition.get("components", []):
        if comp.get("type") == 1:
            children = [
                c for c in (submit(child, None) for child in comp.get("components", [])) if c
            ]
            row: dict[str, Any] = {"type": 1, "components": children}
            if "id" in comp:
                row["id"] = comp["id"]
            result.append(row)
        elif comp.get("type") == 18:
            child = submit(comp.get("component") or {}, comp.get("label"))
            if child is not None:
                label: dict[str, Any] = {"type": 18, "component": child}
                if "id" in comp:
                    label["id"] = comp["id"]
                result.append(label)
    unknown = [k for k in values if k not in used]
    if unknown:
        raise LookupError(f"the modal has no input(s) {unknown}")
    return result


def _validate_modal(data: Mapping[str, Any]) -> None:
    errors: dict[str, Any] = {}
    if not data.get("custom_id") or len(str(data["custom_id"])) > 100:
        _add_error(
            errors, ["custom_id"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
        )
    title = str(data.get("title") or "")
    if not 1 <= len(title) <= 45:
        _add_error(errors, ["title"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length.")
    components = data.get("components") or []
    if not 1 <= len(components) <= 5:
        _add_error(
            errors, ["components"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        )
    if errors:
        raise APIError(400, 50035, "Invalid Form Body", errors=errors)


def _embed_size(embed: Mapping[str, Any]) -> int:
    total = len(str(embed.get("title") or "")) + len(str(embed.get("description") or ""))
    total += len(str((embed.get("footer") or {}).get("text") or ""))
    total += len(str((embed.get("author") or {}).get("name") or ""))
    for fld in embed.get("fields") or []:
        total += len(str(fld.get("name") or "")) + len(str(fld.get("value") or ""))
    return total


def _validate_message(
    body: Mapping[str, Any], files: Sequence[UploadedFile], *, require_content: bool
) -> None:
    """Discord's message limits; raises APIError 50035 / 50006."""
    errors: dict[str, Any] = {}
    content = body.get("content")
    if content is not None and len(str(content)) > 2000:
        _add_error(errors, ["content"], "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    embeds = body.get("embeds") or []
    if len(embeds) > 10:
        _add_error(errors, ["embeds"], "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    limits = {"title": 256, "description": 4096}
    for i, embed in enumerate(embeds[:10]):
        for key, limit in limits.items():
            if len(str(embed.get(key) or "")) > limit:
                _add_error(
                    errors,
                    ["embeds", str(i), key],
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {limit} or fewer in length.",
                )
        fields = embed.get("fields") or []
        if len(fields) > 25:
            _add_error(
                errors,
                ["embeds", str(i), "fields"],
                "BASE_TYPE_MAX_LENGTH",
                "Must be 25 or fewer in length.",
            )
        for j, fld in enumerate(fields):
            if not 1 <= len(str(fld.get("name") or "")) <= 256:
                _add_error(
                    errors,
                    ["embeds", str(i), "fields", str(j), "name"],
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 256 in length.",
                )
            if not 1 <= len(str(fld.get("value") or "")) <= 1024:
                _add_error(
                    errors,
                    ["embeds", str(i), "fields", str(j), "value"],
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 1024 in length.",
                )
        if len(str((embed.get("footer") or {}).get("text") or "")) > 2048:
            _add_error(
                errors,
                ["embeds", str(i), "footer", "text"],
                "BASE_TYPE_MAX_LENGTH",
                "Must be 2048 or fewer in length.",
            )
        if len(str((embed.get("author") or {}).get("name") or "")) > 256:
            _add_error(
                errors,
                ["embeds", str(i), "author", "name"],
                "BASE_TYPE_MAX_LENGTH",
                "Must be 256 or fewer in length.",
            )
    if sum(_embed_size(e) for e in embeds) > 6000:
        _add_error(
            errors, ["embeds"], "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000"
        )
    components = body.get("components") or []
    flags = int(body.get("flags") or 0)
    if not flags & IS_COMPONENTS_V2 and len(components) > 5:
        _add_error(errors, ["components"], "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    if flags & IS_COMPONENTS_V2 and (content or embeds):
        _add_error(
            errors,
            ["content"],
            "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
            "The 'content' and 'embeds' fields cannot be used when using MessageFlags.IS_COMPONENTS_V2",
        )
    if len(files) > 10:
        _add_error(errors, ["files"], "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    if errors:
        raise APIError(400, 50035, "Invalid Form Body", errors=errors)
    if require_content and not (
        content
        or embeds
        or files
        or components
        or body.get("sticker_ids")
        or body.get("poll")
        or body.get("attachments")
    ):
        raise APIError(400, 50006, "Cannot send an empty message")


# ---------------------------------------------------------------------- command validation


def _command_input(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """A stored command back to the shape a client sends."""
    return {
        k: copy.deepcopy(v)
        for k, v in cmd.items()
        if k not in ("id", "application_id", "version", "guild_id")
    }


def _check_name(errors: dict[str, Any], path: list[str], name: Any, *, lowercase: bool) -> None:
    if not isinstance(name, str):
        _add_error(errors, path, "BASE_TYPE_REQUIRED", "This field is required")
        return
    if not _NAME_RE.fullmatch(name) or (lowercase and name != name.lower()):
        _add_error(
            errors, path, "APPLICATION_COMMAND_INVALID_NAME", f"Command name is invalid: {name!r}"
        )


def _check_menu_name(errors: dict[str, Any], path: list[str], name: Any) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        _add_error(errors, path, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length.")


def _check_length(errors: dict[str, Any], path: list[str], value: Any, low: int, high: int) -> None:
    if not isinstance(value, str) or not low <= len(value) <= high:
        _add_error(
            errors, path, "BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length."
        )


def _check_localizations(
    errors: dict[str, Any],
    path: list[str],
    value: Any,
    *,
    kind: Literal["name", "description", "menu", "choice"],
) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        _add_error(errors, path, "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
        return
    for locale, text in value.items():
        sub = [*path, str(locale)]
        if locale not in VALID_LOCALES:
            _add_error(
                errors, sub, "ENUM_TYPE_COERCE", f'Value "{locale}" is not a valid enum value.'
            )
        elif kind == "name":
            _check_name(errors, sub, text, lowercase=True)
        elif kind == "menu":
            _check_menu_name(errors, sub, text)
        else:
            _check_length(errors, sub, text, 1, 100)


def _command_size(cmd: Mapping[str, Any]) -> int:
    total = len(str(cmd.get("name") or "")) + len(str(cmd.get("description") or ""))

    def walk(options: Sequence[Mapping[str, Any]]) -> int:
        size = 0
        for opt in options:
            size += len(str(opt.get("name") or "")) + len(str(opt.get("description") or ""))
            for choice in opt.get("choices") or []:
                size += len(str(choice.get("name") or "")) + len(str(choice.get("value") or ""))
            size += walk(opt.get("options") or [])
        return size

    return total + walk(cmd.get("options") or [])


def _check_options(
    errors: dict[str, Any],
    path: list[str],
    options: Any,
    level: Literal["command", "group", "subcommand"],
) -> None:
    if not isinstance(options, list):
        _add_error(errors, path, "BASE_TYPE_ARRAY", "Must be an array.")
        return
    if len(options) > 25:
        _add_error(errors, path, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    types = [o.get("type") if isinstance(o, Mapping) else None for o in options]
    subs = [t in _SUBCOMMAND_TYPES for t in types]
    if level == "command" and any(subs) and not all(subs):
        _add_error(
            errors,
            path,
            "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
            "Sub-command and sub-command group option types are mutually exclusive to all other types",
        )
    seen_names: set[str] = set()
    seen_optional = False
    for i, opt in enumerate(options):
        p = [*path, str(i)]
        if not isinstance(opt, Mapping):
            _add_error(
                errors, p, "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType"
            )
            continue
        otype = opt.get("type")
        if otype not in range(1, 12):
            _add_error(
                errors,
                [*p, "type"],
                "ENUM_TYPE_COERCE",
                f'Value "{otype}" is not a valid enum value.',
            )
            continue
        if level == "group" and otype != 1:
            _add_error(
                errors,
                [*p, "type"],
                "APPLICATION_COMMAND_OPTION_TYPE_INVALID",
                "Sub-command groups may only contain sub-commands",
            )
        if level == "subcommand" and otype in _SUBCOMMAND_TYPES:
            _add_error(
                errors,
                [*p, "type"],
                "APPLICATION_COMMAND_OPTION_TYPE_INVALID",
                "Sub-commands cannot contain sub-commands or groups",
            )
        name = opt.get("name")
        _check_name(errors, [*p, "name"], name, lowercase=True)
        if isinstance(name, str):
            if name in seen_names:
                _add_error(
                    errors,
                    [*p, "name"],
                    "APPLICATION_COMMAND_OPTION_NAME_ALREADY_EXISTS",
                    "Option names must be unique",
                )
            seen_names.add(name)
        _check_length(errors, [*p, "description"], opt.get("description"), 1, 100)
        _check_localizations(
            errors, [*p, "name_localizations"], opt.get("name_localizations"), kind="name"
        )
        _check_localizations(
            errors,
            [*p, "description_localizations"],
            opt.get("description_localizations"),
            kind="description",
        )
        if otype in _SUBCOMMAND_TYPES:
            children = opt.get("options") or []
            if otype == 2 and not children:
                _add_error(
                    errors, [*p, "options"], "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length."
                )
            _check_options(
                errors, [*p, "options"], children, "group" if otype == 2 else "subcommand"
            )
            continue
        required = bool(opt.get("required", False))
        if required and seen_optional:
            _add_error(
                errors,
                [*p, "required"],
                "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                "Required options must be placed before non-required options",
            )
        if not required:
            seen_optional = True
        choices = opt.get("choices")
        if choices:
            if otype not in _CHOICE_TYPES:
                _add_error(
                    errors,
                    [*p, "choices"],
                    "APPLICATION_COMMAND_OPTION_CHOICES_NOT_ALLOWED",
                    "Choices are only allowed for string, integer and number options",
                )
            if len(choices) > 25:
                _add_error(
                    errors,
                    [*p, "choices"],
                    "BASE_TYPE_MAX_LENGTH",
                    "Must be 25 or fewer in length.",
                )
            if opt.get("autocomplete"):
                _add_error(
                    errors,
                    [*p, "autocomplete"],
                    "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID_CHOICES",
                    "Autocomplete cannot be enabled with choices",
                )
            for j, choice in enumerate(choices):
                cp = [*p, "choices", str(j)]
                _check_length(errors, [*cp, "name"], choice.get("name"), 1, 100)
                _check_localizations(
                    errors,
                    [*cp, "name_localizations"],
                    choice.get("name_localizations"),
                    kind="choice",
                )
                value = choice.get("value")
                if otype == 3 and (not isinstance(value, str) or not 1 <= len(value) <= 100):
                    _add_error(
                        errors,
                        [*cp, "value"],
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    )
                elif otype == 4 and (
                    isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**53
                ):
                    _add_error(
                        errors, [*cp, "value"], "NUMBER_TYPE_COERCE", f'Value "{value}" is not int.'
                    )
                elif otype == 10 and (
                    isinstance(value, bool) or not isinstance(value, int | float)
                ):
                    _add_error(
                        errors,
                        [*cp, "value"],
                        "NUMBER_TYPE_COERCE",
                        f'Value "{value}" is not a number.',
                    )
        if opt.get("autocomplete") and otype not in _CHOICE_TYPES:
            _add_error(
                errors,
                [*p, "autocomplete"],
                "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID_TYPE",
                "Autocomplete is only allowed for string, integer and number options",
            )
        if ("min_value" in opt or "max_value" in opt) and otype not in (4, 10):
            _add_error(
                errors,
                [*p, "min_value"],
                "APPLICATION_COMMAND_OPTION_INVALID_FIELD",
                "min_value/max_value are only allowed for integer and number options",
            )
        if "min_length" in opt or "max_length" in opt:
            if otype != 3:
                _add_error(
                    errors,
                    [*p, "min_length"],
                    "APPLICATION_COMMAND_OPTION_INVALID_FIELD",
                    "min_length/max_length are only allowed for string options",
                )
            if "min_length" in opt and not 0 <= int(opt["min_length"]) <= 6000:
                _add_error(
                    errors,
                    [*p, "min_length"],
                    "NUMBER_TYPE_MAX",
                    "int value should be between 0 and 6000.",
                )
            if "max_length" in opt and not 1 <= int(opt["max_length"]) <= 6000:
                _add_error(
                    errors,
                    [*p, "max_length"],
                    "NUMBER_TYPE_MAX",
                    "int value should be between 1 and 6000.",
                )
        if opt.get("channel_types") and otype != 7:
            _add_error(
                errors,
                [*p, "channel_types"],
                "APPLICATION_COMMAND_OPTION_INVALID_FIELD",
                "channel_types is only allowed for channel options",
            )


def _validate_command(cmd: Any) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    if not isinstance(cmd, Mapping):
        _add_error(errors, [], "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType")
        return errors
    ctype = cmd.get("type", 1)
    if ctype not in (1, 2, 3, 4):
        _add_error(
            errors, ["type"], "ENUM_TYPE_COERCE", f'Value "{ctype}" is not a valid enum value.'
        )
        return errors
    if ctype == 1:
        _check_name(errors, ["name"], cmd.get("name"), lowercase=True)
        _check_length(errors, ["description"], cmd.get("description"), 1, 100)
        _check_localizations(
            errors, ["name_localizations"], cmd.get("name_localizations"), kind="name"
        )
        _check_localizations(
            errors,
            ["description_localizations"],
            cmd.get("description_localizations"),
            kind="description",
        )
        _check_options(errors, ["options"], cmd.get("options") or [], "command")
    else:
        _check_menu_name(errors, ["name"], cmd.get("name"))
        _check_localizations(
            errors, ["name_localizations"], cmd.get("name_localizations"), kind="menu"
        )
        if cmd.get("description"):
            _add_error(
                errors,
                ["description"],
                "APPLICATION_COMMAND_CONTEXT_MENU_DESCRIPTION",
                "Context menu commands cannot have a description",
            )
        if cmd.get("options"):
            _add_error(
                errors,
                ["options"],
                "APPLICATION_COMMAND_CONTEXT_MENU_OPTIONS",
                "Context menu commands cannot have options",
            )
    dmp = cmd.get("default_member_permissions")
    # Discord documents a string but accepts a non-negative integer too (discord.py sends one)
    if dmp is not None and not (
        (isinstance(dmp, str) and dmp.isdigit())
        or (isinstance(dmp, int) and not isinstance(dmp, bool) and dmp >= 0)
    ):
        _add_error(
            errors,
            ["default_member_permissions"],
            "BASE_TYPE_STRING",
            "Must be a string of digits.",
        )
    for key, valid in (("contexts", {0, 1, 2}), ("integration_types", {0, 1})):
        value = cmd.get(key)
        if value is not None and (
            not isinstance(value, list) or any(v not in valid for v in value)
        ):
            _add_error(errors, [key], "ENUM_TYPE_COERCE", f"Invalid {key}.")
    if "nsfw" in cmd and not isinstance(cmd["nsfw"], bool):
        _add_error(errors, ["nsfw"], "BASE_TYPE_BOOLEAN", "Must be a boolean.")
    if _command_size(cmd) > _COMMAND_MAX_SIZE:
        _add_error(
            errors,
            [],
            "APPLICATION_COMMAND_TOO_LARGE",
            f"Command exceeds maximum size ({_COMMAND_MAX_SIZE})",
        )
    return errors


def validate_commands(commands: Any) -> dict[str, Any]:
    """Validate a bulk-overwrite payload like Discord; returns the ``errors`` dict ({} if valid)."""
    errors: dict[str, Any] = {}
    if not isinstance(commands, list):
        return _err("BASE_TYPE_ARRAY", "Must be an array.")
    counts = Counter(c.get("type", 1) if isinstance(c, Mapping) else 1 for c in commands)
    for ctype, count in counts.items():
        limit = _COMMAND_LIMITS.get(ctype)
        if limit is not None and count > limit:
            _add_error(
                errors,
                [],
                "APPLICATION_COMMANDS_LIMIT_EXCEEDED",
                f"Maximum number of type {ctype} application commands reached ({limit})",
            )
    seen: set[tuple[Any, Any]] = set()
    for i, cmd in enumerate(commands):
        cmd_errors = _validate_command(cmd)
        if isinstance(cmd, Mapping):
            key = (cmd.get("type", 1), cmd.get("name"))
            if key in seen:
                _add_error(
                    cmd_errors,
                    ["name"],
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    f"Application command names must be unique: {cmd.get('name')!r}",
                )
            seen.add(key)
        if cmd_errors:
            errors[str(i)] = cmd_errors
    return errors

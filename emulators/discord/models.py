"""Shared models of the Discord emulator: constants, errors, request records, guilds and the
record of each interaction.

World state is plain dicts shaped like Discord payloads; these are the few typed pieces every
part of the emulator (REST routes, gateway, CDN, the test driver) shares.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from .changes import Changes
from .config import Settings

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

API_PREFIX_RE = re.compile(r"^/api(?:/v\d+)?")

#: which gateway clients get an event: every one, the first, the last, or one by index
ToSpec = Literal["all", "first", "last"] | int


def snowflake_time(snowflake: int) -> float:
    """Return the epoch seconds encoded in a Discord snowflake."""
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def err(code: str, message: str) -> dict[str, Any]:
    return {"_errors": [{"code": code, "message": message}]}


def add_error(errors: dict[str, Any], path: Sequence[str], code: str, message: str) -> None:
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


def json_response(
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
        return API_PREFIX_RE.sub("", self.path) or "/"


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
    joined_at: str = field(default_factory=now_iso)

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

    def __init__(self, payload: dict[str, Any], *, settings: Settings, changes: Changes) -> None:
        self._settings = settings
        self._changes = changes
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
        data: dict[str, Any] = self.payload["data"]
        return data

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
        ttl = self._settings.token_ttl
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
        await self._changes.wait_until(lambda: predicate(self), timeout, description=f"{self!r}")
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

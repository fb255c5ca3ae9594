"""The emulated message store: every channel's messages, as Discord message payloads.

:class:`MessageStore` holds them. Messages are created by the bot (REST and interaction routes,
through :meth:`MessageStore.create_from_body`) or by tests (``emu.add_message``); tests read
them with ``emu.public_messages``, ``emu.all_messages`` and ``emu.wait_for_message``.
"""

from __future__ import annotations

import contextlib
import copy
import mimetypes
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .cdn import Cdn, image_info
from .changes import Changes
from .config import Settings
from .connections import Connections
from .ids import Snowflakes
from .models import (
    EPHEMERAL,
    IS_COMPONENTS_V2,
    LOADING,
    SUPPRESS_EMBEDS,
    APIError,
    InteractionRecord,
    UploadedFile,
    now_iso,
)
from .world import World

GUILD_MESSAGES_INTENT = 1 << 9
DIRECT_MESSAGES_INTENT = 1 << 12


class MessageStore:
    """Create, edit, delete and look up the messages of every channel."""

    def __init__(
        self,
        settings: Settings,
        world: World,
        cdn: Cdn,
        snowflakes: Snowflakes,
        connections: Connections,
        changes: Changes,
    ) -> None:
        self._settings = settings
        self._world = world
        self._cdn = cdn
        self._snowflakes = snowflakes
        self._connections = connections
        self._changes = changes
        self.messages: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        self._index: dict[int, dict[str, Any]] = {}
        self.deleted_messages: list[dict[str, Any]] = []

    @property
    def bot_user(self) -> dict[str, Any]:
        """The author of the bot's messages."""
        return self._world.bot_user

    def refresh_urls(self, message: dict[str, Any]) -> None:
        """Fresh signed URLs for the message's attachments (as a fetch of it gets)."""
        self._cdn.refresh_message_urls(message)

    def get(self, message_id: int) -> dict[str, Any] | None:
        """A stored message by id (any channel, ephemeral ones included), if it exists."""
        return self._index.get(message_id)

    def message_dict(self, ref: Mapping[str, Any] | int | str) -> dict[str, Any]:
        mid = int(ref["id"]) if isinstance(ref, Mapping) else int(ref)
        msg = self._index.get(mid)
        if msg is None:
            raise LookupError(f"unknown message {mid}")
        return msg

    def public_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """Messages everyone in the channel can see (no ephemeral ones), oldest first."""
        return [m for m in self.messages.get(int(channel_id), []) if not m["flags"] & EPHEMERAL]

    def all_messages(self) -> list[dict[str, Any]]:
        """Every stored message of every channel."""
        return [m for msgs in self.messages.values() for m in msgs]

    def make_message(
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
        channel = self._world.channel(channel_id)
        mid = self._snowflakes.next()
        msg: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "author": copy.deepcopy(author),
            "content": content,
            "timestamp": now_iso(),
            "edited_timestamp": None,
            "tts": tts,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": list(attachments),
            "embeds": resolve_embeds(embeds, attachments),
            "reactions": [],
            "pinned": False,
            "type": msg_type,
            "flags": flags,
            "components": copy.deepcopy(list(components)),
        }
        if channel.get("guild_id"):
            msg["guild_id"] = channel["guild_id"]
        if interaction is not None:
            msg["webhook_id"] = str(self._settings.application_id)
            msg["application_id"] = str(self._settings.application_id)
            user = copy.deepcopy(self._world.users[interaction.user_id])
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
            ref = self._index.get(int(message_reference.get("message_id", 0) or 0))
            msg["referenced_message"] = copy.deepcopy(ref) if ref else None
        self.messages[int(channel_id)].append(msg)
        self._index[mid] = msg
        if not flags & EPHEMERAL:
            channel["last_message_id"] = str(mid)
        self._changes.notify()
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
        author = self._world.add_user(author_id or self._world.default_user_id)
        atts = [self.coerce_attachment(a, "file") for a in attachments]
        msg = self.make_message(
            channel_id, author=author, content=content, embeds=embeds, attachments=atts
        )
        if dispatch:
            guild = self._world.guild_of_channel(channel_id)
            for conn in self._connections.connections_for(guild.id if guild else None):
                conn.dispatch("MESSAGE_CREATE", copy.deepcopy(msg))
        return msg

    def coerce_attachment(self, value: Any, default_name: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            info = image_info(data)
            ext = mimetypes.guess_extension(info[2]) if info and info[2] else None
            return self._cdn.add(data, f"{default_name}{ext or '.bin'}", "auto")
        if isinstance(value, tuple) and value and isinstance(value[0], bytes | bytearray):
            data, filename, *rest = value
            return self._cdn.add(bytes(data), filename, rest[0] if rest else "auto")
        raise TypeError(f"cannot use {type(value).__name__} as an attachment")

    def delete(self, msg: dict[str, Any]) -> None:
        cid = int(msg["channel_id"])
        with contextlib.suppress(ValueError):
            self.messages[cid].remove(msg)
        self._index.pop(int(msg["id"]), None)
        self.deleted_messages.append(msg)
        self._changes.notify()

    def uploaded_attachments(
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
            att = self._cdn.store(
                up.data,
                str(entry.get("filename") or up.filename),
                up.content_type,
                sniff=True,
                description=entry.get("description"),
                ephemeral=ephemeral,
            )
            new.append(self._cdn.payload(att))
        return keep + new

    def create_from_body(
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
        attachments = self.uploaded_attachments(body, files, ephemeral=bool(flags & EPHEMERAL))
        msg = self.make_message(
            channel_id,
            author=self._world.bot_user,
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
        self._dispatch_own_message(msg)
        return msg

    def _dispatch_own_message(self, msg: dict[str, Any]) -> None:
        """MESSAGE_CREATE for a message the bot (or its interaction webhook) created, to the
        connections that identified with the intent that carries it (``GUILD_MESSAGES`` in a
        server, ``DIRECT_MESSAGES`` in a DM), as Discord sends it; ephemeral ones are never
        sent."""
        if msg["flags"] & EPHEMERAL:
            return
        guild = self._world.guild_of_channel(int(msg["channel_id"]))
        intent = GUILD_MESSAGES_INTENT if guild is not None else DIRECT_MESSAGES_INTENT
        for conn in self._connections.connections_for(guild.id if guild else None):
            if int((conn.identify or {}).get("intents") or 0) & intent:
                conn.dispatch("MESSAGE_CREATE", copy.deepcopy(msg))

    def edit_from_body(
        self, msg: dict[str, Any], body: Mapping[str, Any], files: Sequence[UploadedFile]
    ) -> None:
        if "content" in body:
            msg["content"] = str(body["content"] or "")
        if "components" in body:
            msg["components"] = copy.deepcopy(body["components"] or [])
        if "attachments" in body or files:
            msg["attachments"] = self.uploaded_attachments(
                body, files, ephemeral=bool(msg["flags"] & EPHEMERAL), existing=msg["attachments"]
            )
        if "embeds" in body:
            msg["embeds"] = resolve_embeds(body["embeds"] or [], msg["attachments"])
        if body.get("flags") is not None:
            keep = msg["flags"] & ~(SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
            msg["flags"] = keep | (int(body["flags"]) & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2))
        msg["flags"] &= ~LOADING
        msg["edited_timestamp"] = now_iso()
        self._changes.notify()



def check_upload(files: Sequence[UploadedFile], limit: int) -> None:
    """Discord's 413 for a file above the upload limit."""
    for up in files:
        if up.size > limit:
            raise APIError(413, 40005, "Request entity too large")


def resolve_embeds(
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

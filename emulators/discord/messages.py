"""The emulated message store: every channel's messages, as Discord message payloads.

A mixin of :class:`DiscordEmulator`. Messages are created by the bot (REST and interaction
routes, through :meth:`_create_from_body`) or by tests (:meth:`add_message`); tests read them
with :meth:`public_messages`, :meth:`all_messages` and :meth:`wait_for_message`.
"""

from __future__ import annotations

import contextlib
import copy
import mimetypes
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .cdn import image_info
from .models import (
    EPHEMERAL,
    IS_COMPONENTS_V2,
    LOADING,
    SUPPRESS_EMBEDS,
    APIError,
    Guild,
    InteractionRecord,
    UploadedFile,
    now_iso,
)

if TYPE_CHECKING:
    from .cdn import Cdn
    from .gateway import Gateway


GUILD_MESSAGES_INTENT = 1 << 9
DIRECT_MESSAGES_INTENT = 1 << 12


class MessagesMixin:
    """Create, edit, delete and look up messages (state lives on the emulator)."""

    messages: defaultdict[int, list[dict[str, Any]]]
    _message_index: dict[int, dict[str, Any]]
    deleted_messages: list[dict[str, Any]]
    users: dict[int, dict[str, Any]]
    bot_user: dict[str, Any]
    application_id: int
    default_user_id: int
    cdn: Cdn
    gateway: Gateway
    # provided by DiscordEmulator and its other parts
    notify: Callable[[], None]
    snowflake: Callable[[], int]
    add_user: Callable[..., dict[str, Any]]
    add_attachment: Callable[..., dict[str, Any]]
    _channel: Callable[[int], dict[str, Any]]
    _guild_of_channel: Callable[[int], Guild | None]

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
        self.notify()
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
            for conn in self.gateway.connections_for(guild.id if guild else None):
                conn.dispatch("MESSAGE_CREATE", copy.deepcopy(msg))
        return msg

    def _coerce_attachment(self, value: Any, default_name: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            info = image_info(data)
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
        self.notify()

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
            att = self.cdn.store(
                up.data,
                str(entry.get("filename") or up.filename),
                up.content_type,
                sniff=True,
                description=entry.get("description"),
                ephemeral=ephemeral,
            )
            new.append(self.cdn.payload(att))
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
        msg = self._make_message(
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
        self._dispatch_own_message(msg)
        return msg

    def _dispatch_own_message(self, msg: dict[str, Any]) -> None:
        """MESSAGE_CREATE for a message the bot (or its interaction webhook) created, to the
        connections that identified with the intent that carries it (``GUILD_MESSAGES`` in a
        server, ``DIRECT_MESSAGES`` in a DM), as Discord sends it; ephemeral ones are never
        sent."""
        if msg["flags"] & EPHEMERAL:
            return
        guild = self._guild_of_channel(int(msg["channel_id"]))
        intent = GUILD_MESSAGES_INTENT if guild is not None else DIRECT_MESSAGES_INTENT
        for conn in self.gateway.connections_for(guild.id if guild else None):
            if int((conn.identify or {}).get("intents") or 0) & intent:
                conn.dispatch("MESSAGE_CREATE", copy.deepcopy(msg))

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
            msg["embeds"] = resolve_embeds(body["embeds"] or [], msg["attachments"])
        if body.get("flags") is not None:
            keep = msg["flags"] & ~(SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
            msg["flags"] = keep | (int(body["flags"]) & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2))
        msg["flags"] &= ~LOADING
        msg["edited_timestamp"] = now_iso()
        self.notify()

    def _check_upload(self, files: Sequence[UploadedFile], limit: int) -> None:
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

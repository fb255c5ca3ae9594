"""The emulated world: users, guilds, roles, channels, members, DM channels and permissions.

:class:`World` holds them; tests build their world through the emulator's ``add_guild``,
``add_channel``, ``add_member``, ... Each change is dispatched to the gateway clients that handle
the guild (``GUILD_CREATE``, ``CHANNEL_CREATE``, ...), as Discord does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from .changes import Changes
from .config import Settings
from .connections import Connections
from .ids import Snowflakes
from .models import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    BOT_PERMISSIONS,
    EVERYONE_PERMISSIONS,
    APIError,
    Guild,
    now_iso,
)


class World:
    """Users, guilds, channels, members and their permissions."""

    def __init__(
        self,
        settings: Settings,
        snowflakes: Snowflakes,
        connections: Connections,
        changes: Changes,
    ) -> None:
        self._settings = settings
        self._snowflakes = snowflakes
        self._connections = connections
        self._changes = changes
        self.users: dict[int, dict[str, Any]] = {}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self._dm_by_user: dict[int, int] = {}
        self.bot_user = self._make_user(
            settings.bot_user_id, settings.application_name, bot=True
        )
        self.bot_user.update({"verified": True, "mfa_enabled": False, "email": None, "flags": 0})
        self.owner_user = self.add_user(name="app-owner")
        self.default_user_id = int(self.add_user(name="tester")["id"])

    # ------------------------------------------------------------------ users

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
        uid = user_id or self._snowflakes.next()
        if uid in self.users:
            return self.users[uid]
        return self._make_user(uid, name or f"user{uid % 10000}", bot=bot)

    # ------------------------------------------------------------------ world model

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
        gid = guild_id or self._snowflakes.next()
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
            self._snowflakes.next(), self.bot_user["username"], bot_permissions, position=1
        )
        bot_role["managed"] = True
        bot_role["tags"] = {"bot_id": str(self._settings.bot_user_id)}
        guild.roles[int(bot_role["id"])] = bot_role
        guild.members[self._settings.bot_user_id] = self._member_payload(self.bot_user, [int(bot_role["id"])])
        guild.members[owner] = self._member_payload(self.users[owner], [])
        for conn in self._connections.connections_for(gid):
            conn.dispatch("GUILD_CREATE", guild.to_gateway())
        self._changes.notify()
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
            "joined_at": now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }

    def guild(self, guild_id: int) -> Guild:
        try:
            return self.guilds[int(guild_id)]
        except KeyError:
            raise LookupError(f"unknown guild {guild_id}") from None

    def add_role(
        self, guild_id: int, name: str, permissions: int = 0, *, role_id: int | None = None
    ) -> dict[str, Any]:
        """Add a role (dispatches GUILD_ROLE_CREATE)."""
        guild = self.guild(guild_id)
        role = self._role_payload(
            role_id or self._snowflakes.next(), name, permissions, position=len(guild.roles)
        )
        guild.roles[int(role["id"])] = role
        for conn in self._connections.connections_for(guild.id):
            conn.dispatch(
                "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": copy.deepcopy(role)}
            )
        self._changes.notify()
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
        guild = self.guild(guild_id)
        cid = channel_id or self._snowflakes.next()
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
        for conn in self._connections.connections_for(guild.id):
            conn.dispatch("CHANNEL_CREATE", copy.deepcopy(channel))
        self._changes.notify()
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
        guild = self.guild(guild_id)
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
        for conn in self._connections.connections_for(guild.id):
            conn.dispatch("GUILD_MEMBER_ADD", {**copy.deepcopy(member), "guild_id": str(guild.id)})
        self._changes.notify()
        return member

    def ensure_member(self, guild: Guild, user_id: int) -> dict[str, Any]:
        if user_id not in guild.members:
            user = self.add_user(user_id)
            guild.members[user_id] = self._member_payload(user, [])
        return guild.members[user_id]

    def member_permissions(self, guild_id: int, user_id: int) -> int:
        """Guild-level permissions of a member (owner and ADMINISTRATOR get everything)."""
        guild = self.guild(guild_id)
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
        cid = self._snowflakes.next()
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

    def channel(self, channel_id: int) -> dict[str, Any]:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise APIError(404, 10003, "Unknown Channel")
        return channel

    def guild_of_channel(self, channel_id: int) -> Guild | None:
        channel = self.channels.get(int(channel_id))
        if channel is None or not channel.get("guild_id"):
            return None
        return self.guilds.get(int(channel["guild_id"]))

    def guild_upload_limit(self, guild_id: int | None) -> int:
        """Upload limit for a guild (its own, or by boost tier, or ``emu.upload_limit``)."""
        if guild_id is None:
            return self._settings.upload_limit
        guild = self.guilds.get(guild_id)
        if guild is None:
            return self._settings.upload_limit
        if guild.upload_limit is not None:
            return guild.upload_limit
        tiers = {2: 50 * 1024 * 1024, 3: 100 * 1024 * 1024}
        return max(self._settings.upload_limit, tiers.get(guild.premium_tier, 0))

    def channel_or_lookup(self, channel_id: int) -> dict[str, Any]:
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
        guild = self.guild(guild_id)
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
        self,
        channel_id: int,
        target_id: int,
        *,
        allow: int = 0,
        deny: int = 0,
        member: bool = False,
    ) -> dict[str, Any]:
        """Set a channel's permission overwrite for a role (or, with ``member``, a member);
        dispatches CHANNEL_UPDATE. Returns the channel dict."""
        channel = self.channel(channel_id)
        guild = self.guild_of_channel(channel_id)
        if guild is None:
            raise LookupError(f"channel {channel_id} is not in a guild")
        overwrite = {
            "id": str(target_id),
            "type": 1 if member else 0,
            "allow": str(allow),
            "deny": str(deny),
        }
        channel["permission_overwrites"] = [
            o for o in channel.get("permission_overwrites") or [] if int(o["id"]) != target_id
        ] + [overwrite]
        for conn in self._connections.connections_for(guild.id):
            conn.dispatch("CHANNEL_UPDATE", copy.deepcopy(channel))
        self._changes.notify()
        return channel

"""REST routes of the bot's own world: users and DMs, the application, channels and their
messages, and guild look-ups (``/users``, ``/applications/@me``, ``/channels``, ``/guilds``).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from aiohttp import web

from .cdn import Cdn
from .config import Settings
from .http import json_body, read_body
from .messages import MessageStore, check_upload
from .models import (
    EPHEMERAL,
    IS_COMPONENTS_V2,
    SUPPRESS_EMBEDS,
    SUPPRESS_NOTIFICATIONS,
    APIError,
    err,
    json_response,
)
from .validation import validate_message
from .world import World


class ChannelRoutes:
    """Users, the application, channels, messages and guilds."""

    def __init__(
        self, settings: Settings, world: World, messages: MessageStore, cdn: Cdn
    ) -> None:
        self._settings = settings
        self._world = world
        self._messages = messages
        self._cdn = cdn

    def add_routes(self, app: web.Application, api: str) -> None:
        """Register the routes under the API prefix ``api`` (and a 404 for every other one)."""
        r = app.router
        r.add_get(api + "/users/@me", self.me)
        r.add_post(api + "/users/@me/channels", self.create_dm)
        r.add_get(api + "/users/{user_id:\\d+}", self.user)
        r.add_get(api + "/oauth2/applications/@me", self.application)
        r.add_get(api + "/applications/@me", self.application)
        channel = api + "/channels/{channel_id:\\d+}"
        r.add_get(channel, self.get_channel)
        r.add_get(channel + "/messages", self.list_messages)
        r.add_post(channel + "/messages", self.post_message)
        r.add_post(channel + "/typing", self.typing)
        r.add_get(channel + "/messages/{message_id:\\d+}", self.get_message)
        r.add_patch(channel + "/messages/{message_id:\\d+}", self.edit_message)
        r.add_delete(channel + "/messages/{message_id:\\d+}", self.delete_message)
        guild = api + "/guilds/{guild_id:\\d+}"
        r.add_get(guild, self.get_guild)
        r.add_get(guild + "/channels", self.guild_channels)
        r.add_get(guild + "/roles", self.guild_roles)
        r.add_get(guild + "/members/{user_id:\\d+}", self.guild_member)

    # ------------------------------------------------------------------ users and application

    async def me(self, request: web.Request) -> web.Response:
        return json_response(self._world.bot_user)

    async def user(self, request: web.Request) -> web.Response:
        user = self._world.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise APIError(404, 10013, "Unknown User")
        return json_response(user)

    async def create_dm(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            uid = int(body["recipient_id"])
        except (KeyError, TypeError, ValueError):
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors={"recipient_id": err("BASE_TYPE_REQUIRED", "This field is required")},
            ) from None
        return json_response(self._world.dm_channel(uid))

    async def application(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "id": str(self._settings.application_id),
                "name": self._settings.application_name,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "hook": True,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": hashlib.sha256(self._settings.secret.encode()).hexdigest(),
                "owner": copy.deepcopy(self._world.owner_user),
                "team": None,
                "flags": self._settings.application_flags,
                "rpc_origins": [],
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "role_connections_verification_url": None,
                "approximate_guild_count": len(self._world.guilds),
                "approximate_user_install_count": 0,
                "bot": copy.deepcopy(self._world.bot_user),
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

    # ------------------------------------------------------------------ channels and messages

    async def get_channel(self, request: web.Request) -> web.Response:
        return json_response(self._world.channel(int(request.match_info["channel_id"])))

    async def typing(self, request: web.Request) -> web.Response:
        self._world.channel(int(request.match_info["channel_id"]))
        return web.Response(status=204)

    async def list_messages(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["channel_id"])
        self._world.channel(cid)
        try:
            limit = min(100, max(1, int(request.query.get("limit", "50"))))
            before = int(request.query["before"]) if "before" in request.query else None
            after = int(request.query["after"]) if "after" in request.query else None
        except ValueError:
            raise APIError(400, 50035, "Invalid Form Body") from None
        msgs = self._messages.public_messages(cid)
        if before is not None:
            msgs = [m for m in msgs if int(m["id"]) < before]
        if after is not None:
            msgs = [m for m in msgs if int(m["id"]) > after]
            picked = msgs[:limit]
        else:
            picked = msgs[-limit:]
        for m in picked:
            self._cdn.refresh_message_urls(m)
        return json_response(list(reversed(picked)))

    def _channel_message(self, request: web.Request) -> dict[str, Any]:
        cid = int(request.match_info["channel_id"])
        self._world.channel(cid)
        msg = self._messages.get(int(request.match_info["message_id"]))
        if msg is None or int(msg["channel_id"]) != cid or msg["flags"] & EPHEMERAL:
            raise APIError(404, 10008, "Unknown Message")
        return msg

    async def get_message(self, request: web.Request) -> web.Response:
        msg = self._channel_message(request)
        self._cdn.refresh_message_urls(msg)
        return json_response(msg)

    async def post_message(self, request: web.Request) -> web.Response:
        cid = int(request.match_info["channel_id"])
        self._world.channel(cid)
        body, files = await read_body(request)
        if not isinstance(body, dict):
            body = {}
        guild = self._world.guild_of_channel(cid)
        check_upload(files, self._world.guild_upload_limit(guild.id if guild else None))
        validate_message(body, files, require_content=True)
        reference = body.get("message_reference")
        msg_type = 0
        if reference:
            ref_id = int(reference.get("message_id") or 0)
            if self._messages.get(ref_id) is None and reference.get("fail_if_not_exists", True):
                raise APIError(
                    400,
                    50035,
                    "Invalid Form Body",
                    errors={"message_reference": err("REPLIES_UNKNOWN_MESSAGE", "Unknown message")},
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
        msg = self._messages.create_from_body(
            cid, body, files, flags=flags, msg_type=msg_type, message_reference=reference or None
        )
        return json_response(msg)

    async def edit_message(self, request: web.Request) -> web.Response:
        msg = self._channel_message(request)
        body, files = await read_body(request)
        if not isinstance(body, dict):
            body = {}
        if int(msg["author"]["id"]) != self._settings.bot_user_id:
            raise APIError(403, 50005, "Cannot edit a message authored by another user")
        guild = self._world.guild_of_channel(int(msg["channel_id"]))
        check_upload(files, self._world.guild_upload_limit(guild.id if guild else None))
        validate_message(body, files, require_content=False)
        self._messages.edit_from_body(msg, body, files)
        return json_response(msg)

    async def delete_message(self, request: web.Request) -> web.Response:
        msg = self._channel_message(request)
        self._messages.delete(msg)
        return web.Response(status=204)

    # ------------------------------------------------------------------ guilds

    async def get_guild(self, request: web.Request) -> web.Response:
        guild = self._world.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        return json_response(guild.to_rest())

    async def guild_channels(self, request: web.Request) -> web.Response:
        guild = self._world.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        return json_response(list(guild.channels.values()))

    async def guild_roles(self, request: web.Request) -> web.Response:
        guild = self._world.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        return json_response(list(guild.roles.values()))

    async def guild_member(self, request: web.Request) -> web.Response:
        guild = self._world.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise APIError(404, 10004, "Unknown Guild")
        member = guild.members.get(int(request.match_info["user_id"]))
        if member is None:
            raise APIError(404, 10007, "Unknown Member")
        return json_response(member)

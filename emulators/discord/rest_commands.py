"""REST routes of application commands: ``/applications/{app}/commands`` and
``/applications/{app}/guilds/{guild}/commands`` (bulk overwrite, create, edit, delete, list),
each write validated by the :class:`~.commands.CommandRegistry`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .commands import CommandRegistry
from .config import Settings
from .http import json_body, read_body
from .models import APIError, err, json_response
from .validation import command_input
from .world import World


class CommandRoutes:
    """``/applications/{app}/commands`` and ``/applications/{app}/guilds/{guild}/commands``."""

    def __init__(self, settings: Settings, registry: CommandRegistry, world: World) -> None:
        self._settings = settings
        self._registry = registry
        self._world = world

    def add_routes(self, app: web.Application, api: str) -> None:
        """Register the routes under the API prefix ``api``."""
        r = app.router
        for prefix in (
            "/applications/{app_id:\\d+}",
            "/applications/{app_id:\\d+}/guilds/{guild_id:\\d+}",
        ):
            r.add_get(api + prefix + "/commands", self.list_commands)
            r.add_put(api + prefix + "/commands", self.overwrite)
            r.add_post(api + prefix + "/commands", self.create)
            r.add_get(api + prefix + "/commands/{command_id:\\d+}", self.get)
            r.add_patch(api + prefix + "/commands/{command_id:\\d+}", self.edit)
            r.add_delete(api + prefix + "/commands/{command_id:\\d+}", self.delete)

    def _scope(self, request: web.Request) -> tuple[int | None, list[dict[str, Any]]]:
        if int(request.match_info["app_id"]) != self._settings.application_id:
            raise APIError(403, 50001, "Missing Access")
        gid = request.match_info.get("guild_id")
        if gid is None:
            return None, self._registry.global_commands
        guild_id = int(gid)
        if guild_id not in self._world.guilds:
            raise APIError(403, 50001, "Missing Access")
        return guild_id, self._registry.guild_commands.get(guild_id, [])

    async def list_commands(self, request: web.Request) -> web.Response:
        _, commands = self._scope(request)
        return json_response(commands)

    async def overwrite(self, request: web.Request) -> web.Response:
        guild_id, _ = self._scope(request)
        payload, _ = await read_body(request)
        if not isinstance(payload, list):
            raise APIError(
                400, 50035, "Invalid Form Body", errors=err("BASE_TYPE_ARRAY", "Must be an array.")
            )
        return json_response(self._registry.register_commands(payload, guild_id))

    def _by_id(self, commands: list[dict[str, Any]], command_id: str) -> dict[str, Any]:
        for cmd in commands:
            if cmd["id"] == command_id:
                return cmd
        raise APIError(404, 10063, "Unknown application command")

    async def get(self, request: web.Request) -> web.Response:
        _, commands = self._scope(request)
        return json_response(self._by_id(commands, request.match_info["command_id"]))

    async def create(self, request: web.Request) -> web.Response:
        guild_id, commands = self._scope(request)
        body = await json_body(request)
        key = (body.get("type", 1), body.get("name"))
        others = [c for c in commands if (c.get("type", 1), c["name"]) != key]
        raws = [command_input(c) for c in others] + [body]
        stored = self._registry.register_commands(raws, guild_id)
        return json_response(stored[-1], 201 if len(others) == len(commands) else 200)

    async def edit(self, request: web.Request) -> web.Response:
        guild_id, commands = self._scope(request)
        target = self._by_id(commands, request.match_info["command_id"])
        body = await json_body(request)
        raws = [
            command_input(c) if c is not target else {**command_input(c), **body} for c in commands
        ]
        stored = self._registry.register_commands(raws, guild_id)
        return json_response(next(c for c in stored if c["id"] == target["id"]))

    async def delete(self, request: web.Request) -> web.Response:
        guild_id, commands = self._scope(request)
        target = self._by_id(commands, request.match_info["command_id"])
        self._registry.replace(guild_id, [c for c in commands if c is not target])
        return web.Response(status=204)

"""Application commands: the synced registry (a mixin of :class:`DiscordEmulator`) and the
REST routes a bot syncs them through (bulk overwrite, create, edit, delete, list).

Every write is checked by :func:`~emulators.discord.validation.validate_commands` first, so a
command tree Discord would refuse is refused here too (and kept in ``rejected_syncs``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .models import APIError, Guild, err, json_response
from .validation import command_input, validate_commands

if TYPE_CHECKING:
    from .emulator import DiscordEmulator


class CommandsMixin:
    """The synced commands, global and per guild (state lives on the emulator)."""

    global_commands: list[dict[str, Any]]
    guild_commands: dict[int, list[dict[str, Any]]]
    sync_count: int
    rejected_syncs: list[tuple[int | None, Any, dict[str, Any]]]
    application_id: int
    strict_commands: bool
    guilds: dict[int, Guild]
    # provided by DiscordEmulator and its other parts
    notify: Callable[[], None]
    snowflake: Callable[[], int]

    @property
    def synced_commands(self) -> dict[int | None, list[dict[str, Any]]]:
        """Synced commands: key ``None`` for global, a guild id for guild commands."""
        out: dict[int | None, list[dict[str, Any]]] = {None: self.global_commands}
        out.update(self.guild_commands.items())
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
        self.notify()
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


class CommandRoutes:
    """``/applications/{app}/commands`` and ``/applications/{app}/guilds/{guild}/commands``."""

    def __init__(self, emu: DiscordEmulator) -> None:
        self.emu = emu

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
        if int(request.match_info["app_id"]) != self.emu.application_id:
            raise APIError(403, 50001, "Missing Access")
        gid = request.match_info.get("guild_id")
        if gid is None:
            return None, self.emu.global_commands
        guild_id = int(gid)
        if guild_id not in self.emu.guilds:
            raise APIError(403, 50001, "Missing Access")
        return guild_id, self.emu.guild_commands.get(guild_id, [])

    async def list_commands(self, request: web.Request) -> web.Response:
        _, commands = self._scope(request)
        return json_response(commands)

    async def overwrite(self, request: web.Request) -> web.Response:
        guild_id, _ = self._scope(request)
        payload, _ = await self.emu.http.read_body(request)
        if not isinstance(payload, list):
            raise APIError(
                400, 50035, "Invalid Form Body", errors=err("BASE_TYPE_ARRAY", "Must be an array.")
            )
        return json_response(self.emu.register_commands(payload, guild_id))

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
        body = await self.emu.http.json_body(request)
        key = (body.get("type", 1), body.get("name"))
        others = [c for c in commands if (c.get("type", 1), c["name"]) != key]
        raws = [command_input(c) for c in others] + [body]
        stored = self.emu.register_commands(raws, guild_id)
        return json_response(stored[-1], 201 if len(others) == len(commands) else 200)

    async def edit(self, request: web.Request) -> web.Response:
        guild_id, commands = self._scope(request)
        target = self._by_id(commands, request.match_info["command_id"])
        body = await self.emu.http.json_body(request)
        raws = [
            command_input(c) if c is not target else {**command_input(c), **body} for c in commands
        ]
        stored = self.emu.register_commands(raws, guild_id)
        return json_response(next(c for c in stored if c["id"] == target["id"]))

    async def delete(self, request: web.Request) -> web.Response:
        guild_id, commands = self._scope(request)
        target = self._by_id(commands, request.match_info["command_id"])
        remaining = [c for c in commands if c is not target]
        if guild_id is None:
            self.emu.global_commands = remaining
        else:
            self.emu.guild_commands[guild_id] = remaining
        self.emu.notify()
        return web.Response(status=204)

"""Application commands: the synced registry, global and per guild (its REST routes are in
:mod:`.rest_commands`).

Every write is checked by :func:`~emulators.discord.validation.validate_commands` first, so a
command tree Discord would refuse is refused here too (and kept in ``rejected_syncs``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .changes import Changes
from .config import Settings
from .ids import Snowflakes
from .models import APIError
from .validation import validate_commands


class CommandRegistry:
    """The synced commands, global and per guild."""

    def __init__(self, settings: Settings, snowflakes: Snowflakes, changes: Changes) -> None:
        self._settings = settings
        self._snowflakes = snowflakes
        self._changes = changes
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.sync_count = 0
        self.rejected_syncs: list[tuple[int | None, Any, dict[str, Any]]] = []

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
        self._changes.notify()
        return copy.deepcopy(stored)

    def replace(self, guild_id: int | None, commands: list[dict[str, Any]]) -> None:
        """Keep ``commands`` as the scope's commands (a deletion; no validation needed)."""
        if guild_id is None:
            self.global_commands = commands
        else:
            self.guild_commands[guild_id] = commands
        self._changes.notify()

    def _normalize_command(
        self, raw: Mapping[str, Any], guild_id: int | None, cid: str | None
    ) -> dict[str, Any]:
        cmd = copy.deepcopy(dict(raw))
        cmd["id"] = cid or str(self._snowflakes.next())
        cmd["application_id"] = str(self._settings.application_id)
        cmd["version"] = str(self._snowflakes.next())
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

    def require_command(
        self, name: str, command_type: int, guild_id: int | None
    ) -> dict[str, Any] | None:
        cmd = self.find_command(name, command_type, guild_id)
        if cmd is None and self._settings.strict_commands:
            known = sorted({c["name"] for scope in self.synced_commands.values() for c in scope})
            raise LookupError(
                f"command {name!r} (type {command_type}) was not synced; synced: {known}. "
                "Sync the tree, call emu.register_commands(), or set emu.strict_commands = False."
            )
        return cmd

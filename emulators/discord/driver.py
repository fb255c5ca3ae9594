"""The test driver: what members do in Discord, sent to the bot as INTERACTION_CREATE.

:class:`Driver` (the emulator's ``invoke_slash``, ... delegate to it): :meth:`invoke_slash`, :meth:`invoke_message_command`,
:meth:`invoke_user_command`, :meth:`click_button`, :meth:`select` and :meth:`submit_modal` build
the interaction payload Discord would send (member, permissions, resolved options and
attachments, the channel) from the synced commands and the world, deliver it to the chosen
gateway clients and return its :class:`InteractionRecord`.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping, Sequence
from typing import Any

from .changes import Changes
from .commands import CommandRegistry
from .components import find_component, modal_submission
from .config import Settings
from .connections import Connections, GatewayConnection
from .ids import Snowflakes
from .interactions import Interactions
from .messages import MessageStore
from .models import ALL_PERMISSIONS, DM_APP_PERMISSIONS, InteractionRecord, ToSpec
from .validation import SUBCOMMAND_TYPES
from .world import World


class Driver:
    """Interactions as members cause them, delivered to the bot's gateway clients."""

    def __init__(
        self,
        settings: Settings,
        world: World,
        messages: MessageStore,
        commands: CommandRegistry,
        interactions: Interactions,
        connections: Connections,
        snowflakes: Snowflakes,
        changes: Changes,
    ) -> None:
        self._settings = settings
        self._world = world
        self._messages = messages
        self._commands = commands
        self._interactions = interactions
        self._connections = connections
        self._snowflakes = snowflakes
        self._changes = changes

    def _resolve_location(
        self, guild_id: int | None, channel_id: int | None, dm: bool
    ) -> tuple[int | None, int | None]:
        if dm:
            return None, channel_id
        if channel_id is not None:
            channel = self._world.channel_or_lookup(channel_id)
            return (int(channel["guild_id"]) if channel.get("guild_id") else None), int(channel_id)
        if guild_id is None:
            if len(self._world.guilds) == 1:
                guild_id = next(iter(self._world.guilds))
            elif not self._world.guilds:
                return None, None
            else:
                raise ValueError("several guilds exist: pass guild_id or channel_id")
        guild = self._world.guild(guild_id)
        text = [cid for cid, c in guild.channels.items() if c["type"] == 0]
        if not text:
            raise ValueError(f"guild {guild_id} has no text channel: add_channel() first")
        return guild_id, text[0]

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
        uid = user_id or self._world.default_user_id
        user = self._world.add_user(uid)
        iid = self._snowflakes.next()
        token = self._interactions.new_token(iid)
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self._settings.application_id),
            "type": itype,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": attachment_size_limit or self._world.guild_upload_limit(guild_id),
        }
        if guild_id is not None:
            guild = self._world.guild(guild_id)
            if channel_id is None:
                raise ValueError("channel_id is required")
            member = self._world.ensure_member(guild, uid)
            perms = self._world.channel_permissions(guild.id, uid, channel_id)
            bot_perms = self._world.channel_permissions(guild.id, self._settings.bot_user_id, channel_id)
            channel = copy.deepcopy(self._world.channel_or_lookup(channel_id))
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
            dm = self._world.dm_channel(uid)
            if channel_id is not None and int(channel_id) != int(dm["id"]):
                dm = self._world.channel_or_lookup(channel_id)
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
        return self._interactions.open(payload)

    async def deliver(
        self, rec: InteractionRecord, to: ToSpec | GatewayConnection, timeout: float
    ) -> InteractionRecord:
        if not self._connections.connections:
            await self._connections.wait_connected(1, timeout)
        conns = self._connections.select(to, rec.guild_id)
        if not conns:
            raise RuntimeError(f"no connected gateway client handles guild {rec.guild_id}")
        for conn in conns:
            conn.dispatch("INTERACTION_CREATE", copy.deepcopy(rec.payload))
            rec.delivered_to.append(conn.number)
        await asyncio.gather(*(c.flush(timeout) for c in conns))
        self._changes.notify()
        return rec

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
        command = self._commands.require_command(root, 1, guild_id)
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
                (o for o in defs if o["name"] == segment and o["type"] in SUBCOMMAND_TYPES), None
            )
            if opt is None:
                raise LookupError(f"/{root}: no subcommand or group {segment!r}")
            wrappers.append((segment, opt["type"]))
            defs = opt.get("options", [])
        if defs and any(o["type"] in SUBCOMMAND_TYPES for o in defs):
            raise ValueError(f"/{name}: a subcommand must be chosen")
        opts = self._build_options(defs, values, resolved, guild_id)
        for segment, seg_type in reversed(wrappers):
            opts = [{"name": segment, "type": seg_type, "options": opts}]
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self._snowflakes.next()),
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
        return await self.deliver(rec, to, timeout)

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
            od = by_name[oname] if by_name is not None else {"type": infer_option_type(value)}
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
            att = self._messages.coerce_attachment(value, oname)
            att["ephemeral"] = True
            resolved.setdefault("attachments", {})[att["id"]] = att
            return att["id"]
        if otype in (6, 9) and (
            not isinstance(value, Mapping) or "user" in value or "username" in value
        ):
            ident: Any = value
            if isinstance(value, Mapping):
                ident = value["user"]["id"] if "user" in value else value["id"]
            uid = int(ident)
            if otype == 6 or uid in self._world.users:
                user = self._world.add_user(uid)
                resolved.setdefault("users", {})[str(uid)] = copy.deepcopy(user)
                guild = self._world.guilds.get(guild_id) if guild_id is not None else None
                if guild is not None and uid in guild.members:
                    member = {k: v for k, v in guild.members[uid].items() if k != "user"}
                    member["permissions"] = str(self._world.member_permissions(guild.id, uid))
                    resolved.setdefault("members", {})[str(uid)] = member
                return str(uid)
        if otype in (8, 9):
            rid = int(value["id"]) if isinstance(value, Mapping) else int(value)
            guild = self._world.guild(guild_id) if guild_id is not None else None
            role = guild.roles.get(rid) if guild else None
            if role is None:
                raise LookupError(f"option {oname!r}: unknown role {rid}")
            resolved.setdefault("roles", {})[str(rid)] = copy.deepcopy(role)
            return str(rid)
        if otype == 7:
            cid = int(value["id"]) if isinstance(value, Mapping) else int(value)
            channel = self._world.channel_or_lookup(cid)
            entry: dict[str, Any] = {
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
        msg = self._messages.get(
            int(target_message if isinstance(target_message, int) else target_message["id"])
        )
        if msg is None:
            if isinstance(target_message, int):
                raise LookupError(f"unknown message {target_message}")
            msg = dict(target_message)
        channel_id = int(msg["channel_id"])
        guild_id, _ = self._resolve_location(None, channel_id, False)
        command = self._commands.require_command(name, 3, guild_id)
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self._snowflakes.next()),
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
        return await self.deliver(rec, to, timeout)

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
        command = self._commands.require_command(name, 2, guild_id)
        resolved: dict[str, Any] = {}
        self._option_value("target", {"type": 6}, target_user_id, resolved, guild_id)
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self._snowflakes.next()),
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
        return await self.deliver(rec, to, timeout)

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
        msg = self._messages.message_dict(message)
        comp = find_component(msg.get("components", []), custom_id)
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
        return await self.deliver(rec, to, timeout)

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
                    for r in reversed(self._interactions.records.values())
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
        components = modal_submission(definition, values)
        msg = self._messages.message_dict(message) if message is not None else None
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
        return await self.deliver(rec, to, timeout)

    def expire_token(self, interaction: InteractionRecord | int) -> None:
        """Make webhook calls with this interaction's token answer 401/50027."""
        rec = (
            interaction
            if isinstance(interaction, InteractionRecord)
            else self._interactions.records[int(interaction)]
        )
        rec.token_revoked = True


def infer_option_type(value: Any) -> int:
    """The option type a value stands for (when ``strict_commands`` is off)."""
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

"""The Discord emulator's facade: :class:`DiscordEmulator`, composed of its parts.

An unmodified discord.py 2.7 client talks to it once ``discord.http.Route.BASE`` is
``emu.api_base`` and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` is
``yarl.URL(emu.gateway_url)`` (:meth:`DiscordEmulator.patch_discord_py` sets both).
One aiohttp server on 127.0.0.1 (random free port) serves the REST routes a bot needs
(:mod:`.rest_channels`, :mod:`.rest_interactions`, :mod:`.rest_commands`), signed attachment
URLs (:mod:`.cdn`) and the Gateway (:mod:`.gateway`), through one middleware (:mod:`.http`) that
records requests and applies planned faults (:mod:`.faults`).

Each concern is an object built here, once, with the parts it works with passed in: the
settings (:mod:`.config`), the change notifier (:mod:`.changes`), the ids (:mod:`.ids`), the open
gateway connections (:mod:`.connections`), the world (:mod:`.world`), the CDN, the message store
(:mod:`.messages`), the synced commands (:mod:`.commands`), the interactions sent
(:mod:`.interactions`) and the test driver (:mod:`.driver`). This facade is the API tests hold:
each of its methods and attributes is one of a part's, forwarded.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web

from .cdn import Cdn, StoredAttachment
from .changes import Changes
from .commands import CommandRegistry
from .config import Address, Settings
from .connections import Connections, GatewayConnection
from .driver import Driver
from .faults import DelayRule, FaultRule, Faults
from .gateway import Gateway
from .http import Http
from .ids import Snowflakes
from .interactions import Interactions
from .messages import MessageStore
from .models import (
    BOT_PERMISSIONS,
    EPHEMERAL,
    EVERYONE_PERMISSIONS,
    LOADING,
    APIError,
    Guild,
    InteractionRecord,
    RequestRecord,
    ToSpec,
)
from .rest_channels import ChannelRoutes
from .rest_commands import CommandRoutes
from .rest_interactions import InteractionRoutes
from .world import World

T = TypeVar("T")


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
        self._snowflakes = Snowflakes()
        app_id = application_id or self._snowflakes.next()
        self.settings = Settings(
            application_id=app_id,
            bot_user_id=bot_user_id or self._snowflakes.next(),
            application_name=bot_name,
            token=token,
            upload_limit=upload_limit,
            heartbeat_interval_ms=heartbeat_interval_ms,
            token_ttl=token_ttl,
            response_deadline=response_deadline,
            attachment_ttl=attachment_ttl,
            strict_commands=strict_commands,
            recommended_shards=recommended_shards,
            secret=hashlib.sha256(str(app_id).encode()).hexdigest()[:16],
        )
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.address = Address(self._sock.getsockname()[1])
        self._runner: web.AppRunner | None = None
        self._undo_patch: Callable[[], None] | None = None

        settings, snowflakes = self.settings, self._snowflakes
        self._changes = changes = Changes()
        self._connections = connections = Connections(changes)
        self.world = world = World(settings, snowflakes, connections, changes)
        self.cdn = cdn = Cdn(settings, self.address, snowflakes, changes)
        self.store = store = MessageStore(settings, world, cdn, snowflakes, connections, changes)
        self.commands = commands = CommandRegistry(settings, snowflakes, changes)
        self._interactions = interactions = Interactions(settings, changes)
        self.faults = faults = Faults()
        self.http = Http(settings, faults, changes)
        self.gateway = Gateway(settings, self.address, world, connections, changes)
        self.driver = Driver(
            settings, world, store, commands, interactions, connections, snowflakes, changes
        )
        self._routes = (
            ChannelRoutes(settings, world, store, cdn),
            InteractionRoutes(settings, interactions, store, changes, self.followup_created),
            CommandRoutes(settings, commands, world),
        )

    # ------------------------------------------------------------------ settings

    @property
    def application_id(self) -> int:
        """The emulated application's id."""
        return self.settings.application_id

    @property
    def bot_user_id(self) -> int:
        """The bot user's id."""
        return self.settings.bot_user_id

    @property
    def application_name(self) -> str:
        """The application's name (the bot user's name at construction)."""
        return self.settings.application_name

    @application_name.setter
    def application_name(self, value: str) -> None:
        self.settings.application_name = value

    @property
    def token(self) -> str | None:
        """The bot token REST and IDENTIFY must use (``None``: any)."""
        return self.settings.token

    @token.setter
    def token(self, value: str | None) -> None:
        self.settings.token = value

    @property
    def upload_limit(self) -> int:
        """The upload limit of DMs and of guilds without their own."""
        return self.settings.upload_limit

    @upload_limit.setter
    def upload_limit(self, value: int) -> None:
        self.settings.upload_limit = value

    @property
    def heartbeat_interval_ms(self) -> int:
        """The heartbeat interval HELLO announces."""
        return self.settings.heartbeat_interval_ms

    @heartbeat_interval_ms.setter
    def heartbeat_interval_ms(self, value: int) -> None:
        self.settings.heartbeat_interval_ms = value

    @property
    def token_ttl(self) -> float | None:
        """Seconds an interaction token works for webhook calls (``None``: forever)."""
        return self.settings.token_ttl

    @token_ttl.setter
    def token_ttl(self, value: float | None) -> None:
        self.settings.token_ttl = value

    @property
    def response_deadline(self) -> float | None:
        """Seconds for an interaction's first callback (``None``: no limit)."""
        return self.settings.response_deadline

    @response_deadline.setter
    def response_deadline(self, value: float | None) -> None:
        self.settings.response_deadline = value

    @property
    def attachment_ttl(self) -> float:
        """Seconds a signed attachment URL works."""
        return self.settings.attachment_ttl

    @attachment_ttl.setter
    def attachment_ttl(self, value: float) -> None:
        self.settings.attachment_ttl = value

    @property
    def strict_commands(self) -> bool:
        """Whether invoking a command that was not synced raises ``LookupError``."""
        return self.settings.strict_commands

    @strict_commands.setter
    def strict_commands(self, value: bool) -> None:
        self.settings.strict_commands = value

    @property
    def recommended_shards(self) -> int:
        """The shard count ``GET /gateway/bot`` recommends."""
        return self.settings.recommended_shards

    @recommended_shards.setter
    def recommended_shards(self, value: int) -> None:
        self.settings.recommended_shards = value

    @property
    def allow_resume(self) -> bool:
        """Whether RESUME is accepted (else op 9, a new IDENTIFY)."""
        return self.settings.allow_resume

    @allow_resume.setter
    def allow_resume(self, value: bool) -> None:
        self.settings.allow_resume = value

    @property
    def application_flags(self) -> int:
        """The application's flags (READY and ``GET /applications/@me``)."""
        return self.settings.application_flags

    @application_flags.setter
    def application_flags(self, value: int) -> None:
        self.settings.application_flags = value

    @property
    def secret(self) -> str:
        """The key of the CDN's URL signatures."""
        return self.settings.secret

    # ------------------------------------------------------------------ state tests read

    @property
    def users(self) -> dict[int, dict[str, Any]]:
        """Every user payload by id."""
        return self.world.users

    @property
    def bot_user(self) -> dict[str, Any]:
        """The bot's user payload."""
        return self.world.bot_user

    @property
    def owner_user(self) -> dict[str, Any]:
        """The application owner's user payload."""
        return self.world.owner_user

    @property
    def default_user_id(self) -> int:
        """The member the driver acts as when no ``user_id`` is given."""
        return self.world.default_user_id

    @property
    def guilds(self) -> dict[int, Guild]:
        """Every guild the bot is in, by id."""
        return self.world.guilds

    @property
    def channels(self) -> dict[int, dict[str, Any]]:
        """Every channel (guild channels and DMs) by id."""
        return self.world.channels

    @property
    def messages(self) -> defaultdict[int, list[dict[str, Any]]]:
        """Every stored message by channel id, oldest first."""
        return self.store.messages

    @property
    def deleted_messages(self) -> list[dict[str, Any]]:
        """Every message deleted, in order."""
        return self.store.deleted_messages

    @property
    def attachments(self) -> dict[int, StoredAttachment]:
        """Every stored attachment by id."""
        return self.cdn.attachments

    @property
    def attachment_fetches(self) -> Counter[int]:
        """Successful CDN downloads by attachment id."""
        return self.cdn.fetches

    @property
    def attachment_fetch_failures(self) -> Counter[int]:
        """Refused CDN downloads (expired or unknown URLs) by attachment id."""
        return self.cdn.fetch_failures

    @property
    def global_commands(self) -> list[dict[str, Any]]:
        """The synced global commands."""
        return self.commands.global_commands

    @property
    def guild_commands(self) -> dict[int, list[dict[str, Any]]]:
        """The synced guild commands by guild id."""
        return self.commands.guild_commands

    @property
    def sync_count(self) -> int:
        """How many command writes were accepted."""
        return self.commands.sync_count

    @property
    def rejected_syncs(self) -> list[tuple[int | None, Any, dict[str, Any]]]:
        """Every refused command write: ``(guild id or None, payload, errors)``."""
        return self.commands.rejected_syncs

    @property
    def synced_commands(self) -> dict[int | None, list[dict[str, Any]]]:
        """Synced commands: key ``None`` for global, a guild id for guild commands."""
        return self.commands.synced_commands

    @property
    def interactions(self) -> dict[int, InteractionRecord]:
        """Every interaction sent, by id."""
        return self._interactions.records

    @property
    def requests(self) -> list[RequestRecord]:
        """Every HTTP request answered, in order."""
        return self.http.requests

    @property
    def identify_count(self) -> int:
        """How many IDENTIFYs were accepted."""
        return self.gateway.identify_count

    @property
    def resume_count(self) -> int:
        """How many RESUMEs were accepted."""
        return self.gateway.resume_count

    @property
    def heartbeats(self) -> int:
        """How many heartbeats were received."""
        return self.gateway.heartbeats

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The port the emulator serves on."""
        return self.address.port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self.address.base_url

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return self.address.api_base

    @property
    def gateway_url(self) -> str:
        """The value for ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return self.address.gateway_url

    async def start(self) -> None:
        """Start serving."""
        app = web.Application(middlewares=[self.http.middleware], client_max_size=256 * 1024 * 1024)
        api = "/api/v{version:\\d+}"
        self.cdn.add_routes(app)
        self.gateway.add_routes(app, api)
        for routes in self._routes:
            routes.add_routes(app, api)
        app.router.add_route("*", "/api/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock)
        await site.start()

    async def stop(self) -> None:
        """Close gateway connections, stop serving and undo :meth:`patch_discord_py`."""
        await self._connections.close_all(1001, "emulator stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._undo_patch is not None:
            self._undo_patch()
            self._undo_patch = None

    @staticmethod
    async def _not_found(request: web.Request) -> web.Response:
        """Every other ``/api`` route: Discord's plain 404."""
        raise APIError(404, 0, "404: Not Found")

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

    def notify(self) -> None:
        """Wake every waiter: something in the world changed."""
        self._changes.notify()

    async def wait_until(
        self,
        check: Callable[[], T | None],
        timeout: float = 10.0,
        *,
        description: str = "condition",
    ) -> T:
        """Wait until ``check()`` returns something truthy (re-checked on every change)."""
        return await self._changes.wait_until(check, timeout, description=description)

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

    # ------------------------------------------------------------------ extension point

    def followup_created(self, rec: InteractionRecord, message: dict[str, Any]) -> None:
        """Called once a follow-up message of ``rec`` was stored, before the bot gets its answer.

        Nothing happens here; a subclass extends it (the benchmark notes when each result
        arrived). The interaction routes are given this method when the emulator is built.
        """

    # ------------------------------------------------------------------ attachments (the CDN)

    def add_attachment(
        self, data: bytes, filename: str = "image.png", content_type: str | None = "auto"
    ) -> dict[str, Any]:
        """Store bytes as an uploaded attachment and return its Discord attachment object.

        ``content_type="auto"`` sniffs it (Pillow, then the file extension); ``None`` leaves
        the field out (Discord may omit it); any other string is used as given.
        """
        return self.cdn.add(data, filename, content_type)

    def attachment_bytes(self, ref: Mapping[str, Any] | str | int) -> bytes:
        """The bytes of an attachment (dict, URL or id)."""
        return self.cdn.data(ref)

    def expire_attachment(self, ref: Mapping[str, Any] | str | int) -> None:
        """Make every URL issued so far for this attachment answer 404 (CDN expiry)."""
        self.cdn.expire(ref)

    def fresh_attachment(self, ref: Mapping[str, Any] | str | int) -> dict[str, Any]:
        """A new attachment object (fresh signed URLs), like a fresh fetch of the message."""
        return self.cdn.fresh(ref)

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
        return self.faults.fail_next(
            method,
            path_regex,
            status,
            code=code,
            message=message,
            retry_after=retry_after,
            is_global=is_global,
            times=times,
            process=process,
        )

    def delay(
        self, method: str, path_regex: str, seconds: float, *, times: int | None = None
    ) -> DelayRule:
        """Delay matching requests by ``seconds`` before handling them; the rule returned
        counts the requests it delayed (``hits``, counted as each one arrives)."""
        return self.faults.delay(method, path_regex, seconds, times=times)

    def clear_faults(self) -> None:
        """Drop every fault and delay rule."""
        self.faults.clear()

    # ------------------------------------------------------------------ gateway control

    @property
    def connections(self) -> list[GatewayConnection]:
        """Identified (READY sent), open gateway connections in connection order."""
        return self._connections.connections

    @property
    def _gateway_connections(self) -> list[GatewayConnection]:
        """Every open websocket, identified or not (tests tell a new connection by it)."""
        return self._connections.all

    async def wait_connected(
        self, count: int = 1, timeout: float = 10.0
    ) -> list[GatewayConnection]:
        """Wait until ``count`` clients got READY and their GUILD_CREATEs."""
        return await self._connections.wait_connected(count, timeout)

    async def disconnect_all(self, code: int = 4000, reason: str = "emulated disconnect") -> int:
        """Close every gateway connection with ``code``; returns how many were closed."""
        return await self._connections.close_all(code, reason)

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
        await self._connections.dispatch(event, data, guild_id=guild_id, to=to)

    # ------------------------------------------------------------------ the world

    def snowflake(self) -> int:
        """A new, strictly increasing, timestamp-based snowflake."""
        return self._snowflakes.next()

    def add_user(
        self, user_id: int | None = None, *, name: str | None = None, bot: bool = False
    ) -> dict[str, Any]:
        """Create (or return) a user payload."""
        return self.world.add_user(user_id, name=name, bot=bot)

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
        return self.world.add_guild(
            guild_id,
            name=name,
            owner_id=owner_id,
            preferred_locale=preferred_locale,
            bot_permissions=bot_permissions,
            everyone_permissions=everyone_permissions,
            premium_tier=premium_tier,
            upload_limit=upload_limit,
        )

    def add_role(
        self, guild_id: int, name: str, permissions: int = 0, *, role_id: int | None = None
    ) -> dict[str, Any]:
        """Add a role (dispatches GUILD_ROLE_CREATE)."""
        return self.world.add_role(guild_id, name, permissions, role_id=role_id)

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
        return self.world.add_channel(
            guild_id,
            name=name,
            nsfw=nsfw,
            channel_id=channel_id,
            channel_type=channel_type,
            topic=topic,
        )

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
        return self.world.add_member(
            guild_id, user_id, name=name, permissions=permissions, roles=roles, nick=nick, bot=bot
        )

    def member_permissions(self, guild_id: int, user_id: int) -> int:
        """Guild-level permissions of a member (owner and ADMINISTRATOR get everything)."""
        return self.world.member_permissions(guild_id, user_id)

    def channel_permissions(
        self, guild_id: int, user_id: int, channel_id: int | None = None
    ) -> int:
        """Permissions of a member in a channel: guild permissions, then the channel's
        overwrites in Discord's order (@everyone, the member's roles together, the member)."""
        return self.world.channel_permissions(guild_id, user_id, channel_id)

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
        return self.world.set_overwrite(channel_id, target_id, allow=allow, deny=deny, member=member)

    def dm_channel(self, user_id: int) -> dict[str, Any]:
        """The DM channel between the bot and a user (created on first use)."""
        return self.world.dm_channel(user_id)

    def guild_upload_limit(self, guild_id: int | None) -> int:
        """Upload limit for a guild (its own, or by boost tier, or ``emu.upload_limit``)."""
        return self.world.guild_upload_limit(guild_id)

    # ------------------------------------------------------------------ messages

    def public_messages(self, channel_id: int) -> list[dict[str, Any]]:
        """Messages everyone in the channel can see (no ephemeral ones), oldest first."""
        return self.store.public_messages(channel_id)

    def all_messages(self) -> list[dict[str, Any]]:
        """Every stored message of every channel."""
        return self.store.all_messages()

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
        return self.store.add_message(
            channel_id,
            content,
            author_id=author_id,
            attachments=attachments,
            embeds=embeds,
            dispatch=dispatch,
        )

    # ------------------------------------------------------------------ commands

    def register_commands(
        self, commands: list[dict[str, Any]], guild_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Install a command payload as a bulk PUT would (validated; raises APIError)."""
        return self.commands.register_commands(commands, guild_id)

    def find_command(
        self, name: str, command_type: int = 1, guild_id: int | None = None
    ) -> dict[str, Any] | None:
        """A synced command by name and type, guild commands first."""
        return self.commands.find_command(name, command_type, guild_id)

    # ------------------------------------------------------------------ the driver

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
        """Send a CHAT_INPUT INTERACTION_CREATE as a user running ``/name``
        (see :meth:`.driver.Driver.invoke_slash`)."""
        return await self.driver.invoke_slash(
            name,
            options,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            attachments=attachments,
            subcommand=subcommand,
            locale=locale,
            attachment_size_limit=attachment_size_limit,
            app_permissions=app_permissions,
            dm=dm,
            to=to,
            timeout=timeout,
        )

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
        return await self.driver.invoke_message_command(
            name,
            target_message,
            user_id=user_id,
            locale=locale,
            attachment_size_limit=attachment_size_limit,
            app_permissions=app_permissions,
            to=to,
            timeout=timeout,
        )

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
        return await self.driver.invoke_user_command(
            name,
            target_user_id,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            locale=locale,
            to=to,
            timeout=timeout,
        )

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
        return await self.driver.click_button(
            message,
            custom_id,
            user_id=user_id,
            values=values,
            component_type=component_type,
            locale=locale,
            check=check,
            to=to,
            timeout=timeout,
        )

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
        return await self.driver.select(message, custom_id, values, user_id=user_id, to=to)

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
        """Submit a modal the bot showed (type 9 callback); see
        :meth:`.driver.Driver.submit_modal`."""
        return await self.driver.submit_modal(
            modal,
            values,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
            message=message,
            locale=locale,
            to=to,
            timeout=timeout,
        )

    def expire_token(self, interaction: InteractionRecord | int) -> None:
        """Make webhook calls with this interaction's token answer 401/50027."""
        self.driver.expire_token(interaction)

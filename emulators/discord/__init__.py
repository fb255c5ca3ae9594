"""A local emulator of Discord's REST API, CDN and Gateway for end-to-end tests, the benchmark
and the offline demo.

An unmodified discord.py 2.7 client talks to it once ``discord.http.Route.BASE`` is
``emu.api_base`` and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` is
``yarl.URL(emu.gateway_url)`` (:meth:`DiscordEmulator.patch_discord_py` sets both).
One aiohttp server on 127.0.0.1 (random free port) serves:

* the REST routes a bot needs (users, application, command sync with Discord's
  validation rules, interaction callbacks, interaction webhooks, channel messages, DMs,
  guild look-ups),
* signed, expiring attachment URLs (the CDN),
* the Gateway (HELLO, heartbeats, IDENTIFY -> READY + GUILD_CREATE, RESUME, INTERACTION_CREATE).

Tests drive it through :meth:`DiscordEmulator.invoke_slash`, :meth:`~DiscordEmulator.click_button`,
:meth:`~DiscordEmulator.submit_modal` and friends, and wait for outcomes with
:meth:`InteractionRecord.wait_for` / :meth:`DiscordEmulator.wait_for_message` (event driven,
never fixed sleeps). Faults are injected with :meth:`DiscordEmulator.fail_next` and
:meth:`DiscordEmulator.delay`.

The parts, one concern each, each an object holding the parts it works with (passed in when
the emulator builds it; none imports the facade)::

    emulator.py           DiscordEmulator: the facade tests hold; builds the parts, lifecycle
    config.py             Settings (the knobs tests may change) and Address (the port)
    changes.py            Changes: notify and wait_until, for every waiter
    ids.py                Snowflakes: the emulator's ids
    models.py             constants, APIError, request/interaction records, Guild
    connections.py        the open gateway connections and how events are routed to them
    world.py              World: users, guilds, roles, channels, members, permissions
    cdn.py                Cdn: stored attachments behind signed, expiring URLs
    messages.py           MessageStore: every channel's messages
    commands.py           CommandRegistry: the synced commands
    interactions.py       Interactions: every interaction sent, by id and token
    driver.py             Driver: what members do (slash commands, clicks, modals)
    components.py         finding components, building modal submissions
    validation.py         Discord's checks of commands, messages and modals
    rest_channels.py      REST: users, application, channels, messages, guilds
    rest_interactions.py  REST: interaction callbacks and webhooks
    rest_commands.py      REST: command sync
    gateway.py            Gateway: the websocket endpoint, identify, resume
    faults.py             injected failures, delays and rate-limit headers
    http.py               the middleware (request log, faults, auth) and the body reader

This package does not import discord.py at import time.
"""

from .connections import GatewayConnection
from .emulator import DiscordEmulator
from .faults import FaultRule
from .models import (
    ALL_PERMISSIONS,
    EPHEMERAL,
    LOADING,
    VALID_LOCALES,
    APIError,
    Guild,
    Interaction,
    InteractionRecord,
    RequestRecord,
    UploadedFile,
    snowflake_time,
)
from .validation import validate_commands

__all__ = [
    "ALL_PERMISSIONS",
    "EPHEMERAL",
    "LOADING",
    "VALID_LOCALES",
    "APIError",
    "DiscordEmulator",
    "FaultRule",
    "GatewayConnection",
    "Guild",
    "Interaction",
    "InteractionRecord",
    "RequestRecord",
    "UploadedFile",
    "snowflake_time",
    "validate_commands",
]

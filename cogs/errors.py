"""Every app-command error ends here: one plain, ephemeral reply to the member.

The cog installs :meth:`ErrorHandler.on_app_command_error` as the command tree's error handler
when it loads and puts the previous handler back when it unloads. Three branches:

* a :class:`~kontext.errors.KontextError` (raised on purpose by the core or a cog, possibly
  wrapped in ``CommandInvokeError``) — its own plain message, in the member's language;
* a :class:`~discord.app_commands.CheckFailure` (a command's check said no) — ``error.not_allowed``;
* anything else — logged with its traceback for the owner (the log's redaction applies), and
  the member gets only "something went wrong" (``error.internal``): never a traceback, never a
  secret.

Buttons and modals (``discord.ui``) have their own ``on_error`` in their views; the guild gate
(``KontextTree.interaction_check`` in ``bot.py``) refuses before any command runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from cogs.base import KontextBotBase
from cogs.common import not_allowed, reply_error
from kontext.errors import KontextError

log = logging.getLogger("kontext.cogs.errors")


class ErrorHandler(commands.Cog, name="Errors"):
    """The command tree's error handler, as a cog that can be loaded and unloaded."""

    def __init__(self, bot: KontextBotBase) -> None:
        self.bot = bot
        self._previous: Callable[..., Coroutine[Any, Any, None]] | None = None

    async def cog_load(self) -> None:
        self._previous = self.bot.tree.on_error
        self.bot.tree.on_error = self.on_app_command_error  # type: ignore[method-assign]  # discord.py's own tree.error() does the same

    async def cog_unload(self) -> None:
        if self._previous is not None and self.bot.tree.on_error == self.on_app_command_error:
            self.bot.tree.on_error = self._previous  # type: ignore[method-assign]  # put back what was there
        self._previous = None

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        original = getattr(error, "original", error)
        if isinstance(original, KontextError):
            await reply_error(interaction, original)
            return
        if isinstance(error, app_commands.CheckFailure):
            await reply_error(interaction, not_allowed())
            return
        log.error(
            "command %s failed",
            interaction.command.qualified_name if interaction.command else "?",
            exc_info=original,
        )
        await reply_error(interaction, KontextError(type(original).__name__))


async def setup(bot: KontextBotBase) -> None:
    await bot.add_cog(ErrorHandler(bot))

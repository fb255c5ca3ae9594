"""discord.py's :class:`~discord.app_commands.Translator`, backed by the JSON catalogs.

Not an extension: ``bot.py`` installs it with ``await bot.tree.set_translator(KontextTranslator())``
before syncing. The lookup itself is discord-free (:mod:`kontext.translator`).
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.app_commands import TranslationContextLocation as Loc

from kontext.translator import KIND_MENU, KIND_NAME, KIND_TEXT, command_text, derived_key

_NAME_LOCATIONS = {Loc.command_name, Loc.group_name, Loc.parameter_name}


def context_key(string: app_commands.locale_str, context: app_commands.TranslationContext[Any, Any]) -> str:
    """The catalog key of ``string``: its explicit ``key`` extra, or one derived from its place."""
    explicit = string.extras.get("key")
    if explicit:
        return str(explicit)
    data = context.data
    loc = context.location
    if loc in {Loc.parameter_name, Loc.parameter_description}:
        return derived_key(loc.name, path=data.command.qualified_name, option=data.name)
    if loc == Loc.choice_name:
        return derived_key(loc.name, value=data.value)
    path = getattr(data, "qualified_name", "") or getattr(data, "name", "")
    return derived_key(loc.name, path=path, value=string.message)


def context_kind(context: app_commands.TranslationContext[Any, Any]) -> str:
    if context.location == Loc.command_name and isinstance(context.data, app_commands.ContextMenu):
        return KIND_MENU
    return KIND_NAME if context.location in _NAME_LOCATIONS else KIND_TEXT


class KontextTranslator(app_commands.Translator):
    """Answers discord.py's translation requests from ``kontext/locales/*.json``."""

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContext[Any, Any],
    ) -> str | None:
        return command_text(
            context_key(string, context),
            locale.value,
            english=string.message,
            kind=context_kind(context),
        )

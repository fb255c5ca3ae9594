"""Localized command text (names, descriptions, choices) from the JSON catalogs. Discord-free.

Discord shows each member a command's ``name_localizations`` / ``description_localizations``
for their client language. discord.py asks a :class:`~discord.app_commands.Translator` for
every string of the command tree and every Discord locale; ``cogs/translation.py`` answers
with :func:`command_text`.

Keys. A string may carry an explicit key (``locale_str("…", key="menu.edit_images")``);
otherwise the key follows from where the string sits (:func:`derived_key`):

* ``cmd.<command path>.name`` / ``.description`` for commands and groups
  (``cmd.kontext-admin.grant.description``),
* ``cmd.<command path>.<option>.name`` / ``.description`` for options,
* ``choice.<value>`` for choices.

English is the source: the code holds the English text, and ``en.json`` repeats it under the
key. A translation is used only while the English text in ``en.json`` still equals the code's
text, so a changed English string never ships an outdated translation (the test suite reports
the drift). Discord locales map to catalogs by their full tag, then their language
(``es-ES`` and ``es-419`` → ``es.json``); English locales get no localizations (the defaults
are English).
"""

from __future__ import annotations

import re

from kontext.i18n import DEFAULT_LOCALE, available_locales, catalog

#: Every locale Discord accepts in ``*_localizations``.
DISCORD_LOCALES: tuple[str, ...] = (
    "id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu", "nl",
    "no", "pl", "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru", "uk", "hi",
    "th", "zh-CN", "ja", "zh-TW", "ko",
)  # fmt: skip

#: Discord's rule for command and option names (plus: lowercase where a lowercase form exists).
NAME_RE = re.compile(r"^[-_\w\u0900-\u097F\u0E00-\u0E7F]{1,32}$")

KIND_NAME = "name"  # slash command, group or option name
KIND_MENU = "menu"  # context-menu command name
KIND_TEXT = "text"  # description or choice name


def catalog_language(discord_locale: str) -> str | None:
    """The catalog that serves ``discord_locale``, or None (English or no catalog)."""
    langs = set(available_locales()) - {DEFAULT_LOCALE}
    base = discord_locale.split("-")[0]
    for candidate in (discord_locale, base):
        if candidate in langs:
            return candidate
    return None


def slug(path: str) -> str:
    """``"kontext-admin grant"`` → ``"kontext-admin.grant"``."""
    return ".".join(path.split())


def derived_key(location: str, *, path: str = "", option: str = "", value: object = None) -> str:
    """The catalog key of a string from its place in the command tree.

    ``location`` is the name of discord.py's ``TranslationContextLocation`` member.
    """
    if location in {"command_name", "group_name"}:
        return f"cmd.{slug(path)}.name"
    if location in {"command_description", "group_description"}:
        return f"cmd.{slug(path)}.description"
    if location == "parameter_name":
        return f"cmd.{slug(path)}.{option}.name"
    if location == "parameter_description":
        return f"cmd.{slug(path)}.{option}.description"
    if location == "choice_name":
        return f"choice.{value}"
    return f"other.{value}"


def valid(kind: str, text: str) -> bool:
    """Whether Discord accepts ``text`` as a localization of this kind."""
    if kind == KIND_NAME:
        return bool(NAME_RE.fullmatch(text)) and text == text.lower()
    if kind == KIND_MENU:
        return 1 <= len(text) <= 32
    return 1 <= len(text) <= 100


def command_text(
    key: str, discord_locale: str, *, english: str | None = None, kind: str = KIND_TEXT
) -> str | None:
    """The localization of ``key`` for ``discord_locale``, or None to keep the English default.

    None as well when ``english`` (the code's text) no longer matches ``en.json``, when the
    catalog lacks the key, when it equals the English text, or when Discord would refuse it.
    """
    lang = catalog_language(discord_locale)
    if lang is None:
        return None
    source = catalog(DEFAULT_LOCALE).get(key)
    if source is None or (english is not None and source != english):
        return None
    text = catalog(lang).get(key)
    if not text or text == source or not valid(kind, text):
        return None
    return text


def command_keys() -> list[str]:
    """Every key of command text in the English catalog (``cmd.*``, ``menu.*``, ``choice.*``)."""
    return [k for k in catalog(DEFAULT_LOCALE) if k.startswith(("cmd.", "menu.", "choice."))]

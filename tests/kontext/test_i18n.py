"""The message catalogs and the command translations.

Fails on: a key missing from (or extra in) any catalog, a placeholder that differs between
languages, a key the code uses that English lacks, an untranslated command string, a
translation that Discord would refuse, or English command text in the code that drifted from
``en.json``.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import discord
import pytest
from discord import app_commands

from kontext.guild_settings import SETTING_KEYS
from kontext.i18n import DEFAULT_LOCALE, LOCALES_DIR, available_locales, catalog, t
from kontext.schema import LEDGER_KINDS
from kontext.settings import ASPECT_RATIOS
from kontext.store.showcase import STATES
from kontext.translator import (
    DISCORD_LOCALES,
    KIND_MENU,
    KIND_NAME,
    KIND_TEXT,
    catalog_language,
    command_keys,
    command_text,
    valid,
)

ROOT = Path(__file__).resolve().parents[2]
LANGS = available_locales()
OTHERS = [lang for lang in LANGS if lang != DEFAULT_LOCALE]
EN = catalog(DEFAULT_LOCALE)


def placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def test_at_least_three_languages() -> None:
    assert LANGS[0] == "en"
    assert {"de", "fr", "es"} <= set(OTHERS)


@pytest.mark.parametrize("lang", LANGS)
def test_catalog_is_clean_json_without_duplicates(lang: str) -> None:
    pairs: list[tuple[str, object]] = []
    json.loads(
        (LOCALES_DIR / f"{lang}.json").read_text(encoding="utf-8"),
        object_pairs_hook=lambda kv: pairs.extend(kv) or dict(kv),
    )
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    assert all(isinstance(v, str) and v.strip() for _, v in pairs)


@pytest.mark.parametrize("lang", OTHERS)
def test_catalog_is_complete(lang: str) -> None:
    other = catalog(lang)
    missing = sorted(set(EN) - set(other))
    extra = sorted(set(other) - set(EN))
    assert not missing, f"{lang}.json lacks {missing}"
    assert not extra, f"{lang}.json has keys English lacks: {extra}"


@pytest.mark.parametrize("lang", OTHERS)
def test_placeholders_match_english(lang: str) -> None:
    other = catalog(lang)
    wrong = {
        key: (sorted(placeholders(text)), sorted(placeholders(other[key])))
        for key, text in EN.items()
        if key in other and placeholders(text) != placeholders(other[key])
    }
    assert not wrong, f"{lang}.json placeholders differ from English: {wrong}"


@pytest.mark.parametrize("lang", LANGS)
def test_every_message_formats(lang: str) -> None:
    for key, text in catalog(lang).items():
        params = {p: "x" for p in placeholders(text)}
        assert t(key, lang, **params)  # no stray braces


def _code_keys() -> set[str]:
    """Literal message keys in the code: t("…"), key="…" and class attributes key = "…"."""
    found: set[str] = set()
    pattern = re.compile(
        r"""(?:\bt\(\s*|\bkey\s*=\s*|\brefuse\(\s*|title_key\s*=\s*)["']([a-z][a-z0-9_]*(?:\.[a-z0-9_:-]+)+)["']"""
    )
    for folder in ("cogs", "kontext"):
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def _dynamic_keys() -> set[str]:
    from cogs.result_buttons import BUTTONS

    keys = {f"ledger.{k}" for k in LEDGER_KINDS}
    keys |= {f"setting.{k}" for k in SETTING_KEYS}
    keys |= {f"choice.{a}" for a in ASPECT_RATIOS}
    keys |= {f"safety.{n}" for n in (0, 1, 2)}
    keys |= {f"showcase.already_{s}" for s in STATES if s != "posted"}
    keys |= {label for label, _style, _row in BUTTONS.values()}
    return keys


def test_every_key_the_code_uses_exists_in_english() -> None:
    keys = _code_keys() | _dynamic_keys()
    assert len(keys) > 100  # the scan works
    missing = sorted(k for k in keys if k not in EN)
    assert not missing, f"en.json lacks {missing}"


def test_every_error_class_has_a_message() -> None:
    from kontext import errors

    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, errors.KontextError):
            assert obj.key in EN, obj


def test_locale_fallbacks() -> None:
    assert t("input.blocked_word", "de").startswith("Deine Anweisung")
    assert t("input.blocked_word", "es-ES").startswith("Tu instrucción")
    assert t("input.blocked_word", "es-419").startswith("Tu instrucción")
    assert t("input.blocked_word", "fr").startswith("Votre consigne")
    assert t("input.blocked_word", "pt-BR") == EN["input.blocked_word"]
    assert t("input.blocked_word", None) == EN["input.blocked_word"]
    assert t("no.such.key", "de") == "no.such.key"


def test_discord_locales_map_to_catalogs() -> None:
    assert catalog_language("de") == "de"
    assert catalog_language("fr") == "fr"
    assert catalog_language("es-ES") == "es"
    assert catalog_language("es-419") == "es"
    assert catalog_language("en-US") is None and catalog_language("en-GB") is None
    assert catalog_language("ja") is None
    served = {loc for loc in DISCORD_LOCALES if catalog_language(loc)}
    assert served >= {"de", "fr", "es-ES", "es-419"}
    assert set(DISCORD_LOCALES) == {loc.value for loc in discord.Locale} | set(DISCORD_LOCALES)


def _kind(key: str) -> str:
    if key.startswith("menu."):
        return KIND_MENU
    if key.endswith(".name") and key.startswith("cmd."):
        return KIND_NAME
    return KIND_TEXT


@pytest.mark.parametrize("lang", OTHERS)
def test_command_translations_are_valid_for_discord(lang: str) -> None:
    other = catalog(lang)
    bad = {k: other[k] for k in command_keys() if not valid(_kind(k), other[k])}
    assert not bad, f"{lang}.json: Discord would refuse {bad}"


def test_validity_rules() -> None:
    assert valid(KIND_NAME, "guthaben") and valid(KIND_NAME, "créditos")
    assert not valid(KIND_NAME, "Guthaben") and not valid(KIND_NAME, "zwei wörter")
    assert not valid(KIND_NAME, "x" * 33)
    assert valid(KIND_MENU, "Kontext: diese Bilder bearbeiten")
    assert not valid(KIND_MENU, "x" * 33)
    assert not valid(KIND_TEXT, "") and not valid(KIND_TEXT, "x" * 101)


def test_stale_english_drops_the_translation() -> None:
    key = "cmd.kontext.description"
    assert command_text(key, "de", english=EN[key])
    assert command_text(key, "de", english="something else") is None
    assert command_text(key, "en-US", english=EN[key]) is None
    assert command_text("cmd.kontext.name", "de", english="kontext", kind=KIND_NAME) is None  # same


class Recorder(app_commands.Translator):
    """Wraps the real translator and records what discord.py asked and what it got."""

    def __init__(self) -> None:
        from cogs.translation import KontextTranslator, context_key

        self.inner = KontextTranslator()
        self.context_key = context_key
        self.asked: list[tuple[tuple[str, str], tuple[str, str | None]]] = []

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContext,
    ) -> str | None:
        result = await self.inner.translate(string, locale, context)
        self.asked.append(((self.context_key(string, context), locale.value), (string.message, result)))
        return result


async def _translated_tree() -> tuple[list[dict], Recorder]:
    from cogs.admin import AdminCog
    from cogs.context_menu import ContextMenuCog
    from cogs.credits import CreditsCog
    from cogs.kontext import KontextCog

    client = discord.Client(intents=discord.Intents.none())
    tree = app_commands.CommandTree(client)
    for cog in (KontextCog(None), CreditsCog(None)):  # type: ignore[arg-type]
        for cmd in cog.__cog_app_commands__:
            tree.add_command(cmd)
    tree.add_command(AdminCog(None).group)  # type: ignore[arg-type]
    tree.add_command(ContextMenuCog(None).menu)  # type: ignore[arg-type]
    recorder = Recorder()
    await tree.set_translator(recorder)
    payload = [
        await cmd.get_translated_payload(tree, recorder)
        for cmd in tree.get_commands()
    ]
    await client.close()
    return payload, recorder


async def test_every_command_string_is_translated_and_english_did_not_drift() -> None:
    from emulators.discord import validate_commands

    payload, recorder = await _translated_tree()
    asked_keys = {key for (key, _locale), _ in recorder.asked}
    # every command text in en.json is still used, with exactly the code's English
    unused = sorted(set(command_keys()) - asked_keys)
    assert not unused, f"en.json command text nobody uses (renamed in the code?): {unused}"
    # (a derived choice key may be shared by another command's choice with other text, e.g.
    # "choice.0": such a string is simply not translated; drift is when no use matches)
    seen: dict[str, set[str]] = {}
    for (key, _loc), (message, _res) in recorder.asked:
        seen.setdefault(key, set()).add(message)
    drift = {key: (sorted(seen[key]), EN[key]) for key in command_keys() if EN[key] not in seen[key]}
    assert not drift, f"the code's English differs from en.json: {drift}"
    # every command text with an English entry is translated for each catalog
    for lang_locale in ("de", "fr", "es-ES", "es-419"):
        missing = sorted(
            key
            for (key, loc), (message, result) in recorder.asked
            if loc == lang_locale and EN.get(key) == message and result is None
            and catalog(catalog_language(loc) or "en").get(key) != message  # same word: fine
        )
        assert not missing, f"no {lang_locale} translation for {missing}"
    # descriptions of the member-facing commands are all covered
    for name in ("kontext", "credits", "kontext-admin"):
        cmd = next(c for c in payload if c["name"] == name)
        assert set(cmd["description_localizations"]) >= {"de", "fr", "es-ES", "es-419"}
    assert validate_commands(payload) == {}

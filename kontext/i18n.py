"""Member-facing text, looked up by key in JSON catalogs (``kontext/locales/<lang>.json``).

Every sentence a member can read goes through :func:`t`, so that it can be translated and a test
can check that every catalog carries every key. Discord locales look like ``en-US``, ``de``,
``pt-BR``: the full tag is tried first, then its language part, then English.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

LOCALES_DIR = Path(__file__).with_name("locales")
DEFAULT_LOCALE = "en"


@cache
def catalog(lang: str) -> dict[str, str]:
    """The catalog for ``lang`` (empty when there is none)."""
    path = LOCALES_DIR / f"{lang}.json"
    if not path.is_file():
        return {}
    entries: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return entries


def available_locales() -> list[str]:
    """Every language that has a catalog, English first."""
    return list(_available_locales())


@cache
def _available_locales() -> tuple[str, ...]:
    # the catalogs ship with the code: list the folder once, not on every translated string
    langs = sorted(p.stem for p in LOCALES_DIR.glob("*.json"))
    langs.remove(DEFAULT_LOCALE)
    return (DEFAULT_LOCALE, *langs)


def _candidates(locale: str | None) -> list[str]:
    if not locale:
        return [DEFAULT_LOCALE]
    locale = str(locale)
    out = [locale]
    base = locale.split("-")[0]
    if base != locale:
        out.append(base)
    out.append(DEFAULT_LOCALE)
    return out


def t(key: str, locale: str | None = None, /, **params: object) -> str:
    """The text for ``key`` in ``locale`` with ``params`` filled in.

    A key missing from every catalog returns the key itself, so a slip shows up plainly in a test
    instead of raising in front of a member.
    """
    for lang in _candidates(locale):
        text = catalog(lang).get(key)
        if text is not None:
            try:
                return text.format(**params)
            except (KeyError, IndexError, ValueError):
                return catalog(DEFAULT_LOCALE).get(key, key).format(**params)
    return key

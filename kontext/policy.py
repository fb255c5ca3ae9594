"""Per-server rules a request must pass before any money moves.

Discord-free: the adapter passes plain facts (channel ids, whether the channel is age-restricted,
the member's role ids) and the server's :class:`~kontext.store.GuildSettings`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from kontext.errors import InputError
from kontext.store import GuildSettings


def _fold(text: str) -> str:
    """Lower-case, accent-free text, so that "Blöcked" matches "blocked"."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def find_blocked_word(prompt: str, blocked: Iterable[str]) -> str | None:
    """The first blocked word or phrase that appears in ``prompt`` as a whole word."""
    folded = _fold(prompt)
    for word in blocked:
        w = _fold(word.strip())
        if w and re.search(rf"(?<!\w){re.escape(w)}(?!\w)", folded):
            return word
    return None


def check_channel(gs: GuildSettings, channel_ids: Iterable[int]) -> None:
    """Refuse when the server limits /kontext to some channels and this is not one.

    ``channel_ids`` is the channel and, for a thread, its parent.
    """
    if not gs.allowed_channel_ids:
        return
    if set(channel_ids) & set(gs.allowed_channel_ids):
        return
    channels = ", ".join(f"<#{c}>" for c in gs.allowed_channel_ids[:10])
    raise InputError("channel not allowed", key="input.channel_not_allowed", channels=channels)


def check_safety(gs: GuildSettings, safety_tolerance: int, *, channel_nsfw: bool) -> None:
    """Refuse a tolerance above the server's maximum, and 2 outside age-restricted channels."""
    if safety_tolerance > gs.max_safety_tolerance:
        raise InputError(
            "safety above max", key="input.safety_too_high", max=gs.max_safety_tolerance
        )
    if safety_tolerance >= 2 and not channel_nsfw:
        raise InputError("safety 2 outside nsfw", key="input.safety_nsfw_only")


def check_prompt_words(gs: GuildSettings, prompt: str) -> None:
    word = find_blocked_word(prompt, gs.blocked_words)
    if word is not None:
        raise InputError(f"blocked word {word!r}", key="input.blocked_word")


def is_exempt(gs: GuildSettings, role_ids: Iterable[int]) -> bool:
    """True when one of the member's roles is exempt from the cooldown."""
    return bool(set(role_ids) & set(gs.exempt_role_ids))


def check_request(
    gs: GuildSettings,
    *,
    prompt: str,
    safety_tolerance: int,
    channel_ids: Iterable[int],
    channel_nsfw: bool,
) -> None:
    """Every per-server rule, in the order a member would want to hear about them."""
    check_channel(gs, channel_ids)
    check_safety(gs, safety_tolerance, channel_nsfw=channel_nsfw)
    check_prompt_words(gs, prompt)

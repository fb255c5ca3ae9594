"""The buttons under every result, as sent: Reroll, Edit prompt, Swap images, Use as input, Share,
Delete — their custom ids (``kontext:<action>:<job id>``), labels, styles and rows.

The sinks put them under a new result (:func:`result_view`); pressing one is handled by the
persistent ``ResultButton`` of :mod:`cogs.results`, which matches the same custom ids. Nothing
here imports a flow that starts jobs, so the sinks can build the buttons without a hook.
"""

from __future__ import annotations

from typing import Any

import discord

from kontext.i18n import t
from kontext.jobs import JobSpec
from kontext.store import Store

ACTIONS = ("reroll", "edit", "swap", "use", "share", "delete")

#: action -> (label key, style, row)
BUTTONS: dict[str, tuple[str, discord.ButtonStyle, int]] = {
    "reroll": ("result.reroll", discord.ButtonStyle.primary, 0),
    "edit": ("result.edit", discord.ButtonStyle.secondary, 0),
    "swap": ("result.swap", discord.ButtonStyle.secondary, 0),
    "use": ("result.use", discord.ButtonStyle.secondary, 0),
    "share": ("result.share", discord.ButtonStyle.success, 1),
    "delete": ("result.delete", discord.ButtonStyle.danger, 1),
}

EMOJI = {"reroll": "🎲", "edit": "✏️", "swap": "🔀", "use": "➕", "share": "🌟", "delete": "🗑️"}


def custom_id(action: str, job_id: int) -> str:
    return f"kontext:{action}:{job_id}"


def button(action: str, job_id: int, label: str | None = None) -> discord.ui.Button[Any]:
    """One result button as Discord shows it."""
    _, style, row = BUTTONS[action]
    return discord.ui.Button(
        label=label or action,
        style=style,
        emoji=EMOJI.get(action),
        custom_id=custom_id(action, job_id),
        row=row,
    )


async def result_view(store: Store, spec: JobSpec) -> discord.ui.View:
    """The buttons for a new result (Share only when the server has a showcase channel)."""
    gs = await store.settings.get(spec.guild_id)
    view = discord.ui.View(timeout=None)
    for action in ACTIONS:
        if action == "share" and not gs.showcase_channel_id:
            continue
        view.add_item(button(action, spec.job_id, t(BUTTONS[action][0], spec.locale)[:80]))
    return view

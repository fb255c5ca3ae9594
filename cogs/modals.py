"""The prompt modals: a new prompt (edit prompt, the context menu), or a prompt plus which
original image goes with a result (use as input)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord

from cogs.common import reply_error
from kontext.errors import KontextError
from kontext.i18n import t

log = logging.getLogger("kontext.cogs.modals")

MODAL_TIMEOUT_S = 900.0


OnPrompt = Callable[[discord.Interaction, str], Awaitable[None]]


class PromptModal(discord.ui.Modal):
    """A modal asking for a prompt (optionally prefilled); hands the text to ``on_done``."""

    def __init__(self, locale: str, *, title_key: str, on_done: OnPrompt, default: str = "") -> None:
        super().__init__(title=t(title_key, locale)[:45], timeout=MODAL_TIMEOUT_S)
        self.locale = locale
        self.on_done = on_done
        self.prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            custom_id="prompt",
            default=default[:1000] or None,
            placeholder=t("modal.prompt_placeholder", locale)[:100],
            min_length=1,
            max_length=1000,
        )
        self.add_item(discord.ui.Label(text=t("modal.prompt", locale)[:45], component=self.prompt))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.on_done(interaction, self.prompt.value)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]  # as discord.ui.Modal.on_error: a modal has no item
        log.error("prompt modal failed", exc_info=error)
        await reply_error(interaction, KontextError(type(error).__name__))


class UseAsInputModal(discord.ui.Modal):
    """A follow-up prompt plus which original image goes with the result."""

    def __init__(
        self, locale: str, on_done: Callable[[discord.Interaction, str, int], Awaitable[None]]
    ) -> None:
        super().__init__(title=t("modal.use_title", locale)[:45], timeout=MODAL_TIMEOUT_S)
        self.on_done = on_done
        self.prompt: discord.ui.TextInput[UseAsInputModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            custom_id="prompt",
            placeholder=t("modal.prompt_placeholder", locale)[:100],
            min_length=1,
            max_length=1000,
        )
        self.keep: discord.ui.Select[UseAsInputModal] = discord.ui.Select(
            custom_id="keep",
            min_values=1,
            max_values=1,
            options=[
                discord.SelectOption(label=t("embed.image", locale, n=1), value="1", default=True),
                discord.SelectOption(label=t("embed.image", locale, n=2), value="2"),
            ],
        )
        self.add_item(discord.ui.Label(text=t("modal.prompt", locale)[:45], component=self.prompt))
        self.add_item(
            discord.ui.Label(
                text=t("modal.keep", locale)[:45],
                description=t("modal.keep_hint", locale)[:100],
                component=self.keep,
            )
        )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        keep = 2 if self.keep.values and self.keep.values[0] == "2" else 1
        await self.on_done(interaction, self.prompt.value, keep)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]  # as discord.ui.Modal.on_error: a modal has no item
        log.error("use-as-input modal failed", exc_info=error)
        await reply_error(interaction, KontextError(type(error).__name__))

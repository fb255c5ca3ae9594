"""The one table of per-server settings (``kontext/guild_settings.py``) and what derives from it:
the store's validation and defaults, the ``/kontext-admin settings`` options, the settings
display, and each row's translations. A new row must show up in every one of them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import discord
import pytest
from discord import app_commands

from cogs.admin import AdminGroup, describe_settings, option_value, settings_options
from kontext.guild_settings import (
    SETTING_KEYS,
    SETTINGS,
    Kind,
    SettingRow,
    defaults,
    validate_setting,
)
from kontext.i18n import available_locales, catalog, t
from kontext.schema import guild_settings
from kontext.settings import Settings
from kontext.store.types import GuildSettings

SETTINGS_ENV = Settings(discord_token="x", cooldown_seconds=30, confirm_quote=True)
NEW_ROW = SettingRow(
    "max_prompt_words", Kind.INT, "max_prompt_words", "Longest prompt in words",
    default=50, low=1, high=200,
)


def settings_command(rows: Any = SETTINGS) -> app_commands.Command[Any, Any, Any]:
    """A ``settings`` command built the way ``AdminGroup`` builds its own, over ``rows``."""

    class Group(app_commands.Group, name="kontext-admin", description="test"):
        @app_commands.command(name="settings", description="Show or change")
        @settings_options(rows)
        async def settings(self, interaction: discord.Interaction, **options: Any) -> None:
            pass

    command = Group().get_command("settings")
    assert isinstance(command, app_commands.Command)
    return command


def options_of(command: app_commands.Command[Any, Any, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in command.to_dict(None)["options"]}  # type: ignore[arg-type]


def test_the_table_matches_the_stored_fields_and_the_environment() -> None:
    fields = {f.name for f in dataclasses.fields(GuildSettings)} - {"guild_id", "overridden"}
    assert set(SETTING_KEYS) == fields
    assert set(SETTING_KEYS) <= set(guild_settings.c.keys())
    assert len({row.option for row in SETTINGS}) == len(SETTINGS)
    for row in SETTINGS:
        if row.env is not None:
            assert hasattr(SETTINGS_ENV, row.env), row.name
    values = defaults(SETTINGS_ENV)
    assert values["cooldown_seconds"] == 30 and values["confirm_quote"] is True
    assert values["showcase_channel_id"] is None and values["allowed_channel_ids"] == ()
    for row in SETTINGS:  # every default passes its own validation
        validate_setting(row.name, values[row.name])


@pytest.mark.parametrize("row", SETTINGS, ids=lambda r: r.name)
def test_every_row_is_validated_by_its_bounds(row: SettingRow) -> None:
    if row.kind in (Kind.INT, Kind.CHOICE_INT):
        assert validate_setting(row.name, row.low) == row.low
        assert validate_setting(row.name, str(row.high)) == row.high
        for bad in (row.low - 1, row.high + 1, "many", True):
            with pytest.raises(ValueError, match=row.name):
                validate_setting(row.name, bad)
    elif row.is_list:
        too_many = [str(n) for n in range(1, row.high + 2)] if row.kind is Kind.WORDS else list(
            range(1, row.high + 2)
        )
        with pytest.raises(ValueError, match=row.name):
            validate_setting(row.name, too_many)
        with pytest.raises(ValueError, match=row.name):
            validate_setting(row.name, "not a list")
    else:
        with pytest.raises(ValueError, match=row.name):
            validate_setting(row.name, "no such value")


@pytest.mark.parametrize("lang", available_locales())
def test_every_row_has_its_texts_in_every_language(lang: str) -> None:
    texts = catalog(lang)
    missing = [k for row in SETTINGS for k in (row.text_key, row.option_key) if k not in texts]
    assert missing == []
    if lang == "en":  # the code's English is the catalog's
        assert [texts[row.option_key] for row in SETTINGS] == [row.description for row in SETTINGS]


def test_the_command_has_one_option_per_row_then_reset() -> None:
    command = AdminGroup(SimpleNamespace()).get_command("settings")  # type: ignore[arg-type]
    assert isinstance(command, app_commands.Command)
    options = options_of(command)
    assert list(options) == [row.option for row in SETTINGS] + ["reset"]
    for row in SETTINGS:
        option = options[row.option]
        assert option["description"] == row.description
        assert not option.get("required", False)
        if row.kind is Kind.INT:
            assert (option["min_value"], option["max_value"]) == (row.low, row.high)
        if row.kind is Kind.CHOICE_INT:
            assert [c["value"] for c in option["choices"]] == list(range(row.low, row.high + 1))
    assert [c["value"] for c in options["reset"]["choices"]] == list(SETTING_KEYS)


def test_the_display_shows_every_row() -> None:
    gs = GuildSettings(guild_id=1, **defaults(SETTINGS_ENV))
    embed = describe_settings(gs, "de")
    assert [f.name for f in embed.fields] == [t(row.text_key, "de") for row in SETTINGS]
    shown = {row.name: f.value for row, f in zip(SETTINGS, embed.fields, strict=True)}
    assert shown["cooldown_seconds"] == "30 s"
    assert shown["allowed_channel_ids"] == t("admin.anywhere", "de")
    assert shown["confirm_quote"] == t("admin.yes", "de")


def test_a_new_row_appears_in_validation_options_and_display(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kontext.guild_settings as table

    rows = (*SETTINGS, NEW_ROW)
    monkeypatch.setattr(table, "BY_NAME", {**table.BY_NAME, NEW_ROW.name: NEW_ROW})
    assert validate_setting(NEW_ROW.name, "12") == 12
    with pytest.raises(ValueError, match="max_prompt_words"):
        validate_setting(NEW_ROW.name, 0)

    options = options_of(settings_command(rows))
    assert list(options)[-2:] == ["max_prompt_words", "reset"]
    assert (options["max_prompt_words"]["min_value"], options["max_prompt_words"]["max_value"]) == (
        1, 200,
    )
    assert options["max_prompt_words"]["description"] == "Longest prompt in words"
    assert "max_prompt_words" in [c["value"] for c in options["reset"]["choices"]]
    assert option_value(NEW_ROW, 12) == 12

    gs = SimpleNamespace(**defaults(SETTINGS_ENV), max_prompt_words=80)
    embed = describe_settings(gs, "en", rows)  # type: ignore[arg-type]
    assert (embed.fields[-1].name, embed.fields[-1].value) == ("setting.max_prompt_words", "80")

"""The per-server settings, as one table. Discord-free.

Each row of :data:`SETTINGS` is one setting a server's admins change with ``/kontext-admin
settings``: its name (the ``guild_settings`` column and the :class:`~kontext.store.types.GuildSettings`
field), its kind, its bounds, where its default comes from (a field of the process
:class:`~kontext.settings.Settings`, i.e. the environment, or a constant), the command option
that sets it, that option's English description, and its text key for translations
(``setting.<name>`` in every catalog of ``kontext/locales``).

Everything else is derived from the table: the validation (:func:`validate_setting`), the
defaults (:func:`defaults`), how a value is stored and read (:func:`to_column`,
:func:`from_column`), the command's options and choices (``cogs/admin.py``) and the settings
display. A new setting is one row here, its column in ``kontext/schema.py``, its
``GuildSettings`` field, and its translations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kontext.settings import ASPECT_RATIOS, Settings

MAX_SNOWFLAKE = 2**63 - 1
MAX_BLOCKED_WORD_LEN = 100


class Kind(StrEnum):
    """What a setting holds (its validation, storage, command option and display follow)."""

    INT = "int"  # a whole number in [low, high]
    CHOICE_INT = "choice_int"  # a whole number in [low, high], offered as choices
    BOOL = "bool"
    ASPECT_RATIO = "aspect_ratio"  # one of the API's aspect ratios, offered as choices
    CHANNEL = "channel"  # one channel id, or none
    CHANNELS = "channels"  # a list of channel ids (at most ``high``)
    ROLES = "roles"  # a list of role ids (at most ``high``)
    WORDS = "words"  # a list of words or phrases (at most ``high``)


LIST_KINDS = frozenset({Kind.CHANNELS, Kind.ROLES, Kind.WORDS})


@dataclass(frozen=True, slots=True)
class SettingRow:
    """One per-server setting."""

    name: str
    kind: Kind
    #: the command option that sets it (``/kontext-admin settings <option>:…``)
    option: str
    #: the option's description (English; ``en.json`` repeats it under :attr:`option_key`)
    description: str
    #: the field of :class:`~kontext.settings.Settings` that gives the default, or None
    env: str | None = None
    #: the default when :attr:`env` is None
    default: Any = None
    #: bounds: the value's for numbers, the number of items for lists
    low: int = 0
    high: int = 0
    #: shown after the value (``"s"``)
    unit: str = ""
    #: the text key shown for an empty value (a list, no channel)
    empty: str = "admin.none"

    @property
    def text_key(self) -> str:
        """The translations' key of the setting's name (the display's label)."""
        return f"setting.{self.name}"

    @property
    def option_key(self) -> str:
        """The translations' key of the command option's description."""
        return f"cmd.kontext-admin.settings.{self.option}.description"

    @property
    def is_list(self) -> bool:
        return self.kind in LIST_KINDS

    def default_from(self, settings: Settings) -> Any:
        """The value a server has until its admins change it."""
        return self.default if self.env is None else getattr(settings, self.env)

    def validate(self, value: Any) -> Any:
        """The value to store (lists as Python lists); ValueError naming the setting."""
        return _VALIDATORS[self.kind](self, value)


SETTINGS: tuple[SettingRow, ...] = (
    SettingRow("starting_credits", Kind.INT, "starting_credits",
               "Credits a new member starts with",
               env="starting_credits", low=0, high=1_000_000),
    SettingRow("credits_per_image", Kind.INT, "credits_per_image",
               "Price of one image in credits",
               env="credits_per_image", low=0, high=1_000_000),
    SettingRow("daily_free_credits", Kind.INT, "daily_free_credits",
               "Top-up each UTC day to this many credits (0 = off)",
               env="daily_free_credits", low=0, high=1_000_000),
    SettingRow("cooldown_seconds", Kind.INT, "cooldown_seconds",
               "Seconds between a member's jobs",
               env="cooldown_seconds", low=0, high=86_400, unit="s"),
    SettingRow("jobs_per_member", Kind.INT, "jobs_per_member",
               "Jobs one member may have in flight",
               env="jobs_per_member", low=1, high=10),
    SettingRow("max_safety_tolerance", Kind.CHOICE_INT, "max_safety_tolerance",
               "Highest safety tolerance members may pick",
               env="max_safety_tolerance", low=0, high=2),
    SettingRow("default_aspect_ratio", Kind.ASPECT_RATIO, "default_aspect_ratio",
               "Aspect ratio when a member picks none",
               env="default_aspect_ratio"),
    SettingRow("showcase_channel_id", Kind.CHANNEL, "showcase_channel",
               "Channel where members can share results"),
    SettingRow("showcase_requires_approval", Kind.BOOL, "showcase_requires_approval",
               "Shared results wait for a moderator's approval",
               default=False),
    SettingRow("allowed_channel_ids", Kind.CHANNELS, "allowed_channels",
               "Channels where /kontext works (mentions; 'none' = anywhere)",
               default=(), high=100, empty="admin.anywhere"),
    SettingRow("exempt_role_ids", Kind.ROLES, "exempt_roles",
               "Roles without cooldown (mentions; 'none' to clear)",
               default=(), high=250),
    SettingRow("blocked_words", Kind.WORDS, "blocked_words",
               "Comma-separated words refused in prompts ('none' to clear)",
               default=(), high=200),
    SettingRow("confirm_quote", Kind.BOOL, "confirm_quote",
               "Members confirm a quote before each job",
               env="confirm_quote"),
)  # fmt: skip

BY_NAME: dict[str, SettingRow] = {row.name: row for row in SETTINGS}
SETTING_KEYS: tuple[str, ...] = tuple(BY_NAME)


def setting(name: str) -> SettingRow:
    """The row of ``name``; ValueError naming the known settings when there is none."""
    row = BY_NAME.get(name)
    if row is None:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTING_KEYS)}")
    return row


def validate_setting(key: str, value: Any) -> Any:
    """The value to store for ``key`` (lists as Python lists); ValueError naming the setting."""
    return setting(key).validate(value)


def defaults(settings: Settings) -> dict[str, Any]:
    """Every setting's default for a server that changed nothing."""
    return {row.name: row.default_from(settings) for row in SETTINGS}


def to_column(key: str, value: Any) -> Any:
    """A validated value as its column stores it (lists as JSON)."""
    return json.dumps(value) if BY_NAME[key].is_list and value is not None else value


def from_column(key: str, value: Any) -> Any:
    """A column's value as :class:`~kontext.store.types.GuildSettings` holds it (None: unset)."""
    if value is None:
        return None
    kind = BY_NAME[key].kind
    if kind in LIST_KINDS:
        return tuple(json.loads(value))
    if kind is Kind.BOOL:
        return bool(value)
    return value


def audit_json(key: str, value: Any) -> str | None:
    """A value as the settings audit records it."""
    if value is None:
        return None
    return json.dumps(list(value) if BY_NAME[key].is_list else value)


# --- validators, by kind ------------------------------------------------------------------------


def _int_in(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{key} must be a whole number")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key} must be a whole number, got {value!r}") from None
    if not lo <= number <= hi:
        raise ValueError(f"{key} must be between {lo} and {hi}, got {number}")
    return number


def _int(row: SettingRow, value: Any) -> int:
    return _int_in(row.name, value, row.low, row.high)


def _bool(row: SettingRow, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "no", "off", "0"}:
        return False
    raise ValueError(f"{row.name} must be true or false")


def _aspect_ratio(row: SettingRow, value: Any) -> str:
    if value not in ASPECT_RATIOS:
        raise ValueError(f"{row.name} must be one of {', '.join(ASPECT_RATIOS)}")
    return str(value)


def _snowflake(key: str, value: Any) -> int:
    return _int_in(key, value, 1, MAX_SNOWFLAKE)


def _channel(row: SettingRow, value: Any) -> int | None:
    return None if value is None else _snowflake(row.name, value)


def _ids(row: SettingRow, value: Any) -> list[int]:
    key = row.name
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{key} must be a list of ids")
    out: list[int] = []
    for item in value:
        number = _snowflake(key, item)
        if number not in out:
            out.append(number)
    if len(out) > row.high:
        raise ValueError(f"{key} can hold at most {row.high} ids, got {len(out)}")
    return out


def _words(row: SettingRow, value: Any) -> list[str]:
    key = row.name
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(f"{key} must be a list of words")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{key} must be a list of words")
        word = " ".join(item.split()).casefold()
        if not word:
            continue
        if len(word) > MAX_BLOCKED_WORD_LEN:
            raise ValueError(f"{key}: each word can be at most {MAX_BLOCKED_WORD_LEN} characters")
        if word not in out:
            out.append(word)
    if len(out) > row.high:
        raise ValueError(f"{key} can hold at most {row.high} words, got {len(out)}")
    return out


_VALIDATORS: dict[Kind, Callable[[SettingRow, Any], Any]] = {
    Kind.INT: _int,
    Kind.CHOICE_INT: _int,
    Kind.BOOL: _bool,
    Kind.ASPECT_RATIO: _aspect_ratio,
    Kind.CHANNEL: _channel,
    Kind.CHANNELS: _ids,
    Kind.ROLES: _ids,
    Kind.WORDS: _words,
}

"""The checks Discord applies to what a bot sends: command payloads (bulk sync, single
create/edit), messages (content, embeds, components, files) and modals.

Each failure is reported the way Discord does: an ``errors`` tree of ``{"_errors": [{code,
message}]}`` under the offending field's path, raised as :class:`APIError` 50035 by the routes.
:func:`validate_commands` is public: tests check the bot's command tree with it directly.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .models import IS_COMPONENTS_V2, VALID_LOCALES, APIError, UploadedFile, add_error, err

# Discord: ^[-_\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$ ; Python's \w is Unicode letters/digits/_.
_NAME_RE = re.compile(r"^[-_\w\u0900-\u097F\u0E00-\u0E7F]{1,32}$")
_COMMAND_LIMITS = {1: 100, 2: 15, 3: 15, 4: 1}
_COMMAND_MAX_SIZE = 8000
_CHOICE_TYPES = (3, 4, 10)
SUBCOMMAND_TYPES = (1, 2)


# ---------------------------------------------------------------------- messages and modals


def validate_modal(data: Mapping[str, Any]) -> None:
    errors: dict[str, Any] = {}
    if not data.get("custom_id") or len(str(data["custom_id"])) > 100:
        add_error(
            errors, ["custom_id"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
        )
    title = str(data.get("title") or "")
    if not 1 <= len(title) <= 45:
        add_error(errors, ["title"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length.")
    components = data.get("components") or []
    if not 1 <= len(components) <= 5:
        add_error(
            errors, ["components"], "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length."
        )
    if errors:
        raise APIError(400, 50035, "Invalid Form Body", errors=errors)


def _embed_size(embed: Mapping[str, Any]) -> int:
    total = len(str(embed.get("title") or "")) + len(str(embed.get("description") or ""))
    total += len(str((embed.get("footer") or {}).get("text") or ""))
    total += len(str((embed.get("author") or {}).get("name") or ""))
    for fld in embed.get("fields") or []:
        total += len(str(fld.get("name") or "")) + len(str(fld.get("value") or ""))
    return total


def validate_message(
    body: Mapping[str, Any], files: Sequence[UploadedFile], *, require_content: bool
) -> None:
    """Discord's message limits; raises APIError 50035 / 50006."""
    errors: dict[str, Any] = {}
    content = body.get("content")
    if content is not None and len(str(content)) > 2000:
        add_error(errors, ["content"], "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    embeds = body.get("embeds") or []
    if len(embeds) > 10:
        add_error(errors, ["embeds"], "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    limits = {"title": 256, "description": 4096}
    for i, embed in enumerate(embeds[:10]):
        for key, limit in limits.items():
            if len(str(embed.get(key) or "")) > limit:
                add_error(
                    errors,
                    ["embeds", str(i), key],
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {limit} or fewer in length.",
                )
        fields = embed.get("fields") or []
        if len(fields) > 25:
            add_error(
                errors,
                ["embeds", str(i), "fields"],
                "BASE_TYPE_MAX_LENGTH",
                "Must be 25 or fewer in length.",
            )
        for j, fld in enumerate(fields):
            if not 1 <= len(str(fld.get("name") or "")) <= 256:
                add_error(
                    errors,
                    ["embeds", str(i), "fields", str(j), "name"],
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 256 in length.",
                )
            if not 1 <= len(str(fld.get("value") or "")) <= 1024:
                add_error(
                    errors,
                    ["embeds", str(i), "fields", str(j), "value"],
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 1024 in length.",
                )
        if len(str((embed.get("footer") or {}).get("text") or "")) > 2048:
            add_error(
                errors,
                ["embeds", str(i), "footer", "text"],
                "BASE_TYPE_MAX_LENGTH",
                "Must be 2048 or fewer in length.",
            )
        if len(str((embed.get("author") or {}).get("name") or "")) > 256:
            add_error(
                errors,
                ["embeds", str(i), "author", "name"],
                "BASE_TYPE_MAX_LENGTH",
                "Must be 256 or fewer in length.",
            )
    if sum(_embed_size(e) for e in embeds) > 6000:
        add_error(
            errors, ["embeds"], "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000"
        )
    components = body.get("components") or []
    flags = int(body.get("flags") or 0)
    if not flags & IS_COMPONENTS_V2 and len(components) > 5:
        add_error(errors, ["components"], "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    if flags & IS_COMPONENTS_V2 and (content or embeds):
        add_error(
            errors,
            ["content"],
            "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
            "The 'content' and 'embeds' fields cannot be used when using MessageFlags.IS_COMPONENTS_V2",
        )
    if len(files) > 10:
        add_error(errors, ["files"], "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    if errors:
        raise APIError(400, 50035, "Invalid Form Body", errors=errors)
    if require_content and not (
        content
        or embeds
        or files
        or components
        or body.get("sticker_ids")
        or body.get("poll")
        or body.get("attachments")
    ):
        raise APIError(400, 50006, "Cannot send an empty message")


# ---------------------------------------------------------------------- command validation


def command_input(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """A stored command back to the shape a client sends."""
    return {
        k: copy.deepcopy(v)
        for k, v in cmd.items()
        if k not in ("id", "application_id", "version", "guild_id")
    }


def _check_name(errors: dict[str, Any], path: list[str], name: Any, *, lowercase: bool) -> None:
    if not isinstance(name, str):
        add_error(errors, path, "BASE_TYPE_REQUIRED", "This field is required")
        return
    if not _NAME_RE.fullmatch(name) or (lowercase and name != name.lower()):
        add_error(
            errors, path, "APPLICATION_COMMAND_INVALID_NAME", f"Command name is invalid: {name!r}"
        )


def _check_menu_name(errors: dict[str, Any], path: list[str], name: Any) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        add_error(errors, path, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length.")


def _check_length(errors: dict[str, Any], path: list[str], value: Any, low: int, high: int) -> None:
    if not isinstance(value, str) or not low <= len(value) <= high:
        add_error(
            errors, path, "BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length."
        )


def _check_localizations(
    errors: dict[str, Any],
    path: list[str],
    value: Any,
    *,
    kind: Literal["name", "description", "menu", "choice"],
) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        add_error(errors, path, "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
        return
    for locale, text in value.items():
        sub = [*path, str(locale)]
        if locale not in VALID_LOCALES:
            add_error(
                errors, sub, "ENUM_TYPE_COERCE", f'Value "{locale}" is not a valid enum value.'
            )
        elif kind == "name":
            _check_name(errors, sub, text, lowercase=True)
        elif kind == "menu":
            _check_menu_name(errors, sub, text)
        else:
            _check_length(errors, sub, text, 1, 100)


def _command_size(cmd: Mapping[str, Any]) -> int:
    total = len(str(cmd.get("name") or "")) + len(str(cmd.get("description") or ""))

    def walk(options: Sequence[Mapping[str, Any]]) -> int:
        size = 0
        for opt in options:
            size += len(str(opt.get("name") or "")) + len(str(opt.get("description") or ""))
            for choice in opt.get("choices") or []:
                size += len(str(choice.get("name") or "")) + len(str(choice.get("value") or ""))
            size += walk(opt.get("options") or [])
        return size

    return total + walk(cmd.get("options") or [])


def _check_options(
    errors: dict[str, Any],
    path: list[str],
    options: Any,
    level: Literal["command", "group", "subcommand"],
) -> None:
    if not isinstance(options, list):
        add_error(errors, path, "BASE_TYPE_ARRAY", "Must be an array.")
        return
    if len(options) > 25:
        add_error(errors, path, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    types = [o.get("type") if isinstance(o, Mapping) else None for o in options]
    subs = [t in SUBCOMMAND_TYPES for t in types]
    if level == "command" and any(subs) and not all(subs):
        add_error(
            errors,
            path,
            "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
            "Sub-command and sub-command group option types are mutually exclusive to all other types",
        )
    seen_names: set[str] = set()
    seen_optional = False
    for i, opt in enumerate(options):
        p = [*path, str(i)]
        if not isinstance(opt, Mapping):
            add_error(
                errors, p, "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType"
            )
            continue
        otype = opt.get("type")
        if otype not in range(1, 12):
            add_error(
                errors,
                [*p, "type"],
                "ENUM_TYPE_COERCE",
                f'Value "{otype}" is not a valid enum value.',
            )
            continue
        if level == "group" and otype != 1:
            add_error(
                errors,
                [*p, "type"],
                "APPLICATION_COMMAND_OPTION_TYPE_INVALID",
                "Sub-command groups may only contain sub-commands",
            )
        if level == "subcommand" and otype in SUBCOMMAND_TYPES:
            add_error(
                errors,
                [*p, "type"],
                "APPLICATION_COMMAND_OPTION_TYPE_INVALID",
                "Sub-commands cannot contain sub-commands or groups",
            )
        name = opt.get("name")
        _check_name(errors, [*p, "name"], name, lowercase=True)
        if isinstance(name, str):
            if name in seen_names:
                add_error(
                    errors,
                    [*p, "name"],
                    "APPLICATION_COMMAND_OPTION_NAME_ALREADY_EXISTS",
                    "Option names must be unique",
                )
            seen_names.add(name)
        _check_length(errors, [*p, "description"], opt.get("description"), 1, 100)
        _check_localizations(
            errors, [*p, "name_localizations"], opt.get("name_localizations"), kind="name"
        )
        _check_localizations(
            errors,
            [*p, "description_localizations"],
            opt.get("description_localizations"),
            kind="description",
        )
        if otype in SUBCOMMAND_TYPES:
            children = opt.get("options") or []
            if otype == 2 and not children:
                add_error(
                    errors, [*p, "options"], "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length."
                )
            _check_options(
                errors, [*p, "options"], children, "group" if otype == 2 else "subcommand"
            )
            continue
        required = bool(opt.get("required", False))
        if required and seen_optional:
            add_error(
                errors,
                [*p, "required"],
                "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                "Required options must be placed before non-required options",
            )
        if not required:
            seen_optional = True
        choices = opt.get("choices")
        if choices:
            if otype not in _CHOICE_TYPES:
                add_error(
                    errors,
                    [*p, "choices"],
                    "APPLICATION_COMMAND_OPTION_CHOICES_NOT_ALLOWED",
                    "Choices are only allowed for string, integer and number options",
                )
            if len(choices) > 25:
                add_error(
                    errors,
                    [*p, "choices"],
                    "BASE_TYPE_MAX_LENGTH",
                    "Must be 25 or fewer in length.",
                )
            if opt.get("autocomplete"):
                add_error(
                    errors,
                    [*p, "autocomplete"],
                    "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID_CHOICES",
                    "Autocomplete cannot be enabled with choices",
                )
            for j, choice in enumerate(choices):
                cp = [*p, "choices", str(j)]
                _check_length(errors, [*cp, "name"], choice.get("name"), 1, 100)
                _check_localizations(
                    errors,
                    [*cp, "name_localizations"],
                    choice.get("name_localizations"),
                    kind="choice",
                )
                value = choice.get("value")
                if otype == 3 and (not isinstance(value, str) or not 1 <= len(value) <= 100):
                    add_error(
                        errors,
                        [*cp, "value"],
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    )
                elif otype == 4 and (
                    isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**53
                ):
                    add_error(
                        errors, [*cp, "value"], "NUMBER_TYPE_COERCE", f'Value "{value}" is not int.'
                    )
                elif otype == 10 and (
                    isinstance(value, bool) or not isinstance(value, int | float)
                ):
                    add_error(
                        errors,
                        [*cp, "value"],
                        "NUMBER_TYPE_COERCE",
                        f'Value "{value}" is not a number.',
                    )
        if opt.get("autocomplete") and otype not in _CHOICE_TYPES:
            add_error(
                errors,
                [*p, "autocomplete"],
                "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID_TYPE",
                "Autocomplete is only allowed for string, integer and number options",
            )
        if ("min_value" in opt or "max_value" in opt) and otype not in (4, 10):
            add_error(
                errors,
                [*p, "min_value"],
                "APPLICATION_COMMAND_OPTION_INVALID_FIELD",
                "min_value/max_value are only allowed for integer and number options",
            )
        if "min_length" in opt or "max_length" in opt:
            if otype != 3:
                add_error(
                    errors,
                    [*p, "min_length"],
                    "APPLICATION_COMMAND_OPTION_INVALID_FIELD",
                    "min_length/max_length are only allowed for string options",
                )
            if "min_length" in opt and not 0 <= int(opt["min_length"]) <= 6000:
                add_error(
                    errors,
                    [*p, "min_length"],
                    "NUMBER_TYPE_MAX",
                    "int value should be between 0 and 6000.",
                )
            if "max_length" in opt and not 1 <= int(opt["max_length"]) <= 6000:
                add_error(
                    errors,
                    [*p, "max_length"],
                    "NUMBER_TYPE_MAX",
                    "int value should be between 1 and 6000.",
                )
        if opt.get("channel_types") and otype != 7:
            add_error(
                errors,
                [*p, "channel_types"],
                "APPLICATION_COMMAND_OPTION_INVALID_FIELD",
                "channel_types is only allowed for channel options",
            )


def _validate_command(cmd: Any) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    if not isinstance(cmd, Mapping):
        add_error(errors, [], "MODEL_TYPE_CONVERT", "Only dictionaries may be used in a ModelType")
        return errors
    ctype = cmd.get("type", 1)
    if ctype not in (1, 2, 3, 4):
        add_error(
            errors, ["type"], "ENUM_TYPE_COERCE", f'Value "{ctype}" is not a valid enum value.'
        )
        return errors
    if ctype == 1:
        _check_name(errors, ["name"], cmd.get("name"), lowercase=True)
        _check_length(errors, ["description"], cmd.get("description"), 1, 100)
        _check_localizations(
            errors, ["name_localizations"], cmd.get("name_localizations"), kind="name"
        )
        _check_localizations(
            errors,
            ["description_localizations"],
            cmd.get("description_localizations"),
            kind="description",
        )
        _check_options(errors, ["options"], cmd.get("options") or [], "command")
    else:
        _check_menu_name(errors, ["name"], cmd.get("name"))
        _check_localizations(
            errors, ["name_localizations"], cmd.get("name_localizations"), kind="menu"
        )
        if cmd.get("description"):
            add_error(
                errors,
                ["description"],
                "APPLICATION_COMMAND_CONTEXT_MENU_DESCRIPTION",
                "Context menu commands cannot have a description",
            )
        if cmd.get("options"):
            add_error(
                errors,
                ["options"],
                "APPLICATION_COMMAND_CONTEXT_MENU_OPTIONS",
                "Context menu commands cannot have options",
            )
    dmp = cmd.get("default_member_permissions")
    # Discord documents a string but accepts a non-negative integer too (discord.py sends one)
    if dmp is not None and not (
        (isinstance(dmp, str) and dmp.isdigit())
        or (isinstance(dmp, int) and not isinstance(dmp, bool) and dmp >= 0)
    ):
        add_error(
            errors,
            ["default_member_permissions"],
            "BASE_TYPE_STRING",
            "Must be a string of digits.",
        )
    for key, valid in (("contexts", {0, 1, 2}), ("integration_types", {0, 1})):
        value = cmd.get(key)
        if value is not None and (
            not isinstance(value, list) or any(v not in valid for v in value)
        ):
            add_error(errors, [key], "ENUM_TYPE_COERCE", f"Invalid {key}.")
    if "nsfw" in cmd and not isinstance(cmd["nsfw"], bool):
        add_error(errors, ["nsfw"], "BASE_TYPE_BOOLEAN", "Must be a boolean.")
    if _command_size(cmd) > _COMMAND_MAX_SIZE:
        add_error(
            errors,
            [],
            "APPLICATION_COMMAND_TOO_LARGE",
            f"Command exceeds maximum size ({_COMMAND_MAX_SIZE})",
        )
    return errors


def validate_commands(commands: Any) -> dict[str, Any]:
    """Validate a bulk-overwrite payload like Discord; returns the ``errors`` dict ({} if valid)."""
    errors: dict[str, Any] = {}
    if not isinstance(commands, list):
        return err("BASE_TYPE_ARRAY", "Must be an array.")
    counts = Counter(c.get("type", 1) if isinstance(c, Mapping) else 1 for c in commands)
    for ctype, count in counts.items():
        limit = _COMMAND_LIMITS.get(ctype)
        if limit is not None and count > limit:
            add_error(
                errors,
                [],
                "APPLICATION_COMMANDS_LIMIT_EXCEEDED",
                f"Maximum number of type {ctype} application commands reached ({limit})",
            )
    seen: set[tuple[Any, Any]] = set()
    for i, cmd in enumerate(commands):
        cmd_errors = _validate_command(cmd)
        if isinstance(cmd, Mapping):
            key = (cmd.get("type", 1), cmd.get("name"))
            if key in seen:
                add_error(
                    cmd_errors,
                    ["name"],
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                    f"Application command names must be unique: {cmd.get('name')!r}",
                )
            seen.add(key)
        if cmd_errors:
            errors[str(i)] = cmd_errors
    return errors

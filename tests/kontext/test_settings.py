"""Settings: defaults, parsing, one-line errors, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontext.settings import ENV_NAMES, Settings, SettingsError, load_settings, settings_from_env

BASE = {"DISCORD_TOKEN": "tok.en-123"}


def test_defaults() -> None:
    s = settings_from_env(BASE)
    assert s.segmind_base_url == "https://api.segmind.com"
    assert s.segmind_model == "multi-image-kontext-max"
    assert s.segmind_api_mode == "sync"
    assert s.database_url == "sqlite:///data/kontext.db"
    assert s.shutdown_grace_seconds == 25
    assert s.port is None and s.dev_guild_id is None


def test_token_required() -> None:
    with pytest.raises(SettingsError) as info:
        settings_from_env({})
    assert info.value.name == "DISCORD_TOKEN"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("PORT", "eighty", "whole number"),
        ("PORT", "70000", "at most 65535"),
        ("SEGMIND_API_MODE", "turbo", "sync, async"),
        ("SEGMIND_BASE_URL", "api.segmind.com", "http(s) URL"),
        ("DATABASE_URL", "mysql://x", "sqlite"),
        ("COOLDOWN_SECONDS", "-1", "at least 0"),
        ("DAILY_BUDGET_USD", "nan", "finite"),
        ("CONFIRM_QUOTE", "maybe", "true or false"),
        ("DEFAULT_ASPECT_RATIO", "7:3", "one of"),
        ("MAX_CONCURRENT_JOBS", "0", "at least 1"),
        ("DISCORD_TOKEN", "has space", "spaces"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_from_env({**BASE, name: value})
    assert info.value.name == name
    assert why in str(info.value)
    assert str(info.value).startswith(f"{name}: ")


@pytest.mark.parametrize(
    "url",
    ["sqlite:///data/k.db", "sqlite:////tmp/k.db", "postgres://u:p@h/db", "postgresql://u@h/db?sslmode=require"],
)
def test_database_urls(url: str) -> None:
    assert settings_from_env({**BASE, "DATABASE_URL": url}).database_url == url


def test_empty_values_take_defaults() -> None:
    s = settings_from_env({**BASE, "PORT": "", "LOG_LEVEL": "  "})
    assert s.port is None and s.log_level == "INFO"


def test_log_level_case_insensitive() -> None:
    assert settings_from_env({**BASE, "LOG_LEVEL": "debug"}).log_level == "DEBUG"


def test_repr_hides_secrets() -> None:
    s = settings_from_env({**BASE, "SEGMIND_API_KEY": "SG_secret_value"})
    assert "tok.en-123" not in repr(s) and "SG_secret_value" not in str(s)
    assert s.secrets == ("tok.en-123", "SG_secret_value")


def test_dotenv_file_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / ".env"
    env.write_text("DISCORD_TOKEN=from-file\nCOOLDOWN_SECONDS=5\n# comment\nPORT=8080\n")
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORT", "9090")
    s = load_settings(env)
    assert s.discord_token == "from-file"
    assert s.cooldown_seconds == 5
    assert s.port == 9090


def test_env_example_lists_every_setting() -> None:
    text = (Path(__file__).parents[2] / ".env.example").read_text()
    for name in ENV_NAMES:
        assert f"{name}=" in text, name


def test_settings_is_frozen() -> None:
    s = settings_from_env(BASE)
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert isinstance(s, Settings)


def test_database_url_password_never_in_repr_and_redacted_from_logs() -> None:
    s = settings_from_env({**BASE, "DATABASE_URL": "postgres://kontext:hunter2pw@db.example/k"})
    assert "hunter2pw" not in repr(s) and "postgres://kontext:***@db.example/k" in repr(s)
    assert "hunter2pw" in s.secrets


def test_shards_and_owner_settings() -> None:
    s = settings_from_env(
        {**BASE, "SHARD_COUNT": "4", "SHARD_IDS": "2, 0", "ALLOWED_GUILD_IDS": "11,22 33"}
    )
    assert (s.shard_count, s.shard_ids) == (4, (0, 2))
    assert s.allowed_guild_ids == frozenset({11, 22, 33})
    assert s.guild_daily_budget_usd == 5.0 and s.max_queue_wait_seconds == 1800.0
    with pytest.raises(SettingsError, match="SHARD_IDS"):
        settings_from_env({**BASE, "SHARD_COUNT": "2", "SHARD_IDS": "2"})
    with pytest.raises(SettingsError, match="SHARD_IDS"):
        settings_from_env({**BASE, "SHARD_IDS": "0"})
    with pytest.raises(SettingsError, match="ALLOWED_GUILD_IDS"):
        settings_from_env({**BASE, "ALLOWED_GUILD_IDS": "abc"})
    with pytest.raises(SettingsError, match="ENCRYPTION_KEY"):
        settings_from_env({**BASE, "ENCRYPTION_KEY": "not-a-key"})
    key = "x" * 43 + "="
    assert settings_from_env({**BASE, "ENCRYPTION_KEY": key}).encryption_key == key
    assert key not in repr(settings_from_env({**BASE, "ENCRYPTION_KEY": key}))


def test_per_server_bounds_agree_with_the_environments() -> None:
    """A per-server setting's bounds (kontext/guild_settings.py) are the bounds of the environment
    variable that gives its default (kontext/settings.py): the owner's default is always a value
    an admin could set, and the other way round."""
    from kontext.guild_settings import SETTINGS, Kind
    from kontext.settings import _SPEC

    parsers = {field: parse for field, parse in _SPEC.values()}
    checked = 0
    for row in SETTINGS:
        if row.env is None or row.kind not in (Kind.INT, Kind.CHOICE_INT):
            continue
        parse = parsers[row.env]
        assert parse(str(row.low)) == row.low and parse(str(row.high)) == row.high, row.name
        for outside in (row.low - 1, row.high + 1):
            with pytest.raises(ValueError):
                parse(str(outside))
        checked += 1
    assert checked == 6  # the six numeric settings with an environment default

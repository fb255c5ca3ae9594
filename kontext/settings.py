"""Process-wide settings, read once from the environment (and ``.env`` when present).

:func:`load_settings` returns one frozen, typed :class:`Settings`; a missing or malformed value
raises :class:`SettingsError` naming the setting and why, which ``bot.py`` prints as one line
before exiting with code 2. Names are fixed by PRODUCT.md; ``.env.example`` documents each one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

ASPECT_RATIOS: tuple[str, ...] = (
    "match_input_image", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2",
    "2:3", "4:5", "5:4", "21:9", "9:21", "2:1", "1:2",
)
API_MODES: tuple[str, ...] = ("sync", "async")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

T = TypeVar("T")


class SettingsError(Exception):
    """A setting is missing or malformed. ``str(err)`` is the one line to show."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


@dataclass(frozen=True, slots=True)
class Settings:
    """Every process-wide setting, validated."""

    discord_token: str
    segmind_api_key: str = ""
    segmind_base_url: str = "https://api.segmind.com"
    segmind_model: str = "multi-image-kontext-max"
    segmind_api_mode: str = "sync"
    segmind_timeout_seconds: float = 120.0
    database_url: str = "sqlite:///data/kontext.db"

    # defaults of the per-server settings
    starting_credits: int = 10
    credits_per_image: int = 1
    daily_free_credits: int = 0
    cooldown_seconds: int = 60
    jobs_per_member: int = 1
    max_safety_tolerance: int = 2
    default_aspect_ratio: str = "match_input_image"
    confirm_quote: bool = False

    # capacity and spend
    max_concurrent_jobs: int = 4
    max_queue_size: int = 50
    segmind_rpm: int = 30
    daily_budget_usd: float = 20.0
    cost_per_image_usd: float = 0.10

    # input limits
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000

    # running
    dev_guild_id: int | None = None
    log_level: str = "INFO"
    port: int | None = None
    shutdown_grace_seconds: float = 25.0
    #: a waiting job older than this is refunded and its member told (the queue never hangs)
    max_queue_wait_seconds: float = 1800.0

    # several processes: the gateway split into shards (None = discord.py decides / one shard)
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None

    # the owner and many servers
    allowed_guild_ids: frozenset[int] = frozenset()  # empty = every server
    guild_daily_budget_usd: float = 5.0  # 0 = no per-server cap
    encryption_key: str = ""  # Fernet key for the servers' own Segmind keys ("" = that is off)

    # development and tests only: point discord.py at a local emulator
    discord_api_base_url: str | None = None
    discord_gateway_url: str | None = None

    def __repr__(self) -> str:  # never print secrets
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***"
            elif f.name == "database_url":
                value = redact_url_password(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values, for log redaction."""
        passwords = url_passwords(self.database_url)
        return tuple(
            s for s in (self.discord_token, self.segmind_api_key, self.encryption_key, *passwords) if s
        )


_SECRET_FIELDS = frozenset({"discord_token", "segmind_api_key", "encryption_key"})


def url_passwords(url: str) -> tuple[str, ...]:
    """The password in a ``scheme://user:password@host/…`` URL (empty when none)."""
    try:
        import yarl

        password = yarl.URL(url).password
    except (ValueError, TypeError):
        return ()
    return (password,) if password and len(password) >= 3 else ()


def redact_url_password(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    for password in url_passwords(url):
        url = url.replace(password, "***")
    return url


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if lo is not None and value < lo:
            raise ValueError(f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"must be at most {hi}, got {value}")
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if lo is not None and value < lo:
            raise ValueError(f"must be at least {lo:g}, got {value:g}")
        if hi is not None and value > hi:
            raise ValueError(f"must be at most {hi:g}, got {value:g}")
        return value

    return parse


def _choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {raw!r}")
        return value

    return parse


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or "://" == value[-3:]:
        raise ValueError(f"must be an http(s) URL, got {raw!r}")
    return value


def _ws_url(raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("ws://", "wss://")):
        raise ValueError(f"must be a ws:// or wss:// URL, got {raw!r}")
    return value


def _database_url(raw: str) -> str:
    value = raw.strip()
    scheme = value.split("://", 1)[0].split("+", 1)[0].lower() if "://" in value else ""
    if scheme not in {"sqlite", "postgres", "postgresql"}:
        raise ValueError(
            "must be sqlite:///relative/path.db, sqlite:////absolute/path.db, "
            "postgres://… or postgresql://…"
        )
    return value


def _id_list(raw: str) -> tuple[int, ...]:
    """Comma-separated Discord ids (snowflakes); spaces ignored."""
    out: list[int] = []
    for part in raw.replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) < 2**64:
            raise ValueError(f"must be comma-separated ids (numbers), got {part!r}")
        out.append(int(part))
    return tuple(dict.fromkeys(out))


def _guild_ids(raw: str) -> frozenset[int]:
    return frozenset(_id_list(raw))


def _shard_ids(raw: str) -> tuple[int, ...]:
    """Comma-separated shard numbers (0, 1, …)."""
    parts = [p for p in raw.replace(" ", ",").split(",") if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"must be comma-separated shard numbers like 0,1; got {raw!r}")
    return tuple(sorted({int(p) for p in parts}))


def _fernet_key(raw: str) -> str:
    value = raw.strip()
    import base64
    import binascii

    try:
        decoded = base64.urlsafe_b64decode(value.encode())
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32:
        raise ValueError(
            "must be a Fernet key (32 url-safe base64 bytes); make one with: python -c "
            "'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        )
    return value


def _token(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("is empty")
    if any(c.isspace() for c in value):
        raise ValueError("must not contain spaces (copy the token again from the Developer Portal)")
    return value


# env name -> (field, parser)
_SPEC: dict[str, tuple[str, Callable[[str], object]]] = {
    "DISCORD_TOKEN": ("discord_token", _token),
    "SEGMIND_API_KEY": ("segmind_api_key", str.strip),
    "SEGMIND_BASE_URL": ("segmind_base_url", _http_url),
    "SEGMIND_MODEL": ("segmind_model", str.strip),
    "SEGMIND_API_MODE": ("segmind_api_mode", _choice(API_MODES)),
    "SEGMIND_TIMEOUT_SECONDS": ("segmind_timeout_seconds", _float(1, 900)),
    "DATABASE_URL": ("database_url", _database_url),
    "STARTING_CREDITS": ("starting_credits", _int(0, 1_000_000)),
    "CREDITS_PER_IMAGE": ("credits_per_image", _int(0, 1_000_000)),
    "DAILY_FREE_CREDITS": ("daily_free_credits", _int(0, 1_000_000)),
    "COOLDOWN_SECONDS": ("cooldown_seconds", _int(0, 86_400)),
    "JOBS_PER_MEMBER": ("jobs_per_member", _int(1, 10)),
    "MAX_SAFETY_TOLERANCE": ("max_safety_tolerance", _int(0, 2)),
    "DEFAULT_ASPECT_RATIO": ("default_aspect_ratio", _choice(ASPECT_RATIOS)),
    "CONFIRM_QUOTE": ("confirm_quote", _bool),
    "MAX_CONCURRENT_JOBS": ("max_concurrent_jobs", _int(1, 64)),
    "MAX_QUEUE_SIZE": ("max_queue_size", _int(1, 10_000)),
    "SEGMIND_RPM": ("segmind_rpm", _int(1, 10_000)),
    "DAILY_BUDGET_USD": ("daily_budget_usd", _float(0, 1_000_000)),
    "COST_PER_IMAGE_USD": ("cost_per_image_usd", _float(0, 1_000)),
    "MAX_IMAGE_BYTES": ("max_image_bytes", _int(1024, 500 * 1024 * 1024)),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", _int(1024, 500_000_000)),
    "DEV_GUILD_ID": ("dev_guild_id", _int(1)),
    "LOG_LEVEL": ("log_level", _choice(LOG_LEVELS, upper=True)),
    "PORT": ("port", _int(1, 65535)),
    "SHUTDOWN_GRACE_SECONDS": ("shutdown_grace_seconds", _float(0, 3600)),
    "MAX_QUEUE_WAIT_SECONDS": ("max_queue_wait_seconds", _float(30, 7 * 86_400)),
    "SHARD_COUNT": ("shard_count", _int(1, 10_000)),
    "SHARD_IDS": ("shard_ids", _shard_ids),
    "ALLOWED_GUILD_IDS": ("allowed_guild_ids", _guild_ids),
    "GUILD_DAILY_BUDGET_USD": ("guild_daily_budget_usd", _float(0, 1_000_000)),
    "ENCRYPTION_KEY": ("encryption_key", _fernet_key),
    "DISCORD_API_BASE_URL": ("discord_api_base_url", _http_url),
    "DISCORD_GATEWAY_URL": ("discord_gateway_url", _ws_url),
}

ENV_NAMES: tuple[str, ...] = tuple(_SPEC)


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Build :class:`Settings` from a mapping of environment variables.

    Unset or empty values take the default; ``DISCORD_TOKEN`` is required.
    """
    values: dict[str, object] = {}
    for name, (field_name, parse) in _SPEC.items():
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            if name == "DISCORD_TOKEN":
                raise SettingsError(
                    name, "is required: the bot token from the Discord Developer Portal"
                )
            continue
        try:
            values[field_name] = parse(raw)
        except ValueError as exc:
            raise SettingsError(name, str(exc)) from None
    settings = Settings(**values)  # type: ignore[arg-type]  # each value was parsed to its field's type above
    if settings.segmind_api_mode not in API_MODES:  # pragma: no cover - guarded by the parser
        raise SettingsError("SEGMIND_API_MODE", "must be sync or async")
    if settings.shard_ids is not None:
        if settings.shard_count is None:
            raise SettingsError("SHARD_IDS", "needs SHARD_COUNT (the total number of shards)")
        bad = [i for i in settings.shard_ids if i >= settings.shard_count]
        if bad or not settings.shard_ids:
            raise SettingsError(
                "SHARD_IDS", f"each id must be below SHARD_COUNT={settings.shard_count}, got {bad}"
            )
    return settings


def load_settings(env_file: str | os.PathLike[str] | None = ".env") -> Settings:
    """Read ``.env`` (when present; real environment variables win) and return the settings."""
    if env_file is not None and os.path.isfile(env_file):
        from dotenv import dotenv_values

        file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        merged = {**file_values, **os.environ}
    else:
        merged = dict(os.environ)
    return settings_from_env(merged)

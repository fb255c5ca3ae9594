"""The process's logging: one stream handler on the root logger, every secret redacted.

``setup_logging`` is called once by ``bot.py`` (and the benchmark's bot process); the
:class:`RedactingFilter` replaces the token, the API key and ``DATABASE_URL``'s password in every
record, tracebacks included. :func:`describe` turns a startup failure into one short line.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from kontext.settings import Settings


class RedactingFilter(logging.Filter):
    """Replaces every secret value in a log record's text with ``[redacted]``."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is still logged
            return True
        exc_text = None
        if record.exc_info:
            exc_text = logging.Formatter().formatException(record.exc_info)
        changed = False
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
                changed = True
            if exc_text and secret in exc_text:
                exc_text = exc_text.replace(secret, "[redacted]")
                changed = True
        if changed:
            record.msg, record.args = text, None
            if exc_text is not None:
                record.exc_info, record.exc_text = None, exc_text
        return True


def setup_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """One stream handler on the root logger, secrets redacted, discord.py kept at INFO."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    handler.addFilter(RedactingFilter(settings.secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    quiet = max(logging.INFO, logging.getLevelName(settings.log_level))
    logging.getLogger("discord").setLevel(quiet)
    # database drivers print statement parameters (interaction tokens) at DEBUG
    for name in ("aiosqlite", "asyncpg", "sqlalchemy"):
        logging.getLogger(name).setLevel(max(logging.WARNING, quiet))
    return handler


def describe(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """A short, single-line description of a startup failure (no URL, no secrets)."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:199] + "…"
    why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    for secret in secrets:  # the token, the API key, DATABASE_URL's password
        if len(secret) >= 4:  # as RedactingFilter: a 1-char "secret" would mangle words
            why = why.replace(secret, "***")
    return why

"""The interactions the emulator sent: each one's :class:`~.models.InteractionRecord`, by id and
by token (the test driver opens them, the interaction routes find them by the token a webhook
call carries).
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

from .changes import Changes
from .config import Settings
from .models import InteractionRecord


class Interactions:
    """Every interaction sent, by id and by token."""

    def __init__(self, settings: Settings, changes: Changes) -> None:
        self._settings = settings
        self._changes = changes
        self.records: dict[int, InteractionRecord] = {}
        self._by_token: dict[str, InteractionRecord] = {}
        self._token_counter = itertools.count(1)

    def new_token(self, interaction_id: int) -> str:
        """A fresh interaction token, unique in this emulator."""
        raw = f"interaction:{interaction_id}:emulated-{next(self._token_counter)}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def open(self, payload: dict[str, Any]) -> InteractionRecord:
        """Record the interaction of ``payload`` (its id and token come from it)."""
        rec = InteractionRecord(payload, settings=self._settings, changes=self._changes)
        self.records[rec.id] = rec
        self._by_token[rec.token] = rec
        return rec

    def get(self, interaction_id: int) -> InteractionRecord | None:
        """The interaction with this id, if the emulator sent it."""
        return self.records.get(interaction_id)

    def by_token(self, token: str) -> InteractionRecord | None:
        """The interaction whose token this is, if any."""
        return self._by_token.get(token)

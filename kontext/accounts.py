"""Whose Segmind key runs a job: the owner's, or a server's own.

A server's admins may bring their own key (``/kontext-admin api-key``). It is stored encrypted
at rest with ``ENCRYPTION_KEY`` (Fernet, from the ``cryptography`` package) and never shown back,
logged or put in an error text. That server's jobs then run on its key, under the limits of its
own account (by default 1 generation at a time and 5 starts a minute), and spend none of the
owner's budgets. :class:`Accounts` maps a server to its account, keeps one Segmind client per
key, and lists every account's limits for the queue's dispatcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken

from kontext.store.types import OWNER_ACCOUNT, AccountLimits

if TYPE_CHECKING:
    from kontext.segmind import SegmindClient

log = logging.getLogger("kontext.accounts")

#: a server's own account, by default
GUILD_KEY_CONCURRENCY = 1
GUILD_KEY_RPM = 5


def guild_account(guild_id: int) -> str:
    return f"guild:{guild_id}"


def account_guild(account: str) -> int | None:
    """The server of a ``guild:<id>`` account (None for the owner's)."""
    if account.startswith("guild:") and account[6:].isdigit():
        return int(account[6:])
    return None


class KeyVault:
    """Encrypts servers' keys at rest. Off (``enabled`` False) without ``ENCRYPTION_KEY``."""

    def __init__(self, encryption_key: str) -> None:
        self._fernet = Fernet(encryption_key.encode()) if encryption_key else None

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def encrypt(self, secret: str) -> str:
        if self._fernet is None:
            raise RuntimeError("ENCRYPTION_KEY is not set")
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, token: str) -> str | None:
        """The key, or None when it cannot be read (``ENCRYPTION_KEY`` changed)."""
        if self._fernet is None:
            return None
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            return None


@dataclass(frozen=True, slots=True)
class _GuildKey:
    encrypted: str
    limits: AccountLimits


class Accounts:
    """Servers' accounts: which one a job uses, its client, and every account's limits."""

    def __init__(
        self,
        store: Any,
        vault: KeyVault,
        owner_client: SegmindClient,
        owner_limits: AccountLimits,
        make_client: Callable[[str], SegmindClient],
        *,
        ttl_s: float = 5.0,
    ) -> None:
        self.store = store
        self.vault = vault
        self.owner_client = owner_client
        self.owner_limits = owner_limits
        self._make_client = make_client
        self.ttl_s = ttl_s
        self._keys: dict[int, _GuildKey] = {}
        self._read_at = float("-inf")
        self._clients: dict[str, tuple[str, SegmindClient]] = {}  # account -> (encrypted key, client)

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the servers' keys (at most every ``ttl_s`` unless forced)."""
        if not force and time.monotonic() - self._read_at < self.ttl_s:
            return
        rows = await self.store.owner.api_keys() if self.vault.enabled else []
        self._keys = {
            int(r.guild_id): _GuildKey(
                r.key_encrypted,
                AccountLimits(guild_account(int(r.guild_id)), int(r.max_concurrent), int(r.rpm)),
            )
            for r in rows
        }
        self._read_at = time.monotonic()

    async def account_for(self, guild_id: int) -> str:
        """The account a new job of ``guild_id`` runs on."""
        await self.refresh()
        return guild_account(guild_id) if guild_id in self._keys else OWNER_ACCOUNT

    def limits(self) -> list[AccountLimits]:
        """Every account's limits (the owner's first), for the dispatcher."""
        return [self.owner_limits, *(k.limits for k in self._keys.values())]

    async def client_for(self, account: str) -> SegmindClient:
        """The Segmind client of ``account`` (the owner's, or one per server key)."""
        guild_id = account_guild(account)
        if guild_id is None:
            return self.owner_client
        key = self._keys.get(guild_id)
        if key is None:
            await self.refresh(force=True)
            key = self._keys.get(guild_id)
        if key is None:
            raise LookupError(f"no key for {account}")
        cached = self._clients.get(account)
        if cached is not None and cached[0] == key.encrypted:
            return cached[1]
        secret = self.vault.decrypt(key.encrypted)
        if secret is None:
            raise LookupError(f"the key of {account} cannot be decrypted (ENCRYPTION_KEY changed?)")
        client = self._make_client(secret)
        self._clients[account] = (key.encrypted, client)
        return client

    def forget(self, guild_id: int) -> None:
        """The server's key changed or was removed: read it again next time."""
        self._keys.pop(guild_id, None)
        self._clients.pop(guild_account(guild_id), None)
        self._read_at = float("-inf")

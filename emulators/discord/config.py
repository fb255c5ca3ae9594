"""The emulator's settings and address: what every part reads and tests may change.

:class:`Settings` is the one mutable record of the emulator's knobs (a test sets
``emu.upload_limit`` or ``emu.token_ttl`` on the facade, which writes it here, and every part
sees it on its next request); :class:`Address` is where the emulator serves, fixed at
construction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Settings:
    """The emulated application and the rules it is held to (see ``DiscordEmulator``)."""

    application_id: int
    bot_user_id: int
    application_name: str
    #: REST and IDENTIFY must use it when set (else any token is accepted)
    token: str | None
    upload_limit: int
    heartbeat_interval_ms: int
    #: seconds an interaction token works for webhook calls (``None``: forever)
    token_ttl: float | None
    #: seconds for the first callback (Discord: 3) or ``None`` (no limit)
    response_deadline: float | None
    attachment_ttl: float
    strict_commands: bool
    recommended_shards: int
    #: the key of the CDN's URL signatures and the application's verify key
    secret: str
    allow_resume: bool = True
    application_flags: int = 0


@dataclass(frozen=True)
class Address:
    """Where the emulator serves: 127.0.0.1 and a port reserved at construction."""

    port: int

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """The value for ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://127.0.0.1:{self.port}/gateway"

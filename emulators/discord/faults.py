"""Injected failures and Discord's rate-limit answers.

Tests plan them on the emulator (:meth:`DiscordEmulator.fail_next`, :meth:`~DiscordEmulator.delay`);
the HTTP middleware asks :class:`Faults` before and after each REST request. Every answer that is
not an injected 429 carries generous ``X-RateLimit-*`` headers, as Discord's do.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from dataclasses import dataclass

from .models import API_PREFIX_RE, APIError


@dataclass
class FaultRule:
    """A planned error answer; see :meth:`DiscordEmulator.fail_next`."""

    method: str
    pattern: re.Pattern[str]
    status: int
    code: int | None = None
    message: str | None = None
    retry_after: float | None = None
    is_global: bool = False
    times: int | None = 1
    process: bool = False
    hits: int = 0
    #: drop the connection instead of answering (see :meth:`Faults.drop_next`)
    drop: bool = False

    def matches(self, method: str, path: str) -> bool:
        """Whether the rule applies to this request (and still has uses left)."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in ("*", method.upper()):
            return False
        route = API_PREFIX_RE.sub("", path)
        return bool(self.pattern.search(route) or self.pattern.search(path))

    def to_error(self) -> APIError:
        """The APIError this rule answers with."""
        if self.status == 429:
            retry_after = 0.05 if self.retry_after is None else self.retry_after
            headers = {
                "Retry-After": str(max(1, math.ceil(retry_after))),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                "X-RateLimit-Bucket": "emulated-fault",
                "X-RateLimit-Scope": "shared" if not self.is_global else "global",
            }
            if self.is_global:
                headers["X-RateLimit-Global"] = "true"
            return APIError(
                429,
                self.code if self.code is not None else 0,
                self.message or "You are being rate limited.",
                extra={"retry_after": retry_after, "global": self.is_global},
                headers=headers,
            )
        default_messages = {
            400: "Invalid Form Body",
            401: "401: Unauthorized",
            403: "Missing Permissions",
            404: "404: Not Found",
            413: "Request entity too large",
            500: "500: Internal Server Error",
            502: "502: Bad Gateway",
            503: "503: Service Unavailable",
        }
        default_codes = {403: 50013, 413: 40005}
        return APIError(
            self.status,
            self.code if self.code is not None else default_codes.get(self.status, 0),
            self.message or default_messages.get(self.status, f"{self.status}: Error"),
        )


@dataclass
class DelayRule:
    method: str
    pattern: re.Pattern[str]
    seconds: float
    times: int | None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in ("*", method.upper()):
            return False
        return bool(self.pattern.search(API_PREFIX_RE.sub("", path)) or self.pattern.search(path))


class Faults:
    """The planned faults and delays, consumed in the order they were planned."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []
        self.delays: list[DelayRule] = []

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        *,
        code: int | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        is_global: bool = False,
        times: int | None = 1,
        process: bool = False,
    ) -> FaultRule:
        """Plan an error answer; see :meth:`DiscordEmulator.fail_next`."""
        rule = FaultRule(
            method=method.upper(),
            pattern=re.compile(path_regex),
            status=status,
            code=code,
            message=message,
            retry_after=retry_after,
            is_global=is_global,
            times=times,
            process=process,
        )
        self.rules.append(rule)
        return rule

    def drop_next(
        self, method: str, path_regex: str, *, times: int | None = 1, process: bool = True
    ) -> FaultRule:
        """Plan a dropped connection: the next ``times`` matching requests get no answer, their
        connection is closed. With ``process`` (the default) the request is carried out first
        (e.g. the message is created), so the client cannot know what happened."""
        rule = self.fail_next(method, path_regex, 0, times=times, process=process)
        rule.drop = True
        return rule

    def delay(
        self, method: str, path_regex: str, seconds: float, *, times: int | None
    ) -> DelayRule:
        """Plan a delay; see :meth:`DiscordEmulator.delay`."""
        rule = DelayRule(method.upper(), re.compile(path_regex), seconds, times)
        self.delays.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every fault and delay rule."""
        self.rules.clear()
        self.delays.clear()

    async def wait_delays(self, method: str, path: str) -> None:
        """Sleep as long as the matching delay rules ask (each use counts)."""
        for rule in self.delays:
            if rule.matches(method, path):
                rule.hits += 1
                await asyncio.sleep(rule.seconds)

    def take(self, method: str, path: str) -> FaultRule | None:
        """The first matching fault rule (its use counted), if any."""
        fault = next((f for f in self.rules if f.matches(method, path)), None)
        if fault is not None:
            fault.hits += 1
        return fault


def rate_limit_headers(method: str, path: str) -> dict[str, str]:
    """The headers of an answer well within its (per-route) rate-limit bucket."""
    return {
        "X-RateLimit-Limit": "1000",
        "X-RateLimit-Remaining": "999",
        "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
        "X-RateLimit-Reset-After": "1.000",
        "X-RateLimit-Bucket": hashlib.md5(
            f"{method} {path}".encode(), usedforsecurity=False
        ).hexdigest(),
    }

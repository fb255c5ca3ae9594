"""One message with an upload, sent to Discord exactly once.

discord.py repeats a webhook or channel POST after a 500/502/504/524, and Discord may have
created the message before answering with one: a second copy of a result. :func:`post_once`
sends the body discord.py builds through the process's HTTP session itself, repeats it only
after a 429 (which proves nothing was created), and tells a lost answer as
:class:`~kontext.errors.PostFateUnknown`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import discord
from discord.http import Route
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from cogs.base import KontextBotBase
from kontext.errors import PostFateUnknown, ResultNotDelivered

log = logging.getLogger("kontext.cogs")

#: how many 429 answers a result post waits out before it gives up (a 429 proves nothing
#: was posted, so it is asked again), and the longest wait it accepts for one
POST_RATE_LIMIT_TRIES = 5
POST_RATE_LIMIT_MAX_WAIT_S = 30.0
#: a result upload gives up (fate unknown) when Discord has not answered within this
POST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)


async def _answer(response: aiohttp.ClientResponse) -> dict[str, Any] | str:
    text = await response.text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    return data if isinstance(data, dict) else text


async def post_once(
    bot: KontextBotBase,
    route: Route,
    *,
    files: Sequence[discord.File],
    multipart: Sequence[dict[str, Any]],
    bot_auth: bool,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST a message with an upload, sent once; returns the message Discord created.

    discord.py repeats a webhook or channel POST after a 500/502/504/524, and Discord may have
    created the message before answering with one: a second copy. So the upload is sent here,
    through the process's HTTP session, with the multipart body discord.py builds
    (:func:`discord.http.handle_message_parameters`), and repeated only after a 429 (which
    proves nothing was created).

    Raises :class:`discord.HTTPException` (``Forbidden``, ``NotFound``) on a 4xx: nothing was
    posted. :class:`ResultNotDelivered` when no connection could be made (not a byte was
    sent) or the rate limit outlasts its tries. :class:`PostFateUnknown` once the request may
    have reached Discord without a clear answer: a 5xx, a 2xx without a message, a dropped
    connection, a timeout, or the task cancelled (a cancellation still marks the task as
    cancelling, see :meth:`asyncio.Task.cancelling`).
    """
    headers = {"User-Agent": bot.http.user_agent}
    if bot_auth:
        headers["Authorization"] = f"Bot {bot.http.token}"
    session = bot.services.http
    sent = 0

    async def attempt() -> dict[str, Any]:
        nonlocal sent
        for file in files:
            file.reset(seek=sent)  # the first try reads from where the file is; later ones again
        sent += 1
        form = aiohttp.FormData(quote_fields=False)
        for part in multipart:
            form.add_field(**part)
        try:
            async with session.post(
                route.url,
                data=form,
                params=query,
                headers=headers,
                timeout=POST_TIMEOUT,
                proxy=bot.http.proxy,
                proxy_auth=bot.http.proxy_auth,
            ) as response:
                data = await _answer(response)
                status = response.status
                if 200 <= status < 300:
                    if isinstance(data, dict) and "id" in data:
                        return data
                    raise PostFateUnknown(f"HTTP {status} without the message")
                if status == 429 and response.headers.get("Via") and isinstance(data, dict):
                    raise _RateLimited(float(data.get("retry_after") or 1.0))
                if status == 403:
                    raise discord.Forbidden(response, data)
                if status == 404:
                    raise discord.NotFound(response, data)
                if 400 <= status < 500:  # a 429 from the edge (a ban) included
                    raise discord.HTTPException(response, data)
                raise PostFateUnknown(f"HTTP {status}")
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise ResultNotDelivered(f"no connection to Discord: {type(exc).__name__}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise PostFateUnknown(f"the upload's answer was lost: {type(exc).__name__}") from exc
        except asyncio.CancelledError as exc:
            raise PostFateUnknown("cancelled during the upload") from exc

    try:
        # a 429 proves nothing was created: the only answer that is waited out and sent again
        async for tried in AsyncRetrying(
            retry=retry_if_exception(_waitable),
            stop=stop_after_attempt(POST_RATE_LIMIT_TRIES),
            wait=_asked_wait,
            before_sleep=_log_rate_limited,
            reraise=True,
        ):
            with tried:
                return await attempt()
    except _RateLimited as exc:
        raise ResultNotDelivered(f"rate limited (retry after {exc.retry_after:.1f} s)") from exc
    except asyncio.CancelledError as exc:  # while waiting out a 429: it was not posted yet, but
        raise PostFateUnknown("cancelled during the upload") from exc  # the task is stopping
    raise AssertionError("unreachable")  # pragma: no cover - the retrying returns or raises


class _RateLimited(Exception):
    """Discord answered 429 to the upload: nothing was created."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"429, retry after {retry_after:.2f} s")
        self.retry_after = retry_after


def _waitable(exc: BaseException) -> bool:
    return isinstance(exc, _RateLimited) and exc.retry_after <= POST_RATE_LIMIT_MAX_WAIT_S


def _asked_wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc.retry_after if isinstance(exc, _RateLimited) else 1.0


def _log_rate_limited(state: RetryCallState) -> None:
    log.warning("a result post was rate limited; again in %.2f s", _asked_wait(state))

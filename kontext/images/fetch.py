"""Downloading member images: only from Discord's CDN (or a host explicitly allowed), with a hard
cap on the bytes read and the download budget held, the header decision taken on the first bytes,
then the full check off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp
from yarl import URL

from kontext.errors import InputError
from kontext.images import budget
from kontext.images.checks import ImageInfo, header_check, inspect_image_async, too_large
from kontext.images.formats import HEAD_BYTES

DISCORD_CDN_HOSTS: frozenset[str] = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
"""Where Discord serves attachments (HTTPS, port 443). Inputs come from nowhere else, unless a
host is added with :func:`allow_input_host` or passed as ``allowed_hosts``."""

_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_extra_input_hosts: set[tuple[str, int]] = set()


def _host_key(entry: str | URL) -> tuple[str, int]:
    """``(host, port)`` of a URL or of ``host[:port]`` (port 443 when not given)."""
    url = entry if isinstance(entry, URL) else URL(entry if "://" in entry else f"https://{entry}")
    if not url.host or url.port is None:
        raise ValueError(f"no host in {entry!r}")
    return url.host.lower().rstrip("."), url.port


def allow_input_host(url: str) -> None:
    """Also accept inputs from the host and port of ``url`` (process-wide), e.g.
    ``settings.discord_api_base_url`` when it points at the Discord emulator."""
    _extra_input_hosts.add(_host_key(url))


def input_hosts(*urls: str | None) -> frozenset[str]:
    """:data:`DISCORD_CDN_HOSTS` plus ``host:port`` of each given URL (None ones skipped): the
    value for ``fetch_and_check(…, allowed_hosts=…)``."""
    extra = {"{}:{}".format(*_host_key(u)) for u in urls if u}
    return DISCORD_CDN_HOSTS | extra


def _allowed_url(url: str | URL, allowed: frozenset[tuple[str, int]], which: int) -> URL:
    parsed = url if isinstance(url, URL) else URL(url, encoded=True)
    try:
        key = _host_key(parsed) if parsed.scheme in ("http", "https") else None
    except ValueError:
        key = None
    if key is None or key not in allowed:
        raise InputError(
            f"refused input URL host {parsed.host!r} ({parsed.scheme}): not a Discord attachment",
            key="input.fetch_failed", which=which,
        )
    return parsed


def _early_decision(
    head: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int
) -> bool:
    """The header decision on the first bytes of a download: raises :class:`InputError` when
    they already refuse it; True when decided, False to try again with more bytes (a JPEG's
    frame header may follow large metadata segments)."""
    if len(head) < 512:
        return False
    _, dims, _ = header_check(
        head, which=which, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )
    return dims is not None or len(head) >= HEAD_BYTES


async def fetch_and_check(
    session: aiohttp.ClientSession,
    url: str,
    *,
    which: int,
    declared_size: int | None,
    max_bytes: int,
    max_pixels: int,
    timeout_s: float = 20.0,
    min_side: int = 16,
    allowed_hosts: Iterable[str] | None = None,
) -> tuple[bytes, ImageInfo]:
    """Download an attachment and check it; return ``(bytes, info)``.

    Only URLs on ``allowed_hosts`` are fetched: entries are ``host`` (HTTPS, port 443),
    ``host:port`` or URLs; None means :data:`DISCORD_CDN_HOSTS` plus the hosts given to
    :func:`allow_input_host`. Redirects are followed by hand, at most three, and only to allowed
    hosts; any other host is refused (``input.fetch_failed``) without a request to it.

    ``declared_size`` (Discord's ``Attachment.size``) over ``max_bytes`` is refused before any
    request (``input.too_large``), as is a ``Content-Length`` over the limit. The body's bytes
    are reserved in :data:`DOWNLOAD_BUDGET` (the ``Content-Length``, else ``max_bytes``) until
    this returns; it is read in chunks and reading stops as soon as more than ``max_bytes``
    arrived, so a server that lies about the size cannot make us read more. The header decision
    of :func:`inspect_image` (format, pixel count, sides) is taken on the first bytes, so such a
    refusal stops the download. A network failure, a timeout (``timeout_s`` for the whole
    download) or any final status but 200 — 403/404 usually mean an expired signed URL — raise
    ``input.fetch_failed``. The bytes are then checked by :func:`inspect_image_async`.
    """
    if declared_size is not None and declared_size > max_bytes:
        raise too_large(which, declared_size, max_bytes, f"declared {declared_size} bytes")
    allowed = frozenset(
        _host_key(h) for h in (DISCORD_CDN_HOSTS if allowed_hosts is None else allowed_hosts)
    ) | (_extra_input_hosts if allowed_hosts is None else frozenset())
    target = _allowed_url(url, allowed, which)
    head_limits = {"which": which, "max_bytes": max_bytes, "max_pixels": max_pixels,
                   "min_side": min_side}
    take: int | None = None
    try:
        try:
            async with asyncio.timeout(timeout_s):
                for _hop in range(_MAX_REDIRECTS + 1):
                    async with session.get(
                        target, allow_redirects=False, headers={"Accept-Encoding": "identity"}
                    ) as resp:
                        if resp.status in _REDIRECTS and "Location" in resp.headers:
                            location = URL(resp.headers["Location"], encoded=True)
                            target = _allowed_url(target.join(location), allowed, which)
                            continue
                        if resp.status != 200:
                            raise InputError(
                                f"GET returned HTTP {resp.status}", key="input.fetch_failed",
                                which=which,
                            )
                        length = resp.content_length
                        if length is not None and length > max_bytes:
                            resp.close()
                            raise too_large(which, length, max_bytes, f"Content-Length {length}")
                        take = await budget.DOWNLOAD_BUDGET.acquire(
                            max_bytes if length is None else length
                        )
                        chunks: list[bytes] = []
                        received, decided = 0, False
                        async for chunk in resp.content.iter_chunked(64 * 1024):
                            chunks.append(chunk)
                            received += len(chunk)
                            if received > max_bytes:
                                resp.close()  # drop the connection: do not drain the rest
                                raise too_large(
                                    which, received, max_bytes,
                                    f"body passed {max_bytes} bytes; stopped",
                                )
                            if not decided:
                                try:
                                    decided = _early_decision(
                                        b"".join(chunks)[:HEAD_BYTES], **head_limits
                                    )
                                except InputError:
                                    resp.close()
                                    raise
                        break
                else:
                    raise InputError(
                        f"more than {_MAX_REDIRECTS} redirects", key="input.fetch_failed",
                        which=which,
                    )
        except InputError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise InputError(
                f"download failed: {type(exc).__name__}: {exc}", key="input.fetch_failed",
                which=which,
            ) from None
        data = b"".join(chunks)
        del chunks
        info = await inspect_image_async(data, **head_limits)
        return data, info
    finally:
        if take is not None:
            budget.DOWNLOAD_BUDGET.release(take)


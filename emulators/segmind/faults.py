"""Faults the Segmind emulator answers with, planned by the tests and consumed first in,
first out: an HTTP status, a hang, a dropped connection, a garbage body, an oversize image, or a
result given as a URL the test chose (on another host, or a redirect to one).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .api import CONTENT_TYPES
from .images import noisy_image, solid


@dataclass
class Fault:
    """One planned fault; ``times`` answers are left."""

    kind: str  # status | hang | reset | garbage | oversize | output_url
    times: int
    status: int = 0
    error: str = ""
    headers: dict[str, str] | None = None
    garbage: str = ""
    target_bytes: int = 0
    url: str = ""


async def faulty_body(
    fault: Fault, fmt: str, seed: int, cache: dict[tuple[int, str], bytes]
) -> tuple[bytes, str]:
    """``(body, content_type)`` of a garbage/oversize fault (oversize images kept in ``cache``)."""
    if fault.kind == "oversize":
        key = (fault.target_bytes, fmt)
        if key not in cache:
            cache[key] = await asyncio.to_thread(noisy_image, fault.target_bytes, fmt)
        return cache[key], CONTENT_TYPES[fmt]
    kind = fault.garbage
    if kind == "html":
        return b"<html><head><title>Oops</title></head><body>Try later</body></html>", ("text/html")
    if kind == "json":
        return b'{"status": "success", "message": "queued"}', "application/json"
    if kind == "empty":
        return b"", CONTENT_TYPES[fmt]
    if kind == "wrong_format":
        return await asyncio.to_thread(solid, "gif", seed), CONTENT_TYPES[fmt]
    if kind == "swapped_format":
        other = "png" if fmt == "jpg" else "jpg"
        return await asyncio.to_thread(solid, other, seed), CONTENT_TYPES[other]
    whole = await asyncio.to_thread(solid, fmt, seed)  # truncated
    return whole[: len(whole) // 2], CONTENT_TYPES[fmt]

"""Pure parsers of the API's answers: informational headers, rate-limit waits, error messages,
v2 URLs, and the image formats and completeness of a result's bytes (all unit-tested)."""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from kontext.images.formats import sniff_image
from kontext.segmind.results import ResponseMeta
from kontext.vocab import ImageFormat

ERROR_TEXT_MAX = 300
"""The API's error message is trimmed to this many characters in error details."""

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


# --- headers -------------------------------------------------------------------------------------


def parse_number(value: str | None) -> float | None:
    """The first finite number in ``value`` (``"$0.10"`` → 0.1, ``"18.2s"`` → 18.2), else None."""
    if value is None:
        return None
    match = _NUMBER.search(str(value))
    if match is None:
        return None
    try:
        number = float(match.group(0))
    except ValueError:  # pragma: no cover - the regex only matches numbers
        return None
    return number if math.isfinite(number) else None


def _parse_int(value: str | None) -> int | None:
    number = parse_number(value)
    if number is None or number != int(number):
        return None
    return int(number)


def read_meta(headers: Mapping[str, str]) -> ResponseMeta:
    """Read ``x-request-id``, ``x-cost``, ``x-remaining-credits``, ``x-seed-value`` and
    ``x-generation-time``, tolerating absence and junk."""
    rid = (headers.get("x-request-id") or "").strip()[:200] or None
    return ResponseMeta(
        request_id=rid,
        cost_usd=parse_number(headers.get("x-cost")),
        remaining_credits=parse_number(headers.get("x-remaining-credits")),
        seed=_parse_int(headers.get("x-seed-value")),
        generation_time_s=parse_number(headers.get("x-generation-time")),
    )


def _epoch_of(value: str) -> float | None:
    """An absolute time as epoch seconds, from epoch seconds/milliseconds or an ISO timestamp."""
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0:
            return None
        return number / 1000.0 if number > 1e11 else number
    iso = text.replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if moment.tzinfo is None:  # the header name says UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_MAX_RETRY_AFTER = 86_400.0


def parse_reset_at(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from ``now`` until ``x-rate-limit-reset-at-utc`` (ISO or epoch s/ms), ≥ 0.

    A small bare number (below 10⁸) is read as a delay in seconds rather than a timestamp.
    Junk gives None.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        bare = float(text)
    except ValueError:
        bare = None
    if bare is not None and math.isfinite(bare) and 0 <= bare < 1e8:
        return min(bare, _MAX_RETRY_AFTER)
    epoch = _epoch_of(text)
    if epoch is None:
        return None
    current = time.time() if now is None else now
    return min(max(0.0, epoch - current), _MAX_RETRY_AFTER)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or HTTP date), ≥ 0; junk → None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            return None
        return min(max(0.0, seconds), _MAX_RETRY_AFTER)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return min(max(0.0, moment.timestamp() - current), _MAX_RETRY_AFTER)


def retry_after_from_headers(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a 429 asks for: ``Retry-After`` when present, else ``x-rate-limit-reset-at-utc``."""
    seconds = parse_retry_after(headers.get("Retry-After"), now=now)
    if seconds is None:
        seconds = parse_reset_at(headers.get("x-rate-limit-reset-at-utc"), now=now)
    return seconds


# --- image bytes ---------------------------------------------------------------------------------


_MIN_IMAGE_BYTES = 32


def image_is_complete(data: bytes, fmt: ImageFormat) -> bool:
    """Whether ``data`` (already sniffed as ``fmt``) ends the way a whole file of that kind does.

    JPEG: an end-of-image marker ``FF D9`` near the end; PNG: the ``IEND`` chunk near the end;
    WebP: the RIFF size covers the data. Catches bodies cut short.
    """
    return is_complete(data[:12], data[-64:], len(data), fmt)


def is_complete(head: bytes, tail: bytes, size: int, fmt: ImageFormat) -> bool:
    """:func:`image_is_complete` from the first 12 and last 64 bytes of ``size`` bytes."""
    if size < _MIN_IMAGE_BYTES:
        return False
    if fmt == ImageFormat.JPG:
        return b"\xff\xd9" in tail[-64:]
    if fmt == ImageFormat.PNG:
        return b"IEND\xaeB`\x82" in tail[-64:]
    if fmt == ImageFormat.WEBP:
        return int.from_bytes(head[4:8], "little") + 8 <= size
    return False


def decode_base64_image(text: str) -> bytes | None:
    """Bytes of a base64 (or ``data:`` URI) image, or None when it is not one."""
    payload = text.strip()
    if payload.startswith("data:"):
        _, _, payload = payload.partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if sniff_image(data) else None


# --- answers -------------------------------------------------------------------------------------


def derive_v2_urls(base_url: str, request_id: str) -> tuple[str, str]:
    """``(status_url, response_url)`` of a v2 request id (see the module docstring)."""
    base = base_url.rstrip("/")
    rid = quote(request_id, safe="")
    return f"{base}/v2/requests/{rid}/status", f"{base}/v2/requests/{rid}"


def trim(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_message(body: bytes) -> str:
    """The API's error message: ``error`` (or ``message``/``detail``) of a JSON body, else text."""
    if not body:
        return ""
    text = body[:4096].decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail", "msg"):
            value = data.get(key)
            if value:
                return value if isinstance(value, str) else json.dumps(value)[:1000]
    if "<html" in text.lower():
        match = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        return f"HTML page: {match.group(1).strip()}" if match else "HTML page"
    return text



def image_in_json(data: Any) -> str | None:
    """A URL or base64 string under a usual key of a JSON answer, if any."""
    if isinstance(data, list):
        data = data[0] if data else None
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        return None
    for key in ("image", "output", "url", "image_url", "data", "images"):
        value = data.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


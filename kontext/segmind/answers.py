"""The image in a 200 answer: raw bytes, or (some models) JSON carrying a URL or base64; checked
to be a whole JPEG/PNG/WebP, on its first and last bytes when it was spooled to a file."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from yarl import URL

from kontext.errors import ApiBadResponse
from kontext.images.formats import sniff_image
from kontext.segmind.parsing import (
    decode_base64_image,
    error_message,
    image_in_json,
    is_complete,
)
from kontext.segmind.transport import Answer, Transport
from kontext.spool import ResultFile
from kontext.vocab import ImageFormat

log = logging.getLogger("kontext.segmind")

Download = Callable[[str, str], Awaitable[Answer]]
"""``download(url, label)``: GET a result image (with the client's retries)."""


async def image_from_answer(
    http: Transport,
    answer: Answer,
    download: Download,
    asked_format: ImageFormat | None,
    request_id: str | None,
) -> tuple[bytes | ResultFile, ImageFormat]:
    """The image of a 200: raw bytes, or (some models) JSON carrying a URL or base64.

    A spooled answer's file goes on in the result (closed here when anything fails)."""
    label = f"answer of {URL(answer.url).path}"
    body: bytes | ResultFile = answer.file if answer.file is not None else answer.body
    try:
        head = body.head if isinstance(body, ResultFile) else body
        if sniff_image(head) is None and head[:1] in (b"{", b"["):
            if isinstance(body, ResultFile):  # a long JSON answer (base64 inside): parse it
                text = body.read_bytes()
                body.close()
                body = text
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                data = None
            found = image_in_json(data)
            if found is not None and found.startswith(("http://", "https://")):
                inner = await download(found, label)
                body = inner.file if inner.file is not None else inner.body
            elif found is not None:
                decoded = decode_base64_image(found)
                if decoded is not None:
                    body = decoded
        fmt = validate_image(http, body, asked_format, label, request_id, answer.status)
    except BaseException:
        if isinstance(body, ResultFile):
            body.close()
        raise
    declared = answer.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if declared.startswith("image/") and declared != fmt.mime and not (
        declared == "image/jpg" and fmt == ImageFormat.JPG
    ):
        log.info("segmind %s: Content-Type %s but the bytes are %s", label, declared, fmt)
    return body, fmt


def validate_image(
    http: Transport, body: bytes | ResultFile, asked_format: ImageFormat | None, label: str,
    request_id: str | None, status: int,
) -> ImageFormat:
    """The sniffed format of ``body``; it must be JPEG/PNG/WebP and end as a whole file does
    (a spooled body is checked on its first and last bytes, never read back)."""
    if isinstance(body, ResultFile):
        first, last, size = body.head, body.tail, body.size
    else:
        first, last, size = body, body[-64:], len(body)
    fmt = sniff_image(first)
    if fmt is None:
        head = first[:200]
        if not size:
            what = "empty body"
        elif head.lstrip()[:1] in (b"{", b"["):
            what = "JSON instead of an image: " + error_message(first)
        elif b"<html" in head.lower() or b"<!doctype" in head.lower():
            what = "HTML instead of an image: " + error_message(first)
        else:
            what = f"{size} bytes that are not JPEG/PNG/WebP (starts {first[:8].hex()})"
        # a 200 is a finished, billed generation even when its body is useless
        raise ApiBadResponse(http.detail(label, status, what, request_id), status=status,
                             charged_maybe=status == 200)
    if not is_complete(first[:12], last, size, fmt):
        raise ApiBadResponse(
            http.detail(label, status, f"truncated {fmt} ({size} bytes)", request_id),
            status=status, charged_maybe=status == 200,
        )
    if asked_format and fmt != asked_format:
        log.warning(
            "segmind %s: asked for %s, got %s; using it as it is (request id %s)",
            label, asked_format, fmt, request_id,
        )
    return fmt

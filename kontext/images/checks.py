"""Checking one member image: size, format and dimensions from the first bytes (nothing decoded,
so a decompression bomb is refused without allocating it), then a real decode in bounded memory
that catches truncated or corrupt files. Failures raise :class:`~kontext.errors.InputError`."""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from kontext.errors import InputError
from kontext.images import budget
from kontext.images.budget import MIB
from kontext.images.cost import (
    JPEG_CHECK_SIDE,
    check_cost_async,
    check_jpeg_structure,
    check_png_stream,
    check_webp_structure,
    decode_cost,
    jpeg_decodes_within_budget,
    jpeg_multi_scan,
)
from kontext.images.formats import (
    ACCEPTED_FORMATS,
    header_size,
    jpeg_frame,
    sniff_format,
)
from kontext.vocab import ImageFormat

log = logging.getLogger("kontext.images")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What :func:`inspect_image` found: ``format`` is ``"png"``, ``"jpg"`` or ``"webp"``."""

    format: ImageFormat
    width: int
    height: int
    size: int


def _mb(size: int) -> str:
    """Bytes as MiB with one decimal, rounded up (so "20.1 MB" never reads as the limit)."""
    return f"{math.ceil(size * 10 / MIB) / 10:.1f}"


def too_large(which: int, size: int, max_bytes: int, detail: str) -> InputError:
    return InputError(
        detail, key="input.too_large", which=which, size_mb=_mb(size),
        limit_mb=f"{max_bytes / MIB:.1f}",
    )


def _pixel_limit(max_pixels: int) -> int:
    """Our limit, capped by Pillow's decompression bomb guard when one is set."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, int(pil_limit)) if pil_limit else max_pixels


def _too_many_pixels(which: int, width: int, height: int, limit: int, detail: str) -> InputError:
    return InputError(
        detail, key="input.too_many_pixels", which=which, width=width, height=height,
        limit_mp=f"{limit / 1_000_000:.1f}",
    )


def _check_dimensions(
    fmt: ImageFormat, width: int, height: int, *, which: int, limit: int, min_side: int
) -> None:
    if width * height > limit:
        raise _too_many_pixels(
            which, width, height, limit, f"{fmt} {width}x{height} > {limit} pixels"
        )
    if min(width, height) < min_side:
        raise InputError(
            f"{fmt} {width}x{height}", key="input.too_small", which=which, width=width,
            height=height, min_side=min_side,
        )


def header_check(
    data: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int
) -> tuple[ImageFormat, tuple[int, int] | None, int]:
    """Every decision the first bytes allow, without Pillow and without decoding: returns
    ``(format, (width, height) or None when the header is not readable, pixel limit)``."""
    size = len(data)
    if size == 0:
        raise InputError("empty file", key="input.not_image", which=which)
    if size > max_bytes:
        raise too_large(which, size, max_bytes, f"{size} bytes > {max_bytes}")
    named = sniff_format(data)
    if named not in ACCEPTED_FORMATS:
        raise InputError(
            f"content is {named or 'unknown'} (first bytes {bytes(data[:8])!r})",
            key="input.not_image", which=which,
        )
    fmt = ImageFormat(named)
    limit = _pixel_limit(max_pixels)
    dims = header_size(data, fmt)
    if dims is not None:
        _check_dimensions(fmt, *dims, which=which, limit=limit, min_side=min_side)
    return fmt, dims, limit


def inspect_image(
    data: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int = 16
) -> ImageInfo:
    """Check one member image and describe it; raise :class:`InputError` when it won't do.

    In order, from the first bytes alone (no Pillow, nothing decoded): empty or unknown content
    (``input.not_image``); more than ``max_bytes`` (``input.too_large``); a known but refused
    format such as GIF, PDF or HTML (``input.not_image``); more than ``max_pixels`` — or than
    Pillow's ``MAX_IMAGE_PIXELS`` — per the PNG IHDR, JPEG SOF or WebP VP8/VP8L/VP8X header
    (``input.too_many_pixels``); a side under ``min_side`` (``input.too_small``). Then Pillow
    reads the header again (its reading is the final word, checked before any pixel is decoded)
    and the content is decoded, so a truncated or corrupt file fails (``input.unreadable``):

    * PNG: every chunk's CRC, and all image data inflated in 1 MiB pieces with each row's filter
      type checked (:func:`check_png_stream`): a fixed ~2 MiB, whatever the pixel count;
    * JPEG: decoded at 1/2..1/8 scale (every entropy-coded byte is still read); a progressive or
      multi-scan JPEG whose coefficients alone pass :data:`DECODE_BUDGET_BYTES` (4:4:4 over
      ~26 MP, CMYK over ~20 MP) is never decoded: its segments and scans are walked to the
      end-of-image marker (:func:`check_jpeg_structure`);
    * WebP: a full decode up to :data:`DECODE_BUDGET_BYTES` (10 MP), the RIFF structure above.

    ``which`` (1 or 2) names the image in the message. Synchronous, CPU-bound and not counted in
    :data:`DECODE_BUDGET`: from async code use :func:`inspect_image_async`.
    """
    fmt, dims, limit = header_check(
        data, which=which, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )
    try:
        with Image.open(io.BytesIO(data), formats=[ImageFormat(fmt).pil]) as img:  # lazy: header
            width, height = img.size
            _check_dimensions(fmt, width, height, which=which, limit=limit, min_side=min_side)
            if fmt == ImageFormat.JPG:
                frame = jpeg_frame(data)
                if frame is None:
                    raise ValueError("no frame header before the first scan")
                if not jpeg_decodes_within_budget(frame, jpeg_multi_scan(data, frame)):
                    # a progressive/multi-scan decode holds every coefficient whatever the scale
                    check_jpeg_structure(data, frame)
                    log.debug("image %d: multi-scan jpeg %dx%d checked by structure only "
                              "(decode over budget)", which, width, height)
                    return ImageInfo(format=fmt, width=width, height=height, size=len(data))
                if max(width, height) > JPEG_CHECK_SIDE:
                    scale = max(width, height) / JPEG_CHECK_SIDE
                    img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
                img.load()
            elif fmt == ImageFormat.WEBP:
                if decode_cost(fmt, width, height) <= budget.DECODE_BUDGET_BYTES:
                    img.load()
                else:
                    check_webp_structure(data)
                    log.debug("image %d: webp %dx%d checked by structure only (decode over "
                              "budget)", which, width, height)
        if fmt == ImageFormat.PNG:
            check_png_stream(data)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        w, h = dims or (0, 0)
        raise _too_many_pixels(which, w, h, limit, f"Pillow bomb guard: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, zlib.error,
            EOFError, IndexError, MemoryError) as exc:
        raise InputError(
            f"{fmt} decode failed: {type(exc).__name__}: {exc}", key="input.unreadable",
            which=which,
        ) from None
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover - a misconfiguration elsewhere
        log.warning("ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated JPEG/WebP inputs pass")
    return ImageInfo(format=fmt, width=width, height=height, size=len(data))


async def inspect_image_async(
    data: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int = 16
) -> ImageInfo:
    """:func:`inspect_image`: the header decisions at once (a refusal costs no thread and no
    budget), then the decode on the check pool within :data:`DECODE_BUDGET`."""
    fmt, dims, _ = header_check(
        data, which=which, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )
    return await budget.run_budgeted(
        await check_cost_async(data, fmt, dims), inspect_image, data, which=which,
        max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side,
    )


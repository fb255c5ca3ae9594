"""Image checks and fitting, discord-free.

* :func:`sniff_format` names a file by its magic bytes (never by its name or content type).
* :func:`inspect_image` checks one member image: size, format, dimensions read from the header
  *before* any decoding (so a decompression bomb is refused without allocating it), then a real,
  bounded decode that catches truncated or corrupt files. Failures raise
  :class:`~kontext.errors.InputError` with the right message key.
* :func:`fetch_and_check` downloads an attachment with a hard cap on the bytes read, then inspects
  it off the event loop.
* :func:`validate_prompt` / :func:`validate_seed` check the text options.
* :func:`fit_to_limit` makes a result fit under Discord's upload limit (never fails on size);
  :func:`thumbnail_bytes` makes a small JPEG for embeds and the showcase.

Every Pillow call is synchronous and CPU-bound; each has an ``*_async`` twin that runs it in a
worker thread with :func:`asyncio.to_thread`, so the event loop (and the Discord heartbeat) never
waits on a decode.

Pillow's process-wide guards are respected, not changed: ``Image.MAX_IMAGE_PIXELS`` (a
decompression bomb guard) caps the pixel limit used here, and ``ImageFile.LOAD_TRUNCATED_IMAGES``
stays False so a truncated file fails to decode.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import re
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kontext.errors import InputError

log = logging.getLogger("kontext.images")

ACCEPTED_FORMATS: frozenset[str] = frozenset({"png", "jpeg", "webp"})
"""Formats :func:`inspect_image` accepts (names as returned by :func:`sniff_format`)."""

SEED_MAX = 2**32 - 1
"""The largest seed the API takes (inclusive)."""

MIN_LIMIT_BYTES = 1024
"""The smallest ``limit_bytes`` :func:`fit_to_limit` guarantees (a 1×1 JPEG is ~300 bytes)."""

_MIB = 1024 * 1024
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A JPEG is decoded at 1/2..1/8 scale (libjpeg's DCT scaling): every byte of the entropy-coded
# data is still read, so truncation is caught, but the pixel buffer is up to 64× smaller.
_JPEG_CHECK_SIDE = 256
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
                b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})


# --- sniffing -------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """Name the format of ``data`` from its first bytes, or None when unknown.

    Returns ``"png"``, ``"jpeg"`` or ``"webp"`` for the accepted formats, and for better logs a
    name for common wrong files: ``"gif"``, ``"pdf"``, ``"bmp"``, ``"tiff"``, ``"ico"``,
    ``"heic"``, ``"avif"``, ``"mp4"`` (other ISO-BMFF), ``"jxl"``, ``"zip"``, ``"svg"``,
    ``"html"``, ``"xml"``, ``"json"``. Only :data:`ACCEPTED_FORMATS` pass :func:`inspect_image`.
    """
    head = bytes(data[:512])
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "jxl"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return "avif"
        if brand in _HEIF_BRANDS:
            return "heic"
        return "mp4"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "svg"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "html"
    if text.startswith(b"<?xml"):
        return "xml"
    if text.startswith((b"{", b"[")):
        return "json"
    return None


def header_size(data: bytes, fmt: str | None = None) -> tuple[int, int] | None:
    """``(width, height)`` read from the header of a PNG, JPEG or WebP, without Pillow.

    Nothing is decoded or allocated beyond the header bytes; None when the header cannot be read
    (then Pillow's lazy ``Image.open`` is the fallback).
    """
    fmt = fmt or sniff_format(data)
    try:
        if fmt == "png":
            if data[12:16] != b"IHDR":
                return None
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "jpeg":
            return _jpeg_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


# --- decoding cost ----------------------------------------------------------------------------------

DECODE_BUDGET_BYTES = 160 * _MIB
"""The most memory one decode may take: a 40 MP RGBA PNG. Larger PNGs and WebPs are checked by
structure only (PNG: every chunk's CRC up to IEND; WebP: the RIFF chunk layout), and
:func:`thumbnail_bytes` refuses them."""

# peak bytes per pixel of a full Pillow decode: PNG at most RGBA 8-bit (16-bit colour is read as
# 8-bit); WebP goes through libwebp's animation decoder (canvas + frame + copies, measured ~16);
# JPEG is always decoded at reduced scale here (draft), so its cost is small and bounded.
_BYTES_PER_PIXEL = {"png": 4, "webp": 16, "jpeg": 0}


def _decode_cost(fmt: str, width: int, height: int) -> int:
    return width * height * _BYTES_PER_PIXEL.get(fmt, 4)


def _check_webp_structure(data: bytes) -> None:
    """Walk the RIFF chunks of a WebP; ValueError when truncated or malformed."""
    end = 8 + int.from_bytes(data[4:8], "little")
    if len(data) < end:
        raise ValueError(f"truncated WebP: RIFF says {end} bytes, file has {len(data)}")
    pos, kinds = 12, set()
    while pos + 8 <= end:
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        kinds.add(kind)
        pos += 8 + size + (size & 1)
    if pos not in (end, end + 1):  # end + 1: a writer that left out the last padding byte
        raise ValueError(f"malformed WebP: chunks end at {pos}, RIFF at {end}")
    if not kinds & {b"VP8 ", b"VP8L", b"ANMF"}:
        raise ValueError("WebP without image data")


# --- inspecting member images ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What :func:`inspect_image` found: ``format`` is ``"png"``, ``"jpeg"`` or ``"webp"``."""

    format: str
    width: int
    height: int
    size: int


def _mb(size: int) -> str:
    """Bytes as MiB with one decimal, rounded up (so "20.1 MB" never reads as the limit)."""
    return f"{math.ceil(size * 10 / _MIB) / 10:.1f}"


def _too_large(which: int, size: int, max_bytes: int, detail: str) -> InputError:
    return InputError(
        detail, key="input.too_large", which=which, size_mb=_mb(size),
        limit_mb=f"{max_bytes / _MIB:.1f}",
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


def inspect_image(
    data: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int = 16
) -> ImageInfo:
    """Check one member image and describe it; raise :class:`InputError` when it won't do.

    In order: empty or unknown content (``input.not_image``); more than ``max_bytes``
    (``input.too_large``); a known but refused format such as GIF, PDF or HTML
    (``input.not_image``); more than ``max_pixels`` — or than Pillow's ``MAX_IMAGE_PIXELS`` — read
    from the header before any decoding (``input.too_many_pixels``); a side under ``min_side``
    (``input.too_small``); then a real decode, so a truncated or corrupt file fails
    (``input.unreadable``). The decode's memory is bounded: JPEGs are decoded at reduced scale,
    and a PNG or WebP that would take more than :data:`DECODE_BUDGET_BYTES` is checked by
    structure only. ``which`` (1 or 2) names the image in the message. Synchronous and
    CPU-bound: from async code use :func:`inspect_image_async`.
    """
    size = len(data)
    if size == 0:
        raise InputError("empty file", key="input.not_image", which=which)
    if size > max_bytes:
        raise _too_large(which, size, max_bytes, f"{size} bytes > {max_bytes}")
    fmt = sniff_format(data)
    if fmt not in ACCEPTED_FORMATS:
        raise InputError(
            f"content is {fmt or 'unknown'} (first bytes {bytes(data[:8])!r})",
            key="input.not_image", which=which,
        )
    assert fmt is not None
    limit = _pixel_limit(max_pixels)

    def check_dimensions(width: int, height: int) -> None:
        if width * height > limit:
            raise _too_many_pixels(
                which, width, height, limit, f"{fmt} {width}x{height} > {limit} pixels"
            )
        if min(width, height) < min_side:
            raise InputError(
                f"{fmt} {width}x{height}", key="input.too_small", which=which, width=width,
                height=height, min_side=min_side,
            )

    dims = header_size(data, fmt)
    if dims is not None:
        check_dimensions(*dims)

    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:  # lazy: header
            width, height = img.size
            check_dimensions(width, height)  # Pillow's reading of the header is the final word
            full_decode = _decode_cost(fmt, width, height) <= DECODE_BUDGET_BYTES
            if fmt == "png":
                img.verify()  # every chunk's CRC and the chunk structure, without decoding
            elif fmt == "jpeg":
                if max(width, height) > _JPEG_CHECK_SIDE:
                    scale = max(width, height) / _JPEG_CHECK_SIDE
                    img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
                img.load()
            elif full_decode:
                img.load()
            else:
                _check_webp_structure(data)
        if fmt == "png" and full_decode:  # verify() leaves the image unusable: reopen to decode
            with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
                img.load()
        if not full_decode and fmt != "jpeg":
            log.debug("image %d: %s %dx%d checked by structure only (decode over budget)",
                      which, fmt, width, height)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        w, h = dims or (0, 0)
        raise _too_many_pixels(which, w, h, limit, f"Pillow bomb guard: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error,
            EOFError, IndexError, MemoryError) as exc:
        raise InputError(
            f"{fmt} decode failed: {type(exc).__name__}: {exc}", key="input.unreadable",
            which=which,
        ) from None
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover - a misconfiguration elsewhere
        log.warning("ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated JPEG/WebP inputs pass")
    return ImageInfo(format=fmt, width=width, height=height, size=size)


async def inspect_image_async(
    data: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int = 16
) -> ImageInfo:
    """:func:`inspect_image` in a worker thread."""
    return await asyncio.to_thread(
        inspect_image, data, which=which, max_bytes=max_bytes, max_pixels=max_pixels,
        min_side=min_side,
    )


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
) -> tuple[bytes, ImageInfo]:
    """Download an attachment and check it; return ``(bytes, info)``.

    ``declared_size`` (Discord's ``Attachment.size``) over ``max_bytes`` is refused before any
    request (``input.too_large``), as is a ``Content-Length`` over the limit. The body is read in
    chunks and reading stops as soon as more than ``max_bytes`` arrived, so a server that lies
    about the size cannot make us read more. A network failure, a timeout (``timeout_s`` for the
    whole download) or any status but 200 — 403/404 usually mean an expired signed URL — raise
    ``input.fetch_failed``. The bytes are then checked by :func:`inspect_image` in a thread.
    """
    if declared_size is not None and declared_size > max_bytes:
        raise _too_large(which, declared_size, max_bytes, f"declared {declared_size} bytes")
    chunks: list[bytes] = []
    received = 0
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            headers={"Accept-Encoding": "identity"},
        ) as resp:
            if resp.status != 200:
                raise InputError(
                    f"GET returned HTTP {resp.status}", key="input.fetch_failed", which=which
                )
            length = resp.content_length
            if length is not None and length > max_bytes:
                resp.close()
                raise _too_large(which, length, max_bytes, f"Content-Length {length}")
            async for chunk in resp.content.iter_chunked(64 * 1024):
                chunks.append(chunk)
                received += len(chunk)
                if received > max_bytes:
                    resp.close()  # drop the connection: do not drain the rest
                    raise _too_large(
                        which, received, max_bytes, f"body passed {max_bytes} bytes; stopped"
                    )
    except InputError:
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise InputError(
            f"download failed: {type(exc).__name__}: {exc}", key="input.fetch_failed", which=which
        ) from None
    data = b"".join(chunks)
    info = await asyncio.to_thread(
        inspect_image, data, which=which, max_bytes=max_bytes, max_pixels=max_pixels,
        min_side=min_side,
    )
    return data, info


# --- prompt and seed ------------------------------------------------------------------------------

# C0 controls except tab and newline, DEL, and the C1 controls.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_LINES_RE = re.compile(r"\n(?:[ \t]*\n){2,}")


def validate_prompt(prompt: str, *, limit: int = 1000) -> str:
    """The cleaned prompt, or :class:`InputError` (``input.prompt_empty`` /
    ``input.prompt_too_long``).

    Line ends become ``\\n``; control characters other than tab and newline are removed (emoji
    sequences, joiners and right-to-left marks are kept); more than two line breaks in a row become
    two; the text is trimmed. The length is counted in Unicode code points after all that.
    """
    text = prompt.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    text = text.strip()
    if not text:
        raise InputError("empty prompt", key="input.prompt_empty")
    if len(text) > limit:
        raise InputError(
            f"prompt has {len(text)} code points", key="input.prompt_too_long",
            length=len(text), limit=limit,
        )
    return text


def validate_seed(seed: int | None, rng: Callable[[int], int] | None = None) -> int:
    """``seed`` when it is within 0..4294967295, a random one when None.

    ``rng`` is a ``randbelow``-like function (default :func:`secrets.randbelow`), for tests.
    Out of range (or not a whole number) raises :class:`InputError` ``input.seed_range``.
    """
    if seed is None:
        return (rng or secrets.randbelow)(SEED_MAX + 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed {seed!r}", key="input.seed_range")
    return seed


# --- fitting results under an upload limit ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FittedImage:
    """A result ready to upload.

    ``format`` is ``"jpg"`` or ``"png"`` (``"webp"`` only for a WebP that already fitted),
    ``filename_ext`` the extension to name the file with, ``reencoded`` whether the bytes were
    changed, ``scale`` the linear scale applied (1.0 when not resized).
    """

    data: bytes
    format: str
    filename_ext: str
    width: int
    height: int
    reencoded: bool
    scale: float


_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_MAX_ENCODES = 6  # refining a fitted size upwards stops here (shrinking to fit never does)
# rough size of a JPEG at each quality relative to quality 92 (noise ~0.79/0.62, photos lower)
_JPEG_REACH = {92: 1.0, 85: 0.75, 75: 0.6}


def _open_oriented(data: bytes) -> Image.Image:
    """Decode ``data`` upright (EXIF orientation applied), metadata not carried over."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
        upright = upright if upright is not img else img.copy()
    # drop EXIF, XMP, comments and text chunks; keep the colour profile and transparency
    upright.info = {k: v for k, v in upright.info.items() if k in ("icc_profile", "transparency")}
    return upright


def _flatten(img: Image.Image) -> Image.Image:
    """An RGB image: transparency composited on white, palettes and other modes converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = img.convert("I").point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _encode_jpeg(img: Image.Image, quality: int, icc: bytes | None) -> bytes:
    out = io.BytesIO()
    kwargs: dict[str, object] = {"quality": quality, "optimize": True}
    if img.width * img.height >= 96 * 96:  # progressive costs a few hundred bytes on tiny images
        kwargs["progressive"] = True
    if icc:
        kwargs["icc_profile"] = icc
    img.save(out, "JPEG", **kwargs)
    return out.getvalue()


def _encode_png(img: Image.Image, icc: bytes | None) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", optimize=True, icc_profile=icc)  # None: not even the one in img.info
    return out.getvalue()


def _resized(img: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def fit_to_limit(data: bytes, *, output_format: str, limit_bytes: int) -> FittedImage:
    """Return ``data`` as is when it fits in ``limit_bytes``, else a re-encoded copy that does.

    Fitting never decodes a result that already fits. Otherwise, in order, stopping at the first
    that fits: an optimized PNG (only when ``output_format`` is png and the overshoot is small);
    a progressive RGB JPEG at quality 92, 85, 75 (skipping qualities that cannot close the gap);
    then downscaling by ``sqrt(limit / size) * 0.95`` per round, at quality 85 then 60 once the
    long side is 256 px or less, down to 1 px at quality 30. Typical cases take 1–4 encodes; it
    terminates for every ``limit_bytes >= MIN_LIMIT_BYTES`` (smaller raises ValueError). EXIF
    orientation is applied to the pixels; EXIF and other metadata are dropped, the ICC colour
    profile is kept. Transparency is composited on white for JPEG. Data that does not fit and
    cannot be decoded raises :class:`OSError` (``PIL.UnidentifiedImageError``).
    """
    if len(data) <= limit_bytes:
        fmt = sniff_format(data)
        kind = _EXT.get(fmt or "", "jpg" if output_format in ("jpg", "jpeg") else "png")
        dims = header_size(data, fmt)
        if dims is None:
            try:
                with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                    dims = img.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                dims = (0, 0)
        return FittedImage(data, kind, kind, dims[0], dims[1], reencoded=False, scale=1.0)
    if limit_bytes < MIN_LIMIT_BYTES:
        raise ValueError(f"limit_bytes must be at least {MIN_LIMIT_BYTES}, got {limit_bytes}")

    started = time.perf_counter()
    src = _open_oriented(data)
    icc = src.info.get("icc_profile") or None
    if icc is not None and len(icc) > limit_bytes // 8:
        icc = None  # a profile must never be what breaks the limit
    encodes = 0

    def done(out: bytes, fmt: str, img: Image.Image, scale: float) -> FittedImage:
        assert len(out) <= limit_bytes, (len(out), limit_bytes)
        log.info(
            "re-encoded result to fit %d bytes: %d -> %d bytes, %s %dx%d, scale %.3f, "
            "%d encode(s), %.0f ms",
            limit_bytes, len(data), len(out), fmt, img.width, img.height, scale, encodes,
            (time.perf_counter() - started) * 1000,
        )
        return FittedImage(out, fmt, fmt, img.width, img.height, reencoded=True, scale=scale)

    if output_format == "png" and len(data) <= limit_bytes * 1.25:
        png_src = src if src.mode in ("RGB", "RGBA", "L", "LA", "P", "1") else src.convert("RGBA")
        out = _encode_png(png_src, icc)
        encodes += 1
        if len(out) <= limit_bytes:
            return done(out, "png", png_src, 1.0)

    base = _flatten(src)
    # full size, quality ladder: q92 first; q85 (~0.75x of q92) and q75 (~0.6x) are only tried
    # when they can plausibly close the gap, else downscaling starts at once
    out = _encode_jpeg(base, 92, icc)
    encodes += 1
    quality, size = 92, len(out)
    if size <= limit_bytes:
        return done(out, "jpg", base, 1.0)
    for next_quality in (85, 75):
        predicted = size * _JPEG_REACH[next_quality] / _JPEG_REACH[quality]
        if predicted > limit_bytes * 1.1:
            continue
        out = _encode_jpeg(base, next_quality, icc)
        encodes += 1
        quality, size = next_quality, len(out)
        if size <= limit_bytes:
            return done(out, "jpg", base, 1.0)

    # downscale: estimate the scale from the last size (JPEG size ~ pixel count), re-sampling the
    # full-size image each time; once a size fits with much room left, refine upwards (bounded)
    base_quality, long_side = min(quality, 85), max(base.size)
    scale = fail_scale = 1.0
    best: tuple[bytes, Image.Image, float] | None = None
    while True:
        target = scale * math.sqrt(limit_bytes / size) * 0.95
        if best is None:
            target = min(target, scale * 0.9)  # always shrink: guarantees termination
        else:  # refine between the fitting scale and the smallest one known too big
            if target >= fail_scale * 0.9:
                target = math.sqrt(scale * fail_scale)
            if encodes >= _MAX_ENCODES or size > limit_bytes * 0.7 or target <= scale * 1.05:
                return done(best[0], "jpg", best[1], best[2])
        target = max(target, 1 / long_side)
        img = _resized(base, target)
        side = max(img.size)
        quality = 30 if side <= 64 else min(base_quality, 60) if side <= 256 else base_quality
        out = _encode_jpeg(img, quality, icc if side > 64 else None)
        encodes += 1
        if len(out) <= limit_bytes:
            best, scale, size = (out, img, target), target, len(out)
        elif best is not None:
            fail_scale = target
        elif side <= 1:  # pragma: no cover - a 1x1 JPEG is ~300 bytes < MIN_LIMIT_BYTES
            raise AssertionError(f"cannot fit {limit_bytes} bytes")
        else:
            scale = fail_scale = target
            size = len(out)


async def fit_to_limit_async(data: bytes, *, output_format: str, limit_bytes: int) -> FittedImage:
    """:func:`fit_to_limit` in a worker thread."""
    return await asyncio.to_thread(
        fit_to_limit, data, output_format=output_format, limit_bytes=limit_bytes
    )


def thumbnail_bytes(data: bytes, max_side: int = 256) -> bytes:
    """A small upright JPEG (longest side ``max_side``) of ``data``, for embeds and showcases.

    JPEGs are decoded at reduced scale. Raises :class:`OSError` (``PIL.UnidentifiedImageError``)
    when ``data`` is not a readable image, :class:`ValueError` when a PNG or WebP would cost more
    than :data:`DECODE_BUDGET_BYTES` to decode (show a link instead).
    """
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))
        elif _decode_cost((img.format or "").lower(), *img.size) > DECODE_BUDGET_BYTES:
            raise ValueError(f"{img.format} {img.width}x{img.height} is too large to thumbnail")
        img.load()
        upright = ImageOps.exif_transpose(img)
        upright.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return _encode_jpeg(_flatten(upright), 85, None)


async def thumbnail_bytes_async(data: bytes, max_side: int = 256) -> bytes:
    """:func:`thumbnail_bytes` in a worker thread."""
    return await asyncio.to_thread(thumbnail_bytes, data, max_side)

"""Image checks and fitting, discord-free.

* :func:`sniff_format` names a file by its magic bytes (never by its name or content type).
* :func:`inspect_image` checks one member image: size, format, dimensions read from the header
  *before* Pillow or any decoding (so a decompression bomb is refused without allocating it),
  then a real decode of the content, in bounded memory, that catches truncated or corrupt files.
  Failures raise :class:`~kontext.errors.InputError` with the right message key.
* :func:`fetch_and_check` downloads an attachment from Discord's CDN (or an explicitly allowed
  host) with a hard cap on the bytes read, takes the header decision on the first bytes, then
  inspects it off the event loop.
* :func:`validate_prompt` / :func:`validate_seed` check the text options.
* :func:`fit_to_limit` makes a result fit under Discord's upload limit (never fails on size);
  :func:`thumbnail_bytes` makes a small JPEG for embeds and the showcase.

Every Pillow call is synchronous and CPU-bound; each has an ``*_async`` twin that runs it off the
event loop. Member images (checks, thumbnails) go to a pool of :data:`CHECK_THREADS` threads, and
each first reserves its estimated decode memory in :data:`DECODE_BUDGET`, shared by the whole
process: however many members send images at once, decodes hold at most
:data:`DECODE_BUDGET_BYTES` together (one that needs more runs alone), and downloads at most
:data:`DOWNLOAD_BUDGET_BYTES`.

Pillow's process-wide guards are respected, not changed: ``Image.MAX_IMAGE_PIXELS`` (a
decompression bomb guard) caps the pixel limit used here — our limit is ``min(max_pixels,
MAX_IMAGE_PIXELS)`` and is checked on Pillow's own reading of the header before anything is
loaded, so Pillow's guard can only ever be the stricter one — and ``ImageFile.LOAD_TRUNCATED_IMAGES``
stays False so a truncated file fails to decode.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import re
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import aiohttp
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from yarl import URL

from kontext.errors import InputError
from kontext.spool import SPOOL_BYTES, ResultFile
from kontext.vocab import ImageFormat

log = logging.getLogger("kontext.images")

_T = TypeVar("_T")

ACCEPTED_FORMATS: frozenset[ImageFormat] = frozenset(ImageFormat)
"""Formats :func:`inspect_image` accepts (as returned by :func:`sniff_format`: ``"jpg"``, never
``"jpeg"``; Pillow's names are :attr:`ImageFormat.pil`)."""

SEED_MAX = 2**32 - 1
"""The largest seed the API takes (inclusive)."""

MIN_LIMIT_BYTES = 1024
"""The smallest ``limit_bytes`` :func:`fit_to_limit` guarantees (a 1×1 JPEG is ~300 bytes)."""

_MIB = 1024 * 1024
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

    Returns an :class:`ImageFormat` (``"png"``, ``"jpg"``, ``"webp"``) for the accepted formats,
    and for better logs a name for common wrong files: ``"gif"``, ``"pdf"``, ``"bmp"``,
    ``"tiff"``, ``"ico"``, ``"heic"``, ``"avif"``, ``"mp4"`` (other ISO-BMFF), ``"jxl"``,
    ``"zip"``, ``"svg"``, ``"html"``, ``"xml"``, ``"json"``. Only :data:`ACCEPTED_FORMATS` pass :func:`inspect_image`.
    """
    head = bytes(data[:512])
    if head.startswith(_PNG_SIGNATURE):
        return ImageFormat.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPG
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageFormat.WEBP
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
        if fmt == ImageFormat.PNG:
            if data[12:16] != b"IHDR":
                return None
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if fmt == ImageFormat.WEBP:
            return _webp_size(data)
        if fmt == ImageFormat.JPG:
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


@dataclass(frozen=True, slots=True)
class _JpegFrame:
    """What a JPEG's frame header (SOF) says: size, components' sampling, progressive or not."""

    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (H, V) per component
    progressive: bool
    end: int  # offset just past the SOF segment


_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _jpeg_frame(data: bytes) -> _JpegFrame | None:
    """The first frame header of a JPEG, walking the marker segments; None when not reached."""
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
            height, width, count = struct.unpack(">HHB", data[pos + 5 : pos + 10])
            body = data[pos + 10 : pos + 10 + 3 * count]
            if count == 0 or len(body) < 3 * count:
                return None
            sampling = tuple((body[3 * i + 1] >> 4, body[3 * i + 1] & 0x0F) for i in range(count))
            return _JpegFrame(width, height, sampling, marker in _JPEG_PROGRESSIVE_SOF,
                              pos + 2 + length)
        pos += 2 + length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = _jpeg_frame(data)
    return None if frame is None else (frame.width, frame.height)


# --- decoding cost ----------------------------------------------------------------------------------

DECODE_BUDGET_BYTES = 160 * _MIB
"""The memory that all image decodes of the process may hold at once, and the most that one WebP
decode may take (a 10 MP WebP; larger WebPs are checked by structure only: the RIFF chunk
layout, and :func:`thumbnail_bytes` refuses them). 160 MiB is one worst-case 40 MP RGBA decode;
with it the bot's memory for checks stays within ~200 MiB whatever members send (see
:data:`DECODE_BUDGET`)."""

DOWNLOAD_BUDGET_BYTES = 8 * 20 * _MIB
"""The bytes that all downloads of :func:`fetch_and_check` may hold at once: eight attachments at
Discord's default 20 MiB limit (more when they are smaller). A download reserves its
``Content-Length`` (or ``max_bytes`` when there is none) before reading the body."""

CHECK_THREADS = 2
"""Threads of the pool that runs image checks and thumbnails (never the event loop's)."""

# peak bytes per pixel of a full Pillow decode: PNG at most RGBA 8-bit (16-bit colour is read as
# 8-bit); WebP goes through libwebp's animation decoder (canvas + frame + copies, measured ~16);
# JPEG is decoded at reduced scale here (draft), see _jpeg_check_cost.
_BYTES_PER_PIXEL: dict[str, int] = {ImageFormat.PNG: 4, ImageFormat.WEBP: 16, ImageFormat.JPG: 0}
_PNG_PIECE = 1 * _MIB  # a PNG's image data is inflated this much at a time
_PNG_STREAM_COST = 2 * _MIB  # the piece, zlib's window and state


def _decode_cost(fmt: str, width: int, height: int) -> int:
    """Bytes of a full Pillow decode (used for WebP checks and thumbnails)."""
    return width * height * _BYTES_PER_PIXEL.get(fmt, 4)


def _jpeg_check_cost(frame: _JpegFrame, multi_scan: bool) -> int:
    """Bytes libjpeg holds to decode a JPEG at reduced scale.

    A progressive or multi-scan JPEG keeps every DCT coefficient of the whole image (2 bytes
    each, per component at its sampling): ~3 bytes a pixel at 4:2:0, 6 at 4:4:4, 8 for CMYK —
    measured 117 MiB / 232 MiB for 40 MP. A single-scan baseline JPEG is decoded a band of
    blocks at a time into a buffer of 1/8 scale.
    """
    w, h = frame.width, frame.height
    if not (frame.progressive or multi_scan):
        return w * h * 4 // 64 + w * 16 * 3 * len(frame.sampling)
    h_max = max(hs for hs, _ in frame.sampling) or 1
    v_max = max(vs for _, vs in frame.sampling) or 1
    blocks = sum(
        math.ceil(math.ceil(w * hs / h_max) / 8) * math.ceil(math.ceil(h * vs / v_max) / 8)
        for hs, vs in frame.sampling
    )
    return blocks * 64 * 2


def _jpeg_multi_scan(data: bytes, frame: _JpegFrame) -> bool:
    """Whether a JPEG has more than one scan (each start-of-scan marker is FF DA; the entropy-coded
    data never contains one, since a coded FF is always followed by 00)."""
    return data.count(b"\xff\xda", frame.end) > 1


def _check_cost(data: bytes, fmt: str | None, dims: tuple[int, int] | None) -> int:
    """Bytes an :func:`inspect_image` of ``data`` may hold beyond ``data`` itself: Pillow's copy
    of header chunks (at most the file) plus the decode. Unknown dimensions cost the whole
    budget (the check then runs alone)."""
    if fmt not in ACCEPTED_FORMATS or dims is None:
        return DECODE_BUDGET_BYTES
    size = len(data)
    if fmt == ImageFormat.PNG:
        return size + _PNG_STREAM_COST
    if fmt == ImageFormat.WEBP:
        full = _decode_cost(ImageFormat.WEBP, *dims)
        return size + (full if full <= DECODE_BUDGET_BYTES else 0)
    frame = _jpeg_frame(data)
    if frame is None:
        return DECODE_BUDGET_BYTES
    return size + _jpeg_check_cost(frame, _jpeg_multi_scan(data, frame))


async def _check_cost_async(data: bytes, fmt: str | None, dims: tuple[int, int] | None) -> int:
    """:func:`_check_cost`; a large JPEG's scan count (~1 ms a MiB) is taken off the loop."""
    if fmt == ImageFormat.JPG and len(data) > _MIB:
        return await asyncio.to_thread(_check_cost, data, fmt, dims)
    return _check_cost(data, fmt, dims)


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


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


def _png_rows(width: int, height: int, depth: int, colour: int, interlace: int) -> list[tuple[int, int]]:
    """The image data's layout: ``(rows, bytes per row incl. the filter byte)`` per pass."""
    bits = _PNG_CHANNELS[colour] * depth

    def row(w: int) -> int:
        return 1 + (w * bits + 7) // 8

    if interlace == 0:
        return [(height, row(width))]
    passes = []
    for x0, y0, dx, dy in _ADAM7:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            passes.append((h, row(w)))
    return passes


def _check_png_stream(data: bytes) -> None:
    """Decode a PNG's compressed image data in pieces, without holding its pixels.

    Every chunk's CRC up to IEND is checked (as ``Image.verify`` does); all IDAT data is inflated
    in :data:`_PNG_PIECE` steps until the rows the header promises are there, and each row's
    filter type is checked. That is every way a PNG's pixel data can fail to decode (undoing the
    filters accepts any bytes), at a fixed ~2 MiB instead of 4 bytes a pixel. ValueError or
    zlib.error when it does not decode.
    """
    view = memoryview(data)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if colour not in _PNG_CHANNELS or interlace not in (0, 1):
        raise ValueError(f"PNG colour type {colour} / interlace {interlace}")
    passes = _png_rows(width, height, depth, colour, interlace)
    segments, start = [], 0  # (first byte, end, row length) of each pass in the inflated stream
    for rows, length in passes:
        segments.append((start, start + rows * length, length))
        start += rows * length
    expected, produced = start, 0
    inflater = zlib.decompressobj()
    pos, end, seen_iend = 8, len(data), False
    while pos + 12 <= end:
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        body_end = pos + 8 + length
        if body_end + 4 > end:
            raise ValueError(f"truncated PNG: {kind!r} chunk runs past the end")
        crc = zlib.crc32(view[pos + 4 : body_end])
        if crc != int.from_bytes(view[body_end : body_end + 4], "big"):
            raise ValueError(f"broken PNG: bad CRC in {kind!r} chunk")
        if kind == b"IDAT" and produced < expected:
            tail: bytes | memoryview = view[pos + 8 : body_end]
            while tail and produced < expected:
                piece = inflater.decompress(tail, min(_PNG_PIECE, expected - produced))
                tail = inflater.unconsumed_tail
                for first, last, row in segments:  # the filter byte opens each row
                    lo, hi = max(produced, first), min(produced + len(piece), last)
                    if lo < hi:
                        lo += (first - lo) % row
                        filters = piece[lo - produced : hi - produced : row]
                        if filters and max(filters) > 4:
                            raise ValueError(f"broken PNG: filter type {max(filters)}")
                produced += len(piece)
                if not piece and not tail:
                    break
        if kind == b"IEND":
            seen_iend = True
            break
        pos = body_end + 4
    if produced < expected:
        raise ValueError(f"truncated PNG: image data gives {produced} of {expected} bytes")
    if not seen_iend:
        raise ValueError("truncated PNG: no IEND chunk")


# --- the shared decode budget and pool --------------------------------------------------------------


class MemoryBudget:
    """A weighted, first-come-first-served semaphore in bytes, shared by the whole process.

    :meth:`acquire` waits until ``cost`` bytes fit beside what is held; a cost over the capacity
    takes all of it, so such a job runs alone. Strict arrival order (a large cost is never
    overtaken by small ones, so it cannot starve). Safe across threads and event loops.
    ``in_use``/``holders`` and their peaks are for tests and metrics.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.holders = 0
        self.peak_in_use = 0
        self.peak_holders = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def reset_peaks(self) -> None:
        with self._lock:
            self.peak_in_use, self.peak_holders = self.in_use, self.holders

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _grant(self, take: int) -> None:
        self.in_use += take
        self.holders += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        self.peak_holders = max(self.peak_holders, self.holders)

    async def acquire(self, cost: int) -> int:
        """Wait for ``cost`` bytes (capped at the capacity); returns what to :meth:`release`."""
        take = max(0, min(cost, self.capacity))
        with self._lock:
            if not self._waiters and self.in_use + take <= self.capacity:
                self._grant(take)
                return take
            waiter = _Waiter(take, asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                self.release(take)
            else:
                self._wake()  # the first in line left: the next one may fit now
            raise
        return take

    def release(self, take: int) -> None:
        """Give ``take`` bytes back (from any thread)."""
        with self._lock:
            self.in_use -= take
            self.holders -= 1
        self._wake()

    def _wake(self) -> None:
        ready: list[_Waiter] = []
        with self._lock:
            while self._waiters and self.in_use + self._waiters[0].take <= self.capacity:
                waiter = self._waiters.popleft()
                waiter.granted = True
                self._grant(waiter.take)
                ready.append(waiter)
        for waiter in ready:
            try:
                waiter.future.get_loop().call_soon_threadsafe(_resolve, waiter.future)
            except RuntimeError:  # its event loop is closed: nobody will use the grant
                self.release(waiter.take)


@dataclass(eq=False, slots=True)
class _Waiter:
    """One :meth:`MemoryBudget.acquire` waiting in line for ``take`` bytes."""

    take: int
    future: asyncio.Future[None]
    granted: bool = False  # set under the budget's lock when its bytes were given to it


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


DECODE_BUDGET = MemoryBudget(DECODE_BUDGET_BYTES)
"""Every image check and thumbnail of the process holds its estimated decode memory here."""

DOWNLOAD_BUDGET = MemoryBudget(DOWNLOAD_BUDGET_BYTES)
"""Every :func:`fetch_and_check` holds its body's bytes here until it returns."""

class _LazyPool:
    """A small thread pool made on first use (no threads in a process that never needs it)."""

    def __init__(self, threads: int, prefix: str) -> None:
        self._threads, self._prefix = threads, prefix
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=self._prefix)
            return self._pool


_check_pool = _LazyPool(CHECK_THREADS, "kontext-image")


async def _run_budgeted(cost: int, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` on the check pool once ``cost`` bytes of :data:`DECODE_BUDGET`
    are free. The bytes are given back when ``fn`` ends, not when the caller stops waiting: a
    cancelled check that already runs keeps its share until its thread is done."""
    take = await DECODE_BUDGET.acquire(cost)
    try:
        work = _check_pool().submit(functools.partial(fn, *args, **kwargs))
    except BaseException:
        DECODE_BUDGET.release(take)
        raise
    work.add_done_callback(lambda _: DECODE_BUDGET.release(take))
    return await asyncio.wrap_future(work)


# --- inspecting member images ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What :func:`inspect_image` found: ``format`` is ``"png"``, ``"jpg"`` or ``"webp"``."""

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


def _check_dimensions(
    fmt: str, width: int, height: int, *, which: int, limit: int, min_side: int
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


def _header_check(
    data: bytes, *, which: int, max_bytes: int, max_pixels: int, min_side: int
) -> tuple[str, tuple[int, int] | None, int]:
    """Every decision the first bytes allow, without Pillow and without decoding: returns
    ``(format, (width, height) or None when the header is not readable, pixel limit)``."""
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
      type checked (:func:`_check_png_stream`): a fixed ~2 MiB, whatever the pixel count;
    * JPEG: decoded at 1/2..1/8 scale (every entropy-coded byte is still read);
    * WebP: a full decode up to :data:`DECODE_BUDGET_BYTES` (10 MP), the RIFF structure above.

    ``which`` (1 or 2) names the image in the message. Synchronous, CPU-bound and not counted in
    :data:`DECODE_BUDGET`: from async code use :func:`inspect_image_async`.
    """
    fmt, dims, limit = _header_check(
        data, which=which, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )
    try:
        with Image.open(io.BytesIO(data), formats=[ImageFormat(fmt).pil]) as img:  # lazy: header
            width, height = img.size
            _check_dimensions(fmt, width, height, which=which, limit=limit, min_side=min_side)
            if fmt == ImageFormat.JPG:
                if max(width, height) > _JPEG_CHECK_SIDE:
                    scale = max(width, height) / _JPEG_CHECK_SIDE
                    img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
                img.load()
            elif fmt == ImageFormat.WEBP:
                if _decode_cost(fmt, width, height) <= DECODE_BUDGET_BYTES:
                    img.load()
                else:
                    _check_webp_structure(data)
                    log.debug("image %d: webp %dx%d checked by structure only (decode over "
                              "budget)", which, width, height)
        if fmt == ImageFormat.PNG:
            _check_png_stream(data)
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
    fmt, dims, _ = _header_check(
        data, which=which, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )
    return await _run_budgeted(
        await _check_cost_async(data, fmt, dims), inspect_image, data, which=which,
        max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side,
    )


# --- downloading member images ----------------------------------------------------------------------

DISCORD_CDN_HOSTS: frozenset[str] = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
"""Where Discord serves attachments (HTTPS, port 443). Inputs come from nowhere else, unless a
host is added with :func:`allow_input_host` or passed as ``allowed_hosts``."""

_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEAD_BYTES = 256 * 1024  # the header decision is taken within the first bytes of a download
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
    _, dims, _ = _header_check(
        head, which=which, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side
    )
    return dims is not None or len(head) >= _HEAD_BYTES


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
        raise _too_large(which, declared_size, max_bytes, f"declared {declared_size} bytes")
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
                            raise _too_large(which, length, max_bytes, f"Content-Length {length}")
                        take = await DOWNLOAD_BUDGET.acquire(
                            max_bytes if length is None else length
                        )
                        chunks: list[bytes] = []
                        received, decided = 0, False
                        async for chunk in resp.content.iter_chunked(64 * 1024):
                            chunks.append(chunk)
                            received += len(chunk)
                            if received > max_bytes:
                                resp.close()  # drop the connection: do not drain the rest
                                raise _too_large(
                                    which, received, max_bytes,
                                    f"body passed {max_bytes} bytes; stopped",
                                )
                            if not decided:
                                try:
                                    decided = _early_decision(
                                        b"".join(chunks)[:_HEAD_BYTES], **head_limits
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
            DOWNLOAD_BUDGET.release(take)


async def thumbnail_bytes_async(data: bytes, max_side: int = 256) -> bytes:
    """:func:`thumbnail_bytes` on the check pool, within :data:`DECODE_BUDGET`."""
    fmt = sniff_format(data)
    dims = header_size(data, fmt)
    if fmt == ImageFormat.JPG or dims is None:
        cost = await _check_cost_async(data, fmt, dims)
    else:
        full = _decode_cost(fmt or "", *dims)
        cost = len(data) + (full if full <= DECODE_BUDGET_BYTES else 0)  # else: refused unread
    return await _run_budgeted(cost, thumbnail_bytes, data, max_side)


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

    ``body`` is the image: ``bytes``, or a :class:`~kontext.spool.ResultFile` for one past
    :data:`~kontext.spool.SPOOL_BYTES` (the API's own file passed through, or a re-encoded copy
    written to a new one). ``format`` is ``"jpg"`` or ``"png"`` (``"webp"`` only for a WebP
    that already fitted), ``filename_ext`` the extension to name the file with, ``reencoded``
    whether the bytes were changed, ``scale`` the linear scale applied (1.0 when not resized).
    """

    body: bytes | ResultFile
    format: str
    filename_ext: str
    width: int
    height: int
    reencoded: bool
    scale: float

    @property
    def data(self) -> bytes:
        """The image's bytes when it is held in memory (TypeError for one in a file: read it
        with :meth:`open`, never whole)."""
        if isinstance(self.body, ResultFile):
            raise TypeError(f"the image is in a file ({self.body.size} bytes): use open()")
        return self.body

    @property
    def file(self) -> ResultFile | None:
        """The image's temporary file, or None when it is ``bytes``."""
        return self.body if isinstance(self.body, ResultFile) else None

    @property
    def size(self) -> int:
        """The image's length in bytes."""
        return self.body.size if isinstance(self.body, ResultFile) else len(self.body)

    def open(self) -> IO[bytes]:
        """A readable, seekable stream at the image's first byte: the file itself (owned by the
        file: do not close it) or a ``BytesIO`` sharing the bytes."""
        if isinstance(self.body, ResultFile):
            return self.body.stream()
        return io.BytesIO(self.body)

    def close(self) -> None:
        """Release the image's temporary file, if any (idempotent)."""
        if isinstance(self.body, ResultFile):
            self.body.close()


_MAX_ENCODES = 6  # refining a fitted size upwards stops here (shrinking to fit never does)
# rough size of a JPEG at each quality relative to quality 92 (noise ~0.79/0.62, photos lower)
_JPEG_REACH = {92: 1.0, 85: 0.75, 75: 0.6}


def _open_oriented(data: bytes | ResultFile) -> Image.Image:
    """Decode ``data`` upright (EXIF orientation applied), metadata not carried over (a file is
    decoded from the file: Pillow reads it piece by piece)."""
    stream = data.stream() if isinstance(data, ResultFile) else io.BytesIO(data)
    with Image.open(stream) as img:
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
    img.save(out, ImageFormat.JPG.pil, **kwargs)
    return out.getvalue()


def _encode_png(img: Image.Image, icc: bytes | None) -> bytes:
    out = io.BytesIO()
    img.save(out, ImageFormat.PNG.pil, optimize=True, icc_profile=icc)  # None: not even the one in img.info
    return out.getvalue()


def _resized(img: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def fit_to_limit(
    data: bytes | ResultFile, *, output_format: str, limit_bytes: int
) -> FittedImage:
    """Return ``data`` as is when it fits in ``limit_bytes``, else a re-encoded copy that does.

    ``data`` may be a :class:`~kontext.spool.ResultFile`: one that fits is passed through
    without reading it back (only its header, for the dimensions); one that does not is decoded
    from the file, and a re-encoded copy past :data:`~kontext.spool.SPOOL_BYTES` is written to a
    new file (the caller closes both: :meth:`FittedImage.close`).

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
    spooled = isinstance(data, ResultFile)
    in_size = data.size if isinstance(data, ResultFile) else len(data)
    if in_size <= limit_bytes:
        head = data.head if isinstance(data, ResultFile) else data
        fmt = sniff_format(head)
        kind = ImageFormat(fmt) if fmt in ACCEPTED_FORMATS else (
            ImageFormat.JPG if output_format == ImageFormat.JPG else ImageFormat.PNG
        )
        dims = header_size(head, fmt)
        if dims is None:
            stream = data.stream() if isinstance(data, ResultFile) else io.BytesIO(data)
            try:
                with Image.open(stream) as probe:  # lazy: reads the header only
                    dims = probe.size
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
            "%d encode(s), %.0f ms%s",
            limit_bytes, in_size, len(out), fmt, img.width, img.height, scale, encodes,
            (time.perf_counter() - started) * 1000, " (from a file)" if spooled else "",
        )
        body: bytes | ResultFile = ResultFile.from_bytes(out) if len(out) > SPOOL_BYTES else out
        return FittedImage(body, fmt, fmt, img.width, img.height, reencoded=True, scale=scale)

    if output_format == ImageFormat.PNG and in_size <= limit_bytes * 1.25:
        png_src = src if src.mode in ("RGB", "RGBA", "L", "LA", "P", "1") else src.convert("RGBA")
        out = _encode_png(png_src, icc)
        encodes += 1
        if len(out) <= limit_bytes:
            return done(out, ImageFormat.PNG, png_src, 1.0)

    base = _flatten(src)
    # full size, quality ladder: q92 first; q85 (~0.75x of q92) and q75 (~0.6x) are only tried
    # when they can plausibly close the gap, else downscaling starts at once
    out = _encode_jpeg(base, 92, icc)
    encodes += 1
    quality, size = 92, len(out)
    if size <= limit_bytes:
        return done(out, ImageFormat.JPG, base, 1.0)
    for next_quality in (85, 75):
        predicted = size * _JPEG_REACH[next_quality] / _JPEG_REACH[quality]
        if predicted > limit_bytes * 1.1:
            continue
        out = _encode_jpeg(base, next_quality, icc)
        encodes += 1
        quality, size = next_quality, len(out)
        if size <= limit_bytes:
            return done(out, ImageFormat.JPG, base, 1.0)

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
                return done(best[0], ImageFormat.JPG, best[1], best[2])
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


FIT_THREADS = 2
"""Threads that re-encode results too large to upload (CPU-bound: more would not be quicker)."""

_fit_pool = _LazyPool(FIT_THREADS, "kontext-fit")


def _fit_cost(head: bytes, limit_bytes: int) -> int:
    """Bytes a re-encode may hold beyond its input: the decode (RGBA, or libwebp's ~16 bytes a
    pixel), an upright and an RGB copy, resized copies and the encoded outputs. Unknown
    dimensions cost the whole budget (the fit then runs alone)."""
    fmt = sniff_format(head)
    dims = header_size(head, fmt)
    if fmt not in ACCEPTED_FORMATS or dims is None:
        return DECODE_BUDGET_BYTES
    pixels = dims[0] * dims[1]
    return pixels * (max(4, _BYTES_PER_PIXEL.get(fmt, 4)) + 4 + 3 + 3) + 2 * limit_bytes


async def fit_to_limit_async(
    data: bytes | ResultFile, *, output_format: str, limit_bytes: int
) -> FittedImage:
    """:func:`fit_to_limit` off the event loop.

    One that fits (no decode) runs in a worker thread at once; a re-encode runs on its own pool
    of :data:`FIT_THREADS` threads once its estimated memory is free in :data:`DECODE_BUDGET`
    (shared with the checks of member images), so that however many large results arrive
    together their decodes stay within the budget. A re-encoded file whose caller stopped
    waiting (cancelled) is closed when its thread ends.
    """
    size = data.size if isinstance(data, ResultFile) else len(data)
    if size <= limit_bytes:
        return await asyncio.to_thread(
            fit_to_limit, data, output_format=output_format, limit_bytes=limit_bytes
        )
    head = data.head if isinstance(data, ResultFile) else data[:_HEAD_BYTES]
    take = await DECODE_BUDGET.acquire(_fit_cost(head, limit_bytes))
    abandoned = False

    def finished(work: Any) -> None:
        DECODE_BUDGET.release(take)
        if abandoned and not work.cancelled() and work.exception() is None:
            work.result().close()

    try:
        work = _fit_pool().submit(
            functools.partial(
                fit_to_limit, data, output_format=output_format, limit_bytes=limit_bytes
            )
        )
    except BaseException:
        DECODE_BUDGET.release(take)
        raise
    work.add_done_callback(finished)
    try:
        return await asyncio.wrap_future(work)
    except asyncio.CancelledError:
        abandoned = True
        if work.done() and not work.cancelled() and work.exception() is None:
            work.result().close()  # it ended before ``abandoned`` was seen
        raise


def thumbnail_bytes(data: bytes, max_side: int = 256) -> bytes:
    """A small upright JPEG (longest side ``max_side``) of ``data``, for embeds and showcases.

    JPEGs are decoded at reduced scale. Raises :class:`OSError` (``PIL.UnidentifiedImageError``)
    when ``data`` is not a readable image, :class:`ValueError` when a PNG or WebP would cost more
    than :data:`DECODE_BUDGET_BYTES` to decode (show a link instead).
    """
    with Image.open(io.BytesIO(data)) as img:
        if img.format == ImageFormat.JPG.pil:
            img.draft("RGB", (max_side, max_side))
        elif _decode_cost(ImageFormat.from_pil(img.format) or "", *img.size) > DECODE_BUDGET_BYTES:
            raise ValueError(f"{img.format} {img.width}x{img.height} is too large to thumbnail")
        img.load()
        upright = ImageOps.exif_transpose(img)
        upright.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return _encode_jpeg(_flatten(upright), 85, None)

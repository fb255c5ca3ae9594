"""Fitting a result under an upload limit (never failing on size: re-encoded, then scaled down),
and the small JPEG thumbnails of embeds and the showcase; Pillow work off the event loop, within
the decode budget."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image, ImageOps

from kontext.images import budget
from kontext.images.budget import LazyPool
from kontext.images.cost import (
    BYTES_PER_PIXEL,
    check_cost_async,
    decode_cost,
    jpeg_decodes_within_budget,
    jpeg_multi_scan,
)
from kontext.images.formats import (
    ACCEPTED_FORMATS,
    HEAD_BYTES,
    header_size,
    jpeg_frame,
    sniff_format,
)
from kontext.spool import SPOOL_BYTES, ResultFile
from kontext.vocab import ImageFormat

log = logging.getLogger("kontext.images")


MIN_LIMIT_BYTES = 1024
"""The smallest ``limit_bytes`` :func:`fit_to_limit` guarantees (a 1×1 JPEG is ~300 bytes)."""


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
    format: ImageFormat
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
    data: bytes | ResultFile, *, output_format: ImageFormat, limit_bytes: int
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

    def done(out: bytes, fmt: ImageFormat, img: Image.Image, scale: float) -> FittedImage:
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

_fit_pool = LazyPool(FIT_THREADS, "kontext-fit")


def _fit_cost(head: bytes, limit_bytes: int) -> int:
    """Bytes a re-encode may hold beyond its input: the decode (RGBA, or libwebp's ~16 bytes a
    pixel), an upright and an RGB copy, resized copies and the encoded outputs. Unknown
    dimensions cost the whole budget (the fit then runs alone)."""
    fmt = sniff_format(head)
    dims = header_size(head, fmt)
    if fmt not in ACCEPTED_FORMATS or dims is None:
        return budget.DECODE_BUDGET_BYTES
    pixels = dims[0] * dims[1]
    return pixels * (max(4, BYTES_PER_PIXEL.get(fmt, 4)) + 4 + 3 + 3) + 2 * limit_bytes


async def fit_to_limit_async(
    data: bytes | ResultFile, *, output_format: ImageFormat, limit_bytes: int
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
    head = data.head if isinstance(data, ResultFile) else data[:HEAD_BYTES]
    take = await budget.DECODE_BUDGET.acquire(_fit_cost(head, limit_bytes))
    abandoned = False

    def finished(work: Any) -> None:
        budget.DECODE_BUDGET.release(take)
        if abandoned and not work.cancelled() and work.exception() is None:
            work.result().close()

    try:
        work = _fit_pool().submit(
            functools.partial(
                fit_to_limit, data, output_format=output_format, limit_bytes=limit_bytes
            )
        )
    except BaseException:
        budget.DECODE_BUDGET.release(take)
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
    when ``data`` is not a readable image, :class:`ValueError` when a PNG or WebP — or a
    progressive JPEG, whose coefficients are held whole at any scale — would cost more than
    :data:`DECODE_BUDGET_BYTES` to decode (show a link instead).
    """
    with Image.open(io.BytesIO(data)) as img:
        if img.format == ImageFormat.JPG.pil:
            frame = jpeg_frame(data)
            if frame is None or not jpeg_decodes_within_budget(frame, jpeg_multi_scan(data, frame)):
                raise ValueError(f"JPEG {img.width}x{img.height} is too costly to thumbnail")
            img.draft("RGB", (max_side, max_side))
        elif decode_cost(ImageFormat.from_pil(img.format) or "", *img.size) > budget.DECODE_BUDGET_BYTES:
            raise ValueError(f"{img.format} {img.width}x{img.height} is too large to thumbnail")
        img.load()
        upright = ImageOps.exif_transpose(img)
        upright.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return _encode_jpeg(_flatten(upright), 85, None)


async def thumbnail_bytes_async(data: bytes, max_side: int = 256) -> bytes:
    """:func:`thumbnail_bytes` on the check pool, within :data:`DECODE_BUDGET`."""
    fmt = sniff_format(data)
    dims = header_size(data, fmt)
    if fmt == ImageFormat.JPG or dims is None:
        cost = await check_cost_async(data, fmt, dims)
    else:
        full = decode_cost(fmt or "", *dims)
        cost = len(data) + (full if full <= budget.DECODE_BUDGET_BYTES else 0)  # else: refused unread
    return await budget.run_budgeted(cost, thumbnail_bytes, data, max_side)


"""What checking an image costs, and the checks that need no decode: the memory a Pillow decode
of each format takes (so a check reserves it in the decode budget first), and the structural
checks of a PNG's compressed stream and a WebP's RIFF chunks for images too large to decode."""

from __future__ import annotations

import asyncio
import math
import re
import struct
import zlib

from kontext.images import budget
from kontext.images.budget import MIB
from kontext.images.formats import (
    ACCEPTED_FORMATS,
    JpegFrame,
    jpeg_frame,
)
from kontext.vocab import ImageFormat

# A JPEG is decoded at 1/2..1/8 scale (libjpeg's DCT scaling): every byte of the entropy-coded
# data is still read, so truncation is caught, but the pixel buffer is up to 64× smaller.
JPEG_CHECK_SIDE = 256

# peak bytes per pixel of a full Pillow decode: PNG at most RGBA 8-bit (16-bit colour is read as
# 8-bit); WebP goes through libwebp's animation decoder (canvas + frame + copies, measured ~16);
# JPEG is decoded at reduced scale here (draft), see jpeg_check_cost.
BYTES_PER_PIXEL: dict[str, int] = {ImageFormat.PNG: 4, ImageFormat.WEBP: 16, ImageFormat.JPG: 0}
_PNG_PIECE = 1 * MIB  # a PNG's image data is inflated this much at a time
_PNG_STREAM_COST = 2 * MIB  # the piece, zlib's window and state


def decode_cost(fmt: str, width: int, height: int) -> int:
    """Bytes of a full Pillow decode (used for WebP checks and thumbnails)."""
    return width * height * BYTES_PER_PIXEL.get(fmt, 4)


def jpeg_check_cost(frame: JpegFrame, multi_scan: bool) -> int:
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
    return blocks * 64 * 2 + JPEG_MULTI_SCAN_OVERHEAD


JPEG_MULTI_SCAN_OVERHEAD = 6 * MIB
"""libjpeg's state, Huffman tables and the reduced output beside the coefficients (measured +3 MiB
at 40 MP, 4:4:4 and CMYK)."""

_JPEG_STRUCTURE_COST = 1 * MIB


def jpeg_decodes_within_budget(frame: JpegFrame, multi_scan: bool) -> bool:
    """Whether a (reduced) decode of this JPEG fits in :data:`DECODE_BUDGET_BYTES`: every
    single-scan JPEG does; a progressive 4:4:4 one up to ~26 MP, a CMYK one up to ~20 MP."""
    return jpeg_check_cost(frame, multi_scan) <= budget.DECODE_BUDGET_BYTES


def jpeg_multi_scan(data: bytes, frame: JpegFrame) -> bool:
    """Whether a JPEG has more than one scan (each start-of-scan marker is FF DA; the entropy-coded
    data never contains one, since a coded FF is always followed by 00)."""
    return data.count(b"\xff\xda", frame.end) > 1


def check_cost(data: bytes, fmt: str | None, dims: tuple[int, int] | None) -> int:
    """Bytes an :func:`inspect_image` of ``data`` may hold beyond ``data`` itself: Pillow's copy
    of header chunks (at most the file) plus the decode. Unknown dimensions cost the whole
    budget (the check then runs alone)."""
    if fmt not in ACCEPTED_FORMATS or dims is None:
        return budget.DECODE_BUDGET_BYTES
    size = len(data)
    if fmt == ImageFormat.PNG:
        return size + _PNG_STREAM_COST
    if fmt == ImageFormat.WEBP:
        full = decode_cost(ImageFormat.WEBP, *dims)
        return size + (full if full <= budget.DECODE_BUDGET_BYTES else 0)
    frame = jpeg_frame(data)
    if frame is None:
        return budget.DECODE_BUDGET_BYTES
    multi_scan = jpeg_multi_scan(data, frame)
    if not jpeg_decodes_within_budget(frame, multi_scan):
        return size + _JPEG_STRUCTURE_COST  # checked by structure only, never decoded
    return size + jpeg_check_cost(frame, multi_scan)


async def check_cost_async(data: bytes, fmt: str | None, dims: tuple[int, int] | None) -> int:
    """:func:`check_cost`; a large JPEG's scan count (~1 ms a MiB) is taken off the loop."""
    if fmt == ImageFormat.JPG and len(data) > MIB:
        return await asyncio.to_thread(check_cost, data, fmt, dims)
    return check_cost(data, fmt, dims)


def check_webp_structure(data: bytes) -> None:
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


_JPEG_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
"""The next marker after entropy-coded data: FF then neither a stuffed 00 nor a restart marker
(fill FFs may come before it)."""


def check_jpeg_structure(data: bytes, frame: JpegFrame) -> None:
    """Walk a JPEG's segments after its frame header up to the end-of-image marker, without
    decoding: every segment within the file, every scan header well formed, its entropy-coded
    data ended by a marker, at least one scan, and the end-of-image marker there. Catches a file
    cut short anywhere (not corrupt coefficients: only a decode can). ValueError when broken."""
    pos, end, scans = frame.end, len(data), 0
    while True:
        if pos + 2 > end:
            raise ValueError(f"truncated JPEG: no end-of-image marker ({scans} scans)")
        if data[pos] != 0xFF:
            raise ValueError(f"broken JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > end:
            raise ValueError("truncated JPEG: a segment header runs past the end")
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            raise ValueError(f"truncated JPEG: segment {marker:02X} runs past the end")
        if marker == 0xDA:
            count = data[pos + 4] if length > 2 else 0
            if not 1 <= count <= len(frame.sampling) or length != 6 + 2 * count:
                raise ValueError(f"broken JPEG: scan header of {count} components")
            found = _JPEG_NEXT_MARKER.search(data, pos + 2 + length)
            if found is None:
                raise ValueError("truncated JPEG: scan data runs to the end")
            scans += 1
            pos = found.start()
            continue
        pos += 2 + length
    if not scans:
        raise ValueError("JPEG without scan data")


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


def check_png_stream(data: bytes) -> None:
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


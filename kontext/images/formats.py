"""Image formats by their content: the magic bytes of a file (never its name or content type), the
formats members may send, and the width and height read from a PNG, JPEG or WebP header without
Pillow."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kontext.vocab import ImageFormat

ACCEPTED_FORMATS: frozenset[ImageFormat] = frozenset(ImageFormat)
"""Formats :func:`inspect_image` accepts (as returned by :func:`sniff_format`: ``"jpg"``, never
``"jpeg"``; Pillow's names are :attr:`ImageFormat.pil`)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
                b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})

HEAD_BYTES = 256 * 1024
"""Header decisions (format, dimensions) are taken within this many first bytes of a file."""


def sniff_image(data: bytes) -> ImageFormat | None:
    """One of the :data:`ACCEPTED_FORMATS` (JPEG, PNG, WebP) from the magic bytes, else None:
    the one reading of an image's format, for member inputs and the API's results alike."""
    if data[:8] == PNG_SIGNATURE:
        return ImageFormat.PNG
    if data[:3] == b"\xff\xd8\xff":
        return ImageFormat.JPG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    return None


def sniff_format(data: bytes) -> str | None:
    """Name the format of ``data`` from its first bytes, or None when unknown.

    Returns an :class:`ImageFormat` (``"png"``, ``"jpg"``, ``"webp"``) for the accepted formats,
    and for better logs a name for common wrong files: ``"gif"``, ``"pdf"``, ``"bmp"``,
    ``"tiff"``, ``"ico"``, ``"heic"``, ``"avif"``, ``"mp4"`` (other ISO-BMFF), ``"jxl"``,
    ``"zip"``, ``"svg"``, ``"html"``, ``"xml"``, ``"json"``. Only :data:`ACCEPTED_FORMATS` pass :func:`inspect_image`.
    """
    head = bytes(data[:512])
    accepted = sniff_image(head)
    if accepted is not None:
        return accepted
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
class JpegFrame:
    """What a JPEG's frame header (SOF) says: size, components' sampling, progressive or not."""

    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (H, V) per component
    progressive: bool
    end: int  # offset just past the SOF segment


_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def jpeg_frame(data: bytes) -> JpegFrame | None:
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
            return JpegFrame(width, height, sampling, marker in _JPEG_PROGRESSIVE_SOF,
                              pos + 2 + length)
        pos += 2 + length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = jpeg_frame(data)
    return None if frame is None else (frame.width, frame.height)


"""Tests for kontext.images: sniffing, input checks, downloads, prompt/seed, fitting results."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from kontext import images
from kontext.errors import InputError
from kontext.images import (
    MIN_LIMIT_BYTES,
    SEED_MAX,
    FittedImage,
    ImageInfo,
    fetch_and_check,
    fit_to_limit,
    fit_to_limit_async,
    header_size,
    inspect_image,
    inspect_image_async,
    sniff_format,
    thumbnail_bytes,
    thumbnail_bytes_async,
    validate_prompt,
    validate_seed,
)

MB = 1024 * 1024
MAX_BYTES = 20 * MB
MAX_PIXELS = 40_000_000
REPO = Path(__file__).resolve().parents[2]


# --- helpers --------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A random image, made fast from os.urandom."""
    return Image.frombytes(mode, (width, height), os.urandom(width * height * len(mode)))


def gradient(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    img = Image.linear_gradient("L").resize((width, height))
    return img.convert(mode)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 30_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: ~100 KB on disk, ~1 GB decoded by Pillow."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (
        images._PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )


def check(data: bytes, **kwargs: object) -> ImageInfo:
    params: dict[str, object] = {"which": 1, "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}
    params.update(kwargs)
    return inspect_image(data, **params)  # type: ignore[arg-type]


def refused(data: bytes, key: str, **kwargs: object) -> InputError:
    with pytest.raises(InputError) as info:
        check(data, **kwargs)
    assert info.value.key == key, (info.value.key, info.value.detail)
    assert info.value.members_fault
    return info.value


@pytest.fixture(scope="module")
def noisy_png() -> bytes:
    """A 2000x1800 noise PNG of ~10.8 MB (made once per module)."""
    data = encode(noise(2000, 1800), "PNG")
    assert 9 * MB <= len(data) <= 12 * MB
    return data


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


# --- sniffing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (images._PNG_SIGNATURE + b"rest", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),
        (b"GIF89a\x01\x00", "gif"),
        (b"GIF87a\x01\x00", "gif"),
        (b"%PDF-1.7\n", "pdf"),
        (b"BM" + b"\x00" * 40, "bmp"),
        (b"II*\x00\x08\x00", "tiff"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "heic"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00", "heic"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00", "avif"),
        (b"\x00\x00\x00\x1cftypisom\x00\x00", "mp4"),
        (b"\xef\xbb\xbf  <?xml version='1.0'?><svg xmlns='x'>", "svg"),
        (b"<svg width='1'/>", "svg"),
        (b"\n<!DOCTYPE html><html><body>Not Found</body></html>", "html"),
        (b"<html><head>", "html"),
        (b'{"error": "expired"}', "json"),
        (b"PK\x03\x04", "zip"),
        (b"hello", None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


@pytest.mark.parametrize(
    ("fmt", "mode", "params"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True, "exif": b"Exif\x00\x00" + b"MM\x00*" + b"\x00" * 64}),
        ("JPEG", "L", {}),
        ("WEBP", "RGB", {}),  # VP8 (lossy)
        ("WEBP", "RGB", {"lossless": True}),  # VP8L
        ("WEBP", "RGBA", {}),  # VP8X (alpha)
    ],
)
def test_header_size_agrees_with_pillow(fmt: str, mode: str, params: dict[str, object]) -> None:
    data = encode(gradient(321, 123, mode), fmt, **params)
    assert header_size(data) == (321, 123)


# --- inspect_image ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "mode"),
    [("PNG", "png", "RGB"), ("PNG", "png", "P"), ("PNG", "png", "RGBA"), ("JPEG", "jpeg", "RGB"),
     ("JPEG", "jpeg", "CMYK"), ("WEBP", "webp", "RGB"), ("WEBP", "webp", "RGBA")],
)
def test_accepted_formats(fmt: str, name: str, mode: str) -> None:
    data = encode(gradient(200, 100, mode), fmt)
    assert check(data) == ImageInfo(format=name, width=200, height=100, size=len(data))


def test_large_jpeg_is_checked_at_reduced_scale() -> None:
    data = encode(noise(3000, 2000), "JPEG", quality=80)
    assert check(data) == ImageInfo("jpeg", 3000, 2000, len(data))
    err = refused(data[: len(data) - 5000], "input.unreadable")
    assert "truncated" in err.detail


async def test_inspect_image_async() -> None:
    data = encode(gradient(), "PNG")
    info = await inspect_image_async(data, which=2, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert (info.format, info.width, info.height) == ("png", 64, 48)


def test_zero_bytes_is_not_an_image() -> None:
    err = refused(b"", "input.not_image", which=2)
    assert err.params == {"which": 2}
    assert "Image 2" in err.user_message()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_unreadable(fmt: str) -> None:
    data = encode(noise(300, 200), fmt)
    refused(data[: len(data) // 2], "input.unreadable")


def test_truncated_just_before_the_end_is_unreadable() -> None:
    png = encode(noise(300, 200), "PNG")
    refused(png[:-12], "input.unreadable")  # IEND missing
    jpeg = encode(noise(300, 200), "JPEG")
    refused(jpeg[:-100], "input.unreadable")


def test_corrupt_png_chunk_is_unreadable() -> None:
    data = bytearray(encode(noise(100, 100), "PNG"))
    data[200] ^= 0xFF  # inside IDAT: the CRC no longer matches
    refused(bytes(data), "input.unreadable")


def test_header_only_files_are_unreadable() -> None:
    refused(images._PNG_SIGNATURE, "input.unreadable")
    refused(b"\xff\xd8\xff\xe0" + b"\x00" * 20, "input.unreadable")
    refused(b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "input.unreadable")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_over_the_decode_budget_structure_is_still_checked(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the decode budget (e.g. a 40 MP WebP, ~16 bytes a pixel in libwebp) nothing is
    decoded, yet truncated or malformed files are still refused."""
    monkeypatch.setattr(images, "DECODE_BUDGET_BYTES", 1000)
    data = encode(noise(300, 200), fmt)
    assert check(data) == ImageInfo(fmt.lower(), 300, 200, len(data))
    refused(data[: len(data) // 2], "input.unreadable")
    refused(data[:-12] if fmt == "PNG" else data[:-3], "input.unreadable")  # PNG: IEND missing
    if fmt == "WEBP":
        broken = data[:12] + b"XXXX" + data[16:]  # no image chunk left
        refused(broken, "input.unreadable")
        refused(data[:16] + b"\xff\xff\xff\x00" + data[20:], "input.unreadable")  # chunk overruns
    with pytest.raises(ValueError):
        thumbnail_bytes(data)


def test_inspect_memory_is_bounded_by_the_budget() -> None:
    # a 40 MP RGBA PNG is the most a single decode may take
    assert images._decode_cost("png", 8000, 5000) <= images.DECODE_BUDGET_BYTES
    assert images._decode_cost("webp", 8000, 5000) > images.DECODE_BUDGET_BYTES
    assert images._decode_cost("jpeg", 8000, 5000) == 0  # decoded at 1/8 scale


def test_too_large_bytes() -> None:
    data = encode(gradient(), "PNG")
    err = refused(data, "input.too_large", max_bytes=len(data) - 1)
    assert err.params["limit_mb"] == f"{(len(data) - 1) / MB:.1f}"
    big = images._PNG_SIGNATURE + b"\x00" * (20 * MB + 50_000)
    err = refused(big, "input.too_large")
    assert err.params == {"which": 1, "size_mb": "20.1", "limit_mb": "20.0"}
    assert err.user_message() == "Image 1 is 20.1 MB; the limit is 20.0 MB."


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (encode(gradient(), "GIF"), "gif"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n", "pdf"),
        (encode(gradient(), "BMP"), "bmp"),
        (encode(gradient(), "TIFF"), "tiff"),
        (b"<!DOCTYPE html>\n<html><body><h1>403 Forbidden</h1></body></html>", "html"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "svg"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100, "heic"),
        (os.urandom(2048).replace(b"\xff", b"\x00"), "unknown"),
    ],
)
def test_wrong_types_are_not_images(data: bytes, named: str) -> None:
    """Whatever the file is called (e.g. image.png), only the content counts."""
    err = refused(data, "input.not_image")
    assert named in err.detail
    assert "PNG, JPEG or WebP" in err.user_message()


def test_decompression_bomb_refused_from_header_without_allocating(bomb: bytes) -> None:
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        err = refused(bomb, "input.too_many_pixels")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * MB
    assert err.params == {"which": 1, "width": 30_000, "height": 30_000, "limit_mp": "40.0"}


def test_decompression_bomb_in_a_fresh_process_stays_small(bomb: bytes, tmp_path: Path) -> None:
    """tracemalloc does not see Pillow's C buffers: measure a fresh process's peak RSS instead.

    The peak is read from ``/proc/self/status`` (VmHWM, reset by exec) rather than
    ``ru_maxrss``, which Linux carries over from the (large) pytest parent through fork+exec.
    """
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    script = textwrap.dedent(
        f"""
        import re, sys
        from kontext.errors import InputError
        from kontext.images import inspect_image
        data = open({str(path)!r}, "rb").read()
        try:
            inspect_image(data, which=1, max_bytes=2**30, max_pixels=2_000_000_000)
        except InputError as exc:
            status = open("/proc/self/status").read()
            print(exc.key, re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
        check=True,
    ).stdout.split()
    assert out[0] == "input.too_many_pixels"
    assert int(out[1]) < 150 * 1024  # KiB: far below the ~900 MB a decode would take


def test_pillow_bomb_guard_is_honoured_and_never_crashes(
    bomb: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # even with a huge configured limit, Pillow's MAX_IMAGE_PIXELS caps it
    err = refused(bomb, "input.too_many_pixels", max_pixels=2_000_000_000)
    assert err.params["limit_mp"] == f"{Image.MAX_IMAGE_PIXELS / 1e6:.1f}"
    # when our header reader cannot read the size, Pillow's DecompressionBombError is handled
    monkeypatch.setattr(images, "header_size", lambda data, fmt=None: None)
    err = refused(bomb, "input.too_many_pixels", max_pixels=2_000_000_000)
    assert "bomb" in err.detail


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_is_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(images, "header_size", lambda data, fmt=None: None)
    data = encode(gradient(150, 100), "PNG")  # 15,000 px: in Pillow's warning zone
    refused(data, "input.too_many_pixels", max_pixels=MAX_PIXELS)


def test_too_many_pixels_real_image() -> None:
    data = encode(Image.new("1", (8000, 6000)), "PNG")  # 48 MP, a few KB
    err = refused(data, "input.too_many_pixels")
    assert err.params == {"which": 1, "width": 8000, "height": 6000, "limit_mp": "40.0"}
    assert err.user_message() == "Image 1 is 8000×6000 pixels; the limit is 40.0 megapixels."
    # and within a larger limit it passes (decoded, bounded by that limit)
    assert check(data, max_pixels=50_000_000).width == 8000


def test_too_small() -> None:
    err = refused(encode(gradient(10, 300), "PNG"), "input.too_small")
    assert err.params == {"which": 1, "width": 10, "height": 300, "min_side": 16}
    assert check(encode(gradient(10, 300), "PNG"), min_side=8).width == 10


# --- fetch_and_check ---------------------------------------------------------------------------------


@dataclass
class Server:
    """A tiny local CDN: counts requests, serves files, streams forever, fails on demand."""

    server: TestServer
    files: dict[str, bytes] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    streamed: int = 0
    stream_ended: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def cdn() -> AsyncIterator[Server]:
    state: Server

    async def file(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        name = request.match_info["name"]
        if name not in state.files:
            raise web.HTTPNotFound(text="<html>Not Found</html>", content_type="text/html")
        return web.Response(body=state.files[name], content_type="image/png")

    async def endless(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        chunk = images._PNG_SIGNATURE + b"\x00" * (64 * 1024 - 8)
        try:
            while state.streamed < 200 * MB:
                await resp.write(chunk)
                state.streamed += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            state.stream_ended.set()
        return resp

    async def lying_length(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Length": str(500 * MB)})
        await resp.prepare(request)
        return resp

    async def status(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def slow(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        await asyncio.sleep(5)
        return web.Response(body=b"late")

    app = web.Application()
    app.router.add_get("/files/{name}", file)
    app.router.add_get("/endless", endless)
    app.router.add_get("/lying", lying_length)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/slow", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state = Server(server)
    try:
        yield state
    finally:
        await server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[bytes, ImageInfo]:
    params: dict[str, object] = {
        "which": 1, "declared_size": None, "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS,
    }
    params.update(kwargs)
    return await fetch_and_check(session, url, **params)  # type: ignore[arg-type]


async def fetch_refused(
    session: aiohttp.ClientSession, url: str, key: str, **kwargs: object
) -> InputError:
    with pytest.raises(InputError) as info:
        await fetch(session, url, **kwargs)
    assert info.value.key == key, (info.value.key, info.value.detail)
    return info.value


async def test_fetch_ok(cdn: Server, session: aiohttp.ClientSession) -> None:
    data = encode(gradient(100, 80), "JPEG")
    cdn.files["a.jpg"] = data
    got, info = await fetch(session, cdn.url("/files/a.jpg?ex=1&is=2&hm=3"), declared_size=len(data))
    assert got == data
    assert info == ImageInfo("jpeg", 100, 80, len(data))


async def test_fetch_refuses_declared_size_without_downloading(
    cdn: Server, session: aiohttp.ClientSession
) -> None:
    cdn.files["big.png"] = b"x"
    err = await fetch_refused(
        session, cdn.url("/files/big.png"), "input.too_large", declared_size=MAX_BYTES + 1, which=2
    )
    assert err.params["which"] == 2
    assert cdn.hits == []


async def test_fetch_refuses_content_length_over_limit(
    cdn: Server, session: aiohttp.ClientSession
) -> None:
    err = await fetch_refused(session, cdn.url("/lying"), "input.too_large", declared_size=1000)
    assert err.params["size_mb"] == "500.0"


async def test_fetch_stops_reading_a_stream_over_the_limit(
    cdn: Server, session: aiohttp.ClientSession
) -> None:
    await fetch_refused(
        session, cdn.url("/endless"), "input.too_large", declared_size=1000, max_bytes=1 * MB
    )
    await asyncio.wait_for(cdn.stream_ended.wait(), 5)
    assert cdn.streamed < 32 * MB  # socket buffers at most, never the 200 MB on offer


@pytest.mark.parametrize("code", [404, 403, 500])
async def test_fetch_bad_status_is_fetch_failed(
    cdn: Server, session: aiohttp.ClientSession, code: int
) -> None:
    err = await fetch_refused(session, cdn.url(f"/status/{code}"), "input.fetch_failed")
    assert str(code) in err.detail
    assert "could not be downloaded" in err.user_message()


async def test_fetch_network_failures(cdn: Server, session: aiohttp.ClientSession) -> None:
    await fetch_refused(session, cdn.url("/slow"), "input.fetch_failed", timeout_s=0.2)
    port = cdn.server.port
    await cdn.server.close()
    await fetch_refused(session, f"http://127.0.0.1:{port}/files/x", "input.fetch_failed")
    await fetch_refused(session, "not a url", "input.fetch_failed")


async def test_fetch_html_page_is_not_an_image(cdn: Server, session: aiohttp.ClientSession) -> None:
    cdn.files["expired.png"] = b"<!doctype html><html><body>This content is no longer available."
    err = await fetch_refused(session, cdn.url("/files/expired.png"), "input.not_image")
    assert "html" in err.detail


async def test_fetch_checks_the_content(cdn: Server, session: aiohttp.ClientSession) -> None:
    data = encode(noise(100, 100), "PNG")
    cdn.files["cut.png"] = data[:-500]
    await fetch_refused(session, cdn.url("/files/cut.png"), "input.unreadable")


# --- prompt and seed ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t \n", "\x00\x01"])
def test_prompt_empty(prompt: str) -> None:
    with pytest.raises(InputError) as info:
        validate_prompt(prompt)
    assert info.value.key == "input.prompt_empty"


def test_prompt_length_limit() -> None:
    assert validate_prompt("a" * 1000) == "a" * 1000
    assert validate_prompt("  " + "a" * 1000 + "\n ") == "a" * 1000  # counted after trimming
    with pytest.raises(InputError) as info:
        validate_prompt("a" * 1001)
    assert info.value.key == "input.prompt_too_long"
    assert info.value.params == {"length": 1001, "limit": 1000}
    assert validate_prompt("abc", limit=3) == "abc"


def test_prompt_counts_code_points_not_bytes() -> None:
    emoji = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # family: 3 emoji + 2 joiners
    arabic = "\u0627\u062c\u0639\u0644 \u0627\u0644\u0642\u0637\u0629 \u200f\u062a\u0637\u064a\u0631"
    text = (emoji + arabic) * 30
    assert len(text.encode()) > 1000
    assert validate_prompt(text) == text
    assert validate_prompt("🐱" * 1000) == "🐱" * 1000
    with pytest.raises(InputError):
        validate_prompt("🐱" * 1001)


def test_prompt_control_characters_and_newlines() -> None:
    raw = "\x00 put\x07 the cat\x1b[31m\r\non\tthe moon\x7f\x85\n\n\n\n\nnow  \n \n \n"
    assert validate_prompt(raw) == "put the cat[31m\non\tthe moon\n\nnow"
    assert validate_prompt("a\n\nb") == "a\n\nb"
    assert validate_prompt("a\r\rb") == "a\n\nb"


def test_seed() -> None:
    for _ in range(20):
        assert 0 <= validate_seed(None) <= SEED_MAX
    assert validate_seed(None, rng=lambda n: n - 1) == SEED_MAX
    assert validate_seed(None, rng=lambda n: 0) == 0
    assert validate_seed(0) == 0
    assert validate_seed(SEED_MAX) == 4294967295
    for bad in (-1, 2**32, True):
        with pytest.raises(InputError) as info:
            validate_seed(bad)
        assert info.value.key == "input.seed_range"


# --- fit_to_limit --------------------------------------------------------------------------------


def decode(fitted: FittedImage) -> Image.Image:
    img = Image.open(io.BytesIO(fitted.data))
    img.load()
    assert img.size == (fitted.width, fitted.height)
    assert {"png": "PNG", "jpg": "JPEG"}[fitted.format] == img.format
    return img


def test_fit_small_passes_untouched() -> None:
    data = encode(gradient(300, 200), "PNG")
    fitted = fit_to_limit(data, output_format="png", limit_bytes=10 * MB)
    assert fitted.data is data
    assert (fitted.format, fitted.filename_ext, fitted.width, fitted.height) == ("png", "png", 300, 200)
    assert (fitted.reencoded, fitted.scale) == (False, 1.0)
    jpeg = encode(gradient(300, 200), "JPEG")
    fitted = fit_to_limit(jpeg, output_format="jpg", limit_bytes=len(jpeg))
    assert fitted.data is jpeg and fitted.format == "jpg"


@pytest.mark.parametrize("limit", [2 * MB, 10 * MB, 8 * 1000 * 1000])
def test_fit_large_noisy_png(
    noisy_png: bytes, limit: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kontext.images"):
        fitted = fit_to_limit(noisy_png, output_format="png", limit_bytes=limit)
    assert len(fitted.data) <= limit
    assert fitted.reencoded and fitted.format == "jpg" and fitted.filename_ext == "jpg"
    img = decode(fitted)
    assert img.mode == "RGB"
    assert abs(img.width / img.height - 2000 / 1800) < 0.01 * (2000 / 1800)
    assert abs(fitted.width - 2000 * fitted.scale) <= 1
    record = next(r for r in caplog.records if "re-encoded" in r.getMessage())
    message = record.getMessage()
    assert str(len(noisy_png)) in message and str(len(fitted.data)) in message
    encodes = int(re.search(r"(\d+) encode", message).group(1))  # type: ignore[union-attr]
    assert encodes <= 6


def test_fit_png_that_only_needs_optimizing() -> None:
    img = gradient(800, 600)
    plain = encode(img, "PNG", compress_level=0)
    optimized = encode(img, "PNG", optimize=True)
    assert len(optimized) < len(plain) / 2
    fitted = fit_to_limit(plain, output_format="png", limit_bytes=int(len(plain) * 0.9))
    assert fitted.format == "png" and fitted.reencoded and fitted.scale == 1.0
    assert decode(fitted).size == (800, 600)


def test_fit_rgba_is_flattened_on_white() -> None:
    img = noise(900, 700, "RGBA")
    img.putalpha(Image.new("L", img.size, 255))
    img.paste((0, 0, 0, 0), (0, 0, 300, 700))  # left third fully transparent
    data = encode(img, "PNG")
    fitted = fit_to_limit(data, output_format="png", limit_bytes=len(data) // 3)
    out = decode(fitted)
    assert len(fitted.data) <= len(data) // 3
    assert out.mode == "RGB" and fitted.format == "jpg"
    r, g, b = out.getpixel((10, out.height // 2))  # type: ignore[misc]
    assert min(r, g, b) > 240


def test_fit_palette_and_grey_inputs() -> None:
    pal = noise(500, 500).quantize(256)
    pal.info["transparency"] = 0
    for img in (pal, noise(500, 500, "L"), noise(500, 500, "LA")):
        data = encode(img, "PNG")
        fitted = fit_to_limit(data, output_format="jpg", limit_bytes=30_000)
        assert len(fitted.data) <= 30_000
        assert decode(fitted).mode == "RGB"


@pytest.mark.parametrize("limit", [20_000, 10_000, MIN_LIMIT_BYTES])
def test_fit_tiny_limits(noisy_png: bytes, limit: int) -> None:
    fitted = fit_to_limit(noisy_png, output_format="png", limit_bytes=limit)
    assert len(fitted.data) <= limit
    decode(fitted)


def test_fit_refuses_impossible_limit() -> None:
    data = encode(noise(100, 100), "PNG")
    with pytest.raises(ValueError):
        fit_to_limit(data, output_format="png", limit_bytes=MIN_LIMIT_BYTES - 1)


def test_fit_keeps_exif_orientation_and_drops_exif() -> None:
    stored = Image.new("RGB", (600, 300), (220, 0, 0))
    stored.paste((0, 0, 220), (300, 0, 600, 300))  # left red, right blue
    stored = Image.blend(stored, noise(600, 300), 0.15)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    exif[0x010F] = "SecretCam"
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes(), comment=b"SecretNote")
    fitted = fit_to_limit(data, output_format="jpg", limit_bytes=len(data) // 2)
    out = decode(fitted)
    assert (out.width, out.height) == (300, 600)  # upright: portrait
    top = out.getpixel((150, 60))
    bottom = out.getpixel((150, 540))
    assert top[0] > top[2] + 60  # type: ignore[index]  # red on top
    assert bottom[2] > bottom[0] + 60  # type: ignore[index]  # blue at the bottom
    assert dict(out.getexif()) == {}
    assert b"SecretCam" not in fitted.data and b"SecretNote" not in fitted.data


def test_fit_png_drops_text_metadata() -> None:
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Comment", "SecretNote")
    img = gradient(800, 600)
    plain = encode(img, "PNG", compress_level=0, pnginfo=meta)
    fitted = fit_to_limit(plain, output_format="png", limit_bytes=int(len(plain) * 0.9))
    assert fitted.format == "png" and b"SecretNote" not in fitted.data


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(16, 700),
    height=st.integers(16, 700),
    mode=st.sampled_from(["RGB", "RGBA", "L"]),
    output_format=st.sampled_from(["jpg", "png"]),
    fraction=st.floats(0.001, 1.2),
)
def test_fit_always_fits(
    width: int, height: int, mode: str, output_format: str, fraction: float
) -> None:
    data = encode(noise(width, height, mode), "PNG")
    limit = max(MIN_LIMIT_BYTES, int(len(data) * fraction))
    fitted = fit_to_limit(data, output_format=output_format, limit_bytes=limit)
    assert len(fitted.data) <= limit
    if len(data) <= limit:
        assert fitted.data is data
    out = decode(fitted)
    if fitted.reencoded and min(out.size) > 20:
        assert abs(out.width / out.height - width / height) < 0.02 * width / height


async def test_async_wrappers(noisy_png: bytes) -> None:
    fitted = await fit_to_limit_async(noisy_png, output_format="png", limit_bytes=2 * MB)
    assert len(fitted.data) <= 2 * MB
    thumb = await thumbnail_bytes_async(noisy_png, 128)
    with Image.open(io.BytesIO(thumb)) as img:
        assert img.format == "JPEG" and max(img.size) == 128


def test_thumbnail_bytes() -> None:
    img = noise(1200, 400, "RGBA")
    thumb = thumbnail_bytes(encode(img, "PNG"))
    with Image.open(io.BytesIO(thumb)) as out:
        assert out.format == "JPEG" and out.size == (256, 85) and out.mode == "RGB"
    jpeg = encode(noise(2000, 1000), "JPEG", exif=_exif_orientation(6))
    with Image.open(io.BytesIO(thumbnail_bytes(jpeg, 100))) as out:
        assert out.size == (50, 100)  # upright
    assert len(thumbnail_bytes(jpeg)) < 100_000
    with pytest.raises(OSError):
        thumbnail_bytes(b"<html>")


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def test_locale_has_every_key_used() -> None:
    source = (REPO / "kontext" / "images.py").read_text()
    keys = set(re.findall(r'key="(input\.[a-z_]+)"', source))
    catalog = json.loads((REPO / "kontext" / "locales" / "en.json").read_text())
    assert keys and keys <= set(catalog)

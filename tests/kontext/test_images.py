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
import threading
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

from kontext import images, spool
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
from kontext.spool import SPOOL_BYTES, ResultFile, open_count
from tests.kontext.budgets import PeakBudget

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
        images.formats.PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
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
        (images.formats.PNG_SIGNATURE + b"rest", "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpg"),
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
    [("PNG", "png", "RGB"), ("PNG", "png", "P"), ("PNG", "png", "RGBA"), ("JPEG", "jpg", "RGB"),
     ("JPEG", "jpg", "CMYK"), ("WEBP", "webp", "RGB"), ("WEBP", "webp", "RGBA")],
)
def test_accepted_formats(fmt: str, name: str, mode: str) -> None:
    data = encode(gradient(200, 100, mode), fmt)
    assert check(data) == ImageInfo(format=name, width=200, height=100, size=len(data))


def test_large_jpeg_is_checked_at_reduced_scale() -> None:
    data = encode(noise(3000, 2000), "JPEG", quality=80)
    assert check(data) == ImageInfo("jpg", 3000, 2000, len(data))
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
    refused(images.formats.PNG_SIGNATURE, "input.unreadable")
    refused(b"\xff\xd8\xff\xe0" + b"\x00" * 20, "input.unreadable")
    refused(b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "input.unreadable")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_over_the_decode_budget_structure_is_still_checked(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the decode budget (e.g. a 40 MP WebP, ~16 bytes a pixel in libwebp) nothing is
    decoded, yet truncated or malformed files are still refused."""
    monkeypatch.setattr(images.budget, "DECODE_BUDGET_BYTES", 1000)
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
    assert images.cost.decode_cost("png", 8000, 5000) <= images.DECODE_BUDGET_BYTES
    assert images.cost.decode_cost("webp", 8000, 5000) > images.DECODE_BUDGET_BYTES
    assert images.cost.decode_cost("jpg", 8000, 5000) == 0  # decoded at 1/8 scale


def test_too_large_bytes() -> None:
    data = encode(gradient(), "PNG")
    err = refused(data, "input.too_large", max_bytes=len(data) - 1)
    assert err.params["limit_mb"] == f"{(len(data) - 1) / MB:.1f}"
    big = images.formats.PNG_SIGNATURE + b"\x00" * (20 * MB + 50_000)
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
    monkeypatch.setattr(images.checks, "header_size", lambda data, fmt=None: None)
    err = refused(bomb, "input.too_many_pixels", max_pixels=2_000_000_000)
    assert "bomb" in err.detail


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_is_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(images.checks, "header_size", lambda data, fmt=None: None)
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
        chunk = images.formats.PNG_SIGNATURE + b"\x00" * (64 * 1024 - 8)
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

    async def redirect(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        raise web.HTTPFound(request.query.get("to", "/redirect"))  # no target: a loop

    async def header_then_forever(request: web.Request) -> web.StreamResponse:
        """The first bytes of a file (state.files["head"]), then zeros up to 19 MB."""
        state.hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        try:
            await resp.write(state.files["head"])
            while state.streamed < 19 * MB:
                await resp.write(b"\x00" * 64 * 1024)
                state.streamed += 64 * 1024
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            state.stream_ended.set()
        return resp

    app = web.Application()
    app.router.add_get("/files/{name}", file)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/head-then-forever", header_then_forever)
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
    if "allowed_hosts" not in params:
        params["allowed_hosts"] = images.input_hosts(url)  # the local CDN's 127.0.0.1:port
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
    assert info == ImageInfo("jpg", 100, 80, len(data))


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
    img = Image.open(fitted.open())  # bytes, or a re-encoded copy past SPOOL_BYTES in a file
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
    assert fitted.size <= limit
    assert fitted.reencoded and fitted.format == "jpg" and fitted.filename_ext == "jpg"
    img = decode(fitted)
    assert img.mode == "RGB"
    assert abs(img.width / img.height - 2000 / 1800) < 0.01 * (2000 / 1800)
    assert abs(fitted.width - 2000 * fitted.scale) <= 1
    record = next(r for r in caplog.records if "re-encoded" in r.getMessage())
    message = record.getMessage()
    assert str(len(noisy_png)) in message and str(fitted.size) in message
    encodes = int(re.search(r"(\d+) encode", message).group(1))  # type: ignore[union-attr]
    assert encodes <= 6
    assert isinstance(fitted.body, ResultFile) == (fitted.size > SPOOL_BYTES)
    fitted.close()


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
    assert fitted.size <= len(data) // 3
    assert out.mode == "RGB" and fitted.format == "jpg"
    r, g, b = out.getpixel((10, out.height // 2))  # type: ignore[misc]
    assert min(r, g, b) > 240


def test_fit_palette_and_grey_inputs() -> None:
    pal = noise(500, 500).quantize(256)
    pal.info["transparency"] = 0
    for img in (pal, noise(500, 500, "L"), noise(500, 500, "LA")):
        data = encode(img, "PNG")
        fitted = fit_to_limit(data, output_format="jpg", limit_bytes=30_000)
        assert fitted.size <= 30_000
        assert decode(fitted).mode == "RGB"


@pytest.mark.parametrize("limit", [20_000, 10_000, MIN_LIMIT_BYTES])
def test_fit_tiny_limits(noisy_png: bytes, limit: int) -> None:
    fitted = fit_to_limit(noisy_png, output_format="png", limit_bytes=limit)
    assert fitted.size <= limit
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
    assert fitted.size <= limit
    if len(data) <= limit:
        assert fitted.data is data
    out = decode(fitted)
    if fitted.reencoded and min(out.size) > 20:
        assert abs(out.width / out.height - width / height) < 0.02 * width / height


async def test_async_wrappers(noisy_png: bytes) -> None:
    fitted = await fit_to_limit_async(noisy_png, output_format="png", limit_bytes=2 * MB)
    assert fitted.size <= 2 * MB
    fitted.close()
    thumb = await thumbnail_bytes_async(noisy_png, 128)
    with Image.open(io.BytesIO(thumb)) as img:
        assert img.format == "JPEG" and max(img.size) == 128


# --- fitting results held in a temporary file -------------------------------------------------------


@pytest.fixture
def spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[bytes], ResultFile]]:
    """Makes ResultFiles in ``tmp_path``; at the end every one of them (and every file the code
    under test made) must be closed: no descriptor left on the directory."""
    monkeypatch.setattr(spool, "SPOOL_DIR", str(tmp_path))
    before = open_count()
    made: list[ResultFile] = []

    def make(data: bytes) -> ResultFile:
        made.append(ResultFile.from_bytes(data))
        return made[-1]

    yield make  # type: ignore[misc]
    for file in made:
        file.close()
    assert open_count() == before
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    assert not [f for f in fds if f.startswith(str(tmp_path))]


@pytest.fixture
def no_whole_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """ResultFile.read_bytes (the whole file in memory) fails; ``stream`` calls are recorded."""
    streams: list[str] = []
    original = ResultFile.stream

    def read_bytes(self: ResultFile) -> bytes:
        raise AssertionError("a spooled result was read into memory")

    def stream(self: ResultFile) -> io.BufferedIOBase:
        streams.append(threading.current_thread().name)
        return original(self)  # type: ignore[return-value]

    monkeypatch.setattr(ResultFile, "read_bytes", read_bytes)
    monkeypatch.setattr(ResultFile, "stream", stream)
    return streams


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_a_spooled_result_that_fits_is_passed_through_unread(
    fmt: str, spooled: Callable[[bytes], ResultFile], no_whole_read: list[str]
) -> None:
    data = encode(noise(900, 700), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    file = spooled(data)
    fitted = await fit_to_limit_async(file, output_format="jpg", limit_bytes=10 * MB)
    assert fitted.body is file and fitted.file is file and not fitted.reencoded
    assert (fitted.width, fitted.height, fitted.size) == (900, 700, len(data))
    assert fitted.format == {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    assert no_whole_read == []  # the header was read from the bytes kept in memory
    with pytest.raises(TypeError):
        fitted.data  # noqa: B018 - never the whole file in memory by accident
    fitted.close()
    assert file.closed


def test_a_spooled_jpeg_whose_header_is_far_in_reads_only_the_header(
    spooled: Callable[[bytes], ResultFile], no_whole_read: list[str]
) -> None:
    """A JPEG with long comment segments before its frame header: the dimensions come from a
    lazy Pillow open of the file (which stops at the header), not from reading the file."""
    jpeg = encode(noise(640, 480), "JPEG")
    pad = b"".join(b"\xff\xfe" + struct.pack(">H", 65535) + b"\0" * 65533 for _ in range(4))
    fitted = fit_to_limit(spooled(jpeg[:2] + pad + jpeg[2:]), output_format="jpg",
                          limit_bytes=10 * MB)
    assert (fitted.width, fitted.height, fitted.reencoded) == (640, 480, False)
    assert len(no_whole_read) == 1


async def test_a_spooled_result_too_big_is_decoded_from_the_file_within_the_budget(
    noisy_png: bytes, spooled: Callable[[bytes], ResultFile], no_whole_read: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = PeakBudget(1000 * MB)
    monkeypatch.setattr(images.budget, "DECODE_BUDGET", budget)
    file = spooled(noisy_png)
    fitted = await fit_to_limit_async(file, output_format="png", limit_bytes=2 * MB)
    assert fitted.reencoded and fitted.size <= 2 * MB and fitted.format == "jpg"
    assert no_whole_read and all(name.startswith("kontext-fit") for name in no_whole_read)
    # decoded from the file: 2000x1800 RGBA-sized decode and copies, plus the outputs
    assert budget.peak_in_use == images.fit._fit_cost(noisy_png[:65536], 2 * MB)
    assert budget.peak_in_use >= 2000 * 1800 * 4 and budget.in_use == 0
    # past SPOOL_BYTES the re-encoded copy is a new file of its own; the source stays open
    assert isinstance(fitted.body, ResultFile) and fitted.body is not file and not file.closed
    assert open_count() >= 2
    with Image.open(fitted.open()) as img:
        assert img.format == "JPEG" and img.size == (fitted.width, fitted.height)
    fitted.close()


async def test_big_fits_wait_for_the_decode_budget(
    noisy_png: bytes, spooled: Callable[[bytes], ResultFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = PeakBudget(images.fit._fit_cost(noisy_png, 2 * MB) + 1)  # room for one
    monkeypatch.setattr(images.budget, "DECODE_BUDGET", budget)
    fits = await asyncio.gather(*(
        fit_to_limit_async(spooled(noisy_png), output_format="png", limit_bytes=2 * MB)
        for _ in range(3)
    ))
    assert budget.peak_holders == 1 and budget.in_use == 0
    for fitted in fits:
        assert fitted.size <= 2 * MB
        fitted.close()


async def test_a_cancelled_fit_closes_its_new_file(
    noisy_png: bytes, spooled: Callable[[bytes], ResultFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller stops waiting while the thread re-encodes: the file it makes is closed (by
    the pool's callback, not by the garbage collector's backstop)."""
    monkeypatch.setattr(ResultFile, "__del__", lambda self: None)
    file = spooled(noisy_png)
    before = open_count()
    task = asyncio.create_task(fit_to_limit_async(file, output_format="png", limit_bytes=2 * MB))
    await asyncio.sleep(0.05)  # running in its thread by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(300):  # the thread finishes on its own
        if images.budget.DECODE_BUDGET.in_use == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    assert open_count() == before


def test_fitted_image_of_bytes_keeps_data(noisy_png: bytes) -> None:
    data = encode(gradient(300, 200), "PNG")
    fitted = fit_to_limit(data, output_format="png", limit_bytes=10 * MB)
    assert fitted.data is data and fitted.file is None and fitted.size == len(data)
    assert fitted.open().read() == data
    fitted.close()  # nothing to close


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
    source = "".join(p.read_text() for p in (REPO / "kontext" / "images").glob("*.py"))
    keys = set(re.findall(r'key="(input\.[a-z_]+)"', source))
    catalog = json.loads((REPO / "kontext" / "locales" / "en.json").read_text())
    assert keys and keys <= set(catalog)


# --- issue 10: intake that costs nothing until it may ---------------------------------------------

SIDE_40MP = 6300  # 39.7 MP: under MAX_PIXELS, ~130 KB of PNG, 159 MB as a Pillow RGBA decode


@pytest.fixture(scope="module")
def png_40mp() -> bytes:
    data = encode(Image.new("RGB", (SIDE_40MP, SIDE_40MP), (200, 30, 30)), "PNG")
    assert len(data) < 300_000
    return data


@pytest.fixture
def no_pillow(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any Pillow open, load or check-pool job fails the test (and is recorded)."""
    calls: list[str] = []

    def forbidden(name: str) -> object:
        def call(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} called")
        return call

    monkeypatch.setattr(Image, "open", forbidden("Image.open"))
    monkeypatch.setattr(images.budget, "_check_pool", forbidden("check pool"))
    return calls


def _with_jpeg_size(width: int, height: int) -> bytes:
    data = bytearray(encode(gradient(100, 80), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _with_webp_canvas(width: int, height: int) -> bytes:
    img = gradient(100, 80, "RGBA")
    img.putalpha(128)  # real transparency: written as VP8X + ALPH
    data = bytearray(encode(img, "WEBP"))
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: encode(Image.new("1", (8000, 6000)), "PNG"), "input.too_many_pixels"),
        (lambda: _with_jpeg_size(8000, 6000), "input.too_many_pixels"),
        (lambda: _with_webp_canvas(8000, 6000), "input.too_many_pixels"),
        (lambda: encode(Image.new("1", (12, 5000)), "PNG"), "input.too_small"),
        (lambda: _with_jpeg_size(10, 300), "input.too_small"),
        (lambda: encode(gradient(), "GIF"), "input.not_image"),
    ],
    ids=["png-ihdr", "jpeg-sof", "webp-vp8x", "png-small", "jpeg-small", "gif"],
)
async def test_header_refusal_opens_nothing(make: Callable[[], bytes], key: str,
                                            no_pillow: list[str]) -> None:
    data = make()
    with pytest.raises(InputError) as info:
        await inspect_image_async(data, which=2, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert info.value.key == key
    assert no_pillow == []  # decided from the header: no Pillow, no thread, no budget


async def test_bomb_png_over_the_limit_is_refused_without_decoding(
    png_40mp: bytes, no_pillow: list[str]
) -> None:
    with pytest.raises(InputError) as info:
        await inspect_image_async(png_40mp, which=1, max_bytes=MAX_BYTES, max_pixels=20_000_000)
    assert info.value.params == {"which": 1, "width": SIDE_40MP, "height": SIDE_40MP,
                                 "limit_mp": "20.0"}
    assert no_pillow == []


def test_bomb_png_within_the_limit_is_checked_without_a_pixel_buffer(
    png_40mp: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 130 KB PNG of 39.7 MP passes, checked by content without Pillow's 159 MB decode."""
    def no_load(self: Image.Image) -> None:
        raise AssertionError("full decode")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    assert check(png_40mp) == ImageInfo("png", SIDE_40MP, SIDE_40MP, len(png_40mp))
    # yet the content really is decoded: a change inside the image data is refused
    idat = png_40mp.index(b"IDAT")
    broken = bytearray(png_40mp)
    broken[idat + 40] ^= 0x55
    body = broken[idat : idat + 4 + int.from_bytes(broken[idat - 4 : idat], "big")]
    crc = idat + len(body)
    broken[crc : crc + 4] = struct.pack(">I", zlib.crc32(body))  # a valid CRC: zlib must see it
    refused(bytes(broken), "input.unreadable")


def _raw_png(width: int, height: int, depth: int, colour: int, interlace: int, *,
             filters: Callable[[int], int] = lambda i: i % 5, cut: int = 0) -> bytes:
    rows = [
        bytes([filters(i)]) + os.urandom(length - 1)
        for count, length in images.cost._png_rows(width, height, depth, colour, interlace)
        for i in range(count)
    ]
    raw = b"".join(rows)
    raw = raw[: len(raw) - cut]
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    plte = png_chunk(b"PLTE", bytes(range(256)) * 3) if colour == 3 else b""
    return (images.formats.PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + plte
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def _pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


@pytest.mark.parametrize(("colour", "depth"), [(0, 1), (0, 4), (0, 16), (2, 8), (2, 16), (3, 2),
                                               (3, 8), (4, 8), (6, 8), (6, 16)])
@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("flaw", ["none", "short", "bad-filter"])
def test_png_stream_check_agrees_with_pillow(colour: int, depth: int, interlace: int,
                                             flaw: str) -> None:
    data = _raw_png(
        37, 21, depth, colour, interlace, cut=1 if flaw == "short" else 0,
        filters=(lambda i: 5 if i == 3 else 0) if flaw == "bad-filter" else (lambda i: i % 5),
    )
    assert _pillow_decodes(data) == (flaw == "none")
    if flaw == "none":
        assert check(data, min_side=1).format == "png"
    else:
        refused(data, "input.unreadable", min_side=1)


def test_jpeg_check_cost_counts_the_coefficients_of_progressive_files() -> None:
    """Measured: a 40 MP progressive JPEG holds 117 MiB (4:2:0) / 232 MiB (4:4:4) in libjpeg
    even at 1/8 scale; baseline ones a few MiB."""
    img = noise(800, 600)
    for params, per_pixel in [({}, (0.0, 0.5)), ({"progressive": True}, (2.9, 3.2)),
                              ({"progressive": True, "subsampling": 0}, (5.9, 6.2))]:
        data = encode(img, "JPEG", **params)
        frame = images.formats.jpeg_frame(data)
        assert frame is not None
        cost = images.cost.jpeg_check_cost(frame, images.cost.jpeg_multi_scan(data, frame))
        if params:  # beside the coefficients, libjpeg's state and the reduced output
            cost -= images.cost.JPEG_MULTI_SCAN_OVERHEAD
        assert per_pixel[0] <= cost / (800 * 600) <= per_pixel[1], params


# --- the shared budget ------------------------------------------------------------------------------


async def _until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` (the budget enqueues before its first await)."""
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never met")


async def test_budget_is_first_come_first_served_and_oversize_runs_alone() -> None:
    budget = PeakBudget(100)
    first = await budget.acquire(60)
    big = asyncio.create_task(budget.acquire(500))
    small = asyncio.create_task(budget.acquire(10))  # fits, but waits behind the big one
    await _until(lambda: budget.waiting == 2)
    assert not big.done() and not small.done()
    budget.release(first)
    assert await big == 100  # all of it: runs alone
    assert (budget.in_use, budget.holders, budget.waiting) == (100, 1, 1)
    await asyncio.to_thread(budget.release, 100)  # from a pool thread, as a check's end does
    assert await small == 10
    budget.release(10)
    assert (budget.in_use, budget.holders, budget.peak_in_use, budget.peak_holders) == (0, 0, 100, 1)


async def test_budget_cancelled_waiter_leaves_the_line() -> None:
    budget = images.MemoryBudget(100)
    held = await budget.acquire(90)
    gone = asyncio.create_task(budget.acquire(50))
    behind = asyncio.create_task(budget.acquire(5))
    await _until(lambda: budget.waiting == 2)
    gone.cancel()
    assert await behind == 5  # the one ahead left: 90 + 5 fits
    assert budget.waiting == 0
    budget.release(5)
    budget.release(held)
    assert budget.in_use == 0


async def test_concurrent_checks_share_one_budget_on_two_threads(
    png_40mp: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten members' 40 MP images at once: at most two checks run, each on the check pool, and
    the decode memory held together never passes the budget."""
    running, peak, threads = 0, 0, set()
    lock = threading.Lock()
    real = images.inspect_image

    def counted(*args: object, **kwargs: object) -> ImageInfo:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.current_thread().name)
        try:
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(images.checks, "inspect_image", counted)
    budget = PeakBudget(images.budget.DECODE_BUDGET_BYTES)
    monkeypatch.setattr(images.budget, "DECODE_BUDGET", budget)
    infos = await asyncio.gather(*(
        inspect_image_async(png_40mp, which=1, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
        for _ in range(10)
    ))
    assert {i.width for i in infos} == {SIDE_40MP}
    assert 1 <= peak <= images.CHECK_THREADS == 2
    assert all(name.startswith("kontext-image") for name in threads), threads
    assert 0 < budget.peak_in_use <= budget.capacity
    assert (budget.in_use, budget.holders) == (0, 0)


async def test_costly_checks_wait_for_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progressive JPEGs cost their whole coefficient buffer: with room for two, ten checks
    never hold more than two at a time."""
    data = encode(noise(1500, 1000), "JPEG", progressive=True)
    cost = images.cost.check_cost(data, "jpg", (1500, 1000))
    assert cost > 4 * MB
    budget = PeakBudget(int(cost * 2.5))
    monkeypatch.setattr(images.budget, "DECODE_BUDGET", budget)
    await asyncio.gather(*(
        inspect_image_async(data, which=1, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
        for _ in range(10)
    ))
    assert budget.peak_holders == 2
    assert budget.peak_in_use == 2 * cost <= budget.capacity
    assert (budget.in_use, budget.holders) == (0, 0)


async def test_thumbnail_runs_on_the_pool_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = PeakBudget(1000 * MB)
    monkeypatch.setattr(images.budget, "DECODE_BUDGET", budget)
    out = await thumbnail_bytes_async(encode(gradient(400, 300), "PNG"), 64)
    assert sniff_format(out) == "jpg"
    assert budget.peak_in_use >= 400 * 300 * 4  # a full PNG decode is reserved
    assert budget.in_use == 0


# --- where inputs come from -------------------------------------------------------------------------


@pytest.fixture
async def foreign() -> AsyncIterator[Server]:
    """Another host (a different 127.0.0.1 port) that must never be asked for anything."""
    state: Server

    async def anything(request: web.Request) -> web.StreamResponse:
        state.hits.append(request.path)
        return web.Response(body=encode(gradient(), "PNG"), content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state = Server(server)
    try:
        yield state
    finally:
        await server.close()


@pytest.mark.parametrize("url", [
    "https://evil.example/attachments/1/a.png",
    "http://cdn.discordapp.com/attachments/1/a.png",  # plain HTTP: not the CDN's port
    "https://cdn.discordapp.com.evil.example/attachments/1/a.png",
    "https://evil.example/?https://cdn.discordapp.com/a.png",
    "ftp://cdn.discordapp.com/a.png",
    "file:///etc/passwd",
    "not a url",
])
async def test_only_discord_cdn_hosts_are_fetched(url: str, session: aiohttp.ClientSession) -> None:
    err = await fetch_refused(session, url, "input.fetch_failed", allowed_hosts=None)
    assert "not a Discord attachment" in err.detail
    assert err.user_message() == (
        "Image 1 could not be downloaded from Discord. Please attach it again.")


def test_discord_cdn_urls_are_allowed() -> None:
    allowed = frozenset(images.fetch._host_key(h) for h in images.DISCORD_CDN_HOSTS)
    for url in ("https://cdn.discordapp.com/attachments/1/2/a.png?ex=1&is=2&hm=3&",
                "https://media.discordapp.net/attachments/1/2/a.png",
                "https://CDN.discordapp.com./attachments/1/2/a.png"):
        assert images.fetch._allowed_url(url, allowed, 1).host is not None


async def test_other_hosts_only_when_allowed(
    cdn: Server, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images.fetch, "_extra_input_hosts", set())
    cdn.files["a.png"] = encode(gradient(), "PNG")
    url = cdn.url("/files/a.png")
    await fetch_refused(session, url, "input.fetch_failed", allowed_hosts=None)
    await fetch_refused(session, url, "input.fetch_failed", allowed_hosts=images.DISCORD_CDN_HOSTS)
    assert cdn.hits == []  # refused before any request
    images.allow_input_host(cdn.url("/api/v10"))  # as for settings.discord_api_base_url
    assert (await fetch(session, url, allowed_hosts=None))[1].format == "png"
    assert (await fetch(session, url, allowed_hosts=images.input_hosts(None, cdn.url("/"))))[1]
    assert len(cdn.hits) == 2


async def test_redirect_to_a_foreign_host_is_refused(
    cdn: Server, foreign: Server, session: aiohttp.ClientSession
) -> None:
    target = foreign.url("/image.png")
    err = await fetch_refused(
        session, cdn.url(f"/redirect?to={target}"), "input.fetch_failed",
        allowed_hosts=images.input_hosts(cdn.url("/")),
    )
    assert "not a Discord attachment" in err.detail
    assert cdn.hits == ["/redirect"]
    assert foreign.hits == []  # never asked


async def test_redirects_within_allowed_hosts_are_followed(
    cdn: Server, session: aiohttp.ClientSession
) -> None:
    cdn.files["a.png"] = encode(gradient(), "PNG")
    _, info = await fetch(session, cdn.url("/redirect?to=/files/a.png"))
    assert info.format == "png"
    assert cdn.hits == ["/redirect", "/files/a.png"]
    err = await fetch_refused(session, cdn.url("/redirect"), "input.fetch_failed")
    assert "redirects" in err.detail


# --- a refusal the first bytes allow stops the download ---------------------------------------------


@pytest.mark.parametrize(
    ("head", "key"),
    [
        (bomb_png(30_000)[:64], "input.too_many_pixels"),
        (_with_jpeg_size(9000, 9000)[:600], "input.too_many_pixels"),
        (b"<!DOCTYPE html><html><body>" + b" " * 600, "input.not_image"),
        (b"GIF89a" + b"\x00" * 600, "input.not_image"),
    ],
    ids=["png-bomb", "jpeg", "html", "gif"],
)
async def test_header_refusal_stops_the_download(
    head: bytes, key: str, cdn: Server, session: aiohttp.ClientSession
) -> None:
    cdn.files["head"] = head
    await fetch_refused(session, cdn.url("/head-then-forever"), key)
    await asyncio.wait_for(cdn.stream_ended.wait(), 10)
    assert cdn.streamed < 4 * MB  # not the 19 MB it would send


async def test_downloads_share_one_byte_budget(
    cdn: Server, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies are reserved before they are read: with room for two, four downloads at once
    never hold more than two bodies."""
    data = encode(noise(300, 300), "PNG")

    class Watched(PeakBudget):
        asked = 0
        all_asked = asyncio.Event()

        async def acquire(self, cost: int) -> int:
            Watched.asked += 1
            if Watched.asked == 4:
                Watched.all_asked.set()
            return await super().acquire(cost)

    budget = Watched(2 * len(data) + 100)
    monkeypatch.setattr(images.budget, "DOWNLOAD_BUDGET", budget)

    async def held_back(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)  # headers out: the client reserves, then waits for the body
        await Watched.all_asked.wait()
        await resp.write(data)
        return resp

    cdn.server.app.router._frozen = False  # one more route on the running test server
    cdn.server.app.router.add_get("/held", held_back)
    results = await asyncio.gather(*(fetch(session, cdn.url("/held")) for _ in range(4)))
    assert all(got == data for got, _ in results)
    assert budget.peak_holders == 2
    assert budget.peak_in_use == 2 * len(data)
    assert (budget.in_use, budget.holders) == (0, 0)

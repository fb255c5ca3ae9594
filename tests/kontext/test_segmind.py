"""SegmindClient against the real Segmind emulator (no mocks), plus its pure parsers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from emulators.segmind import SegmindEmulator
from kontext import spool
from kontext.errors import (
    ApiAuthError,
    ApiBadRequest,
    ApiBadResponse,
    ApiConnectionError,
    ApiContentRejected,
    ApiError,
    ApiNotFound,
    ApiOutOfCredits,
    ApiRateLimited,
    ApiServerError,
    ApiTimeout,
)
from kontext.segmind import (
    ASPECT_RATIOS,
    DEFAULT_MAX_RETRIES,
    CallHooks,
    GenerationRequest,
    SegmindClient,
    SendFenced,
    SubmittedJob,
    derive_v2_urls,
    error_for_status,
    image_is_complete,
    parse_number,
    parse_reset_at,
    parse_retry_after,
    read_meta,
    retry_after_from_headers,
    sniff_image,
)
from kontext.segmind.calls import result_url_allowed
from kontext.spool import ResultFile, open_count

KEY = "sk-test-7f3a9c1e5b2d4f60"
MODEL = "multi-image-kontext-max"


# --- fixtures ----------------------------------------------------------------------------------


def _image(color: str, fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


@pytest.fixture
async def emu() -> AsyncIterator[SegmindEmulator]:
    async with SegmindEmulator(api_key=KEY) as emulator:
        yield emulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def inputs(emu: SegmindEmulator) -> tuple[str, str]:
    return (
        emu.host_image(_image("red", "PNG", (80, 60)), "woman.png"),
        emu.host_image(_image("green", "JPEG", (60, 80)), "dress.jpg"),
    )


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_client(
    session: aiohttp.ClientSession, emu: SegmindEmulator, sleeps: list[float]
) -> Callable[..., SegmindClient]:
    async def fast_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    def factory(**kw: Any) -> SegmindClient:
        options: dict[str, Any] = {
            "api_key": KEY, "base_url": emu.base_url, "timeout_s": 5.0, "sleep": fast_sleep,
            "poll_interval_s": 0.01, "poll_max_interval_s": 0.02,
        }
        options.update(kw)
        return SegmindClient(kw.pop("session", session), **options)

    return factory


def _req(inputs: tuple[str, str], **kw: Any) -> GenerationRequest:
    return GenerationRequest("put the green dress on the woman", inputs[0], inputs[1], **kw)


def _no_key_anywhere(err: Exception, caplog: pytest.LogCaptureFixture) -> None:
    assert KEY not in str(err)
    assert KEY not in getattr(err, "detail", "")
    assert KEY not in repr(err)
    for record in caplog.records:
        assert KEY not in record.getMessage()


# --- the request body ----------------------------------------------------------------------------


def test_payload_is_exactly_the_seed_body() -> None:
    req = GenerationRequest("p", "https://a/1.png", "https://a/2.jpg", aspect_ratio="1:1",
                            output_format="png", safety_tolerance=2, seed=7)
    payload = req.to_payload()
    assert payload == {
        "prompt": "p",
        "input_image_1": "https://a/1.png",
        "input_image_2": "https://a/2.jpg",
        "aspect_ratio": "1:1",
        "output_format": "png",
        "safety_tolerance": 2,
        "seed": 7,
    }
    assert type(payload["seed"]) is int and type(payload["safety_tolerance"]) is int
    assert len(ASPECT_RATIOS) == 14


# --- v1 happy path -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "magic"), [("jpg", b"\xff\xd8\xff"), ("png", b"\x89PNG")])
async def test_v1_generates_the_asked_format(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    fmt: str, magic: bytes, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kontext.segmind")
    client = make_client()
    req = _req(inputs, aspect_ratio="16:9", output_format=fmt, seed=1234)
    result = await client.generate(req)

    assert result.image.startswith(magic)
    assert result.output_format == fmt
    assert result.content_type == {"jpg": "image/jpeg", "png": "image/png"}[fmt]
    with Image.open(io.BytesIO(result.image)) as img:
        assert img.size == (256, 144)
    call = emu.calls[0]
    assert call.payload == req.to_payload()
    assert call.path == f"/v1/{MODEL}" and call.charged and call.status == 200
    assert result.request_id == call.request_id
    assert result.cost_usd == pytest.approx(0.1)
    assert result.remaining_credits == pytest.approx(999.9)
    assert result.seed == 1234
    assert result.attempts == 1 and result.elapsed_s >= 0
    assert emu.charged_count == 1
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "200" in infos[0].getMessage() and str(call.request_id) in infos[0].getMessage()
    _no_key_anywhere(Exception(), caplog)


async def test_v1_output_is_deterministic_for_a_seed(
    inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    client = make_client()
    first = await client.generate(_req(inputs, seed=5, output_format="png"))
    again = await client.generate(_req(inputs, seed=5, output_format="png"))
    other = await client.generate(_req(inputs, seed=6, output_format="png"))
    assert first.image == again.image != other.image


async def test_concurrency_is_reported(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.latency = 0.2
    client = make_client()
    results = await asyncio.gather(*(client.generate(_req(inputs)) for _ in range(3)))
    assert len(results) == 3
    assert emu.peak_concurrency == 3 and emu.in_flight == 0
    assert len(emu.started_times) == 3
    emu.reset_stats()
    assert emu.calls == [] and emu.peak_concurrency == 0


# --- status mapping --------------------------------------------------------------------------------

STATUS_TABLE: list[tuple[int, type[ApiError], bool]] = [
    (400, ApiBadRequest, False),
    (401, ApiAuthError, False),
    (403, ApiAuthError, False),
    (404, ApiNotFound, False),
    (405, ApiNotFound, False),
    (406, ApiOutOfCredits, False),
    (422, ApiBadRequest, False),
    (429, ApiRateLimited, True),
    (500, ApiServerError, False),
    (502, ApiServerError, True),
    (503, ApiServerError, True),
    (504, ApiTimeout, False),
]


@pytest.mark.parametrize(("status", "error_class", "retried"), STATUS_TABLE)
async def test_every_status_maps_to_its_error(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], caplog: pytest.LogCaptureFixture,
    status: int, error_class: type[ApiError], retried: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    message = f"emulated {status} problem"
    emu.fail_next(status, times=10, error=message)
    client = make_client(max_retries=2)
    with pytest.raises(error_class) as info:
        await client.generate(_req(inputs))
    err = info.value
    assert type(err) is error_class
    assert err.status == status
    assert str(status) in err.detail
    if status != 405:  # the 405 page is HTML; its title is quoted instead
        assert message in err.detail
    sentence = err.user_message("en")
    assert sentence and sentence != err.key and "{" not in sentence
    assert len(emu.calls) == (3 if retried else 1)
    assert len(sleeps) == (2 if retried else 0)
    assert emu.charged_count == 0
    if status == 429:
        assert isinstance(err, ApiRateLimited) and err.retry_after is not None
        assert 0 <= err.retry_after <= 1.5
    _no_key_anywhere(err, caplog)


async def test_a_key_echoed_by_the_api_is_redacted(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    emu.fail_next(401, error=f"Invalid API key {KEY}")
    with pytest.raises(ApiAuthError) as info:
        await make_client().generate(_req(inputs))
    assert "***" in info.value.detail
    _no_key_anywhere(info.value, caplog)


async def test_long_error_messages_are_trimmed(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.fail_next(400, error="x" * 5000)
    with pytest.raises(ApiBadRequest) as info:
        await make_client().generate(_req(inputs))
    assert "x" * 299 in info.value.detail and "x" * 301 not in info.value.detail


async def test_moderation_message_is_content_rejected(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.fail_next(400, error="Your prompt was flagged as NSFW by the safety filter")
    with pytest.raises(ApiContentRejected):
        await make_client().generate(_req(inputs))


async def test_wrong_key_and_wrong_model_for_real(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ApiAuthError) as info:
        await make_client(api_key="wrong").generate(_req(inputs))
    assert info.value.status == 401 and info.value.account_problem
    with pytest.raises(ApiNotFound) as nf:
        await make_client(model="no-such-model").generate(_req(inputs))
    assert nf.value.status == 404
    assert emu.charged_count == 0
    _no_key_anywhere(info.value, caplog)


async def test_emulator_rejects_bearer_and_get(
    emu: SegmindEmulator, session: aiohttp.ClientSession, inputs: tuple[str, str]
) -> None:
    body = _req(inputs).to_payload()
    url = f"{emu.base_url}/v1/{MODEL}"
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 401
        assert "error" in await resp.json()
    async with session.get(url, headers={"x-api-key": KEY}) as resp:
        assert resp.status == 405
        assert "<html" in (await resp.text()).lower()


BAD_BODIES: list[dict[str, Any]] = [
    {"prompt": ""},
    {"prompt": 5},
    {"input_image_1": None},
    {"aspect_ratio": "7:3"},
    {"output_format": "webp"},
    {"safety_tolerance": 3},
    {"safety_tolerance": True},
    {"safety_tolerance": "1"},
    {"seed": -1},
    {"seed": 4_294_967_296},
    {"seed": 1.5},
    {"extra": 1},
]


@pytest.mark.parametrize("change", BAD_BODIES)
async def test_emulator_validates_the_body_strictly(
    emu: SegmindEmulator, session: aiohttp.ClientSession, inputs: tuple[str, str],
    change: dict[str, Any],
) -> None:
    body = {**_req(inputs).to_payload(), **change}
    async with session.post(f"{emu.base_url}/v1/{MODEL}", json=body,
                            headers={"x-api-key": KEY}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]
    assert emu.charged_count == 0


async def test_missing_fields_and_defaults(
    emu: SegmindEmulator, session: aiohttp.ClientSession, inputs: tuple[str, str]
) -> None:
    url = f"{emu.base_url}/v1/{MODEL}"
    async with session.post(url, json={"prompt": "p", "input_image_1": inputs[0]},
                            headers={"x-api-key": KEY}) as resp:
        assert resp.status == 400
    minimal = {"prompt": "p", "input_image_1": inputs[0], "input_image_2": inputs[1]}
    async with session.post(url, json=minimal, headers={"x-api-key": KEY}) as resp:
        assert resp.status == 200 and resp.content_type == "image/jpeg"
        data = await resp.read()
    with Image.open(io.BytesIO(data)) as img:  # the page's default aspect ratio is 16:9
        assert img.size == (256, 144)


async def test_an_input_that_is_not_an_image_is_a_bad_request(
    emu: SegmindEmulator, make_client: Callable[..., SegmindClient]
) -> None:
    good = emu.host_image(_image("blue"), "ok.png")
    bad = emu.host_image(b"<html>not an image</html>", "page.html")
    with pytest.raises(ApiBadRequest) as info:
        await make_client().generate(GenerationRequest("p", good, bad))
    assert "input_image_2" in info.value.detail
    with pytest.raises(ApiBadRequest):
        await make_client().generate(GenerationRequest("p", good, good + "-missing"))
    assert emu.charged_count == 0


# --- retries -----------------------------------------------------------------------------------


async def test_429_then_success_is_retried_once_and_charged_once(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kontext.segmind")
    emu.fail_next(429)
    result = await make_client().generate(_req(inputs))
    assert result.attempts == 2
    assert len(emu.calls) == 2 and emu.charged_count == 1
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 1.5  # honoured the ~1 s reset time
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"retry 1/{DEFAULT_MAX_RETRIES}" in warnings[0].getMessage()


async def test_429_with_retry_after_header(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float],
) -> None:
    emu.fail_next(429, headers={"Retry-After": "3"})
    result = await make_client(backoff_base_s=0.1).generate(_req(inputs))
    assert result.attempts == 2
    assert 3.0 <= sleeps[0] <= 3.05


async def test_429_far_in_the_future_is_not_waited_for(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float],
) -> None:
    reset = (datetime.now(UTC) + timedelta(minutes=10)).isoformat()
    emu.fail_next(429, headers={"x-rate-limit-reset-at-utc": reset})
    with pytest.raises(ApiRateLimited) as info:
        await make_client(retry_after_max_s=30).generate(_req(inputs))
    assert info.value.retry_after is not None and 590 <= info.value.retry_after <= 600
    assert sleeps == [] and len(emu.calls) == 1


async def test_every_429_is_reported_to_the_rate_limit_hook(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
) -> None:
    seen: list[float | None] = []
    client = make_client()
    emu.fail_next(429, times=2, headers={"x-rate-limit-reset-at-utc": "2"})
    await client.generate(_req(inputs), hooks=CallHooks(on_rate_limited=seen.append))
    assert seen == [2.0, 2.0]
    # a broken hook never breaks the call
    emu.fail_next(429)

    def crash(_delay: float | None) -> None:
        raise ZeroDivisionError

    broken = CallHooks(on_rate_limited=crash)
    assert (await client.generate(_req(inputs), hooks=broken)).attempts == 2


@pytest.mark.parametrize("status", [502, 503])
async def test_gateway_errors_then_success(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], status: int,
) -> None:
    emu.fail_next(status, times=3)
    result = await make_client(backoff_base_s=0.5, backoff_max_s=8).generate(_req(inputs))
    assert result.attempts == 4 and emu.charged_count == 1
    ceilings = [0.5, 1.0, 2.0]
    assert len(sleeps) == 3
    for delay, ceiling in zip(sleeps, ceilings, strict=True):
        assert 0.5 <= delay <= ceiling


async def test_500_is_not_retried(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float],
) -> None:
    emu.fail_next(500)
    with pytest.raises(ApiServerError) as info:
        await make_client().generate(_req(inputs))
    assert len(emu.calls) == 1 and sleeps == []
    assert info.value.charged_maybe  # a 500 after the body was sent: a charge is possible


async def test_reset_after_send_is_not_retried(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], caplog: pytest.LogCaptureFixture,
) -> None:
    emu.reset_next()
    with pytest.raises(ApiConnectionError) as info:
        await make_client().generate(_req(inputs))
    assert info.value.charged_maybe
    assert len(emu.calls) == 1 and sleeps == []
    assert emu.charged_count == 1  # the emulated API did run (and bill) the job
    _no_key_anywhere(info.value, caplog)


async def test_hang_is_a_timeout(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float],
) -> None:
    emu.hang_next()
    started = asyncio.get_running_loop().time()
    with pytest.raises(ApiTimeout) as info:
        await make_client(timeout_s=0.3).generate(_req(inputs))
    assert asyncio.get_running_loop().time() - started < 2
    assert info.value.charged_maybe and info.value.status is None
    assert len(emu.calls) == 1 and sleeps == []
    assert emu.in_flight == 1  # still hanging until the emulator stops


async def test_connection_refused_is_retried_then_fails(
    session: aiohttp.ClientSession, sleeps: list[float], inputs: tuple[str, str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the port is closed now: connecting is refused

    async def fast_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = SegmindClient(session, api_key=KEY, base_url=f"http://127.0.0.1:{port}",
                           max_retries=2, sleep=fast_sleep, timeout_s=2)
    with pytest.raises(ApiConnectionError) as info:
        await client.generate(_req(inputs))
    assert not info.value.charged_maybe
    assert len(sleeps) == 2
    assert "3 attempts" in info.value.detail
    with pytest.raises(ApiConnectionError):
        await client.account_credits()


# --- the POSTs one job can send (the bound in SegmindClient's docstring) ---------------------------


def _posts(emu: SegmindEmulator) -> int:
    """Generation POSTs the emulated API received (v1 calls or v2 submits), counted as they
    arrive (a hanging one too)."""
    assert all(call.api in ("v1", "v2") for call in emu.calls)
    return len(emu.calls)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("status", [429, 502, 503])
async def test_a_free_failure_that_never_ends_sends_exactly_the_documented_posts(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], mode: str, status: int,
) -> None:
    emu.fail_next(status, times=100, headers={"Retry-After": "0.01"} if status == 429 else None)
    told: list[float | None] = []
    client = make_client(mode=mode)
    with pytest.raises(ApiError) as info:
        await client.generate(_req(inputs), hooks=CallHooks(on_rate_limited=told.append))
    assert DEFAULT_MAX_RETRIES + 1 == 6  # what the docstring promises
    assert _posts(emu) == 6
    assert len(sleeps) == DEFAULT_MAX_RETRIES  # a pause between two POSTs, none after the last
    assert "(after 6 attempts)" in info.value.detail
    assert emu.charged_count == 0 and not info.value.charged_maybe  # nothing billed: refundable
    assert told == ([0.01] * 6 if status == 429 else [])  # each 429 told to the queue once


@pytest.mark.parametrize("max_retries", [0, 1, 2])
async def test_max_retries_bounds_the_posts(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    max_retries: int,
) -> None:
    emu.fail_next(502, times=100)
    with pytest.raises(ApiServerError):
        await make_client(max_retries=max_retries).generate(_req(inputs))
    assert _posts(emu) == max_retries + 1


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("fault", ["500", "504", "reset", "hang", "garbage"])
async def test_an_answer_that_may_have_billed_is_never_posted_again(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], mode: str, fault: str,
) -> None:
    if fault.isdigit():
        emu.fail_next(int(fault), times=100)
    elif fault == "reset":
        emu.reset_next(times=100)
    elif fault == "hang":
        emu.hang_next(times=100)
    else:
        emu.garbage_next("html", times=100)
    with pytest.raises(ApiError) as info:
        await make_client(mode=mode, timeout_s=0.3).generate(_req(inputs))
    assert _posts(emu) == 1
    assert mode == "async" or sleeps == []  # (async mode's sleeps are its polls)
    # settled from what is known, never by a second POST: the job may have run
    assert info.value.charged_maybe


async def test_v2_sends_one_post_however_many_polls(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
) -> None:
    emu.latency = 0.2
    client = make_client(mode="async")
    result = await client.generate(_req(inputs))
    polls = [p for _, method, p, _ in emu.requests_log if method == "GET" and p.endswith("/status")]
    assert len(polls) >= 2 and _posts(emu) == 1 and result.attempts == 1
    again = await client.resume(str(result.request_id))
    assert again.attempts == 0 and _posts(emu) == 1 and emu.charged_count == 1


# --- garbage and size ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["html", "json", "truncated", "empty", "wrong_format"])
async def test_garbage_is_a_bad_response(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    sleeps: list[float], kind: str,
) -> None:
    emu.garbage_next(kind)
    with pytest.raises(ApiBadResponse) as info:
        await make_client().generate(_req(inputs))
    assert info.value.status == 200
    assert len(emu.calls) == 1 and sleeps == []
    assert info.value.user_message() != info.value.key


async def test_other_format_is_accepted_and_reported(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kontext.segmind")
    emu.garbage_next("swapped_format")
    result = await make_client().generate(_req(inputs, output_format="jpg"))
    assert result.output_format == "png" and result.content_type == "image/png"
    assert any("asked for jpg, got png" in r.getMessage() for r in caplog.records)


async def test_oversize_image_is_delivered_whole(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    spool_dir: Callable[[], int],
) -> None:
    emu.oversize_next(1_500_000)
    result = await make_client().generate(_req(inputs, output_format="png"))
    assert isinstance(result.image, ResultFile)  # past SPOOL_BYTES: in a temporary file
    assert result.size >= 1_500_000 and sniff_image(result.image.head) == "png"
    assert result.image.read_bytes() == emu.calls[-1].image
    result.close()
    emu.oversize_next(1_500_000)
    with pytest.raises(ApiBadResponse) as info:
        await make_client(max_image_bytes=1_000_000).generate(_req(inputs, output_format="png"))
    assert info.value.charged_maybe
    assert open_count() == 0 and spool_dir() == 0


# --- big results go to a temporary file -----------------------------------------------------------


@pytest.fixture
def spool_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], int]]:
    """Temporary files made in ``tmp_path``; yields a counter of this process's descriptors open
    on files there (an unnamed temporary file shows as ``<dir>/#<inode> (deleted)``)."""
    monkeypatch.setattr(spool, "SPOOL_DIR", str(tmp_path))
    before = open_count()

    def open_here() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        return count

    yield open_here
    assert open_count() == before, "a ResultFile was left open"
    assert open_here() == 0


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every chunk written to a ResultFile; a whole-body ``resp.read()`` fails."""
    seen: list[int] = []
    original = ResultFile.write

    def write(self: ResultFile, chunk: bytes) -> None:
        seen.append(len(chunk))
        original(self, chunk)

    async def no_whole_read(self: aiohttp.ClientResponse) -> bytes:
        if self.content_length and self.content_length > spool.SPOOL_BYTES:
            raise AssertionError(f"a {self.content_length}-byte body was read whole")
        return await original_read(self)

    original_read = aiohttp.ClientResponse.read
    monkeypatch.setattr(ResultFile, "write", write)
    monkeypatch.setattr(aiohttp.ClientResponse, "read", no_whole_read)
    return seen


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_big_result_is_spooled_never_whole_in_memory(
    mode: str, emu: SegmindEmulator, inputs: tuple[str, str],
    make_client: Callable[..., SegmindClient], spool_dir: Callable[[], int], writes: list[int],
) -> None:
    emu.oversize_next(3 * 1024 * 1024)
    result = await make_client(mode=mode).generate(_req(inputs, output_format="png"))
    try:
        assert result.spooled and isinstance(result.image, ResultFile)
        assert spool_dir() == 1  # the one file, open, in the spool directory
        expected = emu._oversize_cache[(3 * 1024 * 1024, "png")]  # what the emulator answered
        assert result.size == len(expected) and result.output_format == "png"
        assert writes and max(writes) <= 1 << 16 and sum(writes) == len(expected)
        assert len(result.image.head) == spool.HEAD_BYTES  # all the bytes kept in memory
        assert result.image.read_bytes() == expected
    finally:
        result.close()
    assert spool_dir() == 0 and result.image.closed


async def test_a_result_up_to_the_spool_size_stays_bytes(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    spool_dir: Callable[[], int], writes: list[int],
) -> None:
    result = await make_client().generate(_req(inputs, output_format="png"))
    assert isinstance(result.image, bytes) and not result.spooled
    assert result.size == len(result.image) and not writes
    result.close()  # a no-op for bytes


async def _serve(handler: Callable[..., Any]) -> tuple[Any, str]:
    from aiohttp import web

    app = web.Application()
    app.router.add_post(f"/v1/{MODEL}", handler)
    app.router.add_get("/out/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _big_png(size: int = 2 * 1024 * 1024) -> bytes:
    from emulators.segmind import noisy_image

    return noisy_image(size, "png")


_ANY_REQ = GenerationRequest("p", "https://cdn.example/1.png", "https://cdn.example/2.png",
                             output_format="png")


@pytest.mark.parametrize("size", [200_000, 2 * 1024 * 1024])
async def test_a_chunked_answer_is_spooled_once_it_passes_the_size(
    size: int, make_client: Callable[..., SegmindClient], spool_dir: Callable[[], int],
    writes: list[int],
) -> None:
    """Without Content-Length the body is held in memory up to SPOOL_BYTES, then moved to a
    file and the rest written there."""
    from aiohttp import web

    body = _big_png(size)

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for at in range(0, len(body), 100_000):
            await resp.write(body[at : at + 100_000])
        await resp.write_eof()
        return resp

    runner, base = await _serve(answer)
    try:
        result = await make_client(base_url=base).generate(_ANY_REQ)
        try:
            if size > spool.SPOOL_BYTES:
                assert isinstance(result.image, ResultFile)
                assert result.image.read_bytes() == body and max(writes) <= 1 << 16
            else:
                assert result.image == body and not writes
        finally:
            result.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("fault", ["truncated", "over_limit", "broken", "not_an_image"])
async def test_a_failed_big_answer_leaves_no_file(
    fault: str, make_client: Callable[..., SegmindClient], spool_dir: Callable[[], int],
    writes: list[int],
) -> None:
    """Every way a spooled body can fail after its file was made: the file is closed."""
    from aiohttp import web

    body = _big_png()
    if fault == "truncated":
        body = body[: len(body) - 100]  # no IEND: checked on the file's tail
    elif fault == "not_an_image":
        body = b"\0" * len(body)

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if fault == "broken":  # promises the whole body, sends a half, hangs up
            resp = web.StreamResponse(headers={"Content-Type": "image/png",
                                               "Content-Length": str(len(body))})
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            assert request.transport is not None
            request.transport.close()
            return resp
        if fault == "over_limit":
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(body)
            await resp.write_eof()
            return resp
        return web.Response(body=body, content_type="image/png")

    runner, base = await _serve(answer)
    try:
        client = make_client(base_url=base, max_image_bytes=len(body) - 1000
                             if fault == "over_limit" else 64 * 1024 * 1024)
        with pytest.raises(ApiError) as info:
            await client.generate(_ANY_REQ)
        assert info.value.charged_maybe
        if fault == "truncated":
            assert "truncated png" in str(info.value.detail)
        assert writes  # the body did go to a file
        assert spool_dir() == 0
    finally:
        await runner.cleanup()


async def test_a_download_cancelled_midway_leaves_no_file(
    make_client: Callable[..., SegmindClient], spool_dir: Callable[[], int],
) -> None:
    from aiohttp import web

    body = _big_png()
    halfway, release = asyncio.Event(), asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "image/png",
                                           "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        halfway.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 30)
        return resp

    runner, base = await _serve(answer)
    try:
        task = asyncio.create_task(make_client(base_url=base).generate(_ANY_REQ))
        await halfway.wait()
        for _ in range(50):  # until the client wrote into its file
            await asyncio.sleep(0.01)
            if spool_dir():
                break
        assert spool_dir() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert spool_dir() == 0
    finally:
        release.set()
        await runner.cleanup()


async def test_a_json_answer_pointing_to_a_big_image_spools_the_download(
    make_client: Callable[..., SegmindClient], spool_dir: Callable[[], int],
) -> None:
    from aiohttp import web

    body = _big_png()

    async def answer(request: web.Request) -> web.Response:
        if request.method == "POST":
            await request.read()
            base = f"{request.scheme}://{request.host}"
            return web.json_response({"image": f"{base}/out/result.png"})
        return web.Response(body=body, content_type="image/png")

    runner, base = await _serve(answer)
    try:
        result = await make_client(base_url=base).generate(_ANY_REQ)
        try:
            assert isinstance(result.image, ResultFile) and result.image.read_bytes() == body
        finally:
            result.close()
    finally:
        await runner.cleanup()


async def test_compressed_answer_is_counted_as_it_inflates(
    session: aiohttp.ClientSession, make_client: Callable[..., SegmindClient]
) -> None:
    """A small gzip body that inflates past ``max_image_bytes`` is refused, not read whole."""
    import gzip

    from aiohttp import web

    bomb = gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(5_000_000))

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=bomb, content_type="image/png", headers={"Content-Encoding": "gzip"}
        )

    app = web.Application()
    app.router.add_post(f"/v1/{MODEL}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        client = make_client(base_url=f"http://127.0.0.1:{port}", max_image_bytes=1_000_000)
        with pytest.raises(ApiBadResponse) as info:
            await client.generate(
                GenerationRequest("p", "https://cdn.example/1.png", "https://cdn.example/2.png")
            )
        assert "over 1000000 bytes" in str(info.value.detail)
        assert len(bomb) < 1_000_000  # the limit held for the inflated bytes, not the wire's
    finally:
        await runner.cleanup()


# --- v2 ------------------------------------------------------------------------------------------


async def test_v2_submit_poll_complete(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.latency = 0.15
    client = make_client(mode="async")
    seen: list[tuple[SubmittedJob, str | None]] = []

    async def on_submitted(job: SubmittedJob) -> None:
        seen.append((job, emu.job_state(job.request_id)))

    req = _req(inputs, output_format="png", seed=99, aspect_ratio="9:16")
    result = await client.generate(req, on_submitted=on_submitted)
    assert len(seen) == 1
    job, state_then = seen[0]
    assert state_then in ("QUEUED", "PROCESSING")
    assert (job.status_url, job.response_url) == derive_v2_urls(emu.base_url, job.request_id)
    assert result.request_id == job.request_id
    assert result.image.startswith(b"\x89PNG") and result.output_format == "png"
    with Image.open(io.BytesIO(result.image)) as img:
        assert img.size == (144, 256)
    assert result.cost_usd == pytest.approx(0.1) and result.seed == 99
    assert result.attempts == 1
    assert emu.calls[0].api == "v2" and emu.calls[0].payload == req.to_payload()
    assert emu.charged_count == 1 and emu.in_flight == 0


async def test_v2_submit_and_wait_separately(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    client = make_client(mode="async")
    job = await client.submit(_req(inputs))
    result = await client.wait(job)
    assert result.image.startswith(b"\xff\xd8\xff") and result.attempts == 0


@pytest.mark.parametrize(
    ("error", "http_status", "error_class"),
    [
        ("Output flagged by content moderation", 422, ApiContentRejected),
        ("Model crashed", 200, ApiServerError),
        ("Invalid input image", 422, ApiBadRequest),
    ],
)
async def test_v2_failed(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    error: str, http_status: int, error_class: type[ApiError],
) -> None:
    emu.fail_v2_next(error, http_status=http_status)
    with pytest.raises(error_class) as info:
        await make_client(mode="async").generate(_req(inputs))
    assert type(info.value) is error_class
    assert error in info.value.detail and not info.value.charged_maybe
    assert emu.charged_count == 0


async def test_v2_submit_errors_and_retries(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.fail_next(429)
    result = await make_client(mode="async").generate(_req(inputs))
    assert result.attempts == 2 and emu.charged_count == 1
    emu.fail_next(406)
    with pytest.raises(ApiOutOfCredits):
        await make_client(mode="async").generate(_req(inputs))
    emu.reset_next()
    with pytest.raises(ApiConnectionError) as info:
        await make_client(mode="async").generate(_req(inputs))
    assert info.value.charged_maybe


async def test_v2_garbage_output_is_bad_response(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.garbage_next("html")
    with pytest.raises(ApiBadResponse) as info:
        await make_client(mode="async").generate(_req(inputs))
    assert info.value.charged_maybe


async def test_v2_deadline_is_a_timeout(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.latency = 30
    client = make_client(mode="async")
    job = await client.submit(_req(inputs))
    with pytest.raises(ApiTimeout) as info:
        await client.wait(job, deadline_s=0.1)
    assert info.value.charged_maybe and job.request_id in info.value.detail


async def test_v2_resume_with_a_new_client_after_restart(
    emu: SegmindEmulator, inputs: tuple[str, str]
) -> None:
    emu.latency = 0.2

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as first_session:
        first = SegmindClient(first_session, api_key=KEY, base_url=emu.base_url, mode="async",
                              sleep=no_sleep)
        job = await first.submit(_req(inputs))
    stored_id = job.request_id  # what the bot keeps in its database; the process then dies

    async with aiohttp.ClientSession() as second_session:
        second = SegmindClient(second_session, api_key=KEY, base_url=emu.base_url + "/",
                               mode="async", sleep=no_sleep, poll_interval_s=0.01)
        result = await second.resume(stored_id)
        assert result.request_id == stored_id and sniff_image(result.image) == "jpg"
        assert result.attempts == 0
        again = await second.resume(stored_id, job.status_url, job.response_url)
        assert again.image == result.image  # results are kept for a while
        with pytest.raises(ApiError) as info:
            await second.resume("does-not-exist")
        err = info.value
        assert err.status == 404 and not err.account_problem and err.charged_maybe
    assert len(emu.calls) == 1 and emu.charged_count == 1


async def test_v2_results_expire(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    client = make_client(mode="async")
    result = await client.generate(_req(inputs))
    emu.result_ttl_s = 0
    await asyncio.sleep(0.01)
    with pytest.raises(ApiError) as info:
        await client.resume(str(result.request_id))
    assert info.value.status == 404


# --- credits --------------------------------------------------------------------------------------


async def test_account_credits(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    client = make_client()
    assert await client.account_credits() == pytest.approx(1000.0)
    await client.generate(_req(inputs))
    assert await client.account_credits() == pytest.approx(999.9)
    with pytest.raises(ApiAuthError):
        await make_client(api_key="nope").account_credits()


async def test_out_of_credits_for_real(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.credits = 0.05
    with pytest.raises(ApiOutOfCredits) as info:
        await make_client().generate(_req(inputs))
    assert info.value.account_problem and emu.charged_count == 0


async def test_emulator_wait_calls(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient]
) -> None:
    emu.latency = 0.1
    task = asyncio.create_task(make_client().generate(_req(inputs)))
    calls = await emu.wait_calls(1, timeout=2)
    assert calls[0].status is None  # still running
    await task
    with pytest.raises(TimeoutError):
        await emu.wait_calls(5, timeout=0.05)


# --- pure helpers ----------------------------------------------------------------------------------

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-06-01T12:00:30Z", 30.0),
        ("2025-06-01T12:00:30.500Z", 30.5),
        ("2025-06-01T14:00:30+02:00", 30.0),
        ("2025-06-01T12:00:30", 30.0),
        ("2025-06-01 12:01:00", 60.0),
        (str(int(NOW) + 45), 45.0),
        (str(NOW + 2.5), 2.5),
        (str(int(NOW * 1000) + 10_000), 10.0),
        ("2025-06-01T11:00:00Z", 0.0),
        ("7", 7.0),
        ("  12.5 ", 12.5),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_reset_at(value: str | None, expected: float | None) -> None:
    got = parse_reset_at(value, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=0.01)


def test_parse_retry_after() -> None:
    assert parse_retry_after("5", now=NOW) == 5.0
    assert parse_retry_after("-3", now=NOW) == 0.0
    date = format_datetime(datetime.fromtimestamp(NOW + 20, UTC), usegmt=True)
    assert parse_retry_after(date, now=NOW) == pytest.approx(20.0)
    assert parse_retry_after("later", now=NOW) is None
    assert parse_retry_after(None) is None
    headers = {"Retry-After": "4", "x-rate-limit-reset-at-utc": "2025-06-01T12:00:30Z"}
    assert retry_after_from_headers(headers, now=NOW) == 4.0
    del headers["Retry-After"]
    assert retry_after_from_headers(headers, now=NOW) == pytest.approx(30.0)
    assert retry_after_from_headers({}, now=NOW) is None


def test_read_meta_tolerates_absence_and_junk() -> None:
    meta = read_meta({
        "x-request-id": " abc-123 ", "x-cost": "$0.10", "x-remaining-credits": "42.5",
        "x-seed-value": "42", "x-generation-time": "18.27s",
    })
    assert meta.request_id == "abc-123" and meta.cost_usd == pytest.approx(0.1)
    assert meta.remaining_credits == 42.5 and meta.seed == 42
    assert meta.generation_time_s == pytest.approx(18.27)
    junk = read_meta({"x-request-id": "", "x-cost": "free", "x-remaining-credits": "inf",
                      "x-seed-value": "4.5", "x-generation-time": "n/a"})
    assert junk == read_meta({})
    assert junk.request_id is None and junk.cost_usd is None and junk.seed is None


@given(st.text(max_size=40))
def test_parsers_never_raise(text: str) -> None:
    parse_number(text)
    parse_reset_at(text, now=NOW)
    parse_retry_after(text, now=NOW)
    read_meta({"x-cost": text, "x-seed-value": text, "x-remaining-credits": text})


def test_sniff_and_completeness() -> None:
    jpg, png = _image("red", "JPEG"), _image("red", "PNG")
    webp = _image("red", "WEBP")
    assert (sniff_image(jpg), sniff_image(png), sniff_image(webp)) == ("jpg", "png", "webp")
    assert sniff_image(b"GIF89a....") is None and sniff_image(b"") is None
    assert image_is_complete(jpg, "jpg") and image_is_complete(png, "png")
    assert image_is_complete(webp, "webp")
    assert not image_is_complete(jpg[: len(jpg) // 2], "jpg")
    assert not image_is_complete(png[: len(png) // 2], "png")
    assert not image_is_complete(webp[: len(webp) - 4], "webp")
    assert not image_is_complete(b"\xff\xd8\xff\xd9", "jpg")


def test_derive_v2_urls() -> None:
    assert derive_v2_urls("https://api.segmind.com/", "r1") == (
        "https://api.segmind.com/v2/requests/r1/status",
        "https://api.segmind.com/v2/requests/r1",
    )


def test_error_for_status_table() -> None:
    for status, error_class, _ in STATUS_TABLE:
        assert type(error_for_status(status, "d")) is error_class
    assert type(error_for_status(418, "d")) is ApiBadRequest
    assert type(error_for_status(599, "d")) is ApiServerError
    assert type(error_for_status(302, "d")) is ApiBadResponse
    rejected = error_for_status(422, "d", message="NSFW content detected")
    assert type(rejected) is ApiContentRejected
    plain = error_for_status(400, "d", message="safety_tolerance must be between 0 and 2")
    assert type(plain) is ApiBadRequest


def test_key_goes_only_to_the_api(session: aiohttp.ClientSession) -> None:
    client = SegmindClient(session, api_key=KEY)
    assert client.sends_key("https://api.segmind.com/v2/requests/x/status")
    assert client.sends_key("https://images.segmind.com/out.jpg")
    assert not client.sends_key("https://bucket.s3.amazonaws.com/out.jpg")
    assert not client.sends_key("http://api.segmind.com.evil.example/x")
    assert KEY not in repr(client)


# --- the caller's lease is asked before every POST (CallHooks.may_send) ---------------------------


class _Lease:
    """A lease of ``ttl_s`` on a clock that only the client's sleeps move."""

    def __init__(self, ttl_s: float) -> None:
        self.now, self.expires = 0.0, ttl_s
        self.asked = 0

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)

    def fresh(self) -> bool:
        self.asked += 1
        return self.now < self.expires


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_429_storm_that_outlives_the_lease_sends_no_post_after_it(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    mode: str,
) -> None:
    # Retry-After 25 s (within retry_after_max_s, so the client waits it out), a lease of 20 s:
    # the repeat after the first 429 would go out with the lease gone
    lease = _Lease(20.0)
    told: list[float | None] = []
    emu.fail_next(429, times=100, headers={"Retry-After": "25"})
    client = make_client(mode=mode, sleep=lease.sleep)
    with pytest.raises(SendFenced) as info:
        await client.generate(
            _req(inputs), hooks=CallHooks(may_send=lease.fresh, on_rate_limited=told.append)
        )
    assert _posts(emu) == 1 and info.value.posts == 1
    assert lease.asked == 2  # before the first POST and before the repeat
    assert told == [25.0] and emu.charged_count == 0


async def test_no_post_at_all_when_the_lease_is_gone_before_the_first(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
) -> None:
    with pytest.raises(SendFenced) as info:
        await make_client().generate(_req(inputs), hooks=CallHooks(may_send=lambda: False))
    assert info.value.posts == 0 and _posts(emu) == 0


async def test_a_broken_may_send_hook_sends_nothing(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
) -> None:
    def broken() -> bool:
        raise RuntimeError("lease table unreadable")

    with pytest.raises(SendFenced):
        await make_client().generate(_req(inputs), hooks=CallHooks(may_send=broken))
    assert _posts(emu) == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_may_send_is_asked_before_each_of_the_documented_posts(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    mode: str,
) -> None:
    asked: list[int] = []

    def may_send() -> bool:
        asked.append(_posts(emu))
        return True

    emu.fail_next(502, times=2)
    result = await make_client(mode=mode).generate(_req(inputs), hooks=CallHooks(may_send=may_send))
    assert result.attempts == 3 and asked == [0, 1, 2]  # before each POST, none after the last
    assert emu.charged_count == 1


async def test_resume_sends_no_post_so_its_lease_fence_is_not_asked(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
) -> None:
    client = make_client(mode="async")
    job = await client.submit(_req(inputs))
    result = await client.resume(job.request_id, hooks=CallHooks(may_send=lambda: False))
    assert result.size > 0 and _posts(emu) == 1  # polls and the download are GETs


# --- result URLs come only from the API's own hosts ------------------------------------------------


@pytest.fixture
async def foreign() -> AsyncIterator[tuple[str, list[str]]]:
    """Another server on the loopback, named ``localhost`` (the API's base is ``127.0.0.1``):
    ``(its base URL, the paths it was asked for)``. It serves a valid JPEG to anyone."""
    hits: list[str] = []
    image = _image("blue", "JPEG")

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=image, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://localhost:{port}", hits
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("via", ["direct", "redirect"])
async def test_a_result_url_on_another_host_is_never_fetched(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    foreign: tuple[str, list[str]], mode: str, via: str,
) -> None:
    base, hits = foreign
    url = f"{base}/out.jpg"
    emu.output_url_next(url if via == "direct" else emu.redirect_url(url))
    with pytest.raises(ApiBadResponse) as info:
        await make_client(mode=mode).generate(_req(inputs))
    assert hits == []  # no request went there
    assert info.value.charged_maybe  # the API ran: the generation may be billed
    assert "localhost" in info.value.detail and emu.charged_count == 1


@pytest.mark.parametrize(
    "url", ["https://evil.example/out.jpg", "https://segmind.com.evil.example/out.jpg",
            "http://images.segmind.com/out.jpg", "ftp://images.segmind.com/out.jpg"],
)
async def test_result_urls_outside_the_api_hosts_are_refused(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
    url: str,
) -> None:
    emu.output_url_next(url)
    with pytest.raises(ApiBadResponse) as info:
        await make_client(mode="async").generate(_req(inputs))
    assert info.value.charged_maybe


def test_the_api_own_hosts() -> None:
    base = "http://127.0.0.1:8123"
    assert result_url_allowed("http://127.0.0.1:8123/_emu/files/x.jpg", base)
    assert not result_url_allowed("http://127.0.0.1:8124/x.jpg", base)  # another port
    assert not result_url_allowed("http://localhost:8123/x.jpg", base)
    prod = "https://api.segmind.com"
    assert result_url_allowed("https://api.segmind.com/v2/x.jpg", prod)
    assert result_url_allowed("https://cdn.segmind.com/x.jpg", prod)
    assert not result_url_allowed("http://cdn.segmind.com/x.jpg", prod)  # https only
    assert not result_url_allowed("https://cdn.segmind.com:8443/x.jpg", prod)
    assert not result_url_allowed("https://notsegmind.com/x.jpg", prod)
    assert not result_url_allowed("https://bucket.s3.amazonaws.com/x.jpg", prod)
    # Segmind's own S3 buckets (virtual-hosted), and no look-alike
    assert result_url_allowed("https://segmind-resources.s3.amazonaws.com/output/x.jpg", prod)
    assert result_url_allowed("https://segmind-outputs.s3.us-east-1.amazonaws.com/x.jpg", prod)
    assert not result_url_allowed("https://segmind-x.s3.amazonaws.com.evil.io/x.jpg", prod)
    assert not result_url_allowed("https://evilsegmind.s3.amazonaws.com/x.jpg", prod)
    assert not result_url_allowed("http://segmind-resources.s3.amazonaws.com/x.jpg", prod)


async def test_a_redirect_within_the_api_host_is_followed(
    emu: SegmindEmulator, inputs: tuple[str, str], make_client: Callable[..., SegmindClient],
) -> None:
    hosted = emu.host_image(_image("blue", "JPEG"), "elsewhere.jpg")
    emu.output_url_next(emu.redirect_url(hosted))
    result = await make_client(mode="async").generate(_req(inputs))
    assert sniff_image(bytes(result.image[:4])) is not None  # type: ignore[index]


def test_the_client_package_imports_without_a_cycle() -> None:
    """v1, v2 and the call context know nothing of SegmindClient (not even for typing)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "kontext" / "segmind"
    for name in ("v1", "v2", "calls", "answers", "transport", "retry", "results", "errors"):
        tree = ast.parse((package / f"{name}.py").read_text(encoding="utf-8"))
        imported = {
            node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "kontext.segmind.client" not in imported, name
        assert "kontext.segmind" not in imported, name  # the package's __init__ imports client

"""Client of Segmind's "Multi Image Kontext Max" API (v1 synchronous, v2 submit + poll).

Discord-free; speaks HTTP through a caller-owned :class:`aiohttp.ClientSession` (one per process,
opened by ``bot.py``); the client never closes it.

Money safety drives the retry policy. The API is not idempotent: a POST whose body reached the
server may run (and bill) a generation even when the answer is lost. So a POST is retried only
when no second charge is possible:

* the connection could not be made at all (``ClientConnectorError``, connect timeout);
* the API answered ``429``, ``502`` or ``503`` (answered before any generation started).

Everything else after the body was sent (timeouts, resets, ``500``, ``504``) is raised at once,
with ``charged_maybe=True`` when the job may have run. GETs (polls, downloads, credits) are safe
to repeat and are retried on every transient failure.

v2 URL derivation (used by :meth:`SegmindClient.resume` when the URLs were not stored; the test
emulator serves the same paths, as does Segmind's own SDK, ``segmind/v2.py``)::

    status_url   = {base_url}/v2/requests/{request_id}/status
    response_url = {base_url}/v2/requests/{request_id}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

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
from kontext.settings import ASPECT_RATIOS
from kontext.spool import SPOOL_BYTES, ResultFile
from kontext.vocab import OUTPUT_FORMATS, ImageFormat

__all__ = [
    "ASPECT_RATIOS",
    "OUTPUT_FORMATS",
    "GenerationRequest",
    "GenerationResult",
    "ResponseMeta",
    "SegmindClient",
    "SubmittedJob",
    "derive_v2_urls",
    "error_for_status",
    "image_is_complete",
    "parse_number",
    "parse_reset_at",
    "parse_retry_after",
    "read_meta",
    "retry_after_from_headers",
    "sniff_image",
]

log = logging.getLogger("kontext.segmind")

T = TypeVar("T")
SleepFn = Callable[[float], Awaitable[Any]]

ERROR_TEXT_MAX = 300
"""The API's error message is trimmed to this many characters in error details."""

CONTENT_TYPES: dict[str, str] = {fmt: fmt.mime for fmt in ImageFormat}

IN_PROGRESS_STATES = frozenset({"QUEUED", "PROCESSING", "IN_PROGRESS", "STARTING", "RUNNING"})

_MODERATION = re.compile(
    r"nsfw|moderat|unsafe|inappropriate|content[ _-]?polic|flagged|safety (?:filter|check|system)"
    r"|sensitive content|not safe",
    re.IGNORECASE,
)
_OUT_OF_CREDITS = re.compile(r"insufficient (?:credit|balance|fund)|out of credit", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


# --- requests and results --------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, with exactly the fields of the model's JSON body."""

    prompt: str
    image_1_url: str
    image_2_url: str
    aspect_ratio: str = "match_input_image"
    output_format: ImageFormat = ImageFormat.JPG
    safety_tolerance: int = 1
    seed: int = 42

    def to_payload(self) -> dict[str, Any]:
        """The JSON body of ``POST /v1|v2/{model}`` (ints stay ints)."""
        return {
            "prompt": self.prompt,
            "input_image_1": self.image_1_url,
            "input_image_2": self.image_2_url,
            "aspect_ratio": self.aspect_ratio,
            "output_format": self.output_format,
            "safety_tolerance": int(self.safety_tolerance),
            "seed": int(self.seed),
        }


@dataclass
class GenerationResult:
    """A generated image and what the API said about it.

    ``content_type``/``output_format`` describe the bytes actually received (sniffed), which may
    differ from the format asked for (e.g. a PNG when JPEG was asked: accepted, logged).
    ``attempts`` counts the POSTs this call made (0 for :meth:`SegmindClient.resume`).

    ``image`` is the bytes of a result up to :data:`~kontext.spool.SPOOL_BYTES`; a longer one
    was written to a :class:`~kontext.spool.ResultFile` as it arrived and never held whole in
    memory. Whoever receives a result owns it: :meth:`close` it when done (a no-op for bytes).
    """

    image: bytes | ResultFile
    content_type: str
    output_format: ImageFormat
    request_id: str | None
    cost_usd: float | None
    remaining_credits: float | None
    seed: int | None
    elapsed_s: float
    attempts: int

    @property
    def size(self) -> int:
        """The image's length in bytes."""
        image = self.image
        return image.size if isinstance(image, ResultFile) else len(image)

    @property
    def spooled(self) -> bool:
        """Whether the image is in a temporary file (:class:`~kontext.spool.ResultFile`)."""
        return isinstance(self.image, ResultFile)

    def close(self) -> None:
        """Release the image's temporary file, if any (idempotent)."""
        if isinstance(self.image, ResultFile):
            self.image.close()


@dataclass(frozen=True)
class SubmittedJob:
    """A v2 job the API accepted; store ``request_id`` (and the URLs) to resume after a restart."""

    request_id: str
    status_url: str
    response_url: str


@dataclass(frozen=True)
class ResponseMeta:
    """The optional informational headers of an answer (each None when absent or junk)."""

    request_id: str | None = None
    cost_usd: float | None = None
    remaining_credits: float | None = None
    seed: int | None = None
    generation_time_s: float | None = None


# --- parsing helpers (pure, unit-tested) -------------------------------------------------------


def parse_number(value: str | None) -> float | None:
    """The first finite number in ``value`` (``"$0.10"`` → 0.1, ``"18.2s"`` → 18.2), else None."""
    if value is None:
        return None
    match = _NUMBER.search(str(value))
    if match is None:
        return None
    try:
        number = float(match.group(0))
    except ValueError:  # pragma: no cover - the regex only matches numbers
        return None
    return number if math.isfinite(number) else None


def _parse_int(value: str | None) -> int | None:
    number = parse_number(value)
    if number is None or number != int(number):
        return None
    return int(number)


def read_meta(headers: Mapping[str, str]) -> ResponseMeta:
    """Read ``x-request-id``, ``x-cost``, ``x-remaining-credits``, ``x-seed-value`` and
    ``x-generation-time``, tolerating absence and junk."""
    rid = (headers.get("x-request-id") or "").strip()[:200] or None
    return ResponseMeta(
        request_id=rid,
        cost_usd=parse_number(headers.get("x-cost")),
        remaining_credits=parse_number(headers.get("x-remaining-credits")),
        seed=_parse_int(headers.get("x-seed-value")),
        generation_time_s=parse_number(headers.get("x-generation-time")),
    )


def _epoch_of(value: str) -> float | None:
    """An absolute time as epoch seconds, from epoch seconds/milliseconds or an ISO timestamp."""
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number < 0:
            return None
        return number / 1000.0 if number > 1e11 else number
    iso = text.replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if moment.tzinfo is None:  # the header name says UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_MAX_RETRY_AFTER = 86_400.0


def parse_reset_at(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from ``now`` until ``x-rate-limit-reset-at-utc`` (ISO or epoch s/ms), ≥ 0.

    A small bare number (below 10⁸) is read as a delay in seconds rather than a timestamp.
    Junk gives None.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        bare = float(text)
    except ValueError:
        bare = None
    if bare is not None and math.isfinite(bare) and 0 <= bare < 1e8:
        return min(bare, _MAX_RETRY_AFTER)
    epoch = _epoch_of(text)
    if epoch is None:
        return None
    current = time.time() if now is None else now
    return min(max(0.0, epoch - current), _MAX_RETRY_AFTER)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or HTTP date), ≥ 0; junk → None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds):
            return None
        return min(max(0.0, seconds), _MAX_RETRY_AFTER)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return min(max(0.0, moment.timestamp() - current), _MAX_RETRY_AFTER)


def retry_after_from_headers(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The wait a 429 asks for: ``Retry-After`` when present, else ``x-rate-limit-reset-at-utc``."""
    seconds = parse_retry_after(headers.get("Retry-After"), now=now)
    if seconds is None:
        seconds = parse_reset_at(headers.get("x-rate-limit-reset-at-utc"), now=now)
    return seconds


def sniff_image(data: bytes) -> ImageFormat | None:
    """``"jpg"``, ``"png"`` or ``"webp"`` from the magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return ImageFormat.JPG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ImageFormat.PNG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    return None


_MIN_IMAGE_BYTES = 32


def image_is_complete(data: bytes, fmt: str) -> bool:
    """Whether ``data`` (already sniffed as ``fmt``) ends the way a whole file of that kind does.

    JPEG: an end-of-image marker ``FF D9`` near the end; PNG: the ``IEND`` chunk near the end;
    WebP: the RIFF size covers the data. Catches bodies cut short.
    """
    return _is_complete(data[:12], data[-64:], len(data), fmt)


def _is_complete(head: bytes, tail: bytes, size: int, fmt: str) -> bool:
    """:func:`image_is_complete` from the first 12 and last 64 bytes of ``size`` bytes."""
    if size < _MIN_IMAGE_BYTES:
        return False
    if fmt == ImageFormat.JPG:
        return b"\xff\xd9" in tail[-64:]
    if fmt == ImageFormat.PNG:
        return b"IEND\xaeB`\x82" in tail[-64:]
    if fmt == ImageFormat.WEBP:
        return int.from_bytes(head[4:8], "little") + 8 <= size
    return False


def derive_v2_urls(base_url: str, request_id: str) -> tuple[str, str]:
    """``(status_url, response_url)`` of a v2 request id (see the module docstring)."""
    base = base_url.rstrip("/")
    rid = quote(request_id, safe="")
    return f"{base}/v2/requests/{rid}/status", f"{base}/v2/requests/{rid}"


def _trim(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_message(body: bytes) -> str:
    """The API's error message: ``error`` (or ``message``/``detail``) of a JSON body, else text."""
    if not body:
        return ""
    text = body[:4096].decode("utf-8", "replace")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail", "msg"):
            value = data.get(key)
            if value:
                return value if isinstance(value, str) else json.dumps(value)[:1000]
    if "<html" in text.lower():
        match = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        return f"HTML page: {match.group(1).strip()}" if match else "HTML page"
    return text


def error_for_status(
    status: int,
    detail: str,
    *,
    message: str = "",
    retry_after: float | None = None,
    charged_maybe: bool = False,
) -> ApiError:
    """The typed error for an HTTP error ``status`` (``message`` is the API's own words)."""
    if status in (400, 422):
        if _MODERATION.search(message) and "safety_tolerance" not in message:
            return ApiContentRejected(detail, status=status)
        return ApiBadRequest(detail, status=status)
    if status in (401, 403):
        return ApiAuthError(detail, status=status)
    if status in (404, 405):
        return ApiNotFound(detail, status=status)
    if status == 406:
        return ApiOutOfCredits(detail, status=status)
    if status == 429:
        return ApiRateLimited(detail, status=status, retry_after=retry_after)
    if status == 504:
        return ApiTimeout(detail, status=status, charged_maybe=charged_maybe)
    if 500 <= status < 600:
        return ApiServerError(detail, status=status, charged_maybe=charged_maybe and status == 500)
    if 400 <= status < 500:
        return ApiBadRequest(detail, status=status)
    return ApiBadResponse(detail, status=status)


def _failed_job_error(message: str, detail: str, status: int | None) -> ApiError:
    """The typed error of a v2 job that ended FAILED (failed jobs are not billed)."""
    if _MODERATION.search(message) and "safety_tolerance" not in message:
        return ApiContentRejected(detail, status=status)
    if _OUT_OF_CREDITS.search(message):
        return ApiOutOfCredits(detail, status=status)
    if re.search(r"invalid|validation|parameter|input|download|fetch|url|unsupported", message, re.I):
        return ApiBadRequest(detail, status=status)
    return ApiServerError(detail, status=status)


# --- the client --------------------------------------------------------------------------------


@dataclass
class _Answer:
    """One HTTP answer, fully read: into ``body``, or (a long 200 read with ``spool=True``) into
    ``file``, with ``body`` then holding the file's first bytes only."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_s: float
    url: str
    file: ResultFile | None = None

    @property
    def size(self) -> int:
        return self.file.size if self.file is not None else len(self.body)


class _Retry(Exception):
    """Internal: ``error`` happened where repeating the request cannot charge twice."""

    def __init__(self, error: ApiError, delay: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.delay = delay


class SegmindClient:
    """Calls the model through v1 (``mode="sync"``) or v2 (``mode="async"``).

    ``max_retries`` counts repeats after the first try (so at most ``max_retries + 1`` POSTs, all
    of them free when they fail). ``timeout_s`` bounds one generation request (v1) and, by
    default, the whole wait of a v2 job. ``sleep`` is injectable so tests never really wait.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str = "https://api.segmind.com",
        model: str = "multi-image-kontext-max",
        mode: str = "sync",
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        poll_interval_s: float = 1.0,
        poll_max_interval_s: float = 5.0,
        sleep: SleepFn = asyncio.sleep,
        retry_after_max_s: float = 30.0,
        max_image_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
        self._session = session
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model = model.strip().strip("/")
        self.mode = mode
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.backoff_base_s = max(0.0, float(backoff_base_s))
        self.backoff_max_s = max(self.backoff_base_s, float(backoff_max_s))
        self.poll_interval_s = max(0.0, float(poll_interval_s))
        self.poll_max_interval_s = max(self.poll_interval_s, float(poll_max_interval_s))
        self.retry_after_max_s = max(0.0, float(retry_after_max_s))
        self.max_image_bytes = int(max_image_bytes)
        self._sleep = sleep
        #: called with the wait (seconds, or None) each time the API answers 429, so the caller's
        #: limiter can slow down for everyone, not just for the request being retried
        self.on_rate_limited: Callable[[float | None], None] | None = None
        self._base_origin = URL(self.base_url).origin()
        connect = min(10.0, self.timeout_s)
        self._timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=connect)
        self._short_timeout = aiohttp.ClientTimeout(
            total=min(self.timeout_s, 30.0), sock_connect=connect
        )

    def __repr__(self) -> str:  # never the key
        return f"SegmindClient(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r})"

    # --- public API ----------------------------------------------------------------------------

    async def generate(
        self,
        req: GenerationRequest,
        *,
        on_submitted: Callable[[SubmittedJob], Awaitable[None]] | None = None,
    ) -> GenerationResult:
        """Generate one image. Sync mode: one v1 call. Async mode: :meth:`submit`, then
        ``await on_submitted(job)`` (store the request id before polling), then :meth:`wait`.

        Raises an :class:`~kontext.errors.ApiError` subclass on every failure.
        """
        if self.mode == "async":
            started = time.monotonic()
            job, attempts = await self._submit(req)
            if on_submitted is not None:
                await on_submitted(job)
            return await self._wait(job, deadline_s=None, attempts=attempts, started=started,
                                    asked_format=req.output_format, seed=req.seed)
        return await self._generate_v1(req)

    async def submit(self, req: GenerationRequest) -> SubmittedJob:
        """``POST {base}/v2/{model}``: queue a job and return its handle."""
        job, _ = await self._submit(req)
        return job

    async def wait(self, job: SubmittedJob, *, deadline_s: float | None = None) -> GenerationResult:
        """Poll ``job`` until it ends; download and return the image.

        ``deadline_s`` (default ``timeout_s``) bounds the whole wait; past it, :class:`ApiTimeout`
        with ``charged_maybe=True`` (the job may still finish: :meth:`resume` can pick it up).
        """
        return await self._wait(job, deadline_s=deadline_s, attempts=0, started=time.monotonic(),
                                asked_format=None, seed=None)

    async def resume(
        self,
        request_id: str,
        status_url: str | None = None,
        response_url: str | None = None,
        *,
        deadline_s: float | None = None,
    ) -> GenerationResult:
        """Pick up a v2 job after a restart; missing URLs are derived (:func:`derive_v2_urls`)."""
        derived_status, derived_response = derive_v2_urls(self.base_url, request_id)
        job = SubmittedJob(request_id, status_url or derived_status, response_url or derived_response)
        return await self.wait(job, deadline_s=deadline_s)

    async def account_credits(self) -> float | None:
        """The account's credits from ``GET {base}/v1/get-user-credits`` (None when not given)."""
        url = f"{self.base_url}/v1/get-user-credits"
        answer, _ = await self._with_retries(
            lambda: self._checked(self._request("GET", url, idempotent=True),
                                  "GET /v1/get-user-credits", idempotent=True),
            "GET /v1/get-user-credits",
        )
        self._log_call("GET", "/v1/get-user-credits", answer)
        data = self._json(answer, "credits")
        if not isinstance(data, dict):
            return None
        value = data.get("credits")
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return float(value) if math.isfinite(value) else None
        return parse_number(value) if isinstance(value, str) else None

    # --- v1 ------------------------------------------------------------------------------------

    async def _generate_v1(self, req: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        path = f"/v1/{self.model}"
        url = self.base_url + path
        payload = req.to_payload()
        answer, attempts = await self._with_retries(
            lambda: self._checked(
                self._request("POST", url, json_body=payload, spool=True), f"POST {path}"
            ),
            f"POST {path}",
        )
        self._log_call("POST", path, answer, attempts=attempts)
        meta = read_meta(answer.headers)
        image, fmt = await self._image_from_answer(answer, req.output_format, meta.request_id)
        return GenerationResult(
            image=image,
            content_type=fmt.mime,
            output_format=fmt,
            request_id=meta.request_id,
            cost_usd=meta.cost_usd,
            remaining_credits=meta.remaining_credits,
            seed=meta.seed if meta.seed is not None else req.seed,
            elapsed_s=time.monotonic() - started,
            attempts=attempts,
        )

    # --- v2 ------------------------------------------------------------------------------------

    async def _submit(self, req: GenerationRequest) -> tuple[SubmittedJob, int]:
        path = f"/v2/{self.model}"
        url = self.base_url + path
        answer, attempts = await self._with_retries(
            lambda: self._checked(self._request("POST", url, json_body=req.to_payload()),
                                  f"POST {path}"),
            f"POST {path}",
        )
        self._log_call("POST", path, answer, attempts=attempts)
        data = self._json(answer, f"POST {path}", charged_maybe=True)
        rid = data.get("request_id") if isinstance(data, dict) else None
        if not isinstance(rid, str) or not rid.strip():
            raise ApiBadResponse(
                self._detail(f"POST {path}", answer.status, "answer without a request_id", None),
                status=answer.status, charged_maybe=True,
            )
        assert isinstance(data, dict)
        derived_status, derived_response = derive_v2_urls(self.base_url, rid)
        status_url = data.get("status_url")
        response_url = data.get("response_url")
        job = SubmittedJob(
            request_id=rid,
            status_url=status_url if isinstance(status_url, str) and status_url else derived_status,
            response_url=(
                response_url if isinstance(response_url, str) and response_url else derived_response
            ),
        )
        return job, attempts

    async def _wait(
        self,
        job: SubmittedJob,
        *,
        deadline_s: float | None,
        attempts: int,
        started: float,
        asked_format: str | None,
        seed: int | None,
    ) -> GenerationResult:
        budget = self.timeout_s if deadline_s is None else float(deadline_s)
        deadline = time.monotonic() + budget
        interval = self.poll_interval_s
        polls = 0
        while True:
            body, status, _ = await self._v2_get(job.status_url, job, "status")
            polls += 1
            state = str(body.get("status", "")).upper()
            if state == "COMPLETED":
                break
            if state == "FAILED":
                raise self._job_failed(job, body, status)
            if state not in IN_PROGRESS_STATES:
                log.debug("segmind job %s: unknown status %r, polling on", job.request_id, state)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiTimeout(
                    f"v2 job {job.request_id} still {state or 'unknown'} after {budget:g}s "
                    f"({polls} polls); it may still finish and be billed",
                    charged_maybe=True,
                )
            await self._sleep(min(interval, remaining))
            interval = min(self.poll_max_interval_s, max(interval * 1.5, 0.05))

        body, status, response_headers = await self._v2_get(job.response_url, job, "response")
        state = str(body.get("status", "COMPLETED")).upper()
        if state == "FAILED":
            raise self._job_failed(job, body, status)
        image, fmt, download_headers = await self._v2_output(job, body, asked_format)
        meta = read_meta(response_headers)
        fallback = read_meta(download_headers)
        metrics = body.get("metrics") if isinstance(body.get("metrics"), dict) else {}
        assert isinstance(metrics, dict)
        cost = meta.cost_usd if meta.cost_usd is not None else fallback.cost_usd
        if cost is None:
            raw = metrics.get("cost", metrics.get("cost_usd"))
            cost = parse_number(str(raw)) if raw is not None else None
        result = GenerationResult(
            image=image,
            content_type=fmt.mime,
            output_format=fmt,
            request_id=job.request_id,
            cost_usd=cost,
            remaining_credits=(
                meta.remaining_credits
                if meta.remaining_credits is not None
                else fallback.remaining_credits
            ),
            seed=next((v for v in (meta.seed, fallback.seed, seed) if v is not None), None),
            elapsed_s=time.monotonic() - started,
            attempts=attempts,
        )
        log.info(
            "segmind v2 job %s completed after %d polls in %.2fs, %d bytes (%s%s)",
            job.request_id, polls, result.elapsed_s, result.size, fmt,
            ", spooled" if result.spooled else "",
        )
        return result

    async def _v2_get(
        self, url: str, job: SubmittedJob, what: str
    ) -> tuple[dict[str, Any], int, Mapping[str, str]]:
        """GET a status/response URL; a body announcing a terminal state is valid whatever the
        HTTP code (the API serves FAILED with 422). Every other failure is charged_maybe."""
        label = f"GET {what} of job {job.request_id}"

        async def once() -> tuple[dict[str, Any], int, Mapping[str, str]]:
            answer = await self._request("GET", url, idempotent=True, timeout=self._short_timeout)
            data: Any = None
            try:
                data = json.loads(answer.body) if answer.body else None
            except (ValueError, UnicodeDecodeError):
                data = None
            if isinstance(data, dict) and str(data.get("status", "")).upper() in (
                "COMPLETED", "FAILED",
            ):
                return data, answer.status, answer.headers
            if answer.status == 404:
                raise ApiError(
                    self._detail(label, 404, "job unknown or expired: "
                                 + _error_message(answer.body), job.request_id),
                    status=404, charged_maybe=True,
                )
            if answer.status != 200:
                raise self._status_error(answer, label, idempotent=True)
            if not isinstance(data, dict):
                raise _Retry(ApiBadResponse(
                    self._detail(label, 200, "not a JSON object: " + _error_message(answer.body),
                                 job.request_id),
                    status=200, charged_maybe=True,
                ))
            log.debug("segmind %s -> %s", label, data.get("status"))
            return data, answer.status, answer.headers

        try:
            result, _ = await self._with_retries(once, label)
        except ApiError as err:
            err.charged_maybe = True
            raise
        return result

    def _job_failed(self, job: SubmittedJob, body: Mapping[str, Any], status: int) -> ApiError:
        raw = body.get("error") or body.get("message") or "no reason given"
        message = raw if isinstance(raw, str) else json.dumps(raw)
        detail = self._detail(f"v2 job {job.request_id}", status, f"FAILED: {message}",
                              job.request_id)
        log.info("segmind v2 job %s failed: %s", job.request_id, self._redact(_trim(message)))
        return _failed_job_error(message, detail, status)

    async def _v2_output(
        self, job: SubmittedJob, body: Mapping[str, Any], asked_format: str | None
    ) -> tuple[bytes | ResultFile, ImageFormat, Mapping[str, str]]:
        """The image of a COMPLETED job's ``output`` (URL, list of URLs, or base64)."""
        output: Any = body.get("output")
        if isinstance(output, list):
            output = output[0] if output else None
        if isinstance(output, dict):
            output = next(
                (output[k] for k in ("image", "url", "image_url", "output") if output.get(k)), None
            )
        label = f"output of job {job.request_id}"
        if not isinstance(output, str) or not output.strip():
            raise ApiBadResponse(
                self._detail(label, 200, f"COMPLETED without an output: {_trim(str(body))}",
                             job.request_id),
                status=200, charged_maybe=True,
            )
        try:
            if output.startswith(("http://", "https://")):
                answer = await self._download(output, label)
                image, fmt = await self._image_from_answer(answer, asked_format, job.request_id)
                return image, fmt, answer.headers
            data = _decode_base64_image(output)
            if data is None:
                raise ApiBadResponse(
                    self._detail(label, 200, "output is neither a URL nor base64", job.request_id),
                    status=200,
                )
            fmt = self._validate_image(data, asked_format, label, job.request_id, 200)
            return data, fmt, {}
        except ApiError as err:
            err.charged_maybe = True  # the job completed: it was billed
            raise

    async def _download(self, url: str, label: str) -> _Answer:
        """GET a result image (the key is sent only to the API's own hosts)."""

        async def once() -> _Answer:
            answer = await self._request("GET", url, idempotent=True, spool=True)
            if answer.status == 200:
                return answer
            if answer.status == 429 or answer.status >= 500:
                raise self._status_error(answer, f"GET {label}", idempotent=True)
            # 403/404 on a result URL: expired or gone, not an account problem.
            raise ApiBadResponse(
                self._detail(f"GET {label}", answer.status,
                             "result not downloadable: " + _error_message(answer.body), None),
                status=answer.status, charged_maybe=True,
            )

        answer, _ = await self._with_retries(once, f"GET {label}")
        self._log_call("GET", label, answer)
        return answer

    # --- answers -------------------------------------------------------------------------------

    async def _image_from_answer(
        self, answer: _Answer, asked_format: str | None, request_id: str | None
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
                found = _image_in_json(data)
                if found is not None and found.startswith(("http://", "https://")):
                    inner = await self._download(found, label)
                    body = inner.file if inner.file is not None else inner.body
                elif found is not None:
                    decoded = _decode_base64_image(found)
                    if decoded is not None:
                        body = decoded
            fmt = self._validate_image(body, asked_format, label, request_id, answer.status)
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

    def _validate_image(
        self, body: bytes | ResultFile, asked_format: str | None, label: str,
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
                what = "JSON instead of an image: " + _error_message(first)
            elif b"<html" in head.lower() or b"<!doctype" in head.lower():
                what = "HTML instead of an image: " + _error_message(first)
            else:
                what = f"{size} bytes that are not JPEG/PNG/WebP (starts {first[:8].hex()})"
            # a 200 is a finished, billed generation even when its body is useless
            raise ApiBadResponse(self._detail(label, status, what, request_id), status=status,
                                 charged_maybe=status == 200)
        if not _is_complete(first[:12], last, size, fmt):
            raise ApiBadResponse(
                self._detail(label, status, f"truncated {fmt} ({size} bytes)", request_id),
                status=status, charged_maybe=status == 200,
            )
        if asked_format and fmt != asked_format:
            log.warning(
                "segmind %s: asked for %s, got %s; using it as it is (request id %s)",
                label, asked_format, fmt, request_id,
            )
        return fmt

    def _json(self, answer: _Answer, label: str, *, charged_maybe: bool = False) -> Any:
        try:
            return json.loads(answer.body)
        except (ValueError, UnicodeDecodeError):
            raise ApiBadResponse(
                self._detail(label, answer.status, "not JSON: " + _error_message(answer.body),
                             answer.headers.get("x-request-id")),
                status=answer.status, charged_maybe=charged_maybe,
            ) from None

    async def _checked(
        self, pending: Awaitable[_Answer], label: str, *, idempotent: bool = False
    ) -> _Answer:
        """Await one request; a non-200 becomes its typed error (or a :class:`_Retry`)."""
        answer = await pending
        if answer.status == 200:
            return answer
        raise self._status_error(answer, label, idempotent=idempotent)

    def _status_error(self, answer: _Answer, label: str, *, idempotent: bool) -> Exception:
        """The typed error of a non-200 answer; wrapped in :class:`_Retry` when repeating is free
        (429/502/503 always; any 5xx when the request was a GET)."""
        message = _error_message(answer.body)
        rid = answer.headers.get("x-request-id")
        retry_after = retry_after_from_headers(answer.headers) if answer.status == 429 else None
        detail = self._detail(label, answer.status, message, rid)
        if retry_after is not None:
            detail += f"; retry after {retry_after:.1f}s"
        error = error_for_status(
            answer.status, detail, message=message, retry_after=retry_after,
            charged_maybe=not idempotent,
        )
        if answer.status in (429, 502, 503) or (idempotent and answer.status >= 500):
            return _Retry(error, retry_after if answer.status == 429 else None)
        return error

    def _detail(self, label: str, status: int | None, message: str, request_id: str | None) -> str:
        parts = [label]
        if status is not None:
            parts.append(f"HTTP {status}")
        if message:
            parts.append(_trim(message))
        text = ": ".join(parts)
        if request_id:
            text += f" (request id {_trim(str(request_id), 100)})"
        return self._redact(text)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # --- transport -----------------------------------------------------------------------------

    def _sends_key(self, url: str) -> bool:
        """The key goes only to the API's own origin (or another https host of segmind.com)."""
        target = URL(url)
        if target.origin() == self._base_origin:
            return True
        host = (target.host or "").lower()
        return target.scheme == "https" and (host == "segmind.com" or host.endswith(".segmind.com"))

    async def _request(
        self,
        method: str,
        url: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        idempotent: bool = False,
        timeout: aiohttp.ClientTimeout | None = None,
        spool: bool = False,
    ) -> _Answer:
        """One HTTP request, body read in full (with ``spool``, a 200's body past
        :data:`~kontext.spool.SPOOL_BYTES` into a temporary file). Transport failures become
        typed errors; those where repeating is free are wrapped in :class:`_Retry`."""
        with_key = self._sends_key(url)
        headers = {"x-api-key": self._api_key, "Accept": "*/*"} if with_key else {"Accept": "*/*"}
        label = f"{method} {URL(url).path}"
        started = time.monotonic()
        try:
            return await self._exchange(
                method, url, json_body=json_body, headers=headers,
                timeout=timeout or self._timeout, allow_redirects=not with_key, label=label,
                started=started, spool=spool,
            )
        except ApiError:
            raise
        except (
            aiohttp.ClientConnectorCertificateError,
            aiohttp.ClientConnectorSSLError,
            aiohttp.ClientSSLError,
        ) as exc:
            raise ApiConnectionError(self._detail(label, None, f"TLS failure: {exc}", None)) from None
        except aiohttp.ClientConnectorError as exc:
            # Nothing was sent: free to repeat.
            raise _Retry(ApiConnectionError(
                self._detail(label, None, f"cannot connect: {exc}", None))) from None
        except aiohttp.ConnectionTimeoutError:
            raise _Retry(ApiConnectionError(
                self._detail(label, None, "connect timeout", None))) from None
        except TimeoutError:
            elapsed = time.monotonic() - started
            error: ApiError = ApiTimeout(
                self._detail(label, None, f"no answer within {elapsed:.1f}s", None),
                charged_maybe=not idempotent,
            )
            if idempotent:
                raise _Retry(error) from None
            raise error from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # Disconnected/reset after the request went out: the job may have run.
            error = ApiConnectionError(
                self._detail(label, None, f"connection broke after sending: "
                             f"{type(exc).__name__}: {exc}", None),
                charged_maybe=not idempotent,
            )
            if idempotent:
                raise _Retry(error) from None
            raise error from None
        except aiohttp.ClientError as exc:
            raise ApiConnectionError(
                self._detail(label, None, f"{type(exc).__name__}: {exc}", None),
                charged_maybe=not idempotent,
            ) from None

    async def _exchange(
        self, method: str, url: str, *, json_body: Mapping[str, Any] | None,
        headers: Mapping[str, str], timeout: aiohttp.ClientTimeout, allow_redirects: bool,
        label: str, started: float, spool: bool,
    ) -> _Answer:
        """Send, read the answer; a spooled body's file is closed unless the answer is returned
        (a failure or a cancellation while the response is released)."""
        body: bytes | ResultFile = b""
        try:
            async with self._session.request(
                method, url, json=json_body, headers=headers, timeout=timeout,
                allow_redirects=allow_redirects,
            ) as resp:
                body = await self._read_body(resp, label, spool=spool)
                elapsed = time.monotonic() - started
                headers_copy, status, where = resp.headers.copy(), resp.status, str(resp.url)
        except BaseException:
            if isinstance(body, ResultFile):
                body.close()
            raise
        if isinstance(body, ResultFile):
            return _Answer(status, headers_copy, body.head, elapsed, where, body)
        return _Answer(status, headers_copy, body, elapsed, where)

    async def _read_body(
        self, resp: aiohttp.ClientResponse, label: str, *, spool: bool = False
    ) -> bytes | ResultFile:
        """The body, never more than ``max_image_bytes``. With ``spool``, a 200's body longer
        than :data:`~kontext.spool.SPOOL_BYTES` is written to a :class:`ResultFile` chunk by
        chunk as it arrives (only ~64 KiB of it in memory at a time)."""
        limit = self.max_image_bytes
        length = resp.content_length
        if length is not None and length > limit:
            raise ApiBadResponse(
                self._detail(label, resp.status, f"body of {length} bytes is over {limit}", None),
                status=resp.status, charged_maybe=resp.status == 200,
            )
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        spooling = spool and resp.status == 200
        if length is not None and encoding == "identity" and not (
            spooling and length > SPOOL_BYTES
        ):
            # aiohttp stops at Content-Length, and nothing is decompressed, so this cannot read
            # more than the limit; one read is several times cheaper than a loop of 64 KiB chunks
            # for a 1 MiB image. A compressed body is counted as it is inflated, below.
            return await resp.read()
        chunks: list[bytes] = []
        size = 0
        file: ResultFile | None = None
        try:
            if spooling and length is not None and length > SPOOL_BYTES:
                file = ResultFile()
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise ApiBadResponse(
                        self._detail(label, resp.status, f"body over {limit} bytes", None),
                        status=resp.status, charged_maybe=resp.status == 200,
                    )
                if file is not None:
                    file.write(chunk)
                    continue
                chunks.append(chunk)
                if spooling and size > SPOOL_BYTES:  # no Content-Length, or compressed
                    file = ResultFile()
                    for held in chunks:
                        file.write(held)
                    chunks.clear()
        except BaseException:
            if file is not None:
                file.close()
            raise
        return file if file is not None else b"".join(chunks)

    async def _with_retries(
        self, op: Callable[[], Awaitable[T]], label: str
    ) -> tuple[T, int]:
        """Run ``op`` and repeat it on :class:`_Retry` with exponential backoff and jitter.

        Returns ``(value, attempts)``; after the last attempt the wrapped error is raised.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return await op(), attempt
            except _Retry as retry:
                error = retry.error
                if isinstance(error, ApiRateLimited) and self.on_rate_limited is not None:
                    try:
                        self.on_rate_limited(retry.delay)
                    except Exception:  # noqa: BLE001 - a hook must never break a call
                        log.exception("on_rate_limited hook failed")
                if attempt > self.max_retries:
                    error.args = (f"{error.detail} (after {attempt} attempts)",)
                    error.detail = error.args[0]
                    raise error from None
                if retry.delay is not None and retry.delay > self.retry_after_max_s:
                    log.warning(
                        "segmind %s: rate limited for %.1fs (over %.1fs): not waiting",
                        label, retry.delay, self.retry_after_max_s,
                    )
                    raise error from None
                delay = self._backoff(attempt, retry.delay)
                log.warning(
                    "segmind %s: %s (HTTP %s); retry %d/%d in %.2fs",
                    label, type(error).__name__, error.status, attempt, self.max_retries, delay,
                )
                await self._sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """The pause before repeat number ``attempt`` (1-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** (attempt - 1)))
        delay = random.uniform(self.backoff_base_s, max(self.backoff_base_s, ceiling))
        if retry_after is not None:
            delay = min(self.retry_after_max_s, retry_after) + random.uniform(
                0, self.backoff_base_s / 2
            )
        return delay

    def _log_call(self, method: str, what: str, answer: _Answer, *, attempts: int = 1) -> None:
        log.info(
            "segmind %s %s -> %d in %.2fs, request id %s, %d bytes%s",
            method, what, answer.status, answer.elapsed_s,
            answer.headers.get("x-request-id", "-"), answer.size,
            f", {attempts} attempts" if attempts > 1 else "",
        )


def _image_in_json(data: Any) -> str | None:
    """A URL or base64 string under a usual key of a JSON answer, if any."""
    if isinstance(data, list):
        data = data[0] if data else None
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        return None
    for key in ("image", "output", "url", "image_url", "data", "images"):
        value = data.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _decode_base64_image(text: str) -> bytes | None:
    """Bytes of a base64 (or ``data:`` URI) image, or None when it is not one."""
    payload = text.strip()
    if payload.startswith("data:"):
        _, _, payload = payload.partition(",")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if sniff_image(data) else None

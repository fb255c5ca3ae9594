"""The Segmind client: one object per API key, calling the model through v1 (one request) or v2
(submit + poll), the account's credits, and result downloads, over a caller-owned
:class:`aiohttp.ClientSession` (one per process, opened by ``bot.py``; never closed here)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from kontext.errors import ApiBadResponse
from kontext.segmind import v1, v2
from kontext.segmind.errors import SendFenced
from kontext.segmind.parsing import derive_v2_urls, error_message, parse_number
from kontext.segmind.results import CallHooks, GenerationRequest, GenerationResult, SubmittedJob
from kontext.segmind.retry import (
    DEFAULT_MAX_RETRIES,
    RateLimitHook,
    RetryPolicy,
    SleepFn,
    with_retries,
)
from kontext.segmind.transport import Answer, Transport

T = TypeVar("T")


class SegmindClient:
    """Calls the model through v1 (``mode="sync"``) or v2 (``mode="async"``).

    **POSTs per job.** The client owns every HTTP retry of the bot (the pipeline calls
    :meth:`generate` once per job and never repeats it; the queue only paces starts). One
    :meth:`generate` sends at most ``max_retries + 1`` POSTs — **6** with the default
    ``max_retries`` (:data:`~kontext.segmind.retry.DEFAULT_MAX_RETRIES` = 5) — and repeats one
    only after an answer or failure that proves no generation started (could not connect, 429,
    502, 503: the table in :mod:`kontext.segmind.retry`); those repeats are never billed. So a
    job is billed at most once. :meth:`resume` and :meth:`wait` send no POST (GETs only), and
    :meth:`submit` at most ``max_retries + 1``.

    Each 429 is told once to :attr:`on_rate_limited` (the queue slows every process down) and
    then waited out here, unless it asks for more than ``retry_after_max_s``: then it is raised
    at once. ``timeout_s`` bounds one generation request (v1) and, by default, the whole wait of
    a v2 job. ``sleep`` is injectable so tests never really wait. The retry settings are read at
    each call, so they may be changed on a live client.
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
        max_retries: int = DEFAULT_MAX_RETRIES,
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
        self.sleep = sleep
        #: called with the wait (seconds, or None) each time the API answers 429, so the caller's
        #: queue can slow down for everyone, not just for the request being retried
        self.on_rate_limited: RateLimitHook | None = None
        self.http = Transport(
            session, api_key=api_key, base_url=self.base_url, timeout_s=self.timeout_s,
            max_image_bytes=max_image_bytes,
        )

    def __repr__(self) -> str:  # never the key
        return f"SegmindClient(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r})"

    @property
    def max_image_bytes(self) -> int:
        """The largest body read (a result image, or an error page)."""
        return self.http.max_image_bytes

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry settings as they are now."""
        return RetryPolicy(
            max_retries=self.max_retries,
            backoff_base_s=self.backoff_base_s,
            backoff_max_s=self.backoff_max_s,
            retry_after_max_s=self.retry_after_max_s,
        )

    # --- public API ----------------------------------------------------------------------------

    async def generate(
        self,
        req: GenerationRequest,
        *,
        on_submitted: Callable[[SubmittedJob], Awaitable[None]] | None = None,
        hooks: CallHooks | None = None,
    ) -> GenerationResult:
        """Generate one image. Sync mode: one v1 call. Async mode: :meth:`submit`, then
        ``await on_submitted(job)`` (store the request id before polling), then :meth:`wait`.

        Sends at most ``max_retries + 1`` POSTs (see the class docstring). Raises an
        :class:`~kontext.errors.ApiError` subclass on every failure; ``charged_maybe`` says
        whether the API may have run (and billed) the generation.
        """
        if hooks is not None:
            if not hooks.may_send():
                raise SendFenced(0)
            self.on_rate_limited = hooks.on_rate_limited
        if self.mode == "async":
            started = time.monotonic()
            job, attempts = await v2.submit(self, req)
            if on_submitted is not None:
                await on_submitted(job)
            return await v2.wait(self, job, deadline_s=None, attempts=attempts, started=started,
                                 asked_format=req.output_format, seed=req.seed)
        return await v1.generate_v1(self, req)

    async def submit(self, req: GenerationRequest) -> SubmittedJob:
        """``POST {base}/v2/{model}``: queue a job and return its handle."""
        job, _ = await v2.submit(self, req)
        return job

    async def wait(self, job: SubmittedJob, *, deadline_s: float | None = None) -> GenerationResult:
        """Poll ``job`` until it ends; download and return the image.

        ``deadline_s`` (default ``timeout_s``) bounds the whole wait; past it, :class:`ApiTimeout`
        with ``charged_maybe=True`` (the job may still finish: :meth:`resume` can pick it up).
        """
        return await v2.wait(self, job, deadline_s=deadline_s, attempts=0,
                             started=time.monotonic(), asked_format=None, seed=None)

    async def resume(
        self,
        request_id: str,
        status_url: str | None = None,
        response_url: str | None = None,
        *,
        deadline_s: float | None = None,
        hooks: CallHooks | None = None,
    ) -> GenerationResult:
        """Pick up a v2 job after a restart; missing URLs are derived (:func:`derive_v2_urls`).
        Sends no POST: a billed job is fetched, never re-submitted."""
        derived_status, derived_response = derive_v2_urls(self.base_url, request_id)
        job = SubmittedJob(request_id, status_url or derived_status, response_url or derived_response)
        return await self.wait(job, deadline_s=deadline_s)

    async def account_credits(self) -> float | None:
        """The account's credits from ``GET {base}/v1/get-user-credits`` (None when not given);
        the account probe of a paused account, and the check of a server's own key."""
        url = f"{self.base_url}/v1/get-user-credits"
        label = "GET /v1/get-user-credits"
        http = self.http
        answer, _ = await self.retrying(
            lambda: http.checked(http.request("GET", url, idempotent=True), label, idempotent=True),
            label,
        )
        http.log_call("GET", "/v1/get-user-credits", answer)
        data = http.parse_json(answer, "credits")
        if not isinstance(data, dict):
            return None
        value = data.get("credits")
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return float(value) if math.isfinite(value) else None
        return parse_number(value) if isinstance(value, str) else None

    # --- shared by v1 and v2 -------------------------------------------------------------------

    async def retrying(self, op: Callable[[], Awaitable[T]], label: str) -> tuple[T, int]:
        """Run ``op`` under this client's retry policy: ``(value, attempts)``."""
        return await with_retries(
            op, label, policy=self.retry_policy, sleep=self.sleep,
            on_rate_limited=self.on_rate_limited,
        )

    async def download(self, url: str, label: str) -> Answer:
        """GET a result image (the key is sent only to the API's own hosts)."""
        http = self.http

        async def once() -> Answer:
            answer = await http.request("GET", url, idempotent=True, spool=True)
            if answer.status == 200:
                return answer
            if answer.status == 429 or answer.status >= 500:
                raise http.status_error(answer, f"GET {label}", idempotent=True)
            # 403/404 on a result URL: expired or gone, not an account problem.
            raise ApiBadResponse(
                http.detail(f"GET {label}", answer.status,
                            "result not downloadable: " + error_message(answer.body), None),
                status=answer.status, charged_maybe=True,
            )

        answer, _ = await self.retrying(once, f"GET {label}")
        http.log_call("GET", label, answer)
        return answer

    def sends_key(self, url: str) -> bool:
        """Whether a request to ``url`` carries the API key (only the API's own hosts)."""
        return self.http.sends_key(url)


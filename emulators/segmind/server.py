"""The Segmind emulator's server: :class:`SegmindEmulator`, its routes and v2 jobs (the
routes, faults and bookkeeping are described in :mod:`emulators.segmind`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from .api import CONTENT_TYPES, DEFAULT_ERRORS, MAX_INPUT_BYTES, html_page, validate
from .faults import Fault, faulty_body
from .images import decode_check, render, sniff


@dataclass
class CallRecord:
    """One generation POST the emulator received."""

    time: float
    method: str
    path: str
    api: str
    payload: Any = None
    status: int | None = None
    charged: bool = False
    request_id: str | None = None
    fault: str | None = None
    finished: float | None = None
    #: the bytes answered (v1 200) or served as the output (v2), so tests can compare them
    image: bytes | None = None
    #: the API key the call was made with (the emulator knows several: ``add_key``)
    api_key: str | None = None


@dataclass
class _Job:
    request_id: str
    payload: dict[str, Any]
    record: CallRecord
    created: float
    state: str = "QUEUED"
    error: str | None = None
    fail_http_status: int = 422
    output_name: str | None = None
    output_fault: Fault | None = None
    fail_with: str | None = None
    fail_status: int = 422
    started: float | None = None
    done_at: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class SegmindEmulator:
    """An in-process Segmind API. Use ``async with SegmindEmulator(api_key=...) as emu``."""

    def __init__(
        self,
        *,
        api_key: str = "test-segmind-key",
        models: tuple[str, ...] = ("multi-image-kontext-max", "multi-image-kontext-pro"),
        latency: float = 0.0,
        credits: float = 1000.0,
        cost: float = 0.1,
        result_ttl_s: float = 3600.0,
        output_long_side: int = 256,
    ) -> None:
        self.api_key = api_key
        self.other_keys: set[str] = set()
        self.models = set(models)
        self.latency = latency
        self.credits = credits
        self.cost = cost
        self.result_ttl_s = result_ttl_s
        self.output_long_side = output_long_side

        self.calls: list[CallRecord] = []
        self.requests_log: list[tuple[float, str, str, int | None]] = []
        self.in_flight = 0
        self.peak_concurrency = 0
        self.started_times: list[float] = []

        self._faults: list[Fault] = []
        self._v2_failures: list[tuple[str, int]] = []
        self._jobs: dict[str, _Job] = {}
        self._files: dict[str, tuple[bytes, str]] = {}
        self._oversize_cache: dict[tuple[int, str], bytes] = {}
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._stopping = asyncio.Event()
        self._call_arrived = asyncio.Event()
        self.port: int | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (after :meth:`start`)."""
        if self.port is None:
            raise RuntimeError("SegmindEmulator is not started")
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> SegmindEmulator:
        """Listen on a random loopback port."""
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/v1/get-user-credits", self._credits)
        app.router.add_post("/v1/{model}", self._v1_generate)
        app.router.add_route("*", "/v1/{model}", self._method_not_allowed)
        app.router.add_get("/v2/requests/{rid}/status", self._v2_status)
        app.router.add_get("/v2/requests/{rid}", self._v2_response)
        app.router.add_post("/v2/{model}", self._v2_submit)
        app.router.add_route("*", "/v2/{model}", self._method_not_allowed)
        app.router.add_get("/_emu/files/{name}", self._file)
        app.router.add_get("/_emu/redirect", self._redirect)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        return self

    async def stop(self) -> None:
        """Release hung requests, cancel running jobs, close everything."""
        self._stopping.set()
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> SegmindEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- fault control ---------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        error: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``times`` generation POSTs answer ``status`` with ``{"error": error}``.

        A 429 without explicit headers carries ``x-rate-limit-reset-at-utc`` one second ahead.
        A 405 answers an HTML page, like the real API.
        """
        self._faults.append(Fault("status", times, status=status,
                                   error=error or DEFAULT_ERRORS.get(status, f"HTTP {status}"),
                                   headers=headers))

    def hang_next(self, times: int = 1) -> None:
        """The next ``times`` generation POSTs are read and never answered (until stop)."""
        self._faults.append(Fault("hang", times))

    def reset_next(self, times: int = 1) -> None:
        """The next ``times`` generation POSTs: body read, generation billed, connection dropped."""
        self._faults.append(Fault("reset", times))

    def garbage_next(self, kind: str = "html", *, times: int = 1) -> None:
        """The next ``times`` generations answer 200 with a body that is not the asked image.

        ``kind``: ``html``, ``json``, ``truncated`` (first half of a real image), ``empty``,
        ``wrong_format`` (a GIF labelled as the asked format), ``swapped_format`` (a valid image
        of the *other* format, e.g. PNG when JPEG was asked: a tolerant client accepts it).
        """
        kinds = {"html", "json", "truncated", "empty", "wrong_format", "swapped_format"}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}")
        self._faults.append(Fault("garbage", times, garbage=kind))

    def oversize_next(self, target_bytes: int, *, times: int = 1) -> None:
        """The next ``times`` generations answer a valid (noisy) image of ≥ ``target_bytes``."""
        self._faults.append(Fault("oversize", times, target_bytes=int(target_bytes)))

    def output_url_next(self, url: str, *, times: int = 1) -> None:
        """The next ``times`` generations run (and bill) as usual, but give their result as
        ``url``: v1 answers 200 with JSON ``{"output": url}``, a v2 job's response carries
        ``url`` as its ``output``. :meth:`redirect_url` makes an URL of this emulator that
        redirects to another one."""
        self._faults.append(Fault("output_url", times, url=url))

    def redirect_url(self, to: str) -> str:
        """An URL on this emulator's own host that answers 302 to ``to``."""
        return str(URL(self.base_url).with_path("/_emu/redirect").with_query(to=to))

    def fail_v2_next(self, error: str = "Generation failed", *, http_status: int = 422) -> None:
        """The next v2 job ends FAILED with ``error`` (its status answered with ``http_status``)."""
        self._v2_failures.append((error, http_status))

    def clear_faults(self) -> None:
        """Forget every queued fault."""
        self._faults.clear()
        self._v2_failures.clear()

    def _take_fault(self) -> Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.times -= 1
        if fault.times <= 0:
            self._faults.pop(0)
        return fault

    # --- reporting -------------------------------------------------------------------------------

    @property
    def charged_count(self) -> int:
        """How many generation calls were billed."""
        return sum(1 for c in self.calls if c.charged)

    async def wait_calls(self, n: int, timeout: float = 5.0) -> list[CallRecord]:
        """Wait until at least ``n`` generation calls arrived (``TimeoutError`` otherwise)."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.calls) < n:
                    await self._call_arrived.wait()
        except TimeoutError:
            raise TimeoutError(f"expected {n} calls, got {len(self.calls)}") from None
        return list(self.calls)

    def reset_stats(self) -> None:
        """Forget calls, logs and peaks (jobs and files stay)."""
        self.calls.clear()
        self.requests_log.clear()
        self.started_times.clear()
        self.peak_concurrency = self.in_flight

    def host_image(self, data: bytes, name: str | None = None) -> str:
        """Serve ``data`` at a URL on this emulator (inputs for tests without Discord)."""
        name = name or f"{uuid.uuid4().hex}.{sniff(data) or 'bin'}"
        ctype = CONTENT_TYPES.get(sniff(data) or "", "application/octet-stream")
        self._files[name] = (data, ctype)
        return f"{self.base_url}/_emu/files/{name}"

    def job_state(self, request_id: str) -> str | None:
        """The state of a v2 job (None when unknown)."""
        job = self._jobs.get(request_id)
        return job.state if job else None

    # --- helpers ---------------------------------------------------------------------------------

    def _enter(self) -> None:
        self.in_flight += 1
        self.peak_concurrency = max(self.peak_concurrency, self.in_flight)

    def _leave(self) -> None:
        self.in_flight -= 1

    def _record(self, request: web.Request, api: str) -> CallRecord:
        now = time.monotonic()
        record = CallRecord(
            time=now, method=request.method, path=request.path, api=api,
            api_key=request.headers.get("x-api-key"),
        )
        self.calls.append(record)
        self._call_arrived.set()  # wake wait_calls, then arm a fresh event for the next call
        self._call_arrived = asyncio.Event()
        self.started_times.append(now)
        return record

    def _log(self, request: web.Request, status: int | None) -> None:
        self.requests_log.append((time.monotonic(), request.method, request.path, status))

    @staticmethod
    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": message}, status=status, headers=headers)

    def _auth_error(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("x-api-key")
        if key is None and request.headers.get("Authorization", "").lower().startswith("bearer"):
            return self._error(401, "Unauthorized: use the x-api-key header (bearer not supported)")
        if not key or (key != self.api_key and key not in self.other_keys):
            return self._error(401, DEFAULT_ERRORS[401])
        return None

    def add_key(self, key: str) -> None:
        """Accept another account's key too (a server that brings its own)."""
        self.other_keys.add(key)

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; True when the emulator is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def _success_headers(self, rid: str, seed: int, elapsed: float) -> dict[str, str]:
        return {
            "x-request-id": rid,
            "x-remaining-credits": f"{self.credits:.4f}",
            "x-cost": f"{self.cost:g}",
            "x-seed-value": str(seed),
            "x-generation-time": f"{elapsed:.3f}",
        }

    def _charge(self, record: CallRecord) -> None:
        record.charged = True
        self.credits = round(self.credits - self.cost, 6)


    async def _read_payload(self, request: web.Request) -> tuple[Any, str | None]:
        raw = await request.read()
        try:
            return json.loads(raw), None
        except (ValueError, UnicodeDecodeError):
            return None, "Request body must be valid JSON"

    async def _fetch_input(self, which: str, url: str) -> bytes:
        assert self._client is not None
        try:
            async with self._client.get(url) as resp:
                if resp.status != 200:
                    raise ValueError(f"{which}: could not download the image (HTTP {resp.status})")
                data = await resp.content.read(MAX_INPUT_BYTES + 1)
        except aiohttp.ClientError as exc:
            raise ValueError(f"{which}: could not download the image ({exc})") from None
        except TimeoutError:
            raise ValueError(f"{which}: timed out downloading the image") from None
        if len(data) > MAX_INPUT_BYTES:
            raise ValueError(f"{which}: image too large")
        try:
            await asyncio.to_thread(decode_check, data)
        except Exception:  # noqa: BLE001 - any decoder failure means "not an image"
            raise ValueError(f"{which}: not a valid image (PNG, JPEG or WebP)") from None
        return data

    async def _fetch_inputs(self, payload: dict[str, Any]) -> tuple[bytes, bytes]:
        first, second = await asyncio.gather(
            self._fetch_input("input_image_1", payload["input_image_1"]),
            self._fetch_input("input_image_2", payload["input_image_2"]),
        )
        return first, second

    async def _render(self, payload: dict[str, Any], img1: bytes, img2: bytes) -> bytes:
        return await asyncio.to_thread(
            render, img1, img2, payload.get("aspect_ratio", "16:9"),
            payload.get("output_format", "jpg"), int(payload.get("seed", 42)),
            self.output_long_side,
        )

    async def _fault_response(
        self, request: web.Request, fault: Fault, record: CallRecord
    ) -> web.StreamResponse:
        """Answer a status/hang/reset fault (the ones that hit the request itself)."""
        record.fault = fault.kind if fault.kind != "status" else f"status:{fault.status}"
        if fault.kind == "hang":
            await self._stopping.wait()
            record.status = 503
            return self._error(503, "emulator stopping")
        if fault.kind == "reset":
            self._charge(record)
            record.status = None
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError  # the connection is gone: nothing to answer
        headers = dict(fault.headers or {})
        if fault.status == 429 and not headers:
            reset_at = datetime.now(UTC) + timedelta(seconds=1)
            headers["x-rate-limit-reset-at-utc"] = reset_at.isoformat().replace("+00:00", "Z")
        record.status = fault.status
        if fault.status == 405:
            return web.Response(status=405, text=html_page(405, fault.error),
                                content_type="text/html", headers=headers)
        return self._error(fault.status, fault.error, headers)

    # --- handlers --------------------------------------------------------------------------------

    async def _method_not_allowed(self, request: web.Request) -> web.Response:
        self._log(request, 405)
        return web.Response(status=405, text=html_page(405, "Method Not Allowed"),
                            content_type="text/html")

    async def _credits(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied is not None:
            self._log(request, denied.status)
            return denied
        self._log(request, 200)
        return web.json_response({"credits": round(self.credits, 4), "free-credits": 0})

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        item = self._files.get(name)
        if item is None:
            self._log(request, 404)
            return web.Response(status=404, text="Not Found")
        self._log(request, 200)
        data, ctype = item
        return web.Response(body=data, content_type=ctype)

    async def _v1_generate(self, request: web.Request) -> web.StreamResponse:
        record = self._record(request, "v1")
        self._enter()
        try:
            return await self._v1_inner(request, record)
        finally:
            record.finished = time.monotonic()
            self._leave()
            self._log(request, record.status)

    async def _redirect(self, request: web.Request) -> web.Response:
        self._log(request, 302)
        return web.Response(status=302, headers={"Location": request.query.get("to", "/")})

    async def _v1_inner(self, request: web.Request, record: CallRecord) -> web.StreamResponse:
        started = time.monotonic()
        payload, bad_json = await self._read_payload(request)
        record.payload = payload
        fault = self._take_fault()
        if fault is not None and fault.kind in ("status", "hang", "reset"):
            return await self._fault_response(request, fault, record)
        response = await self._precheck(request, payload, bad_json)
        if response is not None:
            record.status = response.status
            return response
        try:
            img1, img2 = await self._fetch_inputs(payload)
        except ValueError as exc:
            record.status = 400
            return self._error(400, str(exc))
        if await self._pause(self.latency):
            record.status = 503
            return self._error(503, "emulator stopping")
        fmt = payload.get("output_format", "jpg")
        seed = int(payload.get("seed", 42))
        rid = uuid.uuid4().hex
        record.request_id = rid
        if fault is not None and fault.kind == "output_url":
            record.fault = fault.kind
            body, ctype = json.dumps({"output": fault.url}).encode(), "application/json"
        elif fault is not None:  # garbage / oversize
            record.fault = f"{fault.kind}:{fault.garbage}" if fault.garbage else fault.kind
            body, ctype = await faulty_body(fault, fmt, seed, self._oversize_cache)
        else:
            body, ctype = await self._render(payload, img1, img2), CONTENT_TYPES[fmt]
        self._charge(record)
        record.status = 200
        record.image = body
        return web.Response(
            body=body, content_type=ctype,
            headers=self._success_headers(rid, seed, time.monotonic() - started),
        )

    async def _precheck(
        self, request: web.Request, payload: Any, bad_json: str | None
    ) -> web.Response | None:
        """Auth, model, body and credits checks shared by v1 and v2 submits."""
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        if request.match_info["model"] not in self.models:
            return self._error(404, f"Model not found: {request.match_info['model']}")
        problem = bad_json or validate(payload)
        if problem is not None:
            return self._error(400, problem)
        if self.credits < self.cost:
            return self._error(406, DEFAULT_ERRORS[406])
        return None

    # --- v2 --------------------------------------------------------------------------------------

    async def _v2_submit(self, request: web.Request) -> web.StreamResponse:
        record = self._record(request, "v2")
        self._enter()
        handed_over = False
        try:
            payload, bad_json = await self._read_payload(request)
            record.payload = payload
            fault = self._take_fault()
            if fault is not None and fault.kind in ("status", "hang", "reset"):
                return await self._fault_response(request, fault, record)
            response = await self._precheck(request, payload, bad_json)
            if response is not None:
                record.status = response.status
                return response
            rid = uuid.uuid4().hex
            record.request_id = rid
            job = _Job(request_id=rid, payload=payload, record=record, created=time.monotonic(),
                       output_fault=fault)
            if fault is not None:
                record.fault = f"{fault.kind}:{fault.garbage}" if fault.garbage else fault.kind
            if self._v2_failures:
                job.fail_with, job.fail_status = self._v2_failures.pop(0)
            self._jobs[rid] = job
            job.task = asyncio.create_task(self._run_job(job))
            handed_over = True
            record.status = 200
            base = self.base_url
            return web.json_response(
                {
                    "request_id": rid,
                    "status": "QUEUED",
                    "status_url": f"{base}/v2/requests/{rid}/status",
                    "response_url": f"{base}/v2/requests/{rid}",
                },
                headers={"x-request-id": rid},
            )
        finally:
            if not handed_over:
                record.finished = time.monotonic()
                self._leave()
            self._log(request, record.status)

    async def _run_job(self, job: _Job) -> None:
        try:
            await asyncio.sleep(0)
            try:
                img1, img2 = await self._fetch_inputs(job.payload)
            except ValueError as exc:
                job.state, job.error, job.fail_status = "FAILED", str(exc), 422
                return
            job.state = "PROCESSING"
            job.started = time.monotonic()
            if await self._pause(self.latency):
                job.state, job.error = "FAILED", "emulator stopping"
                return
            if job.fail_with is not None:
                job.state, job.error = "FAILED", job.fail_with
                return
            fmt = job.payload.get("output_format", "jpg")
            seed = int(job.payload.get("seed", 42))
            if job.output_fault is not None and job.output_fault.kind == "output_url":
                body, ctype = await self._render(job.payload, img1, img2), CONTENT_TYPES[fmt]
            elif job.output_fault is not None:
                body, ctype = await faulty_body(job.output_fault, fmt, seed, self._oversize_cache)
            else:
                body, ctype = await self._render(job.payload, img1, img2), CONTENT_TYPES[fmt]
            name = f"out-{job.request_id}.{fmt}"
            self._files[name] = (body, ctype)
            job.output_name = name
            self._charge(job.record)
            job.state = "COMPLETED"
        except asyncio.CancelledError:
            job.state, job.error = "FAILED", "emulator stopped"
            raise
        finally:
            job.done_at = time.monotonic()
            job.record.finished = job.done_at
            self._leave()

    def _live_job(self, rid: str) -> _Job | None:
        job = self._jobs.get(rid)
        if job is None:
            return None
        if job.done_at is not None and time.monotonic() - job.done_at > self.result_ttl_s:
            del self._jobs[rid]
            if job.output_name:
                self._files.pop(job.output_name, None)
            return None
        return job

    async def _v2_status(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied is not None:
            self._log(request, denied.status)
            return denied
        job = self._live_job(request.match_info["rid"])
        if job is None:
            self._log(request, 404)
            return self._error(404, "Request not found")
        body: dict[str, Any] = {"request_id": job.request_id, "status": job.state}
        status = 200
        if job.state == "FAILED":
            body["error"] = job.error
            status = job.fail_status
        self._log(request, status)
        return web.json_response(body, status=status, headers={"x-request-id": job.request_id})

    async def _v2_response(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied is not None:
            self._log(request, denied.status)
            return denied
        job = self._live_job(request.match_info["rid"])
        if job is None:
            self._log(request, 404)
            return self._error(404, "Request not found")
        headers = {"x-request-id": job.request_id}
        if job.state == "FAILED":
            self._log(request, job.fail_status)
            return web.json_response(
                {"request_id": job.request_id, "status": "FAILED", "error": job.error},
                status=job.fail_status, headers=headers,
            )
        if job.state != "COMPLETED":
            self._log(request, 200)
            return web.json_response(
                {"request_id": job.request_id, "status": job.state, "output": None},
                headers=headers,
            )
        seed = int(job.payload.get("seed", 42))
        assert job.done_at is not None and job.started is not None
        headers.update(self._success_headers(job.request_id, seed, job.done_at - job.started))
        self._log(request, 200)
        fault = job.output_fault
        return web.json_response(
            {
                "request_id": job.request_id,
                "status": "COMPLETED",
                "output": (
                    fault.url if fault is not None and fault.kind == "output_url"
                    else f"{self.base_url}/_emu/files/{job.output_name}"
                ),
                "metrics": {
                    "queue_time": round(job.started - job.created, 3),
                    "inference_time": round(job.done_at - job.started, 3),
                },
            },
            headers=headers,
        )


# --- images (run in threads) -------------------------------------------------------------------

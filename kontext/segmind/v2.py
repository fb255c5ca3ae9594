"""v2, asynchronous: ``POST {base}/v2/{model}`` queues a job (its request id is stored before
anything else), then its status URL is polled until COMPLETED or FAILED, and the output image is
downloaded. Only the submit is a POST; every other request is a GET, safe to repeat.

URL derivation (used by :meth:`SegmindClient.resume` when the URLs were not stored; the test
emulator serves the same paths, as does Segmind's own SDK, ``segmind/v2.py``)::

    status_url   = {base_url}/v2/requests/{request_id}/status
    response_url = {base_url}/v2/requests/{request_id}
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from kontext.errors import ApiBadResponse, ApiError, ApiTimeout
from kontext.segmind.answers import image_from_answer, validate_image
from kontext.segmind.calls import ApiCall
from kontext.segmind.errors import failed_job_error
from kontext.segmind.parsing import (
    decode_base64_image,
    derive_v2_urls,
    error_message,
    parse_number,
    read_meta,
    trim,
)
from kontext.segmind.results import GenerationRequest, GenerationResult, SubmittedJob
from kontext.segmind.retry import Retryable
from kontext.spool import ResultFile
from kontext.vocab import ImageFormat

log = logging.getLogger("kontext.segmind")

IN_PROGRESS_STATES = frozenset({"QUEUED", "PROCESSING", "IN_PROGRESS", "STARTING", "RUNNING"})


async def submit(call: ApiCall, req: GenerationRequest) -> tuple[SubmittedJob, int]:
    """``POST {base}/v2/{model}``: ``(job, POSTs sent)``; the only POST of a v2 job."""
    path = f"/v2/{call.model}"
    url = call.base_url + path
    http = call.http
    answer, attempts = await call.retrying(
        lambda: http.checked(
            http.request("POST", url, json_body=req.to_payload()), f"POST {path}"
        ),
        f"POST {path}",
        post=True,  # hooks.may_send() before each POST
    )
    http.log_call("POST", path, answer, attempts=attempts)
    data = http.parse_json(answer, f"POST {path}", charged_maybe=True)
    rid = data.get("request_id") if isinstance(data, dict) else None
    if not isinstance(rid, str) or not rid.strip():
        raise ApiBadResponse(
            http.detail(f"POST {path}", answer.status, "answer without a request_id", None),
            status=answer.status, charged_maybe=True,
        )
    assert isinstance(data, dict)
    derived_status, derived_response = derive_v2_urls(call.base_url, rid)
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


async def wait(
    call: ApiCall,
    job: SubmittedJob,
    *,
    deadline_s: float | None,
    attempts: int,
    started: float,
    asked_format: ImageFormat | None,
    seed: int | None,
) -> GenerationResult:
    """Poll ``job`` until it ends (within ``deadline_s``, default ``call.timeout_s``), then
    fetch and download its image. GETs only: a poll that fails is repeated, never the submit."""
    budget = call.timeout_s if deadline_s is None else float(deadline_s)
    deadline = time.monotonic() + budget
    interval = call.poll_interval_s
    polls = 0
    while True:
        body, status, _ = await _get(call, job.status_url, job, "status")
        polls += 1
        state = str(body.get("status", "")).upper()
        if state == "COMPLETED":
            break
        if state == "FAILED":
            raise _job_failed(call, job, body, status)
        if state not in IN_PROGRESS_STATES:
            log.debug("segmind job %s: unknown status %r, polling on", job.request_id, state)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiTimeout(
                f"v2 job {job.request_id} still {state or 'unknown'} after {budget:g}s "
                f"({polls} polls); it may still finish and be billed",
                charged_maybe=True,
            )
        await call.sleep(min(interval, remaining))
        interval = min(call.poll_max_interval_s, max(interval * 1.5, 0.05))

    body, status, response_headers = await _get(call, job.response_url, job, "response")
    state = str(body.get("status", "COMPLETED")).upper()
    if state == "FAILED":
        raise _job_failed(call, job, body, status)
    image, fmt, download_headers = await _output(call, job, body, asked_format)
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


async def _get(
    call: ApiCall, url: str, job: SubmittedJob, what: str
) -> tuple[dict[str, Any], int, Mapping[str, str]]:
    """GET a status/response URL; a body announcing a terminal state is valid whatever the
    HTTP code (the API serves FAILED with 422). Every other failure is charged_maybe."""
    label = f"GET {what} of job {job.request_id}"
    http = call.http

    async def once() -> tuple[dict[str, Any], int, Mapping[str, str]]:
        answer = await http.request("GET", url, idempotent=True, timeout=http.short_timeout)
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
                http.detail(label, 404, "job unknown or expired: " + error_message(answer.body),
                            job.request_id),
                status=404, charged_maybe=True,
            )
        if answer.status != 200:
            raise http.status_error(answer, label, idempotent=True)
        if not isinstance(data, dict):
            raise Retryable(ApiBadResponse(
                http.detail(label, 200, "not a JSON object: " + error_message(answer.body),
                            job.request_id),
                status=200, charged_maybe=True,
            ))
        log.debug("segmind %s -> %s", label, data.get("status"))
        return data, answer.status, answer.headers

    try:
        result, _ = await call.retrying(once, label)
    except ApiError as err:
        err.charged_maybe = True
        raise
    return result


def _job_failed(
    call: ApiCall, job: SubmittedJob, body: Mapping[str, Any], status: int
) -> ApiError:
    """The typed error of a job that ended FAILED (never billed)."""
    raw = body.get("error") or body.get("message") or "no reason given"
    message = raw if isinstance(raw, str) else json.dumps(raw)
    detail = call.http.detail(
        f"v2 job {job.request_id}", status, f"FAILED: {message}", job.request_id
    )
    log.info("segmind v2 job %s failed: %s", job.request_id, call.http.redact(trim(message)))
    return failed_job_error(message, detail, status)


async def _output(
    call: ApiCall,
    job: SubmittedJob,
    body: Mapping[str, Any],
    asked_format: ImageFormat | None,
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
            call.http.detail(
                label, 200, f"COMPLETED without an output: {trim(str(body))}", job.request_id
            ),
            status=200, charged_maybe=True,
        )
    try:
        if output.startswith(("http://", "https://")):
            answer = await call.download(output, label)
            image, fmt = await image_from_answer(
                call.http, answer, call.download, asked_format, job.request_id
            )
            return image, fmt, answer.headers
        data = decode_base64_image(output)
        if data is None:
            raise ApiBadResponse(
                call.http.detail(label, 200, "output is neither a URL nor base64", job.request_id),
                status=200,
            )
        fmt = validate_image(call.http, data, asked_format, label, job.request_id, 200)
        return data, fmt, {}
    except ApiError as err:
        err.charged_maybe = True  # the job completed: it was billed
        raise

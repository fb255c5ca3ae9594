"""v1, synchronous: one ``POST {base}/v1/{model}`` whose 200 answer is the image itself."""

from __future__ import annotations

import time

from kontext.segmind.answers import image_from_answer
from kontext.segmind.calls import ApiCall
from kontext.segmind.parsing import read_meta
from kontext.segmind.results import GenerationRequest, GenerationResult


async def generate_v1(call: ApiCall, req: GenerationRequest) -> GenerationResult:
    """Generate one image with one v1 call (repeated only as :mod:`~kontext.segmind.retry` allows:
    at most ``max_retries + 1`` POSTs, each one
    allowed by ``call.hooks.may_send()``)."""
    started = time.monotonic()
    path = f"/v1/{call.model}"
    url = call.base_url + path
    http = call.http
    payload = req.to_payload()
    answer, attempts = await call.retrying(
        lambda: http.checked(
            http.request("POST", url, json_body=payload, spool=True), f"POST {path}"
        ),
        f"POST {path}",
        post=True,  # hooks.may_send() before each POST
    )
    http.log_call("POST", path, answer, attempts=attempts)
    meta = read_meta(answer.headers)
    image, fmt = await image_from_answer(
        http, answer, call.download, req.output_format, meta.request_id
    )
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

"""v1, synchronous: one ``POST {base}/v1/{model}`` whose 200 answer is the image itself."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kontext.segmind.answers import image_from_answer
from kontext.segmind.parsing import read_meta
from kontext.segmind.results import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from kontext.segmind.client import SegmindClient


async def generate_v1(client: SegmindClient, req: GenerationRequest) -> GenerationResult:
    """Generate one image with one v1 call (repeated only as :mod:`~kontext.segmind.retry` allows:
    at most ``client.max_retries + 1`` POSTs)."""
    started = time.monotonic()
    path = f"/v1/{client.model}"
    url = client.base_url + path
    http = client.http
    payload = req.to_payload()
    answer, attempts = await client.retrying(
        lambda: http.checked(
            http.request("POST", url, json_body=payload, spool=True), f"POST {path}"
        ),
        f"POST {path}",
    )
    http.log_call("POST", path, answer, attempts=attempts)
    meta = read_meta(answer.headers)
    image, fmt = await image_from_answer(
        http, answer, client.download, req.output_format, meta.request_id
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

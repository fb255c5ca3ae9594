"""Client of Segmind's "Multi Image Kontext Max" API (v1 synchronous, v2 submit + poll).

Discord-free; speaks HTTP through a caller-owned :class:`aiohttp.ClientSession`.

Money safety drives the retry policy. The API is not idempotent: a POST whose body reached the
server may run (and bill) a generation even when the answer is lost. So the client — the only
place in the bot that repeats an API request — repeats a POST only when no second charge is
possible (could not connect; 429, 502, 503), at most ``max_retries`` times (one job: at most
``max_retries + 1`` POSTs, 6 by default). Everything else after the body was sent (timeouts,
resets, 500, 504) is raised at once with ``charged_maybe=True`` and settled from what the
database knows. GETs (polls, downloads, credits) are safe to repeat and are retried on every
transient failure.

======================  ====================================================================
module                  its one job
======================  ====================================================================
``client``              :class:`SegmindClient`: the public calls, the account's credits
``v1``                  the synchronous call (one POST, the image in the answer)
``v2``                  submit, poll, fetch the output; URL derivation for a resume
``retry``               what is repeated, how often, after what pause (tenacity runs it)
``transport``           one HTTP request: body limits, spooling, the key, typed failures
``answers``             the image inside a 200 (raw, JSON URL or base64), checked whole
``errors``              HTTP status / FAILED job → typed :class:`~kontext.errors.ApiError`
``parsing``             pure parsers: headers, rate-limit waits, error texts, image bytes
``results``             request and result types
======================  ====================================================================
"""

from __future__ import annotations

from kontext.images.formats import sniff_image
from kontext.segmind.client import SegmindClient
from kontext.segmind.errors import SendFenced, error_for_status
from kontext.segmind.parsing import (
    derive_v2_urls,
    image_is_complete,
    parse_number,
    parse_reset_at,
    parse_retry_after,
    read_meta,
    retry_after_from_headers,
)
from kontext.segmind.results import (
    CallHooks,
    GenerationRequest,
    GenerationResult,
    ResponseMeta,
    SubmittedJob,
)
from kontext.segmind.retry import DEFAULT_MAX_RETRIES, RetryPolicy
from kontext.settings import ASPECT_RATIOS
from kontext.vocab import OUTPUT_FORMATS

__all__ = [
    "ASPECT_RATIOS",
    "CallHooks",
    "DEFAULT_MAX_RETRIES",
    "OUTPUT_FORMATS",
    "GenerationRequest",
    "GenerationResult",
    "ResponseMeta",
    "RetryPolicy",
    "SendFenced",
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

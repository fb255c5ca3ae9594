"""Image checks and fitting, discord-free.

* :func:`sniff_format` names a file by its magic bytes (never by its name or content type).
* :func:`inspect_image` checks one member image: size, format, dimensions read from the header
  *before* Pillow or any decoding (so a decompression bomb is refused without allocating it),
  then a real decode of the content, in bounded memory, that catches truncated or corrupt files.
  Failures raise :class:`~kontext.errors.InputError` with the right message key.
* :func:`fetch_and_check` downloads an attachment from Discord's CDN (or an explicitly allowed
  host) with a hard cap on the bytes read, takes the header decision on the first bytes, then
  inspects it off the event loop.
* :func:`validate_prompt` / :func:`validate_seed` check the text options.
* :func:`fit_to_limit` makes a result fit under Discord's upload limit (never fails on size);
  :func:`thumbnail_bytes` makes a small JPEG for embeds and the showcase.

Every Pillow call is synchronous and CPU-bound; each has an ``*_async`` twin that runs it off the
event loop. Member images (checks, thumbnails) go to a pool of :data:`CHECK_THREADS` threads, and
each first reserves its estimated decode memory in :data:`DECODE_BUDGET`, shared by the whole
process: however many members send images at once, decodes hold at most
:data:`DECODE_BUDGET_BYTES` together (one that needs more runs alone), and downloads at most
:data:`DOWNLOAD_BUDGET_BYTES`.

Pillow's process-wide guards are respected, not changed: ``Image.MAX_IMAGE_PIXELS`` (a
decompression bomb guard) caps the pixel limit used here — our limit is ``min(max_pixels,
MAX_IMAGE_PIXELS)`` and is checked on Pillow's own reading of the header before anything is
loaded, so Pillow's guard can only ever be the stricter one — and ``ImageFile.LOAD_TRUNCATED_IMAGES``
stays False so a truncated file fails to decode.

======================  ====================================================================
module                  its one job
======================  ====================================================================
``formats``             magic bytes, accepted formats, dimensions from a header
``cost``                the memory a decode takes; structure checks that need no decode
``budget``              the process-wide decode and download budgets, the thread pools
``checks``              :func:`inspect_image`: one member image, header first, then a decode
``fetch``               :func:`fetch_and_check`: downloads from the CDN allowlist
``fit``                 :func:`fit_to_limit` and thumbnails: results re-encoded to fit
``options``             :func:`validate_prompt` and :func:`validate_seed`
======================  ====================================================================
"""

from __future__ import annotations

from kontext.images.budget import (
    CHECK_THREADS,
    DECODE_BUDGET,
    DECODE_BUDGET_BYTES,
    DOWNLOAD_BUDGET,
    DOWNLOAD_BUDGET_BYTES,
    MemoryBudget,
)
from kontext.images.checks import ImageInfo, inspect_image, inspect_image_async
from kontext.images.fetch import (
    DISCORD_CDN_HOSTS,
    allow_input_host,
    fetch_and_check,
    input_hosts,
)
from kontext.images.fit import (
    FIT_THREADS,
    MIN_LIMIT_BYTES,
    FittedImage,
    fit_to_limit,
    fit_to_limit_async,
    thumbnail_bytes,
    thumbnail_bytes_async,
)
from kontext.images.formats import ACCEPTED_FORMATS, header_size, sniff_format, sniff_image
from kontext.images.options import SEED_MAX, validate_prompt, validate_seed

__all__ = [
    "ACCEPTED_FORMATS",
    "CHECK_THREADS",
    "DECODE_BUDGET",
    "DECODE_BUDGET_BYTES",
    "DISCORD_CDN_HOSTS",
    "DOWNLOAD_BUDGET",
    "DOWNLOAD_BUDGET_BYTES",
    "FIT_THREADS",
    "MIN_LIMIT_BYTES",
    "SEED_MAX",
    "FittedImage",
    "ImageInfo",
    "MemoryBudget",
    "allow_input_host",
    "fetch_and_check",
    "fit_to_limit",
    "fit_to_limit_async",
    "header_size",
    "input_hosts",
    "inspect_image",
    "inspect_image_async",
    "sniff_format",
    "sniff_image",
    "thumbnail_bytes",
    "thumbnail_bytes_async",
    "validate_prompt",
    "validate_seed",
]

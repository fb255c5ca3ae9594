"""The Segmind emulator's server: :class:`SegmindEmulator`, its routes, faults and v2 jobs.

It behaves like the documented API (see ``/work/shared/reference/segmind-api.md``): ``x-api-key``
auth, strict body validation per the model's page, real input downloads (decoded with Pillow) and
real output images (Pillow, deterministic for inputs + seed), and injectable faults.

Routes::

    POST /v1/{model}                      generate, answer the image bytes (other methods: 405 HTML)
    POST /v2/{model}                      queue a job: {request_id, status, status_url, response_url}
    GET  /v2/requests/{request_id}/status {status: QUEUED|PROCESSING|COMPLETED|FAILED[, error]}
    GET  /v2/requests/{request_id}        {status, output: <image url>, metrics}
    GET  /v1/get-user-credits             {credits, free-credits}
    GET  /_emu/files/{name}               outputs of v2 jobs and images given to host_image()

Faults (``fail_next``, ``hang_next``, ``reset_next``, ``garbage_next``, ``oversize_next``) are
queued and consumed, first in first out, by the generation POSTs (``/v1/{model}`` and
``/v2/{model}``). On v2, a status/hang/reset fault hits the submit; garbage/oversize replace the
job's output image. ``fail_v2_next`` makes the next v2 job end FAILED.

Bookkeeping: ``calls`` holds one :class:`CallRecord` per generation POST. A call is *charged*
when the emulator generated (billed) an image for it: a v1 200 (also garbage/oversize answers,
since the API answered 200), a v1 request whose connection was dropped by ``reset_next`` after
the body was read (the generation ran; the client just never saw it), and a v2 job that reached
COMPLETED. Times are ``time.monotonic()``.

The parts: ``server.py`` (the emulator, its routes and v2 jobs), ``api.py`` (the body schema,
formats and error texts), ``faults.py`` (planned faults and their bodies), ``images.py`` (the
images it makes and checks).
"""

from .api import ASPECT_RATIOS, DEFAULT_ERRORS, OUTPUT_FORMATS, SEED_MAX
from .images import noisy_image
from .server import CallRecord, SegmindEmulator

__all__ = [
    "ASPECT_RATIOS",
    "DEFAULT_ERRORS",
    "OUTPUT_FORMATS",
    "SEED_MAX",
    "CallRecord",
    "SegmindEmulator",
    "noisy_image",
]

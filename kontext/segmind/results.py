"""What goes to the API and what comes back: the request body, a finished generation, a
submitted v2 job and the informational headers of an answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kontext.spool import ResultFile
from kontext.vocab import ImageFormat


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


@dataclass(frozen=True, slots=True)
class CallHooks:
    """What one job's calls ask and tell its caller."""

    may_send: Callable[[], bool] = lambda: True
    on_rate_limited: Callable[[float | None], None] = lambda delay: None

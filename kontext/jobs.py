"""What a job is, as the core and the Discord adapter exchange it.

:class:`JobSpec` is what to make (and who asked, where), :class:`JobSink` how the pipeline talks
to the member (implemented by the Discord adapter), :class:`ResultInfo` what the sink posts,
:class:`Delivery` where it went and :class:`JobOutcome` how the job ended. No behaviour here:
the pipeline (:mod:`kontext.pipeline`) runs jobs, the launcher (:mod:`kontext.launcher`) starts
them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from kontext import images
from kontext.errors import KontextError
from kontext.segmind import GenerationRequest, GenerationResult
from kontext.store import Job
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import ImageFormat, Outcome, Source


@dataclass(frozen=True, slots=True)
class InputImage:
    """One input image as Discord gave it."""

    url: str
    filename: str = "image"
    size: int | None = None
    content_type: str | None = None
    attachment_id: int | None = None
    message_id: int | None = None  # the message that carries it, to refetch a fresh URL


@dataclass(slots=True)
class JobSpec:
    """Everything needed to run (or rerun) one generation."""

    job_id: int
    guild_id: int
    channel_id: int
    user_id: int
    prompt: str
    image_1: InputImage
    image_2: InputImage
    aspect_ratio: str = "match_input_image"
    output_format: ImageFormat = ImageFormat.JPG
    safety_tolerance: int = 1
    seed: int = 42
    locale: str | None = None
    exempt_from_cooldown: bool = False
    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    parent_job_id: int | None = None
    source: Source = Source.SLASH
    #: whose API key runs it: the owner's, or ``guild:<id>`` (a server's own key)
    account: str = OWNER_ACCOUNT

    def params(self) -> dict[str, Any]:
        """The job's parameters as stored in the database (no token)."""
        return {
            "prompt": self.prompt,
            "image_1": asdict(self.image_1),
            "image_2": asdict(self.image_2),
            "aspect_ratio": self.aspect_ratio,
            "output_format": self.output_format,
            "safety_tolerance": self.safety_tolerance,
            "seed": self.seed,
            "source": self.source,
        }

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt=self.prompt,
            image_1_url=self.image_1.url,
            image_2_url=self.image_2.url,
            aspect_ratio=self.aspect_ratio,
            output_format=self.output_format,
            safety_tolerance=self.safety_tolerance,
            seed=self.seed,
        )

    @classmethod
    def from_job(cls, job: Job) -> JobSpec:
        """Rebuild the spec of a stored job (after a restart, or for a button)."""
        p = job.params
        return cls(
            job_id=job.id,
            guild_id=job.guild_id,
            channel_id=job.channel_id,
            user_id=job.user_id,
            prompt=p["prompt"],
            image_1=InputImage(**p["image_1"]),
            image_2=InputImage(**p["image_2"]),
            aspect_ratio=p.get("aspect_ratio", "match_input_image"),
            output_format=ImageFormat(p.get("output_format", ImageFormat.JPG)),
            safety_tolerance=int(p.get("safety_tolerance", 1)),
            seed=int(p.get("seed", job.seed or 0)),
            locale=job.locale,
            application_id=job.application_id,
            interaction_token=job.interaction_token,
            parent_job_id=job.parent_job_id,
            source=Source(p.get("source", Source.SLASH)),
            account=job.account,
        )


@dataclass(slots=True)
class ResultInfo:
    """What the sink needs to post a result."""

    spec: JobSpec
    image: images.FittedImage
    generation: GenerationResult
    api_seconds: float
    total_seconds: float
    balance_after: int
    cost: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where the result was posted."""

    message_id: int
    channel_id: int


@dataclass(slots=True)
class JobOutcome:
    """How a job ended, for callers and tests."""

    job_id: int
    status: Outcome
    cause: str | None = None
    error: KontextError | None = None
    delivery: Delivery | None = None
    timings: dict[str, float] = field(default_factory=dict)


class JobSink(Protocol):
    """How the pipeline talks to the member. Implemented by the Discord adapter."""

    @property
    def upload_limit(self) -> int:
        """Largest attachment, in bytes, the result may have."""
        ...

    async def queued(self, position: int, total: int, eta_s: float) -> None:
        """The job waits at ``position`` of ``total``."""

    async def generating(self, elapsed_s: float, estimate_s: float) -> None:
        """The API is working on it."""

    async def deliver(self, result: ResultInfo) -> Delivery:
        """Post the result, sending the upload once.

        Raises :class:`~kontext.errors.ResultNotDelivered` when Discord provably did not post it
        (a refusal, or a failure before any byte of the upload was sent), and
        :class:`~kontext.errors.PostFateUnknown` when the upload began and no clear answer came
        (5xx, a dropped connection, a timeout, a cancellation): it may be in the channel.
        """
        ...

    async def failed(self, error: KontextError, *, refunded: int) -> None:
        """Tell the member the job stopped (``refunded`` credits were given back)."""

    async def find_result(self, since: float) -> Delivery | None:
        """Look for this job's result among every message of its channel created after unix
        time ``since`` (an ambiguous or interrupted post; no fixed count).

        None when it is not there; raises when the channel cannot be read (then nobody knows).
        """
        ...

"""What a job is, as the core and the Discord adapter exchange it.

:class:`JobSpec` is what to make (its :class:`~kontext.job_options.JobOptions`) and who asked,
where, :class:`JobSink` how the pipeline talks to the member (implemented by the Discord
adapter), :class:`ResultInfo` what the sink posts, :class:`Delivery` where it went and
:class:`JobOutcome` how the job ended. No behaviour here: the pipeline (:mod:`kontext.pipeline`)
runs jobs, the launcher (:mod:`kontext.launcher`) starts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from kontext import images
from kontext.errors import KontextError
from kontext.job_options import InputImage, JobOptions
from kontext.segmind import GenerationRequest, GenerationResult
from kontext.store import Job
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import ImageFormat, Outcome

__all__ = [
    "Delivery",
    "InputImage",
    "JobOptions",
    "JobOutcome",
    "JobSink",
    "JobSpec",
    "ResultInfo",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything needed to run (or rerun) one generation: what to make (``options``, every
    choice resolved) and who asked, where."""

    job_id: int
    guild_id: int
    channel_id: int
    user_id: int
    options: JobOptions
    locale: str | None = None
    exempt_from_cooldown: bool = False
    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    #: whose API key runs it: the owner's, or ``guild:<id>`` (a server's own key)
    account: str = OWNER_ACCOUNT

    def __post_init__(self) -> None:
        if not self.options.resolved:
            raise ValueError(f"job {self.job_id}: options not resolved: {self.options!r}")

    # the options a job runs with, read often: short, and typed as resolved

    @property
    def prompt(self) -> str:
        return self.options.prompt

    @property
    def image_1(self) -> InputImage:
        return self.options.image_1

    @property
    def image_2(self) -> InputImage:
        return self.options.image_2

    @property
    def aspect_ratio(self) -> str:
        return _chosen(self.options.aspect_ratio)

    @property
    def output_format(self) -> ImageFormat:
        return self.options.output_format

    @property
    def safety_tolerance(self) -> int:
        return _chosen(self.options.safety_tolerance)

    @property
    def seed(self) -> int:
        return _chosen(self.options.seed)

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
        return cls(
            job_id=job.id,
            guild_id=job.guild_id,
            channel_id=job.channel_id,
            user_id=job.user_id,
            options=JobOptions.from_params(
                job.params, seed=job.seed, parent_job_id=job.parent_job_id
            ),
            locale=job.locale,
            application_id=job.application_id,
            interaction_token=job.interaction_token,
            account=job.account,
        )


def _chosen(value: T | None) -> T:
    """A resolved option (:class:`JobSpec` checks every one is on creation)."""
    if value is None:
        raise ValueError("option not resolved")
    return value


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

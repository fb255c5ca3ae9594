"""What a job makes: :class:`JobOptions`, one frozen value from the Discord adapter to the
database.

The adapter reads a member's request into it (``None`` where the member chose nothing), the
launcher fills in the server's defaults with :func:`dataclasses.replace`, the pipeline carries
it in its :class:`~kontext.jobs.JobSpec`, and the ledger stores it as the job's ``params`` JSON
(:meth:`JobOptions.params`, read back by :meth:`JobOptions.from_params`). Who asked and where
(member, channel, interaction) is not part of it. Imports nothing of kontext but its vocabularies,
so the store can carry it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kontext.vocab import ImageFormat, Source

#: what a stored job without the key was made with (rows written before the key existed)
STORED_ASPECT_RATIO = "match_input_image"
STORED_SAFETY_TOLERANCE = 1


@dataclass(frozen=True, slots=True)
class InputImage:
    """One input image as Discord gave it."""

    url: str
    filename: str = "image"
    size: int | None = None
    content_type: str | None = None
    attachment_id: int | None = None
    message_id: int | None = None  # the message that carries it, to refetch a fresh URL


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What to make: the prompt, the two inputs and the generation's settings.

    ``None`` in ``aspect_ratio``, ``safety_tolerance`` or ``seed`` means "not chosen": the
    launcher resolves it (the server's default, or a random seed) before the job starts, so a
    job's options are always :attr:`resolved`.
    """

    prompt: str
    image_1: InputImage
    image_2: InputImage
    aspect_ratio: str | None = None
    output_format: ImageFormat = ImageFormat.JPG
    safety_tolerance: int | None = None
    seed: int | None = None
    source: Source = Source.SLASH
    #: the job this one was made from (a result's button); stored in its own column
    parent_job_id: int | None = None

    @property
    def resolved(self) -> bool:
        """Every choice made (what a job runs with)."""
        return None not in (self.aspect_ratio, self.safety_tolerance, self.seed)

    def params(self) -> dict[str, Any]:
        """The options as the job's ``params`` JSON stores them (``parent_job_id`` and the seed
        have columns of their own too; the seed is in both)."""
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

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        *,
        seed: int | None = None,
        parent_job_id: int | None = None,
    ) -> JobOptions:
        """The options of a stored job: its ``params`` JSON, with its ``seed`` and
        ``parent_job_id`` columns. Keys missing from older rows take what those jobs ran with."""
        return cls(
            prompt=params["prompt"],
            image_1=InputImage(**params["image_1"]),
            image_2=InputImage(**params["image_2"]),
            aspect_ratio=params.get("aspect_ratio", STORED_ASPECT_RATIO),
            output_format=ImageFormat(params.get("output_format", ImageFormat.JPG)),
            safety_tolerance=int(params.get("safety_tolerance", STORED_SAFETY_TOLERANCE)),
            seed=int(params.get("seed", seed or 0)),
            source=Source(params.get("source", Source.SLASH)),
            parent_job_id=parent_job_id,
        )

"""Starting a job, whichever way a member asked: ``/kontext``, a result's button (reroll, swap,
edit prompt, use as input), the message context menu or its modal.

The Discord adapter reads what it needs from the interaction into a :class:`JobRequest` and
asks the :class:`JobLauncher`; the launcher applies the server's rules (enabled, channel,
safety, blocked words, cooldown exemption), fills in the defaults, and hands the job to the
pipeline. Discord-free: the adapter keeps only acknowledging, the quote's buttons and the sink.

    prepared = await launcher.prepare(request)          # KontextError: refused, nothing charged
    if prepared.confirm_cost is not None:               # the server wants a quote confirmed
        quote = await launcher.quote(prepared.spec, prepared.confirm_cost)
    outcome = await launcher.run(prepared.spec, sink)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kontext import images, policy
from kontext.errors import InputError
from kontext.jobs import JobOptions, JobOutcome, JobSink, JobSpec
from kontext.pipeline import JobPipeline
from kontext.queue import SharedQueue
from kontext.store import Store

#: the safety tolerance when a member picks none (or the server's maximum, when lower)
DEFAULT_SAFETY = 1


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One member's request for a new job, as the Discord adapter read it.

    ``job_id`` is the interaction's id (a second delivery of it is never charged twice);
    ``options`` is what to make, ``None`` where the member chose nothing: the server's default
    (aspect ratio, safety) or a random seed.
    """

    job_id: int
    guild_id: int | None
    channel_id: int
    user_id: int
    locale: str
    options: JobOptions
    #: a thread's parent channel (the channel rules apply to either)
    parent_channel_id: int | None = None
    channel_nsfw: bool = False
    role_ids: tuple[int, ...] = ()
    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)

    @property
    def channel_ids(self) -> list[int]:
        ids = [self.channel_id]
        if self.parent_channel_id:
            ids.append(self.parent_channel_id)
        return ids


@dataclass(frozen=True, slots=True)
class PreparedJob:
    """A request the server's rules accept, ready to run."""

    spec: JobSpec
    #: the price to confirm first (the server's ``confirm_quote``); None: run at once
    confirm_cost: int | None


@dataclass(frozen=True, slots=True)
class Quote:
    """What a member confirms before a job: cost, balance before and after, the expected wait."""

    cost: int
    balance: int
    after: int
    eta_s: float
    waiting: int


class JobLauncher:
    """The one way every job starts (see the module)."""

    def __init__(self, store: Store, pipeline: JobPipeline, queue: SharedQueue) -> None:
        self.store = store
        self.pipeline = pipeline
        self.queue = queue

    async def check_channel(self, guild_id: int | None, channel_ids: Sequence[int]) -> None:
        """Raise when jobs may not start in this channel (for flows that ask for a prompt
        first: the member learns it before typing one). :meth:`prepare` checks it again."""
        if guild_id is None:
            raise InputError("not in a guild", key="input.guild_only")
        gs = await self.store.settings.get(guild_id)
        policy.check_channel(gs, channel_ids)

    async def prepare(self, request: JobRequest) -> PreparedJob:
        """Apply the server's rules and defaults; raises a KontextError when refused."""
        if request.guild_id is None:
            raise InputError("not in a guild", key="input.guild_only")
        await self.pipeline.ensure_accepting_for(request.guild_id)
        gs = await self.store.settings.get(request.guild_id)
        chosen = request.options
        prompt = images.validate_prompt(chosen.prompt)
        safety = chosen.safety_tolerance
        if safety is None:
            safety = min(DEFAULT_SAFETY, gs.max_safety_tolerance)
        policy.check_request(
            gs,
            prompt=prompt,
            safety_tolerance=safety,
            channel_ids=request.channel_ids,
            channel_nsfw=request.channel_nsfw,
        )
        spec = JobSpec(
            job_id=request.job_id,
            guild_id=request.guild_id,
            channel_id=request.channel_id,
            user_id=request.user_id,
            options=replace(
                chosen,
                prompt=prompt,
                aspect_ratio=chosen.aspect_ratio or gs.default_aspect_ratio,
                safety_tolerance=safety,
                seed=images.validate_seed(chosen.seed),
            ),
            locale=request.locale,
            exempt_from_cooldown=policy.is_exempt(gs, request.role_ids),
            application_id=request.application_id,
            interaction_token=request.interaction_token,
        )
        return PreparedJob(spec, gs.credits_per_image if gs.confirm_quote else None)

    async def quote(self, spec: JobSpec, cost: int) -> Quote:
        """The member's balance before and after, and the wait at the queue's current length."""
        status = await self.store.credits.member_status(spec.guild_id, spec.user_id)
        waiting = self.queue.estimates.waiting_count
        eta = self.queue.estimates.estimate_duration() * (1 + waiting // max(1, self.queue.max_concurrent))
        return Quote(
            cost=cost, balance=status.balance, after=status.balance - cost, eta_s=eta, waiting=waiting
        )

    async def run(self, spec: JobSpec, sink: JobSink) -> JobOutcome:
        """Run the job to its end (:meth:`kontext.pipeline.JobPipeline.run`)."""
        return await self.pipeline.run(spec, sink)

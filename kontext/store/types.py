"""The value types the store's areas take and return (the common ones re-exported by
:mod:`kontext.store`), and the small time and money conversions they share."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from kontext.job_options import JobOptions

MICROS_PER_USD = 1_000_000
#: a day, in seconds
DAY = 86_400.0
#: the API account of the bot's owner (a server's own key is ``"guild:<id>"``)
OWNER_ACCOUNT = "owner"


def usd_to_micros(usd: float) -> int:
    """Whole micro-dollars for ``usd`` (0.10 → 100000)."""
    return int(round(usd * MICROS_PER_USD))


def utc_day(ts: float) -> str:
    """The UTC day of epoch seconds ``ts`` as ``YYYY-MM-DD``."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def until_midnight_utc(ts: float) -> tuple[int, int]:
    """``(hours, minutes)`` from ``ts`` to the next 00:00 UTC (rounded up to a minute)."""
    left = int(day_start(ts) + DAY - ts + 59) // 60
    return left // 60, left % 60


def day_start(ts: float) -> float:
    """Epoch seconds of 00:00 UTC of the day containing ``ts``."""
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    return d.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


@dataclass(frozen=True, slots=True)
class GuildSettings:
    """One server's settings, with the process defaults filled in where the server has none."""

    guild_id: int
    starting_credits: int
    credits_per_image: int
    daily_free_credits: int
    cooldown_seconds: int
    jobs_per_member: int
    max_safety_tolerance: int
    default_aspect_ratio: str
    showcase_channel_id: int | None = None
    showcase_requires_approval: bool = False
    allowed_channel_ids: tuple[int, ...] = ()
    exempt_role_ids: tuple[int, ...] = ()
    blocked_words: tuple[str, ...] = ()
    confirm_quote: bool = False
    #: the keys this server set itself (the others are process defaults)
    overridden: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """What :meth:`kontext.store.ledger.Ledger.reserve` needs to create a job and charge for it."""

    job_id: int
    guild_id: int
    channel_id: int
    user_id: int
    #: what to make: stored as the job's ``params`` JSON, its seed and parent columns
    options: JobOptions
    locale: str | None = None
    application_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    exempt_from_cooldown: bool = False
    worker_id: str | None = None
    #: claim it at once for this worker when nothing else waits: ``(worker_id, every account's
    #: limits, lease seconds)`` (see :meth:`kontext.store.ledger.Ledger.reserve`)
    claim_for: Any = None
    #: whose API key runs it: ``"owner"`` (the owner's budgets apply) or ``"guild:<id>"``
    account: str = OWNER_ACCOUNT

    @property
    def params(self) -> dict[str, Any]:
        """The job's ``params`` JSON (:meth:`kontext.job_options.JobOptions.params`)."""
        return self.options.params()

    @property
    def seed(self) -> int | None:
        return self.options.seed

    @property
    def parent_job_id(self) -> int | None:
        return self.options.parent_job_id


@dataclass(frozen=True, slots=True)
class Reservation:
    """A successful reservation: the job exists and ``cost`` credits are held."""

    job_id: int
    cost: int
    balance_after: int
    cooldown_until: float | None
    #: the job claimed in the same transaction (an empty queue with room): a :class:`Claim`,
    #: or None when it waits for a dispatcher
    claim: Claim | None = None


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """A member's credits as ``/credits`` shows them."""

    balance: int
    cooldown_remaining: float
    inflight: int
    exists: bool
    #: free credits the member gets at the next job today (daily top-up not yet claimed)
    daily_pending: int


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row."""

    id: int
    delta: int
    kind: str
    reason: str | None
    job_id: int | None
    actor_id: int | None
    balance_after: int
    created_at: float


@dataclass(frozen=True, slots=True)
class Job:
    """One job row, ``params`` decoded. ``interaction_token`` is kept out of ``repr``."""

    id: int
    guild_id: int
    channel_id: int
    user_id: int
    state: str
    params: dict[str, Any]
    seed: int | None
    cost_credits: int
    cost_usd_micros: int
    cooldown_until: float | None
    locale: str | None
    application_id: int | None
    interaction_token: str | None = field(repr=False)
    worker_id: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_s: float | None
    api_request_id: str | None
    api_status_url: str | None
    api_response_url: str | None
    api_charged: bool
    result_message_id: int | None
    result_channel_id: int | None
    failure_cause: str | None
    parent_job_id: int | None
    queued_at: float | None = None
    lease_owner: str | None = None
    lease_epoch: int = 0
    lease_expires_at: float | None = None
    api_done_at: float | None = None
    account: str = OWNER_ACCOUNT
    sent_at: float | None = None
    posting_at: float | None = None
    settle_tries: int = 0


@dataclass(frozen=True, slots=True)
class StatsWindow:
    """Activity of one server over a time window."""

    generations: int
    credits_spent: int
    usd_spent: float
    failures_by_cause: dict[str, int]
    top_members: list[tuple[int, int]]
    refunds: int


@dataclass(frozen=True, slots=True)
class GuildStats:
    """``/kontext-admin stats``."""

    today: StatsWindow
    last_30_days: StatsWindow


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Today's spend against the owner's daily cap (all servers)."""

    day: str
    reserved_usd: float
    cap_usd: float
    generations: int


# --- the shared queue (kontext.store.queue, kontext.store.leases) -------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """A process's hold on one job: every change it makes names it."""

    job_id: int
    owner: str
    epoch: int

    def params(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "owner": self.owner, "epoch": self.epoch}


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """One API account's limits (the owner's from the settings)."""

    account: str
    max_concurrent: int
    rpm: int


@dataclass(slots=True)
class Claim:
    """What :meth:`kontext.store.queue.QueueStore.claim_next` found: a job, or why none (and
    for how long)."""

    job: Job | None = None
    lease: Lease | None = None
    #: nothing waits
    empty: bool = False
    #: the account is paused (it needs its owner)
    paused: bool = False
    #: seconds until a start may be allowed (RPM window, 429 hold); 0 when at the slot limit
    wait_s: float = 0.0
    #: waiting jobs of servers the bot no longer serves (blocked by the owner, or not in
    #: ``ALLOWED_GUILD_IDS``): never claimed; the caller refunds them
    refused: list[int] = field(default_factory=list)
    #: with ``done``: whether that job's row moved ``sent → posting`` in the same transaction
    done_posting: bool = False


@dataclass(slots=True)
class QueueView:
    """The whole bot's queue as the members see it (positions, ETAs)."""

    now: float  # the database's clock when read
    waiting: list[int] = field(default_factory=list)  # job ids in the order they will start
    running_started: list[float] = field(default_factory=list)  # generations in progress
    waiting_members: dict[tuple[int, int], int] = field(default_factory=dict)
    blocked_until: float = 0.0
    paused: bool = False
    recent_starts: list[float] = field(default_factory=list)  # starts in the RPM window, oldest first

    def position(self, job_id: int) -> tuple[int, int]:
        """``(position, waiting)``: 1-based place among the waiting jobs; 0 once it left."""
        try:
            return self.waiting.index(job_id) + 1, len(self.waiting)
        except ValueError:
            return 0, len(self.waiting)


# --- the owner's controls (kontext.store.owner) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuildControl:
    """The owner's controls of one server (defaults when never set)."""

    guild_id: int
    blocked: bool = False
    daily_budget_usd: float | None = None  # None: GUILD_DAILY_BUDGET_USD
    name: str | None = None


@dataclass(frozen=True, slots=True)
class GuildSpend:
    """One server in the owner's listing."""

    guild_id: int
    name: str | None
    blocked: bool
    budget_usd: float  # its cap today (0 = none)
    spent_today_usd: float
    spent_30d_usd: float
    images_30d: int
    members: int


# --- showcase posts (kontext.store.showcase) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShowcasePost:
    """One row of ``showcase_posts``."""

    job_id: int
    guild_id: int
    state: str
    requested_by: int
    decided_by: int | None
    showcase_channel_id: int | None
    showcase_message_id: int | None
    approval_message_id: int | None
    created_at: float
    updated_at: float

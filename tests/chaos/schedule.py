"""The fault schedule of one chaos run: a pure function of the seed (and the run's size).

``plan(seed, backend, jobs)`` draws everything from one ``random.Random(seed)``: how many bot
processes, the API mode, the jobs (when, which member, which channel, which process receives the
interaction) and the faults (when, which, their parameters). Replaying a seed replays the same
schedule; what the processes make of it still depends on timing, as in any fault injection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

#: fault kind -> weight (how often it is drawn among the faults of a run)
FAULT_WEIGHTS: dict[str, int] = {
    "kill9": 3,  # SIGKILL a process, restart it after a pause
    "sigterm": 3,  # SIGTERM a process (it drains within its grace), restart it
    "clock": 1,  # restart a process with its clock moved (libfaketime)
    "db_outage": 2,  # the database is unreachable (Postgres) / locked (SQLite) > one lease
    "db_drop": 1,  # every database connection killed (Postgres)
    "discord_5xx": 3,  # Discord answers 5xx *after* creating the result message
    "discord_drop": 2,  # the result upload is carried out, then its connection drops
    "gateway_drop": 1,  # every gateway connection dropped (the bots resume)
    "history_removed": 2,  # the bots lose Read Message History in a channel
    "delete_result": 2,  # a moderator deletes a posted result
    "segmind_429": 2,  # rate limited (not billed)
    "segmind_5xx": 2,  # 500/502/503/504 (not billed by the emulator: the fate is unknown)
    "segmind_timeout": 1,  # the API never answers (the bot's own timeout fires)
    "segmind_reset": 2,  # billed, then the connection drops
}
POSTGRES_ONLY = {"db_drop"}


@dataclass(frozen=True)
class Job:
    at: float  # seconds after the run starts
    index: int
    member: int  # index into the run's members
    channel: int  # index into the run's channels
    bot: int  # which process receives the interaction (another one if it is down)

    @property
    def tag(self) -> str:
        return f"chaos-job-{self.index}"


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in sorted(self.args.items()))
        return f"{self.at:7.2f}s  {self.kind:<16} {args}".rstrip()


@dataclass(frozen=True)
class Plan:
    seed: int
    backend: str
    mode: str  # SEGMIND_API_MODE
    bots: int
    members: int
    channels: int
    lease_s: float
    latency_s: float
    duration_s: float
    jobs: tuple[Job, ...]
    faults: tuple[Fault, ...]

    def describe(self) -> str:
        head = (
            f"seed={self.seed} backend={self.backend} mode={self.mode} bots={self.bots} "
            f"jobs={len(self.jobs)} members={self.members} channels={self.channels} "
            f"lease={self.lease_s:g}s latency={self.latency_s:g}s duration={self.duration_s:g}s"
        )
        lines = [head, f"faults ({len(self.faults)}):"]
        lines += ["  " + f.describe() for f in self.faults]
        lines.append("jobs: " + " ".join(
            f"{j.index}@{j.at:.1f}s/m{j.member}/c{j.channel}/b{j.bot}" for j in self.jobs
        ))
        return "\n".join(lines)


def plan(seed: int, backend: str, jobs: int = 20, *, lease_s: float = 3.0) -> Plan:
    """The schedule of run ``seed`` on ``backend`` (``postgres`` or ``sqlite``) with ``jobs`` jobs."""
    rng = random.Random(f"{seed}:{backend}:{jobs}")
    bots = rng.choice((2, 3)) if backend == "postgres" else 2
    mode = rng.choice(("sync", "async"))
    members = max(3, jobs // 2)
    channels = 3
    latency = round(rng.uniform(0.3, 1.2), 2)
    duration = max(10.0, jobs * 0.6)
    job_list = tuple(
        Job(
            at=round(rng.uniform(0.0, duration), 2),
            index=i,
            member=rng.randrange(members),
            channel=rng.randrange(channels),
            bot=rng.randrange(bots),
        )
        for i in range(jobs)
    )
    kinds = [k for k in FAULT_WEIGHTS if backend == "postgres" or k not in POSTGRES_ONLY]
    weights = [FAULT_WEIGHTS[k] for k in kinds]
    count = max(4, jobs // 3)
    faults = [
        _fault(rng, rng.choices(kinds, weights)[0], round(rng.uniform(0.5, duration), 2),
               bots=bots, channels=channels, lease_s=lease_s)
        for _ in range(count)
    ]
    return Plan(
        seed=seed, backend=backend, mode=mode, bots=bots, members=members, channels=channels,
        lease_s=lease_s, latency_s=latency, duration_s=duration,
        jobs=tuple(sorted(job_list, key=lambda j: (j.at, j.index))),
        faults=tuple(sorted(faults, key=lambda f: (f.at, f.kind))),
    )


def _fault(
    rng: random.Random, kind: str, at: float, *, bots: int, channels: int, lease_s: float
) -> Fault:
    args: dict[str, Any] = {}
    if kind in ("kill9", "sigterm"):
        args = {"bot": rng.randrange(bots), "restart_after": round(rng.uniform(0.2, 3.0), 2)}
    elif kind == "clock":
        skew = rng.choice((-1, 1)) * rng.randrange(30, 600)
        args = {"bot": rng.randrange(bots), "skew_s": skew, "kill": rng.random() < 0.5}
    elif kind == "db_outage":
        args = {"seconds": round(lease_s * rng.uniform(1.5, 3.0), 2)}
    elif kind == "discord_drop":
        args = {"route": rng.choice(("followup", "channel"))}
    elif kind == "discord_5xx":
        args = {
            "status": rng.choice((500, 502, 503, 504)),
            "route": rng.choice(("followup", "channel")),
        }
    elif kind == "history_removed":
        # None: removed until the end of the run (the bound must hold all the same)
        args = {
            "channel": rng.randrange(channels),
            "seconds": rng.choice((None, round(lease_s * rng.uniform(2.0, 6.0), 2))),
        }
    elif kind == "delete_result":
        args = {"channel": rng.randrange(channels)}
    elif kind == "segmind_429":
        args = {"times": rng.randint(1, 3)}
    elif kind == "segmind_5xx":
        args = {"status": rng.choice((500, 502, 503, 504)), "times": rng.randint(1, 2)}
    return Fault(at=at, kind=kind, args=args)

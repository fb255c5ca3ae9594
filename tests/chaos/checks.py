"""What must hold after a chaos run, checked in SQL and against the emulators' own records.

* every job is finished (no state outside ``posted``/``refunded``/``failed``) within the bound;
* charged ⇔ posted: a committed job has exactly one result message in the channels, or the
  schedule deleted it; a refunded (or failed) job has none;
* posted at most once;
* the budget counts every billed call, and over-counts only calls whose answer left it unknown
  (a 5xx, a dropped connection, no answer): per job, from the calls Segmind received and billed;
* nothing held: no member's job slot (``members.inflight``), no credit (balance = starting
  credits − committed costs), no lease;
* ``store.audit.check_invariants(posts=...)`` finds nothing.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

from sqlalchemy import select

from kontext.schema import jobs, members
from kontext.store.types import OWNER_ACCOUNT
from kontext.vocab import JobState
from tests.chaos.runner import FINISHED, STARTING_CREDITS, open_store

if TYPE_CHECKING:
    from emulators.segmind.server import CallRecord
    from tests.chaos.runner import Run

TAG = re.compile(r"chaos-job-(\d+)\b")
UNKNOWN_STATUSES = {500, 502, 503, 504}


def unknown_answer(call: CallRecord) -> bool:
    """The caller could not tell whether this call was billed."""
    return call.status is None or call.status in UNKNOWN_STATUSES or call.fault in ("hang", "reset")


async def check_run(run: Run) -> list[str]:
    out: list[str] = []
    job_of_index = {index: rec.id for index, rec in run.recs.items()}
    label = {rec.id: f"#{index}" for index, rec in run.recs.items()}

    def name(job_id: int) -> str:
        """``job <id> (#<index in the schedule>)``."""
        return f"job {job_id} ({label.get(job_id, '?')})"

    async with open_store(run.url) as store:
        async with store.db.read() as conn:
            rows = {int(r.id): r for r in await conn.execute(select(jobs))}
            member_rows = (await conn.execute(select(members))).all()
        posts = run.posted()
        seen = posts + run.deleted
        out += [f"audit: {p}" for p in await store.audit.check_invariants(posts=seen)]

    # every job finished within the bound
    for job_id, row in sorted(rows.items()):
        if row.state not in FINISHED:
            out.append(
                f"{name(job_id)}: still {row.state} after the bound (lease {row.lease_owner}, "
                f"epoch {row.lease_epoch}, api_charged {row.api_charged})"
            )

    # charged <=> posted, posted at most once
    for job_id, row in sorted(rows.items()):
        n, gone = posts[job_id], run.deleted[job_id]
        if row.state == JobState.POSTED and n + gone != 1:
            out.append(f"{name(job_id)}: committed with {n} result message(s) ({gone} deleted)")
        elif row.state in (JobState.REFUNDED, JobState.FAILED) and n + gone:
            out.append(f"{name(job_id)}: {row.state} but {n + gone} result message(s) were posted")
        elif n + gone > 1:
            out.append(f"{name(job_id)}: posted {n + gone} times")
    for job_id in (posts + run.deleted).keys() - rows.keys():
        out.append(f"{name(job_id)}: a result message without a job row")

    # the budget against the calls Segmind received and billed
    billed: Counter[int] = Counter()
    unknown: Counter[int] = Counter()
    reached: Counter[int] = Counter()
    for call in run.semu.calls:
        tag = TAG.search(str((call.payload or {}).get("prompt") or ""))
        found = job_of_index.get(int(tag.group(1))) if tag else None
        if found is None:
            if call.charged:
                out.append(f"a billed call of no known job: {call.path} {call.payload!r:.80}")
            continue
        job_id = found
        reached[job_id] += 1
        billed[job_id] += call.charged
        unknown[job_id] += unknown_answer(call)
    for job_id, row in sorted(rows.items()):
        if row.account != OWNER_ACCOUNT:
            continue
        counted = row.state == JobState.POSTED or bool(row.api_charged)
        if billed[job_id] > 1:
            out.append(f"{name(job_id)}: billed {billed[job_id]} times by Segmind, counted once")
        if billed[job_id] and not counted:
            out.append(f"{name(job_id)}: billed by Segmind but its budget share was given back "
                       f"({row.state})")
        # a process stopped (killed, or restarting) while it held the job: the answers it had
        # died with it, so the row keeps the call counted (the over-count the README states)
        stopped_holding = row.failure_cause == "shutdown"
        if counted and not billed[job_id] and not unknown[job_id] and not stopped_holding:
            out.append(f"{name(job_id)}: budget counts a call that was not billed, and every answer "
                       f"was known ({reached[job_id]} call(s) reached the API; {row.state})")
    for job_id in billed.keys() - rows.keys():
        out.append(f"{name(job_id)}: billed by Segmind but no job row")

    # nothing held
    spent: defaultdict[tuple[int, int], int] = defaultdict(int)
    for row in rows.values():
        if row.state == JobState.POSTED:
            spent[(int(row.guild_id), int(row.user_id))] += int(row.cost_credits)
    for member in member_rows:
        who = f"member {member.user_id}"
        if member.inflight:
            out.append(f"{who}: {member.inflight} job slot(s) held")
        expected = STARTING_CREDITS - spent[(int(member.guild_id), int(member.user_id))]
        if member.balance != expected:
            out.append(f"{who}: balance {member.balance}, committed jobs say {expected}")
    return out

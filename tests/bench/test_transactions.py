"""The transactions section's arithmetic: windows of counters, the idle rate taken off per job."""

from __future__ import annotations

import pytest

from bench.transactions import Snapshot, idle_rates, per_job


def snap(at: float, commits: int, jobs_upd: int, rollbacks: int = 0) -> Snapshot:
    return Snapshot(at, {"xact_commit": commits, "xact_rollback": rollbacks},
                    {"jobs": {"n_tup_ins": 0, "n_tup_upd": jobs_upd, "n_tup_del": 0},
                     "workers": {"n_tup_ins": 1, "n_tup_upd": 0, "n_tup_del": 0}})


def test_per_job_takes_the_idle_rate_off_the_jobs_window() -> None:
    # idle 2 commits/s over 10 s, then 10 jobs of 9 commits and 6 updates each in 5 s, idle again
    marks = [snap(0.0, 100, 7), snap(10.0, 120, 7), snap(15.0, 120 + 90 + 10, 67), snap(25.0, 240, 67)]
    idle = [marks[1].minus(marks[0]), marks[3].minus(marks[2])]
    jobs = marks[2].minus(marks[1])
    assert jobs.seconds == 5.0 and jobs.tables == {"jobs": {"n_tup_ins": 0, "n_tup_upd": 60, "n_tup_del": 0}}
    assert idle[0].tables == {}  # tables that did not change are left out
    assert idle_rates(idle)["xact_commit"] == pytest.approx(2.0)
    got = per_job(jobs, idle, 10)
    assert got["xact_commit"] == pytest.approx(9.0)
    assert got["jobs.n_tup_upd"] == pytest.approx(6.0)
    assert got["rows_updated"] == pytest.approx(6.0) and got["rows_inserted"] == 0.0

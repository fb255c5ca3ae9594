"""A short randomized fault-injection run, part of the test suite: a few seeds, about twenty
jobs each, on Postgres (2–3 processes) and SQLite (2 processes). ``make chaos SEEDS=N`` runs
many more (``python -m tests.chaos``). A failing seed prints its schedule; replay it with
``python -m tests.chaos --seed S --backend B --jobs J``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.runner import run_plan
from tests.chaos.schedule import plan
from tests.dbutil import backend_url

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

JOBS = 16
BOUND_S = 45.0


@pytest.mark.parametrize(
    ("backend", "seed"), [("postgres", 1), ("postgres", 2), ("sqlite", 1)],
)
async def test_every_job_ends_and_ends_right_under_faults(
    backend: str, seed: int, tmp_path: Path
) -> None:
    the_plan = plan(seed, backend, JOBS)
    async with backend_url(backend, tmp_path) as url:
        result = await run_plan(the_plan, url, tmp_path, bound_s=BOUND_S)
    print(result.report())
    assert result.ok, (
        f"{len(result.violations)} violation(s); replay with: python -m tests.chaos "
        f"--seed {seed} --backend {backend} --jobs {JOBS}\n{result.report()}"
    )

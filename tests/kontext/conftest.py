"""Fixtures of the storage tests: a store on each backend, a controllable clock, fresh databases.

``store`` is parametrized over SQLite (a file in the test's temp dir) and Postgres (a fresh
schema per test in ``KONTEXT_TEST_POSTGRES_URL``; skipped when no server answers, failed instead
when ``KONTEXT_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from kontext.store import Store
from tests.dbutil import BACKENDS, FakeClock, make_settings, open_test_store, temp_database

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture
def clock() -> FakeClock:
    """The injected clock, at 2025-03-01 12:00 UTC."""
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``"sqlite"`` or ``"postgres"``."""
    return str(request.param)


@pytest.fixture
async def store_factory(
    backend: str, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[StoreFactory]:
    """``await store_factory(**settings_overrides)`` opens a store on a fresh database."""
    async with AsyncExitStack() as stack:

        async def factory(**overrides: Any) -> Store:
            return await stack.enter_async_context(
                open_test_store(backend, make_settings(**overrides), clock=clock, tmp_dir=tmp_path)
            )

        yield factory


@pytest.fixture
async def store(store_factory: StoreFactory) -> Store:
    """A store with the default test settings on a fresh database."""
    return await store_factory()


@pytest.fixture
async def fresh_db(backend: str, tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``(url, engine_kwargs)`` of a fresh, empty database (no migrations run yet)."""
    async with temp_database(backend, tmp_path) as db:
        yield db
